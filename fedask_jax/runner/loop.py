"""The round loop: `train` runs (or resumes) a prepared experiment and writes its run directory
(`fedask_jax.runner.rundir`); `evaluate_run` evaluates a run's latest checkpoint.

Resumption. Every random draw of round t derives from `fold_in(run_key, t)` (client sampling, batches, DP
noise, the sketch), with run_key = `jax.random.key(seed)`; the adapters are initialised from
`fold_in(run_key, ADAPTER_INIT_STREAM)`. The checkpoint holds all the state the next round reads, so a run
stopped after checkpoint c and restarted recomputes rounds c+1, ... exactly as an uninterrupted run does
(bit-identical on the same machine and software); metrics lines after round c are dropped and rewritten.
This holds for a run killed at any moment (tests/test_faults.py kills one inside a round and inside a
checkpoint write): a checkpoint becomes visible only when complete (orbax's atomic rename), metrics lines are
appended whole and a torn last line is dropped on resume, config.yaml is renamed into place. A damaged latest
checkpoint (one that fails to restore or to match the SHA-256 saved with it) is skipped with a warning and the
run resumes from the previous one, to the same result; with none readable `train` raises a ValueError
(`fedask_jax.checkpoint.state`). Keep at least 2 checkpoints (`checkpoint.keep`) to have one to fall back to.

Faults in a round. A sampled client whose update has a NaN or Inf is left out of that round's aggregate, the
other clients' weights renormalised; a round with no valid client leaves the state unchanged
(`fedask_jax.simulation`, module docstring). Both show in the metrics line (`client_valid`, `invalid_clients`,
`skipped`) and as a warning line on stderr, printed even with progress off. Training examples with a non-finite
loss or gradient are counted per client in every metrics line (`nonfinite_examples`; under DP the clipping
zeroes their gradients, so their clients stay valid) and warned about once, naming the round and the clients.

Diagnostics. `privacy.release_diagnostics: false` withholds the statistics of the raw training data
(`report.DIAGNOSTICS`: the train and client losses, the clipped fraction, the non-finite counts) from the
metrics lines and the progress bar, and with them the non-finite warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

from fedask_jax import simulation
from fedask_jax.adapters import Adapters
from fedask_jax.checkpoint.peft import export_peft
from fedask_jax.checkpoint.state import StateCheckpoints
from fedask_jax.config import Config, ConfigError, from_dict, read_yaml
from fedask_jax.evaluation import EvalResult, evaluate
from fedask_jax.lora import from_adapters, to_adapters
from fedask_jax.runner import processes
from fedask_jax.runner.plan import Experiment, make_strategy, prepare, run_key, sample_rate
from fedask_jax.runner.report import DIAGNOSTICS, summarize, write_plots
from fedask_jax.runner.rundir import (
  ADAPTER_DIR,
  CHECKPOINT_DIR,
  CONFIG_FILE,
  METRICS_FILE,
  SUMMARY_FILE,
  MetricsLog,
  stored_config,
  to_json,
)
from fedask_jax.simulation import ServerState


def _set_adapters(model: nnx.Module, adapters: Adapters) -> None:
  nnx.update(model, from_adapters(nnx.state(model, nnx.LoRAParam), adapters))


def _evaluate(experiment: Experiment, adapters: Adapters) -> EvalResult:
  """The held-out loss with `adapters`, sharded over the round's mesh when it has one (with several processes
  every process calls it: `fedask_jax.runner.processes`, "Evaluation")."""
  _set_adapters(experiment.model, adapters)
  mesh = experiment.round_fn.mesh if experiment.round_fn is not None else None
  return evaluate(
    experiment.model,
    experiment.eval_data,
    batch_size=experiment.config.eval.batch_size,
    mesh=mesh,
    capacity=experiment.head_capacity["eval"],
  )


def _eval_fields(result: EvalResult) -> dict[str, Any]:
  return {"eval_loss": result.eval_loss, "perplexity": result.perplexity}


def _epsilon(experiment: Experiment, round_index: int) -> float | None:
  return None if experiment.privacy is None else experiment.privacy.epsilon(round_index)


def _checkpoint_state(server: ServerState, key: jax.Array, round_index: int) -> dict[str, Any]:
  return {"server": server, "run_key": key, "round": np.asarray(round_index, np.int32)}


def _ledger(experiment: Experiment, round_index: int, epsilon: float | None) -> dict[str, Any]:
  plan = experiment.privacy
  ledger: dict[str, Any] = {"round": round_index, "private": plan is not None}
  if plan is not None:
    # Not the N per-client rates: they follow from the data, and the ledger stays small at any N.
    ledger.update({k: v for k, v in dataclasses.asdict(plan).items() if k != "sample_rates"}, epsilon=epsilon)
  return ledger


def round_sampler(config: Config, capacity: int):
  """The runner's draw of a round's clients and batches, `fedask_jax.simulation.round_sampler` with the config's
  sizes: (round_key, client data) -> (client ids [K], weights [K], batches [K, S, capacity, L]), jitted; Poisson
  batches with DP, uniform without. With DP and privacy.client_sizes "private" neither the Poisson rate nor the
  weights depend on the clients' sizes (every client samples at privacy.sample_rate, the sampled clients weigh
  the same); otherwise client k samples at batch_size / n_k and weighs n_k. Experiments that drive
  `FederatedRound` themselves use it to draw exactly what `train` draws."""
  return simulation.round_sampler(
    config.num_clients,
    config.clients_per_round,
    local_steps=config.local_steps,
    batch_size=config.batch_size,
    capacity=capacity,
    sampling="poisson" if config.privacy.enabled else "uniform",
    sample_rate=sample_rate(config),
  )


class Interrupted(Exception):
  """`train` stopped by a signal (SIGINT or SIGTERM: `fedask_jax.runner.processes`, "Stops") after round
  `round_index` of `rounds`, which is checkpointed at `checkpoint`; the same command resumes the run."""

  def __init__(self, signum: int, round_index: int, rounds: int, checkpoint: Path):
    super().__init__(
      f"stopped by {signal.Signals(signum).name} after round {round_index} of {rounds} (checkpoint {checkpoint})"
    )
    self.signum, self.round_index, self.rounds, self.checkpoint = signum, round_index, rounds, checkpoint


def train(experiment: Experiment, *, progress: bool = True, stop_after: int | None = None) -> dict[str, Any] | None:
  """Runs (or resumes) the rounds of a prepared experiment; writes the run directory; returns the summary.

  `stop_after`: stop after this round as an interruption would, with a checkpoint there to resume from (the
  plots, summary and adapter then describe the run so far). SIGINT or SIGTERM during the rounds stops the run
  after the round in progress, checkpointed, and raises `Interrupted` (`fedask_jax.runner.processes`, "Stops").
  In a multi-process run every process calls it; process 0 writes the run directory's files, prints and returns
  the summary, the others return None.
  """
  from tqdm import tqdm

  config, run_dir, round_fn = experiment.config, experiment.run_dir, experiment.round_fn
  if round_fn is None:
    raise ValueError(
      "train: this experiment was prepared without a round function (prepare(..., for_training=False), "
      "which is for evaluation only): prepare it with for_training=True."
    )
  primary = processes.is_primary()
  config_path = run_dir / CONFIG_FILE
  if primary and not config_path.is_file():
    run_dir.mkdir(parents=True, exist_ok=True)
    # Written whole (a new file renamed into place): a kill mid-write must not leave a torn config that
    # check_run_dir would then refuse.
    tmp = config_path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(stored_config(config), sort_keys=False), encoding="utf-8")
    os.replace(tmp, config_path)
  log = MetricsLog(run_dir / METRICS_FILE)
  checkpoints = StateCheckpoints(run_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep)
  key = run_key(config)
  state = round_fn.init(config.num_clients)
  write = (lambda line: tqdm.write(line, file=sys.stderr)) if progress and primary else (lambda line: None)
  # Faults are printed even with progress off: they change what the run computed or resumed from.
  warn = (lambda line: tqdm.write(f"warning: {line}", file=sys.stderr)) if primary else (lambda line: None)
  stops = processes.StopSignals(
    lambda signum: write(
      f"{signal.Signals(signum).name}: stopping once the round in progress is finished and checkpointed (send it "
      "again to stop at once, losing the rounds since the last checkpoint)"
    )
  )
  # Caught from here on: a signal during the restore or the first evaluation stops the run after its next round.
  with stops:
    for note in experiment.notes:
      write(note)
    try:
      restored = checkpoints.restore_latest(_checkpoint_state(state, key, 0))
    except ValueError:
      checkpoints.close()
      raise
    # The processes start the rounds together, whatever their loading and restoring took.
    processes.wait_for_all("rounds")
    processes.join_collectives(round_fn.mesh)
    if restored is None:
      start = 0
      before = _eval_fields(_evaluate(experiment, state.adapters))
      if primary:
        log.truncate(-1)
        log.append({"round": 0, "epsilon": 0.0 if experiment.privacy else None, **before})
    else:
      start, state = restored.round, restored.state["server"]
      for skipped, error in restored.unreadable:
        warn(f"the checkpoint of round {skipped} is unreadable ({error}); falling back to round {start}")
      if primary:
        log.truncate(start)
      write(f"resuming {run_dir} from the checkpoint of round {start}")

    sample = round_sampler(config, experiment.capacity)
    release, warned_nonfinite = config.privacy.release_diagnostics, False
    compiled: set[str] = set()
    bar = tqdm(
      total=config.rounds,
      initial=start,
      desc="rounds",
      unit="round",
      file=sys.stderr,
      disable=not (progress and primary),
    )
    try:
      last = config.rounds if stop_after is None else min(stop_after, config.rounds)
      for t in range(start + 1, last + 1):
        trained = round_fn.trained(t)
        first = trained not in compiled
        compiled.add(trained)
        began = time.perf_counter()
        round_key = jax.random.fold_in(key, t)
        ids, weights, batches = sample(round_key, experiment.client_data)
        state, metrics = round_fn(state, batches, ids, weights, round_key, t)
        metrics = jax.device_get(processes.host_local(metrics, round_fn.mesh))
        seconds = time.perf_counter() - began
        record = {
          "round": t,
          "train_loss": to_json(metrics.pop("train_loss")),
          "epsilon": _epsilon(experiment, t),
          "clients": to_json(ids),
          **{k: to_json(v) for k, v in sorted(metrics.items())},
        }
        if not release:
          for name in DIAGNOSTICS:
            del record[name]
        elif not warned_nonfinite and any(record["nonfinite_examples"]):
          warned_nonfinite = True
          counts = ", ".join(f"client {c}: {n}" for c, n in zip(record["clients"], record["nonfinite_examples"]) if n)
          effect = (
            "the clipping zeroed their gradients, and their clients' losses are NaN"
            if experiment.privacy
            else "their clients' updates are NaN"
          )
          warn(
            f"round {t}: training examples with a non-finite loss or gradient ({counts}); {effect}. "
            "metrics.jsonl counts them every round (nonfinite_examples); this warning is not repeated"
          )
        if t == config.rounds or (config.eval.every and t % config.eval.every == 0):
          record.update(_eval_fields(_evaluate(experiment, state.adapters)))
        record["timing"] = {"seconds": seconds, "compiled": first}
        if primary:
          log.append(record)
        if record["skipped"]:
          warn(f"round {t}: no client's update was finite (clients {record['clients']}); the global state is unchanged")
        elif record["invalid_clients"]:
          left_out = [c for c, ok in zip(record["clients"], record["client_valid"]) if not ok]
          warn(f"round {t}: clients {left_out} had a NaN or Inf update and were left out of the aggregate")
        stop = stops.agreed() if t < config.rounds else 0
        if stop or t in (last, config.rounds) or (config.checkpoint.every and t % config.checkpoint.every == 0):
          checkpoints.save(t, _checkpoint_state(state, key, t), _ledger(experiment, t, record["epsilon"]))
        postfix = {"loss": f"{record['train_loss']:.4f}"} if release else {}
        if record["epsilon"] is not None:
          assert experiment.privacy is not None  # epsilon is only recorded under a privacy plan
          heuristic = experiment.privacy.schedule.participation == "expected"
          postfix["eps (expected: no guarantee)" if heuristic else "eps"] = f"{record['epsilon']:.3f}"
        if "eval_loss" in record:
          postfix["eval"] = f"{record['eval_loss']:.4f}"
        bar.set_postfix(postfix)
        bar.update(1)
        if stop:
          raise Interrupted(stop, t, config.rounds, checkpoints.directory / str(t))
    finally:
      bar.close()
      checkpoints.close()

  final = processes.host_local(state.adapters, round_fn.mesh)
  if not primary:
    return None
  records = log.read()
  write_plots(records, run_dir)
  _set_adapters(experiment.model, final)
  export_peft(experiment.model, run_dir / ADAPTER_DIR, base_model_name_or_path=config.model.path)
  summary = summarize(experiment, records)
  (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
  return summary


def latest_adapters(experiment: Experiment) -> tuple[int, Adapters]:
  """(round, global adapters) of the run directory's newest readable checkpoint (older ones when the newest are
  damaged, with a warning: `StateCheckpoints.restore_latest`); ValueError if it has none."""
  config = experiment.config
  checkpoints = StateCheckpoints(experiment.run_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep)
  try:
    adapters = to_adapters(nnx.state(experiment.model, nnx.LoRAParam))
    template = _checkpoint_state(
      ServerState(adapters, make_strategy(config).init(adapters, config.num_clients)), run_key(config), 0
    )
    restored = checkpoints.restore_latest(template)
  finally:
    checkpoints.close()
  if restored is None:
    raise ValueError(f"run_dir {str(experiment.run_dir)!r} has no checkpoint yet: train first.")
  return restored.round, restored.state["server"].adapters


def evaluate_run(run_dir: str | os.PathLike) -> dict[str, Any]:
  """Held-out loss and perplexity of a (finished or interrupted) run's latest checkpoint."""
  path = Path(run_dir) / CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE}): pass the run_dir of a run.")
  config = dataclasses.replace(from_dict(read_yaml(path)), run_dir=str(run_dir))
  experiment = prepare(config, for_training=False)
  latest, adapters = latest_adapters(experiment)
  result = _evaluate(experiment, adapters)
  return {
    "round": latest,
    "eval_loss": result.eval_loss,
    "perplexity": result.perplexity,
    "examples": result.examples,
    "tokens": result.tokens,
  }
