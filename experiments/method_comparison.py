"""Method comparison: FedASK against the baselines across privacy levels and data distributions (issue 6, item 3).

    python experiments/method_comparison.py --quick             # < 20 min on a 2-core CPU (= --mode quick)
    python experiments/method_comparison.py --mode cpu          # the whole grid, small runs: ~70 min on 2 CPU cores
    python experiments/method_comparison.py                     # the whole grid at full size (meant for a GPU)
    python experiments/method_comparison.py --only-methods fedask,fedavg --seeds 0,1   # a slice of the grid
    python experiments/method_comparison.py --report            # rebuild the table and plot from the runs file

The grid: methods {fedask, fedask-alt, fedavg, ffa-lora, fedsa-lora, fedprox, scaffold} x target epsilon
{1, 3, 6, inf (non-private)} x partitions {IID, Dirichlet(0.5), Dirichlet(0.1) over GSM8K's derived step-count
category} x seeds, on the embedded base model (`experiments/base_model`) and GSM8K (`data/gsm8k`). Each run
is what `fedask-jax train` would do with `experiments/configs/quickstart.yaml` and the run's overrides
(`run_config`): the runner's run key and initial adapters for the seed, its partition for the seed, its privacy
plan (sigma calibrated for the smallest client, `runner.plan_privacy`), its sampler and key streams
(`runner.round_sampler`), R rounds, then the held-out loss on the first GSM8K test problems
(`fedask_jax.evaluation.evaluate`) and the smallest client's epsilon spent (`privacy.epsilon_spent`).
Hyper-parameters are fixed a priori (the quickstart's lr 1e-2 and AdamW for every method, FedProx mu = 0.01, the
sketch's oversampling 2); nothing is chosen on the test split, and nothing is tuned.

Compile reuse. Every run of the grid shares one static shape, so each (method, DP on/off) pair compiles its
round once (fedask-alt twice: it trains lora_b in odd rounds and lora_a in even ones) and reuses it for every
epsilon (sigma is a traced argument), partition and seed:
- every client's data are padded to N rows, the number of training examples (an upper bound on any client's
  size, whatever the partition): the Poisson sampler draws over the padded rows, so padding to a constant of
  the settings also makes a run's batches independent of which other runs share its invocation;
- the batch capacity of DP rounds is `batch_capacity(N + 1, b / N, overflow_prob)`, at least what
  `runner.plan_privacy` gives for any partition of the N examples (the binomial tail at a fixed mean b grows
  with n), checked against each run's plan; non-private rounds use b slots, as the runner does.
The script counts the compilations (the calls of each round variant, sampler and the evaluation during which XLA
compiled, through `jax.monitoring`) and stores them with each invocation.

Modes. quick: 7 methods x epsilon {1, inf} x IID x 3 seeds, 6 rounds of 4 clients. cpu: the whole grid (every
method, epsilon and partition, 3 seeds) on the paper's federation (10 clients, 2 per round) with runs a quarter of
full's length (20 rounds x 3 local steps of batch 8, 128 tokens), so that all 252 runs fit a 2-core CPU. full: the
whole grid with 80 rounds x 5 local steps of batch 16, 192 tokens.

Timing. --quick: 42 runs, 11 to 14 min on the shared 2-core CPU (250 to 300 s of CPU time). --mode cpu on a quiet
2-core CPU: about 5 s per non-private run and 20 s per DP run alone (a DP step computes per-example gradients for
the Poisson batch's capacity, 35 slots for an expected 8), so about 70 min for the grid in one process (an
estimate); two processes over disjoint --only-methods, sharing the runs file, took 66 min (measured: XLA already
uses both cores, so the second process gains little). The full grid on one
H100 (jax 0.11.2): about 2 s per run of 80 rounds after its round variant compiled (10 to 25 s per variant),
1 to 2 s per sigma calibration, so two invocations of about 7 min each:

    python experiments/method_comparison.py --only-methods fedask,fedask-alt,ffa-lora
    python experiments/method_comparison.py --only-methods fedavg,fedsa-lora,fedprox,scaffold

An invocation stopped by a time limit loses only the run in flight: the same command continues.

Files (in --out, default experiments/results; --quick / --mode cpu write `method_comparison_quick*` /
`method_comparison_cpu*` instead):
- `method_comparison_runs.jsonl`: one JSON line per finished run (`"kind": "run"`) and one per invocation
  (`"kind": "invocation"`: command, device, compile counts, base-model loss). Runs already there are skipped,
  so a killed or split grid continues where it stopped; a line written under other settings is an error.
- `method_comparison.md`, `.json`, `.png`: rebuilt from the runs file at the end of every invocation (and by
  `--report`): mean +- sample std (ddof 1) over seeds of the held-out loss per (method, epsilon, partition), the
  epsilon spent, and what the numbers say about the paper's claims.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedask_jax import data as fdata
from fedask_jax import evaluation, privacy, runner
from fedask_jax.adapters import Adapters
from fedask_jax.config import Config, load_config, to_dict
from fedask_jax.lora import from_adapters, to_adapters
from fedask_jax.models import load_tokenizer
from fedask_jax.simulation import DPConfig, FederatedRound
from fedask_jax.strategies import get_strategy

import _common  # experiments/_common.py
from _common import plt

NAME = "method_comparison"
METHODS = ("fedask", "fedask-alt", "fedavg", "ffa-lora", "fedsa-lora", "fedprox", "scaffold")
# name -> (data.partition, data.dirichlet_alpha); the paper's non-IID settings are Dirichlet(0.1) and (0.5).
PARTITIONS = {"iid": ("iid", None), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
PARTITION_LABELS = {"iid": "IID", "dir0.5": "Dirichlet(0.5)", "dir0.1": "Dirichlet(0.1)"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The grid and the training sizes of one mode. epsilons: math.inf is the non-private run.

  min_client_size bounds the Dirichlet partitions' smallest client, and with it the Poisson rate
  q = batch_size / min_k n_k that sigma is calibrated for (every client's data must meet the target epsilon).
  accuracy_problems: GSM8K test problems scored by exact match after each run (0: not measured).
  """

  methods: tuple[str, ...]
  epsilons: tuple[float, ...]
  partitions: tuple[str, ...]
  seeds: tuple[int, ...]
  rounds: int
  num_clients: int
  clients_per_round: int
  local_steps: int
  batch_size: int
  max_seq_len: int
  max_train_examples: int | None
  eval_examples: int
  eval_batch_size: int
  min_client_size: int
  accuracy_problems: int = 0
  accuracy_tokens: int = 128

  def as_json(self) -> dict[str, Any]:
    """The settings as JSON values (the non-private epsilon inf as None)."""
    return dict(dataclasses.asdict(self), epsilons=[eps_key(e) for e in self.epsilons])

  def training(self) -> dict[str, Any]:
    """The settings that change a run's result (the grid's axes excluded): runs agree on these to be compared."""
    grid = ("methods", "epsilons", "partitions", "seeds")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in grid}


MODES = {
    # 4 IID clients of 500 examples, 7 methods x eps {1, inf} x IID x 3 seeds = 42 runs.
    "quick": Settings(
        methods=METHODS, epsilons=(1.0, math.inf), partitions=("iid",), seeds=(0, 1, 2), rounds=6, num_clients=4,
        clients_per_round=2, local_steps=2, batch_size=8, max_seq_len=96, max_train_examples=2000,
        eval_examples=64, eval_batch_size=32, min_client_size=64, accuracy_problems=32, accuracy_tokens=128),
    # The whole grid (7 x 4 x 3 x 3 = 252 runs) on the paper's federation, with runs short enough for a CPU.
    "cpu": Settings(
        methods=METHODS, epsilons=(1.0, 3.0, 6.0, math.inf), partitions=tuple(PARTITIONS), seeds=(0, 1, 2),
        rounds=20, num_clients=10, clients_per_round=2, local_steps=3, batch_size=8, max_seq_len=128,
        max_train_examples=None, eval_examples=200, eval_batch_size=50, min_client_size=160,
        accuracy_problems=64, accuracy_tokens=128),
    # The paper's federation (10 clients, 2 per round), 7 x 4 x 3 x 3 = 252 runs.
    "full": Settings(
        methods=METHODS, epsilons=(1.0, 3.0, 6.0, math.inf), partitions=tuple(PARTITIONS), seeds=(0, 1, 2),
        rounds=80, num_clients=10, clients_per_round=2, local_steps=5, batch_size=16, max_seq_len=192,
        max_train_examples=None, eval_examples=200, eval_batch_size=50, min_client_size=160,
        accuracy_problems=64, accuracy_tokens=128),
}


def eps_key(epsilon: float) -> float | None:
  """A target epsilon as stored in JSON: None for the non-private run (inf)."""
  return None if math.isinf(epsilon) else float(epsilon)


def eps_label(epsilon: float | None) -> str:
  return "inf" if epsilon is None or math.isinf(epsilon) else f"{epsilon:g}"


def run_overrides(settings: Settings, method: str, epsilon: float, partition: str, seed: int) -> list[str]:
  """The overrides of the quickstart that make one run's config: the settings and the grid point."""
  s = settings
  scheme, alpha = PARTITIONS[partition]
  values = {
      "strategy": method, "rounds": s.rounds, "num_clients": s.num_clients, "clients_per_round": s.clients_per_round,
      "local_steps": s.local_steps, "batch_size": s.batch_size, "seed": seed,
      "model.path": _common.REPO / "experiments/base_model", "data.path": _common.REPO / "data/gsm8k",
      "data.max_seq_len": s.max_seq_len, "data.max_train_examples": s.max_train_examples, "data.partition": scheme,
      "data.min_client_size": s.min_client_size, "eval.max_examples": s.eval_examples,
      "eval.batch_size": s.eval_batch_size, "privacy.enabled": not math.isinf(epsilon),
      "client_chunk": _common.cpu_client_chunk(),
  }
  if alpha is not None:
    values["data.dirichlet_alpha"] = alpha
  if not math.isinf(epsilon):
    values["privacy.target_epsilon"] = epsilon
  return _common.overrides(values)


def run_config(settings: Settings, method: str, epsilon: float, partition: str, seed: int) -> Config:
  """The config of one run (`run_overrides` applied to the quickstart's), as `fedask-jax train` would load it."""
  return load_config(_common.QUICKSTART, run_overrides(settings, method, epsilon, partition, seed))


def round_label(method: str, private: bool, trained: str) -> str:
  """The compile counts' name of a round variant, e.g. "round fedask dp lora_b"."""
  return f"round {method} {'dp' if private else 'nodp'} {trained}"


def sampler_label(private: bool) -> str:
  """The compile counts' name of a sampler: Poisson batches with DP, uniform without."""
  return f"sampler {'poisson' if private else 'uniform'}"


def _pad_clients(data: fdata.ClientData, rows: int) -> fdata.ClientData:
  """`data` [C, M, L] padded with empty rows (masks False) to [C, rows, L]."""
  pad = lambda x: np.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, 0)))
  return fdata.ClientData(pad(data.input_ids), pad(data.attention_mask), pad(data.loss_mask), data.client_sizes)


class Compilations:
  """Calls that compiled, per label, seen through `jax.monitoring`'s compilation events: a `counting(label)` block
  around one call counts 1 under `label` if XLA compiled anything during it (a first evaluation also compiles two
  small eager flax ops beside its jitted step), 0 if it reused what was compiled before."""

  EVENT = "/jax/core/compile/backend_compile_duration"  # one per XLA compilation (a cache hit has none)

  def __init__(self):
    self.counts: collections.Counter[str] = collections.Counter()
    self.events = 0
    jax.monitoring.register_event_duration_secs_listener(self.record)

  def record(self, event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    self.events += event == self.EVENT

  @contextlib.contextmanager
  def counting(self, label: str) -> Iterator[None]:
    before = self.events
    yield
    if self.events > before:
      self.counts[label] += 1


class Grid:
  """What the runs of one invocation share (module docstring: compile reuse): the model, tokenizer, encoded
  data, one `FederatedRound` per (method, DP on/off), one sampler per sampling mode, and per (partition, seed)
  the padded client data and the privacy plans."""

  def __init__(self, settings: Settings):
    self.settings = settings
    base = run_config(settings, settings.methods[0], math.inf, "iid", settings.seeds[0])
    self.model = runner.load_model(base)
    self.tokenizer = load_tokenizer(base.model.path)
    self.eval_data = runner.load_eval_data(base, self.tokenizer)
    self.records = runner.load_records(base, "train", base.data.max_train_examples)
    self.template = fdata.get_template(base.data.template, **base.data.template_fields)
    self.encoded = fdata.encode(self.records, self.template, self.tokenizer, base.data.max_seq_len)
    n = settings.accuracy_problems
    self.problems = runner.load_records(base, "eval", n) if n else []
    n = self.num_examples = len(self.records)
    self.capacity = min(n, privacy.batch_capacity(n + 1, settings.batch_size / n, base.privacy.overflow_prob))
    self._rounds: dict[tuple[str, bool], FederatedRound] = {}
    self._samplers: dict[bool, Any] = {}
    self._clients: dict[tuple[str, int], tuple[fdata.ClientData, np.ndarray]] = {}
    self._plans: dict[tuple[float, str, int], tuple[runner.PrivacyPlan | None, float | None]] = {}
    self._adapters: dict[int, Adapters] = {}
    self.compilations = Compilations()
    self.base_eval_loss = self.evaluate(self.initial_adapters(settings.seeds[0]))

  # ----- shared, built once -----

  def round_fn(self, method: str, private: bool) -> FederatedRound:
    """The round of `method` with or without DP; sigma is passed per call, so the DPConfig's is a placeholder."""
    if (method, private) not in self._rounds:
      config = run_config(self.settings, method, 1.0 if private else math.inf, "iid", self.settings.seeds[0])
      dp = None if not private else DPConfig(
          clip_norm=config.privacy.clip_norm, noise_multiplier=1.0, expected_batch_size=float(config.batch_size),
          mechanism=config.privacy.mechanism)
      self._rounds[method, private] = FederatedRound(
          self.model, runner.make_strategy(config), optimizer=runner.make_optimizer(config), dp=dp,
          client_chunk=config.client_chunk)
    return self._rounds[method, private]

  def sampler(self, private: bool):
    if private not in self._samplers:
      config = run_config(self.settings, self.settings.methods[0], 1.0 if private else math.inf, "iid",
                          self.settings.seeds[0])
      self._samplers[private] = runner.round_sampler(config, self.capacity if private else config.batch_size)
    return self._samplers[private]

  def client_data(self, partition: str, seed: int) -> tuple[fdata.ClientData, np.ndarray]:
    """(client data [C, N, L] on device, client sizes [C]) of the runner's partition for (partition, seed)."""
    if (partition, seed) not in self._clients:
      config = run_config(self.settings, self.settings.methods[0], math.inf, partition, seed)
      parts = runner.partition(config, self.records)
      stacked = _pad_clients(fdata.stack_clients(self.encoded, parts), self.num_examples)
      self._clients[partition, seed] = (jax.device_put(stacked), parts.sizes)
    return self._clients[partition, seed]

  def plan(self, epsilon: float, partition: str, seed: int) -> tuple[runner.PrivacyPlan | None, float | None]:
    """(the runner's privacy plan, the smallest client's epsilon spent after all rounds); (None, None) at inf."""
    key = (epsilon, partition, seed)
    if key not in self._plans:
      if math.isinf(epsilon):
        self._plans[key] = (None, None)
      else:
        config = run_config(self.settings, self.settings.methods[0], epsilon, partition, seed)
        plan, capacity = runner.plan_privacy(config, self.client_data(partition, seed)[1])
        if capacity > self.capacity:
          raise RuntimeError(
              f"the privacy plan of ({epsilon}, {partition}, seed {seed}) needs {capacity} slots per step, more than "
              f"the shared capacity {self.capacity}: the module docstring's bound does not hold for these settings.")
        spent = privacy.epsilon_spent(plan.schedule, plan.noise_multiplier, plan.accountant_delta,
                                      config.privacy.accountant)
        self._plans[key] = (plan, spent)
    return self._plans[key]

  def initial_adapters(self, seed: int) -> Adapters:
    """The runner's initial adapters for `seed` (`runner.load_model`: fold_in(run_key, ADAPTER_INIT_STREAM))."""
    if seed not in self._adapters:
      config = run_config(self.settings, self.settings.methods[0], math.inf, "iid", seed)
      self._adapters[seed] = to_adapters(nnx.state(runner.load_model(config), nnx.LoRAParam))
    return self._adapters[seed]

  def evaluate(self, adapters: Adapters) -> float:
    nnx.update(self.model, from_adapters(nnx.state(self.model, nnx.LoRAParam), adapters))
    with self.compilations.counting("evaluate"):
      return evaluation.evaluate(self.model, self.eval_data, batch_size=self.settings.eval_batch_size).eval_loss

  def accuracy(self, adapters: Adapters) -> float | None:
    """GSM8K exact match on the first `accuracy_problems` test problems (greedy), or None when not asked for."""
    if not self.problems:
      return None
    nnx.update(self.model, from_adapters(nnx.state(self.model, nnx.LoRAParam), adapters))
    # One batch of all problems: one prompt shape, one compilation of the generation loop.
    return evaluation.exact_match(self.model, self.tokenizer, self.problems, template=self.template,
                                  max_new_tokens=self.settings.accuracy_tokens,
                                  batch_size=len(self.problems)).accuracy

  def compile_counts(self) -> dict[str, int]:
    """Compilations since this grid was built (`Compilations`): of each round variant (`round_label`), each
    sampler and the evaluation (GSM8K generation not counted)."""
    return dict(sorted(self.compilations.counts.items()))

  def expected_compiles(self) -> dict[str, int]:
    """One compilation per (method, DP, trained factor) used, sampler and evaluation: what reuse should give."""
    expected = {}
    for (m, p), rnd in self._rounds.items():
      for t in {rnd.trained(i) for i in range(1, min(self.settings.rounds, 2) + 1)}:
        expected[round_label(m, p, t)] = 1
    expected.update({sampler_label(p): 1 for p in self._samplers})
    expected["evaluate"] = 1
    return dict(sorted(expected.items()))

  # ----- one run -----

  def run(self, method: str, epsilon: float, partition: str, seed: int) -> dict[str, Any]:
    """One run of the grid (module docstring); returns its record."""
    began = time.perf_counter()
    s = self.settings
    private = not math.isinf(epsilon)
    round_fn, sample = self.round_fn(method, private), self.sampler(private)
    client_data, sizes = self.client_data(partition, seed)
    plan, spent = self.plan(epsilon, partition, seed)
    config = run_config(s, method, epsilon, partition, seed)
    key = runner.run_key(config)
    # A copy: the round donates its state, and the seed's adapters serve every method.
    state = round_fn.init(s.num_clients, jax.tree.map(jnp.copy, self.initial_adapters(seed)))
    sigma = {} if plan is None else {"noise_multiplier": plan.noise_multiplier}
    losses, clipped = [], []
    for t in range(1, s.rounds + 1):
      round_key = jax.random.fold_in(key, t)
      with self.compilations.counting(sampler_label(private)):
        ids, weights, batches = sample(round_key, client_data)
      with self.compilations.counting(round_label(method, private, round_fn.trained(t))):
        state, metrics = round_fn(state, batches, ids, weights, round_key, t, **sigma)
      losses.append(metrics["train_loss"])
      clipped.append(metrics["clipped_fraction"])
    eval_loss = self.evaluate(state.adapters)
    accuracy = self.accuracy(state.adapters)
    record = {
        "kind": "run", "method": method, "partition": partition, "target_epsilon": eps_key(epsilon), "seed": seed,
        "eval_loss": eval_loss, "perplexity": math.exp(eval_loss), "accuracy": accuracy,
        "final_train_loss": float(losses[-1]), "train_loss": [float(x) for x in jax.device_get(losses)],
        "clipped_fraction": float(np.mean(jax.device_get(clipped))),
        "epsilon_spent": spent, "noise_multiplier": None if plan is None else plan.noise_multiplier,
        "sample_rate": None if plan is None else plan.schedule.sample_rate,
        "participation": None if plan is None else plan.schedule.participation,
        "participation_rate": None if plan is None else plan.schedule.participation_rate,
        "accountant": None if plan is None else config.privacy.accountant,
        "accountant_delta": None if plan is None else plan.accountant_delta,
        "capacity": self.capacity if private else s.batch_size, "client_sizes": sizes.tolist(),
        "settings": s.training(), "seconds": time.perf_counter() - began,
    }
    return record


# ---------------------------------------------------------------------------------------------------------------
# The runs file.


def run_id(method: str, epsilon: float | None, partition: str, seed: int) -> tuple[str, float | None, str, int]:
  return (method, None if epsilon is None or math.isinf(epsilon) else float(epsilon), partition, int(seed))


def done_runs(lines: Iterable[dict[str, Any]], settings: Settings, path: Path) -> set[tuple]:
  """Ids of the finished runs; a run written under other training settings is an error (not comparable)."""
  done = set()
  for line in lines:
    if line.get("kind") != "run":
      continue
    if line["settings"] != json.loads(json.dumps(settings.training())):
      raise ValueError(
          f"{path} holds a run ({line['method']}, eps {eps_label(line['target_epsilon'])}, {line['partition']}, "
          f"seed {line['seed']}) made with other settings ({line['settings']}): use another --out, or move that file.")
    done.add(run_id(line["method"], line["target_epsilon"], line["partition"], line["seed"]))
  return done


def grid_points(settings: Settings) -> list[tuple[str, float, str, int]]:
  """(method, epsilon, partition, seed) in run order: partitions and seeds outermost, so a (partition, seed)'s
  client data and privacy plans are built once."""
  return [(m, e, p, s) for p in settings.partitions for s in settings.seeds for e in settings.epsilons
          for m in settings.methods]


def run_grid(settings: Settings, path: Path, *, grid: Grid | None = None, progress: bool = True,
             command: str = "") -> tuple[Grid | None, int]:
  """Runs every point of `settings` not yet in the runs file `path`, appending one line per run and one for
  the invocation; returns (the grid used, None if nothing ran; the number of runs made)."""
  from tqdm import tqdm

  done = done_runs(runner.MetricsLog(path).read(), settings, path)
  todo = [p for p in grid_points(settings) if run_id(*p) not in done]
  if not todo:
    return grid, 0
  began = time.perf_counter()
  if grid is not None and grid.settings != settings:
    raise ValueError("run_grid got a grid built for other settings: pass grid=None to build one for these.")
  grid = grid or Grid(settings)
  bar = tqdm(todo, desc="runs", unit="run", file=sys.stderr, disable=not progress)
  for method, epsilon, partition, seed in bar:
    record = grid.run(method, epsilon, partition, seed)
    runner.MetricsLog(path).append(record)
    bar.set_postfix(last=f"{method} eps={eps_label(epsilon)} {partition} s{seed}: {record['eval_loss']:.4f}")
  counts, expected = grid.compile_counts(), grid.expected_compiles()
  runner.MetricsLog(path).append({
      "kind": "invocation", "command": command, "runs": len(todo), "seconds": time.perf_counter() - began,
      "compile_counts": counts, "expected_compile_counts": expected, "base_eval_loss": grid.base_eval_loss,
      "capacity": grid.capacity, "device": _common.device_report(), "settings": settings.as_json()})
  if progress:
    print(f"compilations: {sum(counts.values())} (expected {sum(expected.values())}): {counts}", file=sys.stderr)
  return grid, len(todo)


# ---------------------------------------------------------------------------------------------------------------
# The report.


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (method, partition, target epsilon): mean and sample std (ddof 1; 0 for one seed) over seeds of
  the eval loss (and accuracy), the largest epsilon spent, the mean sigma, the seeds."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in runs:
    groups.setdefault((r["method"], r["partition"], r["target_epsilon"]), []).append(r)
  rows = []
  for (method, partition, epsilon), members in groups.items():
    loss = np.array([r["eval_loss"] for r in members], np.float64)
    acc = [r["accuracy"] for r in members if r.get("accuracy") is not None]
    spent = [r["epsilon_spent"] for r in members if r["epsilon_spent"] is not None]
    rows.append({
        "method": method, "partition": partition, "target_epsilon": epsilon,
        "seeds": sorted(r["seed"] for r in members), "n": len(members),
        "eval_loss_mean": float(loss.mean()), "eval_loss_std": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
        "accuracy_mean": float(np.mean(acc)) if acc else None,
        "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else (0.0 if acc else None),
        "epsilon_spent_max": max(spent) if spent else None,
        "noise_multiplier_mean": float(np.mean([r["noise_multiplier"] for r in members]))
        if members[0]["noise_multiplier"] is not None else None,
    })
  return rows


class Cells(NamedTuple):
  """The summary rows by (method, partition, target epsilon), and the methods, partitions and epsilons present,
  in the grid's order (the non-private epsilon, None, last)."""

  cell: dict[tuple[str, str, float | None], dict[str, Any]]
  methods: list[str]
  partitions: list[str]
  epsilons: list[float | None]

  @property
  def points(self) -> list[tuple[str, float | None]]:
    """(partition, epsilon) of every column of the table, partition-major."""
    return [(p, e) for p in self.partitions for e in self.epsilons]

  def loss(self, method: str, partition: str, epsilon: float | None) -> float:
    return self.cell[method, partition, epsilon]["eval_loss_mean"]


def cells(rows: Sequence[dict[str, Any]]) -> Cells:
  return Cells(
      cell={(r["method"], r["partition"], r["target_epsilon"]): r for r in rows},
      methods=[m for m in METHODS if any(r["method"] == m for r in rows)],
      partitions=[p for p in PARTITIONS if any(r["partition"] == p for r in rows)],
      epsilons=sorted({r["target_epsilon"] for r in rows}, key=lambda e: math.inf if e is None else e))


def paired_gap(runs: Sequence[dict[str, Any]], a: str, b: str, partition: str, epsilon: float | None
               ) -> tuple[float, float, int] | None:
  """(mean, standard error, n) over seeds of eval_loss(a) - eval_loss(b), paired by seed (same partition, initial
  adapters and run key), or None without common seeds. Negative: `a` is better."""
  pick = lambda m: {r["seed"]: r["eval_loss"] for r in runs
                    if r["method"] == m and r["partition"] == partition and r["target_epsilon"] == epsilon}
  ra, rb = pick(a), pick(b)
  seeds = sorted(set(ra) & set(rb))
  if not seeds:
    return None
  d = np.array([ra[s] - rb[s] for s in seeds])
  se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
  return float(d.mean()), se, len(d)


def where(partition: str, epsilon: float | None) -> str:
  """A cell's name in the findings, e.g. "IID eps 1"."""
  return f"{PARTITION_LABELS[partition]} eps {eps_label(epsilon)}"


def fedask_claim(runs: Sequence[dict[str, Any]], c: Cells) -> str | None:
  """The paper's claim: FedASK against the best other method of each cell, paired by seed."""
  if "fedask" not in c.methods or len(c.methods) < 2:
    return None
  gaps = []  # (partition, epsilon, best other method, (mean, standard error, n) of fedask minus it)
  for p, e in c.points:
    others = [m for m in c.methods if m != "fedask" and (m, p, e) in c.cell]
    if ("fedask", p, e) not in c.cell or not others:
      continue
    best = min(others, key=lambda m: c.loss(m, p, e))
    gap = paired_gap(runs, "fedask", best, p, e)
    if gap is not None:
      gaps.append((p, e, best, gap))
  if not gaps:
    return None
  wins = sum(gap[0] < 0 for *_, gap in gaps)
  # "Clear": the paired mean gap exceeds two standard errors (a rough 95% two-sided t-band would need 4.3 standard
  # errors at 3 seeds; 2 is a lenient screen, stated as such).
  clear_wins = sum(gap[0] < -2 * gap[1] for *_, gap in gaps)
  clear_losses = sum(gap[0] > 2 * gap[1] for *_, gap in gaps)
  verdict = "The claim holds here." if wins == len(gaps) else "The claim does not hold here."
  per_cell = "; ".join(f"{PARTITION_LABELS[p]}, eps {eps_label(e)}: {gap[0]:+.4f} +- {gap[1]:.4f} vs {best}"
                       for p, e, best, gap in gaps)
  return (
      "**Claim: FedASK outperforms the baselines in every privacy setting and data distribution.** FedASK has a "
      f"lower mean held-out loss than the best other method in {wins} of {len(gaps)} (partition, epsilon) cells; "
      f"by more than two paired standard errors in {clear_wins}, and is worse by more than two in {clear_losses}. "
      f"{verdict} Per cell, FedASK minus the best other method (paired by seed, mean +- standard error): "
      f"{per_cell}.")


def cell_gaps(runs: Sequence[dict[str, Any]], c: Cells, a: str, b: str,
              with_se: bool) -> tuple[int, int, str] | None:
  """`paired_gap` of a minus b in every cell where both ran: (cells where a is lower, cells, the per-cell gaps as
  text, with their standard errors if `with_se`); None if no cell has both."""
  if a not in c.methods or b not in c.methods:
    return None
  gaps = [(p, e, gap) for p, e in c.points if (gap := paired_gap(runs, a, b, p, e)) is not None]
  if not gaps:
    return None
  se = lambda gap: f" +- {gap[1]:.4f}" if with_se else ""
  per_cell = "; ".join(f"{where(p, e)}: {gap[0]:+.4f}{se(gap)}" for p, e, gap in gaps)
  return sum(gap[0] < 0 for *_, gap in gaps), len(gaps), per_cell


def rival_finding(runs: Sequence[dict[str, Any]], c: Cells, rival: str) -> str | None:
  """FedASK minus `rival` in every cell, paired by seed."""
  if (gaps := cell_gaps(runs, c, "fedask", rival, with_se=True)) is None:
    return None
  better, count, per_cell = gaps
  return (f"FedASK vs {rival} (loss difference, negative = FedASK better): lower in {better} of {count} cells; "
          f"{per_cell}.")


def alternating_finding(runs: Sequence[dict[str, Any]], c: Cells) -> str | None:
  """fedask-alt (ours) minus fedask in every cell."""
  if (gaps := cell_gaps(runs, c, "fedask-alt", "fedask", with_se=False)) is None:
    return None
  better, count, per_cell = gaps
  return (f"fedask-alt (our extension: the frozen factor alternates) vs fedask: lower loss in {better} of {count} "
          f"cells ({per_cell}).")


def factors_finding(c: Cells) -> str | None:
  """Lemma 1's direction: the methods that noise one factor per DP round against those that noise both."""
  one = [m for m in c.methods if get_strategy(m).trained(1, True) != "both"]
  both = [m for m in c.methods if m not in one]
  private = [e for e in c.epsilons if e is not None]
  if not (one and both and private):
    return None

  def mean(group: list[str], e: float) -> float:
    return np.mean([c.loss(m, p, e) for m in group for p in c.partitions if (m, p, e) in c.cell])

  per_epsilon = "; ".join(f"eps {eps_label(e)}: {mean(one, e):.4f} vs {mean(both, e):.4f}" for e in private)
  return (
      "Noise on one factor vs on both (the paper's Lemma 1: noising both factors adds a term quadratic in "
      f"sigma): mean loss of the methods that train one factor under DP ({', '.join(one)}) vs those that train "
      f"both ({', '.join(both)}), over partitions: {per_epsilon}.")


def privacy_cost_finding(c: Cells) -> str | None:
  """How much of the non-private result survives DP: per method, loss at epsilon minus the non-private loss."""
  if None not in c.epsilons or all(e is None for e in c.epsilons):
    return None
  costs = []
  for m in c.methods:
    for e in [e for e in c.epsilons if e is not None]:
      diffs = [c.loss(m, p, e) - c.loss(m, p, None) for p in c.partitions
               if (m, p, e) in c.cell and (m, p, None) in c.cell]
      if diffs:
        costs.append(f"{m} eps {eps_label(e)}: {float(np.mean(diffs)):+.4f}")
  if not costs:
    return None
  return ("Privacy cost (mean over partitions of loss at epsilon minus the non-private loss): "
          + "; ".join(costs) + ".")


def dp_gain_finding(rows: Sequence[dict[str, Any]], base_loss: float | None) -> str | None:
  """The best DP cell's loss reduction from the base model, per epsilon: how far the DP runs moved at all."""
  private = [r for r in rows if r["target_epsilon"] is not None]
  if base_loss is None or not private:
    return None
  gains = []
  for e in sorted({r["target_epsilon"] for r in private}):
    top = min((r for r in private if r["target_epsilon"] == e), key=lambda r: r["eval_loss_mean"])
    gains.append(f"eps {eps_label(e)}: {base_loss - top['eval_loss_mean']:.4f} ({top['method']}, "
                 f"{PARTITION_LABELS[top['partition']]})")
  return ("Largest loss reduction from the base model under DP: " + "; ".join(gains) + ". Where it is small, the "
          "DP cells compare methods that barely moved, and differences smaller than the seed spread are not "
          "evidence either way.")


def range_finding(rows: Sequence[dict[str, Any]], base_loss: float | None) -> str | None:
  """The base model's loss and the best and worst cells."""
  if base_loss is None or not rows:
    return None
  best = min(rows, key=lambda r: r["eval_loss_mean"])
  worst = max(rows, key=lambda r: r["eval_loss_mean"])

  def name(r: dict[str, Any]) -> str:
    return f"{r['method']}, {PARTITION_LABELS[r['partition']]}, eps {eps_label(r['target_epsilon'])}"

  return (f"Every run starts from the base model's held-out loss {base_loss:.4f}; the best cell reaches "
          f"{best['eval_loss_mean']:.4f} ({name(best)}), the worst {worst['eval_loss_mean']:.4f} ({name(worst)}).")


def spent_finding(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str | None:
  """The epsilon actually spent against the target."""
  spent = [r for r in rows if r["epsilon_spent_max"] is not None]
  if not spent:
    return None
  ratio = max(r["epsilon_spent_max"] / r["target_epsilon"] for r in spent)
  return (f"Epsilon actually spent (the smallest client, {accounting(runs)}) is at most {ratio:.4f} x the target in "
          "every private cell.")


def findings(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], base_loss: float | None) -> list[str]:
  """Sentences on the paper's claims, generated from the numbers (each finding is left out where its methods or
  cells are missing)."""
  c = cells(rows)
  candidates = [fedask_claim(runs, c), rival_finding(runs, c, "fedavg"), rival_finding(runs, c, "ffa-lora"),
                alternating_finding(runs, c), factors_finding(c), privacy_cost_finding(c),
                dp_gain_finding(rows, base_loss), range_finding(rows, base_loss), spent_finding(runs, rows)]
  return [f for f in candidates if f is not None]


def accounting(runs: Sequence[dict[str, Any]]) -> str:
  """How the private runs were accounted, e.g. 'pld, sampled participation'. Runs recorded before the records
  named their accountant and participation model were accounted with RDP and worst-case participation."""
  kinds = sorted({(r.get("accountant", "rdp"), r.get("participation", "worst_case"))
                  for r in runs if r["target_epsilon"] is not None})
  return "; ".join(f"{accountant.upper()}, {participation.replace('_', '-')} participation"
                   for accountant, participation in kinds)


def plot(rows: Sequence[dict[str, Any]], base_loss: float | None, path: Path, title: str) -> None:
  """Eval loss vs epsilon per method, one panel per partition, error bars = sample std over seeds."""
  c = cells(rows)
  fig, axes = plt.subplots(1, len(c.partitions), figsize=(5 * len(c.partitions), 4), sharey=True, squeeze=False)
  x = np.arange(len(c.epsilons))
  for ax, p in zip(axes[0], c.partitions):
    for i, m in enumerate(c.methods):
      pts = [(j, c.cell[m, p, e]) for j, e in enumerate(c.epsilons) if (m, p, e) in c.cell]
      if not pts:
        continue
      offset = (i - (len(c.methods) - 1) / 2) * 0.04
      ax.errorbar([j + offset for j, _ in pts], [r["eval_loss_mean"] for _, r in pts],
                  yerr=[r["eval_loss_std"] for _, r in pts], marker="o", capsize=3, label=m,
                  linewidth=2.2 if m == "fedask" else 1.2)
    if base_loss is not None:
      ax.axhline(base_loss, color="gray", linestyle="--", linewidth=1, label="base model")
    ax.set_xticks(x, [eps_label(e) for e in c.epsilons])
    ax.set_xlabel("target epsilon (delta = 1e-5; inf = non-private)")
    ax.set_title(PARTITION_LABELS[p])
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("held-out loss (nats / answer token)")
  axes[0][-1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def provenance(runs: Sequence[dict[str, Any]], invocations: Sequence[dict[str, Any]], command: str, stem: str) -> str:
  """The report's command and the invocations that made its runs (runs, minutes, device, jax)."""
  made = ", ".join(f"{i['runs']} runs in {i['seconds'] / 60:.1f} min on {i['device']['device_kind']} "
                   f"(jax {i['device']['jax']})" for i in invocations)
  return f"Generated by `{command}` from `{stem}_runs.jsonl` ({len(runs)} runs; {made})."


def setup_text(runs: Sequence[dict[str, Any]], c: Cells, settings: Settings) -> str:
  """Model, data, federation, training, DP, seeds and the held-out loss."""
  s = settings
  examples = "all" if s.max_train_examples is None else f"the first {s.max_train_examples}"
  dirichlet = (f" (Dirichlet clients hold at least {s.min_client_size} examples)"
               if any(p != "iid" for p in c.partitions) else "")
  seeds = sorted({r["seed"] for r in runs})
  return (
      "**Setup.** Embedded base model (1.05M-parameter Llama, `experiments/base_model`), GSM8K question -> worked "
      f"answer (plain template, calculator annotations stripped, {s.max_seq_len} tokens), {examples} training "
      f"problems over {s.num_clients} clients, {s.clients_per_round} per round, {s.rounds} rounds of "
      f"{s.local_steps} local AdamW steps (lr 1e-2, the quickstart's), batch {s.batch_size} (the expected Poisson "
      "batch under DP), LoRA r 8 on q_proj and v_proj, sketch oversampling 2, FedProx mu 0.01. DP: example-level "
      f"(epsilon, 1e-5) for every client, B-space DP-SGD with C = 1, sigma calibrated ({accounting(runs)}; "
      f"{s.rounds} rounds of {s.local_steps} steps, {s.clients_per_round} of {s.num_clients} clients per round) for "
      f"the smallest client's rate q = {s.batch_size} / min_k n_k{dirichlet}. Seeds {seeds}: the seed sets the "
      "partition, the initial adapters and every random draw; for one seed all methods see the same partition, "
      "start and client sampling. Held-out loss: "
      f"token-mean cross-entropy on the answers of the first {s.eval_examples} GSM8K test problems. FedSA-LoRA is "
      "evaluated with its global adapters (the mean lora_b of the last round's clients). Nothing was tuned: every "
      "hyper-parameter is the quickstart's, fixed before any run.")


def loss_table(c: Cells) -> list[str]:
  """One row per (epsilon, method): the loss per partition (bold: the column's best), mean sigma, eps spent."""
  best = {(p, e): min((m for m in c.methods if (m, p, e) in c.cell), key=lambda m: c.loss(m, p, e))
          for p, e in c.points if any((m, p, e) in c.cell for m in c.methods)}
  rows = []
  for e in c.epsilons:
    for m in c.methods:
      present = [c.cell.get((m, p, e)) for p in c.partitions]
      if not any(present):
        continue
      losses = []
      for p, r in zip(c.partitions, present):
        text = "-" if r is None else f"{r['eval_loss_mean']:.4f} +- {r['eval_loss_std']:.4f}"
        losses.append(f"**{text}**" if r is not None and best.get((p, e)) == m else text)
      sigma = [r["noise_multiplier_mean"] for r in present if r and r["noise_multiplier_mean"] is not None]
      spent = [r["epsilon_spent_max"] for r in present if r and r["epsilon_spent_max"] is not None]
      rows.append([m, eps_label(e), *losses, f"{np.mean(sigma):.3g}" if sigma else "-",
                   f"{max(spent):.3f}" if spent else "-"])
  header = ["method", "epsilon", *(PARTITION_LABELS[p] for p in c.partitions), "sigma", "eps spent"]
  return _common.table(header, rows, "lr" + "r" * len(c.partitions) + "rr")


def accuracy_note(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], settings: Settings) -> str:
  """GSM8K exact match: how many problems were solved at all, and the best cell."""
  s = settings
  scored = [r for r in rows if r["accuracy_mean"] is not None]
  if not scored:
    return ("- Task accuracy (GSM8K exact match) was not measured in these runs (settings.accuracy_problems = "
            "0).")
  top = max(scored, key=lambda r: r["accuracy_mean"])
  solved = sum(round(r["accuracy"] * s.accuracy_problems) for r in runs if r.get("accuracy") is not None)
  best_cell = (f"the best cell mean is {top['accuracy_mean']:.3f} ({top['method']}, "
               f"{PARTITION_LABELS[top['partition']]}, eps {eps_label(top['target_epsilon'])}); " if solved else "")
  return (
      "- Task accuracy, GSM8K exact match (`fedask_jax.evaluation.exact_match`: greedy, up to "
      f"{s.accuracy_tokens} new tokens, the first {s.accuracy_problems} test problems): {best_cell}{solved} "
      f"problems solved over all {len(runs)} runs together. A 1M-parameter model does not do grade-school "
      "arithmetic, so accuracy cannot separate the methods here (per-run values are in the JSON); the held-out "
      "loss does.")


def compile_notes(invocations: Sequence[dict[str, Any]]) -> list[str]:
  """Per invocation: its compilations against one per round variant, sampler and evaluation."""
  if not invocations:
    return []
  lines = ["", "Compile reuse (one compilation per round variant used, per sampler and for the evaluation; "
           "GSM8K generation not counted):"]
  for inv in invocations:
    if "compile_counts" not in inv:  # an invocation cut off before its closing line (its "note" says how)
      lines.append(f"- `{inv['command']}`: {inv['runs']} runs; compilations not recorded: {inv['note']}.")
      continue
    counts = inv["compile_counts"]
    verdict = "as expected" if counts == inv["expected_compile_counts"] else "NOT as expected"
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
    lines.append(f"- `{inv['command']}`: {inv['runs']} runs, {sum(counts.values())} compilations, {verdict} "
                 f"({detail}).")
  return lines


SCALE_NOTE = (
    "- Scale: the paper fine-tunes Llama-2-7B/13B for 800 rounds and scores task accuracy (MMLU 46.15 vs FedAvg "
    "45.13 non-private; 45.80 vs 42.07 at eps 1; GSM8K 22.7 vs FFA-LoRA 14.2 at eps 1). This is a 1M-parameter "
    "model for a few rounds, measured by held-out loss: it tests the direction of the claims at small scale, not "
    "their size.")


def markdown(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], invocations: Sequence[dict[str, Any]],
             settings: Settings, command: str, stem: str) -> str:
  c = cells(rows)
  base_loss = invocations[-1]["base_eval_loss"] if invocations else None
  return "\n".join([
      "# Method comparison: held-out loss by method, privacy level and data distribution", "",
      provenance(runs, invocations, command, stem), "",
      setup_text(runs, c, settings), "",
      "Held-out loss, mean +- sample std over seeds (bold: the lowest mean of the column's epsilon); sigma: mean "
      "noise multiplier over partitions and seeds; eps spent: the largest over partitions and seeds.", "",
      *loss_table(c), "",
      "## What the numbers show", "",
      *(f"- {f}" for f in findings(runs, rows, base_loss)),
      SCALE_NOTE,
      accuracy_note(runs, rows, settings),
      *compile_notes(invocations), "",
      f"![held-out loss vs epsilon]({stem}.png)", "",
  ])


def write_report(settings: Settings, out: Path, stem: str, command: str) -> dict[str, Any]:
  """Rebuilds `<stem>.md`, `.json` and `.png` in `out` from `<stem>_runs.jsonl`; returns the JSON object."""
  lines = runner.MetricsLog(out / f"{stem}_runs.jsonl").read()
  # The last record of each run (two invocations started on the same slice at once would both append it).
  runs = list({run_id(r["method"], r["target_epsilon"], r["partition"], r["seed"]): r
               for r in lines if r.get("kind") == "run"}.values())
  invocations = [r for r in lines if r.get("kind") == "invocation"]
  if not runs:
    raise ValueError(f"{out / (stem + '_runs.jsonl')} holds no runs yet: run the grid first.")
  rows = summarize(runs)
  base_loss = invocations[-1]["base_eval_loss"] if invocations else None
  example = (settings.methods[0], settings.epsilons[0], settings.partitions[-1], settings.seeds[0])
  config = {"base": str(_common.QUICKSTART.relative_to(_common.REPO)),
            "overrides": "run_overrides(settings, method, epsilon, partition, seed), e.g. example",
            "example": {"run": [example[0], eps_key(example[1]), *example[2:]],
                        "overrides": run_overrides(settings, *example),
                        "resolved": to_dict(run_config(settings, *example))}}
  result = {"command": command, "settings": settings.as_json(), "config": config, "device": _common.device_report(),
            "base_eval_loss": base_loss, "summary": rows, "runs": runs, "invocations": invocations,
            "findings": findings(runs, rows, base_loss)}
  _common.save(out / f"{stem}.json", result)
  (out / f"{stem}.md").write_text(markdown(runs, rows, invocations, settings, command, stem), encoding="utf-8")
  plot(rows, base_loss, out / f"{stem}.png",
       f"Held-out loss after {settings.rounds} rounds, mean +- std over {len({r['seed'] for r in runs})} seeds")
  return result


def main(argv: Sequence[str] | None = None) -> None:
  parser = _common.parser(__doc__, "the same as --mode quick",
                          report_help="only rebuild the report from the runs file")
  parser.add_argument("--mode", choices=tuple(MODES), default=None,
                      help="quick: a small grid (< 20 min on a 2-core CPU); cpu: the whole grid with short runs "
                           "(~70 min on a 2-core CPU); full (the default): the whole grid at full size (a GPU)")
  parser.add_argument("--only-methods", default=None, help="comma-separated subset of the methods")
  parser.add_argument("--only-partitions", default=None, help="comma-separated subset of iid,dir0.5,dir0.1")
  parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the mode's)")
  args = parser.parse_args(argv)
  _common.quiet_accounting()
  if args.quick and args.mode not in (None, "quick"):
    parser.error(f"--quick is --mode quick: it contradicts --mode {args.mode}")
  mode = "quick" if args.quick else args.mode or "full"
  settings = MODES[mode]
  if args.only_methods:
    chosen = tuple(m.strip() for m in args.only_methods.split(","))
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
      parser.error(f"--only-methods: unknown {unknown}; choose from {','.join(METHODS)}")
    settings = dataclasses.replace(settings, methods=chosen)
  if args.only_partitions:
    chosen = tuple(p.strip() for p in args.only_partitions.split(","))
    if set(chosen) - set(PARTITIONS):
      parser.error(f"--only-partitions: choose from {','.join(PARTITIONS)}")
    settings = dataclasses.replace(settings, partitions=chosen)
  if args.seeds:
    settings = dataclasses.replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
  stem = NAME + ("" if mode == "full" else f"_{mode}")
  out = args.out or _common.RESULTS
  out.mkdir(parents=True, exist_ok=True)
  command = _common.command(NAME, argv)
  if not args.report:
    run_grid(settings, out / f"{stem}_runs.jsonl", command=command)
  write_report(MODES[mode], out, stem, command)
  print(f"wrote {out}/{stem}.{{md,json,png}} and {stem}_runs.jsonl")


if __name__ == "__main__":
  main()
