"""The runner: from a `Config` to a finished run directory (design.md section 2, layer 4).

    experiment = prepare(load_config("experiments/configs/quickstart.yaml"))   # loads, validates, plans
    summary = train(experiment)                                                 # the round loop

`prepare` does everything that can fail on bad input before anything is compiled: it checks the run
directory against the config, loads the model, tokenizer and data, partitions the clients, and plans the
privacy (noise multiplier, sampling rate, batch capacity). `train` then runs the rounds, resuming from the
latest checkpoint of the run directory when there is one.

Run directory (`config.run_dir`):
- `config.yaml`: the resolved config. A run directory belongs to one config: `prepare` refuses another one,
  naming the keys that differ (run_dir itself excepted).
- `metrics.jsonl`: one JSON object per line: round 0 (the base model's eval loss) and one per round (train
  loss, epsilon spent so far, the compiled round's metrics, the eval loss when evaluated, and `timing`, the
  wall-clock seconds of the round and whether it included a compilation). Each line is written whole
  (write, flush, fsync).
- `checkpoints/<round>/`: orbax checkpoints (`fedask_jax.checkpoint.state`) of the server state (the global
  adapters and the strategy's state: SCAFFOLD's control variates, FedSA-LoRA's per-client factors), the run
  key and the round, with the privacy ledger. Clients' optimisers start afresh every round
  (`fedask_jax.simulation`), so there is no optimiser state to keep.
- `loss.png`, `epsilon.png`, `summary.json`, and `adapter/`: the final global adapter in PEFT's format.

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
`skipped`) and as a warning line on stderr, printed even with progress off.

Privacy (design.md section 4). Client k samples each local step's batch by Poisson sampling with rate
q_k = batch_size / n_k. One noise multiplier serves all clients, calibrated for the largest rate
q = batch_size / min_k n_k: every client's data, the smallest client's included, is then
(target_epsilon, delta)-DP, and larger clients spend less. The number of DP steps follows
`privacy.participation` (`fedask_jax.privacy.dp_steps`). Batches have a fixed capacity: the largest over
clients of `batch_capacity(n_k + 1, q_k, overflow_prob)` (n_k + 1: the add-one neighbour); the overflow's
cost in delta, `overflow_delta(overflow_prob, steps, target_epsilon)`, is taken out of delta before
calibration, so the total is delta. The `epsilon` of each metrics line is the smallest client's epsilon after
that round's DP steps at that reduced delta.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from fedask_jax import data as fdata
from fedask_jax import privacy
from fedask_jax.checkpoint.peft import export_peft
from fedask_jax.checkpoint.state import StateCheckpoints
from fedask_jax.config import (
    Config, ConfigError, check_encoded, check_model, check_records, config_diff, from_dict, read_yaml, to_dict)
from fedask_jax.evaluation import EvalResult, evaluate
from fedask_jax.lora import Adapters, LoRAConfig, from_adapters, inject_lora, to_adapters
from fedask_jax.models import load_pretrained, load_tokenizer
from fedask_jax.simulation import (
    DPConfig, FederatedRound, ServerState, client_weights, data_key, sample_clients)
from fedask_jax.strategies import STRATEGIES, Strategy, get_strategy

# The adapters' init key is fold_in(run_key, ADAPTER_INIT_STREAM); round keys use fold_in(run_key, t), t >= 1.
ADAPTER_INIT_STREAM = 0
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """The DP parameters of a run (module docstring).

  noise_multiplier: sigma; sample_rate: q = batch_size / min_k n_k; steps: DP steps over the whole run;
  delta: the total delta; accountant_delta: delta minus overflow_delta, what epsilon is computed at;
  overflow_delta: the truncated-Poisson cost; capacity: slots per local step.
  """

  noise_multiplier: float
  sample_rate: float
  steps: int
  delta: float
  accountant_delta: float
  overflow_delta: float
  capacity: int


@dataclasses.dataclass
class Experiment:
  """Everything `prepare` loaded and planned; `train` runs it."""

  config: Config
  run_dir: Path
  model: nnx.Module
  tokenizer: Any
  eval_data: fdata.EncodedDataset
  client_data: fdata.ClientData | None
  capacity: int
  privacy: PrivacyPlan | None
  round_fn: FederatedRound | None
  notes: list[str]


# ---------------------------------------------------------------------------------------------------------------
# Preparation.


def run_key(config: Config) -> jax.Array:
  """The run's root key: `jax.random.key(seed)`."""
  return jax.random.key(config.seed)


def check_run_dir(config: Config) -> None:
  """Refuse a run directory that holds a different config (naming the keys that differ), checkpoints without
  their config, or that is not a directory."""
  run_dir = Path(config.run_dir)
  if run_dir.exists() and not run_dir.is_dir():
    raise ConfigError(f"run_dir={config.run_dir!r} is a file, not a directory: choose another run_dir.")
  path = run_dir / CONFIG_FILE
  if not path.is_file():
    if (run_dir / CHECKPOINT_DIR).exists():
      raise ConfigError(
          f"run_dir={config.run_dir!r} holds checkpoints but no {CONFIG_FILE}, so a resume cannot be checked "
          "against the config they were trained with: choose a new run_dir.")
    return
  try:
    stored = from_dict(read_yaml(path))
  except ConfigError as error:
    raise ConfigError(f"{path} holds an invalid config ({error}): use another run_dir.") from None
  differ = config_diff(stored, config, ignore=("run_dir",))
  if differ:
    detail = ", ".join(
        f"{k}: {_lookup(stored, k)!r} -> {_lookup(config, k)!r}" for k in differ[:8])
    if len(differ) > 8:
      detail += f", and {len(differ) - 8} more: {', '.join(differ[8:])}"
    raise ConfigError(
        f"run_dir {config.run_dir!r} holds a run with a different config ({detail}): resume with the same config "
        "or choose a new run_dir.")


def _lookup(config: Config, dotted: str) -> Any:
  value: Any = to_dict(config)
  for part in dotted.split("."):
    value = value.get(part) if isinstance(value, dict) else None
  return value


def load_model(config: Config) -> nnx.Module:
  """The base model with fresh adapters from `fold_in(run_key, ADAPTER_INIT_STREAM)` (float32, PEFT's init)."""
  model = load_pretrained(config.model.path, dtype=jnp.dtype(config.model.dtype))
  check_model(config, model)
  lora = LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha, target_modules=config.lora.target_modules,
                    dropout=config.lora.dropout)
  inject_lora(model, lora, jax.random.fold_in(run_key(config), ADAPTER_INIT_STREAM), dtype=jnp.float32)
  return model


def load_records(config: Config, split: str, max_records: int | None) -> list[dict[str, Any]]:
  """The records of the train or eval split of `config.data`'s source (`fedask_jax.data` loaders)."""
  d = config.data
  if d.source == "gsm8k":
    name = d.train_split if split == "train" else d.eval_split
    return fdata.load_gsm8k(name, source=d.path, max_records=max_records, strip_calculator=d.strip_calculator)
  if d.source == "jsonl":
    return fdata.load_jsonl(d.path if split == "train" else d.eval_path, max_records=max_records)
  name = d.train_split if split == "train" else d.eval_split
  if d.source == "hf":
    return fdata.load_hf(d.path, split=name, name=d.name, max_records=max_records)
  return fdata.load_tfds(d.path, split=name, data_dir=d.data_dir, max_records=max_records)


def partition(config: Config, records: list[dict[str, Any]]) -> fdata.Partition:
  """The clients' partition of `records` (`config.data.partition`), checked against `num_clients`."""
  d = config.data
  if d.partition == "iid" and d.category_column is None:
    parts = fdata.iid_partition([0] * len(records), config.num_clients, seed=config.seed)
  else:
    values = len(np.unique(np.asarray([r[d.category_column] for r in records])))
    try:
      parts = fdata.partition_records(
          records, d.partition, num_clients=config.num_clients, column=d.category_column, alpha=d.dirichlet_alpha,
          seed=config.seed, min_client_size=d.min_client_size)
    except ValueError:
      # check_records has ruled out the other causes (a missing column, too few records), so for a Dirichlet
      # partition this is every draw leaving some client below min_client_size.
      if d.partition != "dirichlet":
        raise
      raise ConfigError(
          f"data.partition='dirichlet': every draw of Dirichlet(data.dirichlet_alpha={d.dirichlet_alpha:g}) over "
          f"the {values} values of {d.category_column!r} left some of the num_clients={config.num_clients} clients "
          f"with fewer than data.min_client_size={d.min_client_size} records: raise data.dirichlet_alpha (the "
          "paper: 0.1 to 1), or lower num_clients or data.min_client_size.") from None
  if parts.num_clients != config.num_clients:
    dropped = values - parts.num_clients  # only a natural partition can differ
    reason = (f" ({dropped} of its {values} values have fewer than data.min_client_size={d.min_client_size} "
              "records)" if dropped else "")
    raise ConfigError(
        f"data.partition='natural' over {d.category_column!r} gives {parts.num_clients} clients{reason} but "
        f"num_clients={config.num_clients}: set num_clients={parts.num_clients}"
        f"{' or lower data.min_client_size' if dropped else ''}.")
  return parts


def plan_privacy(config: Config, sizes: np.ndarray) -> tuple[PrivacyPlan | None, int]:
  """(privacy plan or None without DP, batch capacity) for clients of `sizes` (module docstring)."""
  b, smallest, largest = config.batch_size, int(sizes.min()), int(sizes.max())
  if not config.privacy.enabled:
    if b > largest:
      raise ConfigError(f"batch_size={b} exceeds the largest client's {largest} examples: lower batch_size.")
    return None, b
  p = config.privacy
  if b > smallest:
    raise ConfigError(
        f"batch_size={b} exceeds the smallest client's {smallest} examples, so its Poisson rate "
        "q = batch_size / n would exceed 1: lower batch_size or num_clients, or raise data.min_client_size.")
  capacity = min(largest, max(privacy.batch_capacity(int(n) + 1, b / int(n), p.overflow_prob) for n in set(sizes)))
  steps = privacy.dp_steps(config.rounds, config.local_steps, config.clients_per_round, config.num_clients,
                           p.participation)
  overflow = privacy.overflow_delta(p.overflow_prob, steps, p.target_epsilon)
  if overflow >= p.delta / 2:
    raise ConfigError(
        f"privacy.overflow_prob={p.overflow_prob:g} costs delta {overflow:.3g} over {steps} steps, at least half "
        f"of privacy.delta={p.delta:g}: lower overflow_prob (e.g. 1e-12).")
  q = b / smallest
  sigma = privacy.calibrate_noise(p.target_epsilon, p.delta - overflow, q, steps, p.accountant)
  return PrivacyPlan(sigma, q, steps, p.delta, p.delta - overflow, overflow, capacity), capacity


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """The local optimiser: `optimizer.name` at `lr`, after a linear warm-up from 0 over `warmup_steps` local
  steps of each round (Hugging Face's constant-with-warm-up schedule: lr s / warmup at local step s)."""
  o = config.optimizer
  lr: Any = config.lr
  if o.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, config.lr, o.warmup_steps)
  if o.name == "adamw":
    return optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=o.weight_decay)
  if o.name == "adam":
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
  return optax.sgd(lr)


def make_strategy(config: Config) -> Strategy:
  """The configured strategy; the sketch's oversample/certify go to those strategies that take them."""
  params = inspect.signature(STRATEGIES[config.strategy]).parameters
  kwargs = dict(config.strategy_args)
  for key in ("oversample", "certify"):
    if key in params:
      kwargs[key] = getattr(config.sketch, key)
  return get_strategy(config.strategy, **kwargs)


def load_eval_data(config: Config, tokenizer: Any) -> fdata.EncodedDataset:
  """The held-out set (the first `eval.max_examples` examples of the eval split), encoded as training data."""
  records = load_records(config, "eval", config.eval.max_examples)
  check_records(config, records, "eval")
  template = fdata.get_template(config.data.template, **config.data.template_fields)
  encoded = fdata.encode(records, template, tokenizer, config.data.max_seq_len)
  check_encoded(config, encoded, "eval")
  return encoded


CPU_CLIENT_CHUNK = 4


def client_chunk(config: Config) -> int | None:
  """`config.client_chunk`, or when it is None: all clients at once on an accelerator, and on a CPU chunks of
  the largest divisor of K up to `CPU_CLIENT_CHUNK`. On a CPU all K clients at once make every intermediate K
  times larger, past the caches: chunks of 4 were the fastest variant from K = 16 up and used 14x to 43x less
  memory (benchmarks/README.md, "Full mode"); on an H100 chunking was 1.33x slower (benchmarks/gpu.md).
  Results do not depend on the chunk beyond float32 summation order."""
  if config.client_chunk is not None or jax.default_backend() != "cpu":
    return config.client_chunk
  k = config.clients_per_round
  return max(c for c in range(1, min(k, CPU_CLIENT_CHUNK) + 1) if k % c == 0)


def prepare(config: Config, *, for_training: bool = True) -> Experiment:
  """Loads and checks everything a run needs (module docstring); raises ValueError (ConfigError for the
  config's own rules) on bad input, before any round is compiled. `for_training=False` loads only what
  evaluation needs (model, tokenizer, held-out set)."""
  if for_training:
    check_run_dir(config)
  model = load_model(config)
  tokenizer = load_tokenizer(config.model.path)
  eval_data = load_eval_data(config, tokenizer)
  notes = [f"eval: {eval_data.num_examples} held-out examples, {eval_data.num_truncated} truncated to "
           f"{config.data.max_seq_len} tokens"]
  if not for_training:
    return Experiment(config, Path(config.run_dir), model, tokenizer, eval_data, None, 0, None, None, notes)
  records = load_records(config, "train", config.data.max_train_examples)
  check_records(config, records, "train")
  template = fdata.get_template(config.data.template, **config.data.template_fields)
  encoded = fdata.encode(records, template, tokenizer, config.data.max_seq_len)
  check_encoded(config, encoded, "train")
  parts = partition(config, records)
  plan, capacity = plan_privacy(config, parts.sizes)
  dp = None if plan is None else DPConfig(
      clip_norm=config.privacy.clip_norm, noise_multiplier=plan.noise_multiplier,
      expected_batch_size=float(config.batch_size), mechanism=config.privacy.mechanism)
  round_fn = FederatedRound(model, make_strategy(config), optimizer=make_optimizer(config), dp=dp,
                            client_chunk=client_chunk(config))
  if round_fn.mesh is not None and config.clients_per_round % round_fn.mesh.size:
    raise ConfigError(
        f"clients_per_round={config.clients_per_round} cannot be split evenly over {round_fn.mesh.size} devices: "
        f"use a multiple of {round_fn.mesh.size}.")
  # Rounds 1 and 2 cover every strategy's choice of trained factor (fedask-alt alternates), so an impossible
  # combination (W-space DP with both factors trained) fails here rather than inside the loop.
  for t in range(1, min(config.rounds, 2) + 1):
    round_fn.trained(t)
  sizes = parts.sizes
  notes.append(f"train: {encoded.num_examples} examples, {encoded.num_truncated} truncated to "
               f"{config.data.max_seq_len} tokens, {encoded.num_without_targets} without targets; "
               f"{parts.num_clients} clients of {int(sizes.min())} to {int(sizes.max())} examples")
  if plan is not None:
    notes.append(
        f"privacy: ({config.privacy.target_epsilon:g}, {config.privacy.delta:g})-DP, noise multiplier "
        f"{plan.noise_multiplier:.4f} ({config.privacy.accountant}, {config.privacy.participation}, "
        f"q = {plan.sample_rate:.4g}, {plan.steps} steps), {capacity} slots per step")
  client_data = jax.device_put(fdata.stack_clients(encoded, parts))
  return Experiment(config, Path(config.run_dir), model, tokenizer, eval_data, client_data, capacity, plan, round_fn,
                    notes)


# ---------------------------------------------------------------------------------------------------------------
# Run-directory files.


class MetricsLog:
  """`metrics.jsonl`: one JSON object per round, each line written whole (write, flush, fsync)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def read(self) -> list[dict[str, Any]]:
    """The records, skipping a last line left incomplete by an interrupted write."""
    if not self.path.is_file():
      return []
    records = []
    lines = self.path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if i != len(lines) - 1:
          raise ValueError(f"{self.path}:{i + 1} is not a JSON object: the metrics file is damaged.") from None
    return records

  def truncate(self, last_round: int) -> list[dict[str, Any]]:
    """Keep the records of rounds <= last_round (atomically: a new file renamed over the old); returns them."""
    kept = [r for r in self.read() if r["round"] <= last_round]
    tmp = self.path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      for record in kept:
        f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    return kept

  def append(self, record: dict[str, Any]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())


def _to_json(value: Any) -> Any:
  """A pytree of arrays -> the same tree of Python scalars and (nested) lists."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), value)


def write_plots(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
  """loss.png (train loss per round, held-out loss where evaluated) and, with DP, epsilon.png (epsilon spent)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  train = [(r["round"], r["train_loss"]) for r in records if "train_loss" in r]
  evals = [(r["round"], r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss (sampled clients)")
  if evals:
    ax.plot(*zip(*evals), "o-", label="held-out loss")
  ax.set_xlabel("round")
  ax.set_ylabel("cross-entropy (nats / target token)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(run_dir / "loss.png", dpi=120)
  plt.close(fig)
  written.append(run_dir / "loss.png")
  eps = [(r["round"], r["epsilon"]) for r in records if r.get("epsilon") is not None]
  if eps:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*eps))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "epsilon.png", dpi=120)
    plt.close(fig)
    written.append(run_dir / "epsilon.png")
  return written


def summarize(experiment: Experiment, records: list[dict[str, Any]]) -> dict[str, Any]:
  """The run's summary (summary.json) from its metrics records."""
  config, plan = experiment.config, experiment.privacy
  evals = [r for r in records if "eval_loss" in r]
  timed = [r["timing"]["seconds"] for r in records if "timing" in r and not r["timing"]["compiled"]]
  compiled = [r["timing"]["seconds"] for r in records if "timing" in r and r["timing"]["compiled"]]
  summary: dict[str, Any] = {
      "strategy": config.strategy,
      "rounds": max((r["round"] for r in records), default=0),
      "eval_loss_before": evals[0]["eval_loss"] if evals and evals[0]["round"] == 0 else None,
      "eval_loss_after": evals[-1]["eval_loss"] if evals and evals[-1]["round"] > 0 else None,
      "perplexity_before": evals[0]["perplexity"] if evals and evals[0]["round"] == 0 else None,
      "perplexity_after": evals[-1]["perplexity"] if evals and evals[-1]["round"] > 0 else None,
      "eval_examples": experiment.eval_data.num_examples,
      "final_train_loss": next((r["train_loss"] for r in reversed(records) if "train_loss" in r), None),
      # Rounds that compiled (the first of each trained-factor choice in a process) are excluded.
      "seconds_per_round": float(np.mean(timed)) if timed else None,
      "compile_round_seconds": float(np.mean(compiled)) if compiled else None,
      "capacity": experiment.capacity,
      "private": plan is not None,
      # Faults (module docstring): clients left out of an aggregate for a non-finite update, and rounds with no
      # valid client (the state left unchanged).
      "invalid_clients": sum(int(r.get("invalid_clients", 0)) for r in records),
      "skipped_rounds": sum(int(r.get("skipped", 0)) for r in records),
  }
  if plan is not None:
    summary.update(
        epsilon=records[-1].get("epsilon") if records else None, target_epsilon=config.privacy.target_epsilon,
        delta=plan.delta, accountant_delta=plan.accountant_delta, overflow_delta=plan.overflow_delta,
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, dp_steps=plan.steps,
        accountant=config.privacy.accountant, participation=config.privacy.participation,
        mechanism=config.privacy.mechanism, clip_norm=config.privacy.clip_norm)
  return summary


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
  """A few human-readable lines of `summary`."""
  lines = [f"{summary['strategy']}: {summary['rounds']} rounds"]
  if summary["eval_loss_before"] is not None and summary["eval_loss_after"] is not None:
    lines.append(
        f"held-out loss {summary['eval_loss_before']:.4f} (perplexity {summary['perplexity_before']:.2f}) before, "
        f"{summary['eval_loss_after']:.4f} (perplexity {summary['perplexity_after']:.2f}) after, on "
        f"{summary['eval_examples']} examples")
  if summary["private"]:
    lines.append(
        f"privacy: epsilon spent {summary['epsilon']:.3f} (target {summary['target_epsilon']:g}) at delta "
        f"{summary['delta']:g}; noise multiplier {summary['noise_multiplier']:.4f}, q {summary['sample_rate']:.4g}, "
        f"{summary['dp_steps']} steps ({summary['accountant']}, {summary['participation']}, "
        f"{summary['mechanism']})")
  else:
    lines.append("privacy: off (non-private run)")
  if summary["invalid_clients"] or summary["skipped_rounds"]:
    lines.append(f"faults: {summary['invalid_clients']} client updates left out for non-finite values, "
                 f"{summary['skipped_rounds']} rounds skipped (no valid client)")
  if summary["seconds_per_round"] is not None:
    lines.append(f"seconds per round: {summary['seconds_per_round']:.3f} (excluding compilation; rounds that "
                 f"compiled took {summary['compile_round_seconds']:.1f} s)")
  names = (METRICS_FILE, "loss.png", "epsilon.png", SUMMARY_FILE, ADAPTER_DIR + "/")
  files = [name for name in names if (run_dir / name).exists()]
  lines.append(f"run directory: {run_dir} ({', '.join(files)})")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The round loop.


def _set_adapters(model: nnx.Module, adapters: Adapters) -> None:
  nnx.update(model, from_adapters(nnx.state(model, nnx.LoRAParam), adapters))


def _evaluate(experiment: Experiment, adapters: Adapters) -> EvalResult:
  _set_adapters(experiment.model, adapters)
  return evaluate(experiment.model, experiment.eval_data, batch_size=experiment.config.eval.batch_size)


def _eval_fields(result: EvalResult) -> dict[str, Any]:
  return {"eval_loss": result.eval_loss, "perplexity": result.perplexity}


def _epsilon(experiment: Experiment, round_index: int) -> float | None:
  plan, c = experiment.privacy, experiment.config
  if plan is None:
    return None
  steps = privacy.dp_steps(round_index, c.local_steps, c.clients_per_round, c.num_clients, c.privacy.participation)
  return privacy.epsilon_spent(plan.noise_multiplier, plan.accountant_delta, plan.sample_rate, steps,
                               c.privacy.accountant)


def _checkpoint_state(server: ServerState, key: jax.Array, round_index: int) -> dict[str, Any]:
  return {"server": server, "run_key": key, "round": jnp.asarray(round_index, jnp.int32)}


def _ledger(experiment: Experiment, round_index: int) -> dict[str, Any]:
  plan = experiment.privacy
  ledger: dict[str, Any] = {"round": round_index, "private": plan is not None}
  if plan is not None:
    ledger.update(dataclasses.asdict(plan), epsilon=_epsilon(experiment, round_index),
                  accountant=experiment.config.privacy.accountant,
                  participation=experiment.config.privacy.participation)
  return ledger


def round_sampler(config: Config, capacity: int):
  """The runner's draw of a round's clients and batches, jitted: (round_key, client data) -> (client ids [K],
  weights [K], batches [K, S, capacity, L]); ids from `sample_clients(round_key)`, batches (Poisson with DP,
  uniform without) from `data_key(round_key)`. Experiments that drive `FederatedRound` themselves use it to
  draw exactly what `train` draws."""
  sampling = "poisson" if config.privacy.enabled else "uniform"

  @jax.jit
  def sample(round_key, client_data):
    ids = sample_clients(round_key, config.num_clients, config.clients_per_round)
    batches = fdata.client_batches(data_key(round_key), client_data, ids, local_steps=config.local_steps,
                                   batch_size=config.batch_size, capacity=capacity, sampling=sampling)
    return ids, client_weights(client_data.client_sizes, ids), batches

  return sample


def train(experiment: Experiment, *, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the rounds of a prepared experiment; writes the run directory; returns the summary.

  `stop_after`: stop after this round as an interruption would, with a checkpoint there to resume from (the
  plots, summary and adapter then describe the run so far).
  """
  from tqdm import tqdm

  config, run_dir, round_fn = experiment.config, experiment.run_dir, experiment.round_fn
  run_dir.mkdir(parents=True, exist_ok=True)
  config_path = run_dir / CONFIG_FILE
  if not config_path.is_file():
    # Written whole (a new file renamed into place): a kill mid-write must not leave a torn config that
    # check_run_dir would then refuse.
    tmp = config_path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
    os.replace(tmp, config_path)
  log = MetricsLog(run_dir / METRICS_FILE)
  checkpoints = StateCheckpoints(run_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep)
  key = run_key(config)
  state = round_fn.init(config.num_clients)
  write = (lambda line: tqdm.write(line, file=sys.stderr)) if progress else (lambda line: None)
  # Faults are printed even with progress off: they change what the run computed or resumed from.
  warn = lambda line: tqdm.write(f"warning: {line}", file=sys.stderr)
  for note in experiment.notes:
    write(note)
  try:
    restored = checkpoints.restore_latest(_checkpoint_state(state, key, 0))
  except ValueError:
    checkpoints.close()
    raise
  if restored is None:
    start = 0
    log.truncate(-1)
    before = _evaluate(experiment, state.adapters)
    log.append({"round": 0, "epsilon": 0.0 if experiment.privacy else None, **_eval_fields(before)})
  else:
    start, state = restored.round, restored.state["server"]
    for skipped, error in restored.unreadable:
      warn(f"the checkpoint of round {skipped} is unreadable ({error}); falling back to round {start}")
    log.truncate(start)
    write(f"resuming {run_dir} from the checkpoint of round {start}")

  sample = round_sampler(config, experiment.capacity)
  compiled: set[str] = set()
  bar = tqdm(total=config.rounds, initial=start, desc="rounds", unit="round", file=sys.stderr, disable=not progress)
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
      metrics = jax.device_get(metrics)
      seconds = time.perf_counter() - began
      record = {"round": t, "train_loss": _to_json(metrics.pop("train_loss")), "epsilon": _epsilon(experiment, t),
                "clients": _to_json(ids), **{k: _to_json(v) for k, v in sorted(metrics.items())}}
      if t == config.rounds or (config.eval.every and t % config.eval.every == 0):
        record.update(_eval_fields(_evaluate(experiment, state.adapters)))
      record["timing"] = {"seconds": seconds, "compiled": first}
      log.append(record)
      if record["skipped"]:
        warn(f"round {t}: no client's update was finite (clients {record['clients']}); the global state is "
             "unchanged")
      elif record["invalid_clients"]:
        left_out = [c for c, ok in zip(record["clients"], record["client_valid"]) if not ok]
        warn(f"round {t}: clients {left_out} had a NaN or Inf update and were left out of the aggregate")
      if t in (last, config.rounds) or (config.checkpoint.every and t % config.checkpoint.every == 0):
        checkpoints.save(t, _checkpoint_state(state, key, t), _ledger(experiment, t))
      postfix = {"loss": f"{record['train_loss']:.4f}"}
      if record["epsilon"] is not None:
        postfix["eps"] = f"{record['epsilon']:.3f}"
      if "eval_loss" in record:
        postfix["eval"] = f"{record['eval_loss']:.4f}"
      bar.set_postfix(postfix)
      bar.update(1)
  finally:
    bar.close()
    checkpoints.close()

  records = log.read()
  write_plots(records, run_dir)
  _set_adapters(experiment.model, state.adapters)
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
    template = _checkpoint_state(ServerState(adapters, make_strategy(config).init(adapters, config.num_clients)),
                                 run_key(config), 0)
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
  return {"round": latest, "eval_loss": result.eval_loss, "perplexity": result.perplexity,
          "examples": result.examples, "tokens": result.tokens}
