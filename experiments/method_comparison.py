"""Method comparison: FedASK against the baselines across privacy levels and data distributions, each method at its
own tuned learning rate (issue 6, item 3; the protocol of issue 14).

    python experiments/method_comparison.py --quick              # tuning, then the grid: a small check of both
    python experiments/method_comparison.py --mode cpu --tune    # 1. tune each method's lr on the validation split
    python experiments/method_comparison.py --mode cpu           # 2. the whole grid at the tuned lrs (20 rounds)
    python experiments/method_comparison.py --mode long          # 3. 100 rounds, a subset, at the cpu mode's lrs
    python experiments/method_comparison.py --mode cpu --report  # rebuild the report from the runs files
    python experiments/method_comparison.py --mode cpu --tune --only-methods fedavg,ffa-lora   # a slice

The grid: methods x target epsilon {1, 3, 6, inf (non-private)} x partitions {IID, Dirichlet(0.5), Dirichlet(0.1)
over GSM8K's derived step-count category} x seeds, on the embedded base model (`experiments/base_model`) and GSM8K
(`data/gsm8k`). The methods are the seven strategies, FedASK's and fedask-alt's named with their reconstruction
gauge (`fedask_jax.sketch.split_factors`): `fedask:balanced` is the paper's, `fedask:orthonormal` and
`fedask:norm` hold the frozen factor at its initial scale. Each run is what `fedask-jax train` would do with
`experiments/configs/quickstart.yaml` and the run's overrides (`run_config`): the runner's run key and initial
adapters for the seed, its partition for the seed, its privacy plan (sigma calibrated for the smallest client,
`runner.plan_privacy`), its sampler and key streams (`runner.round_sampler`), R rounds, then the held-out loss.

Protocol (fixed before any run; nothing is chosen on the test problems):
- Data. The federation trains on the first `train_examples` GSM8K training problems; the next
  `validation_examples` training problems are the validation split, on which learning rates are tuned; the
  held-out loss of the grid is measured on the first `eval_examples` GSM8K test problems, never used for a choice.
- Learning rate. Per method and target epsilon (the best rate moves with sigma), on IID data with the tuning seeds
  (disjoint from the grid's seeds, so the grid's runs are fresh draws, not the tuning runs that won), over the
  lattice lr_k = 0.1 * 2^k (AdamW): the mode's `tuning_steps` (cpu: k = -5..0, 3.1e-3 to 0.1) and, wherever the
  best mean validation loss sits on an edge of the rates run so far, the next rate beyond it, up to
  `max_extension` steps beyond the base lattice, so that every chosen rate has a worse neighbour on each side.
  The chosen rate is the argmin of the mean validation loss over the tuning seeds. An invocation of the grid first
  finishes the tuning it needs (`--tune` runs the tuning only); the long mode uses, and if need be runs, the cpu
  mode's tuning of its methods and epsilons.
- Comparison. Every method of a cell shares the seed's partition, initial adapters, client sampling and key
  streams; differences are paired by seed, reported as mean +- standard error.

Compile reuse. Every run of the grid shares one static shape, and the learning rate and sigma are traced
arguments of the round (the round is `simulation.round_step` with the runner's optimiser built from a traced lr),
so each (method, DP on/off, trained factor) compiles once and serves every rate, epsilon, partition and seed:
- every client's data are padded to N rows, the number of training examples (an upper bound on any client's
  size, whatever the partition): the Poisson sampler draws over the padded rows, so padding to a constant of
  the settings also makes a run's batches independent of which other runs share its invocation;
- the batch capacity of DP rounds is `batch_capacity(N + 1, b / N, overflow_prob)`, at least what
  `runner.plan_privacy` gives for any partition of the N examples (the binomial tail at a fixed mean b grows
  with n), checked against each run's plan; non-private rounds use b slots, as the runner does.
The script counts the compilations (the calls of each round variant, sampler and the evaluation during which XLA
compiled, through `jax.monitoring`) and stores them with each invocation.

Modes. quick: a small grid for tests and CI (4 clients, 6 rounds). cpu: the whole grid (every method, epsilon and
partition, 3 seeds) on the paper's federation (10 clients, 2 per round) with short runs (20 rounds x 3 local steps
of batch 8, 128 tokens). long: the same federation for 100 rounds, for the FedASK gauges, FFA-LoRA and FedAvg at
epsilon 1 and 6, IID and Dirichlet(0.1). full: 80 rounds x 5 local steps of batch 16, 192 tokens (a GPU).

Timing (2-core CPU shared with other jobs; the module's README section gives the measured totals): a cpu-mode run
takes about 5 s without DP and 20 s with DP on a quiet machine (a DP step computes per-example gradients for the
Poisson batch's capacity, 35 slots for an expected 8); several times that under load. Split an invocation over
processes with disjoint --only-methods (they share the runs file); an invocation stopped by a time limit loses
only the run in flight: the same command continues.

Files (in --out, default experiments/results; stem `method_comparison_tuned` for full,
`method_comparison_tuned_<mode>` otherwise; the `method_comparison*` files without "tuned" are the records of the
earlier, untuned grid, every method at the quickstart's lr 1e-2):
- `<stem>_tuning_runs.jsonl` and `<stem>_runs.jsonl`: one JSON line per finished tuning / grid run (`"kind":
  "run"`) and one per invocation (`"kind": "invocation"`: command, device, compile counts, base-model loss). Runs
  already there are skipped, so a killed or split grid continues where it stopped; a line written under other
  settings is an error.
- `<stem>.md`, `.json`, `.png` (held-out loss by cell) and `<stem>_tuning.png` (validation loss against lr per
  method): rebuilt from the runs files at the end of every invocation and by `--report`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import _common  # experiments/_common.py
import jax
import jax.numpy as jnp
import numpy as np
from _common import plt
from flax import nnx

from fedask_jax import data as fdata
from fedask_jax import evaluation, privacy, runner, sketch
from fedask_jax.adapters import Adapters
from fedask_jax.config import Config, load_config, to_dict
from fedask_jax.lora import from_adapters, to_adapters
from fedask_jax.models import load_tokenizer
from fedask_jax.simulation import DPConfig, FederatedRound, round_step
from fedask_jax.strategies import STRATEGIES, get_strategy

NAME = "method_comparison"
STEM = "method_comparison_tuned"  # the results of this protocol (module docstring: files)

SKETCH_STRATEGIES = ("fedask", "fedask-alt")
METHODS = (
  "fedask:balanced",
  "fedask:orthonormal",
  "fedask:norm",
  "fedask-alt:balanced",
  "fedavg",
  "ffa-lora",
  "fedsa-lora",
  "fedprox",
  "scaffold",
)
# name -> (data.partition, data.dirichlet_alpha); the paper's non-IID settings are Dirichlet(0.1) and (0.5).
PARTITIONS = {"iid": ("iid", None), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
PARTITION_LABELS = {"iid": "IID", "dir0.5": "Dirichlet(0.5)", "dir0.1": "Dirichlet(0.1)"}
# The learning-rate lattice lr_k = LR_TOP * 2^k (module docstring: protocol).
LR_TOP = 0.1


def lattice_lr(step: int) -> float:
  """The learning rate of lattice step k: 0.1 * 2^k (k = -5..0 spans 3.1e-3 to 0.1)."""
  return LR_TOP * 2.0**step


def split_method(method: str) -> tuple[str, str | None]:
  """(strategy, gauge) of a method name: "fedask:norm" -> ("fedask", "norm"), "fedavg" -> ("fedavg", None)."""
  strategy, _, gauge = method.partition(":")
  if (
    strategy not in STRATEGIES
    or (strategy in SKETCH_STRATEGIES) != bool(gauge)
    or (gauge and gauge not in sketch.GAUGES)
  ):
    raise ValueError(
      f"method {method!r}: expected a strategy of {sorted(STRATEGIES)}, with ':<gauge>' (one of {sketch.GAUGES}) "
      f"for {' and '.join(SKETCH_STRATEGIES)} only, e.g. 'fedask:balanced'."
    )
  return strategy, gauge or None


@dataclasses.dataclass(frozen=True)
class Settings:
  """The grid, the training sizes and the tuning protocol of one mode. epsilons: math.inf is the non-private run.

  train_examples: the federation's training problems (the first ones of GSM8K's train split; None: all);
  validation_examples: the next training problems, the validation split of the tuning. min_client_size bounds the
  Dirichlet partitions' smallest client, and with it the Poisson rate q = batch_size / min_k n_k that sigma is
  calibrated for (every client's data must meet the target epsilon). accuracy_problems: GSM8K test problems scored
  by exact match after each run (0: not measured). tuning_steps: the base lattice steps k of lr_k = 0.1 * 2^k;
  max_extension: how many steps beyond them the edge rule may add; tuning_seeds: the tuning runs' seeds (IID);
  lr_source: the mode whose tuned rates the grid uses (None: this mode's own tuning).
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
  train_examples: int | None
  validation_examples: int
  eval_examples: int
  eval_batch_size: int
  min_client_size: int
  tuning_steps: tuple[int, ...]
  max_extension: int
  tuning_seeds: tuple[int, ...]
  lr_source: str | None = None
  accuracy_problems: int = 0
  accuracy_tokens: int = 128

  def as_json(self) -> dict[str, Any]:
    """The settings as JSON values (the non-private epsilon inf as None)."""
    return dict(dataclasses.asdict(self), epsilons=[eps_key(e) for e in self.epsilons])

  def training(self) -> dict[str, Any]:
    """The settings that change a run's result (the grid's axes and the tuning protocol excluded): runs agree
    on these to be compared."""
    other = ("methods", "epsilons", "partitions", "seeds", "tuning_steps", "max_extension", "tuning_seeds", "lr_source")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in other}


# GSM8K's train split holds 7,473 problems: the last 200 are the validation split of the cpu, long and full modes.
GSM8K_TRAIN = 7473
MODES = {
  # 4 IID clients of 500 examples, the sketch methods and two baselines, eps {1, inf}, 3 seeds; 3 rates, 1 seed.
  "quick": Settings(
    methods=("fedask:balanced", "fedask:norm", "fedavg", "ffa-lora"),
    epsilons=(1.0, math.inf),
    partitions=("iid",),
    seeds=(0, 1, 2),
    rounds=6,
    num_clients=4,
    clients_per_round=2,
    local_steps=2,
    batch_size=8,
    max_seq_len=96,
    train_examples=2000,
    validation_examples=64,
    eval_examples=64,
    eval_batch_size=32,
    min_client_size=64,
    tuning_steps=(-3, -2, -1),
    max_extension=0,
    tuning_seeds=(100,),
    accuracy_problems=0,
  ),
  # The whole grid (9 x 4 x 3 x 3 = 324 runs) on the paper's federation, with runs short enough for a CPU.
  "cpu": Settings(
    methods=METHODS,
    epsilons=(1.0, 3.0, 6.0, math.inf),
    partitions=tuple(PARTITIONS),
    seeds=(0, 1, 2),
    rounds=20,
    num_clients=10,
    clients_per_round=2,
    local_steps=3,
    batch_size=8,
    max_seq_len=128,
    train_examples=GSM8K_TRAIN - 200,
    validation_examples=200,
    eval_examples=200,
    eval_batch_size=50,
    min_client_size=160,
    tuning_steps=tuple(range(-5, 1)),
    max_extension=3,
    tuning_seeds=(100, 101, 102),
    accuracy_problems=64,
    accuracy_tokens=128,
  ),
  # Long runs (100 rounds) of the FedASK gauges and the two closest baselines, at the cpu mode's tuned rates.
  "long": Settings(
    methods=("fedask:balanced", "fedask:orthonormal", "fedask:norm", "ffa-lora", "fedavg"),
    epsilons=(1.0, 6.0),
    partitions=("iid", "dir0.1"),
    seeds=(0, 1, 2),
    rounds=100,
    num_clients=10,
    clients_per_round=2,
    local_steps=3,
    batch_size=8,
    max_seq_len=128,
    train_examples=GSM8K_TRAIN - 200,
    validation_examples=200,
    eval_examples=200,
    eval_batch_size=50,
    min_client_size=160,
    tuning_steps=(),
    max_extension=0,
    tuning_seeds=(),
    lr_source="cpu",
    accuracy_problems=0,
  ),
  # The paper's federation at full length (a GPU), 9 x 4 x 3 x 3 = 324 runs.
  "full": Settings(
    methods=METHODS,
    epsilons=(1.0, 3.0, 6.0, math.inf),
    partitions=tuple(PARTITIONS),
    seeds=(0, 1, 2),
    rounds=80,
    num_clients=10,
    clients_per_round=2,
    local_steps=5,
    batch_size=16,
    max_seq_len=192,
    train_examples=GSM8K_TRAIN - 200,
    validation_examples=200,
    eval_examples=200,
    eval_batch_size=50,
    min_client_size=160,
    tuning_steps=tuple(range(-5, 1)),
    max_extension=3,
    tuning_seeds=(100, 101, 102),
    accuracy_problems=64,
    accuracy_tokens=128,
  ),
}


def eps_key(epsilon: float | None) -> float | None:
  """A target epsilon as stored in JSON: None for the non-private run (inf)."""
  return None if epsilon is None or math.isinf(epsilon) else float(epsilon)


def eps_label(epsilon: float | None) -> str:
  return "inf" if epsilon is None or math.isinf(epsilon) else f"{epsilon:g}"


def run_overrides(
  settings: Settings, method: str, epsilon: float, partition: str, seed: int, lr: float | None = None
) -> list[str]:
  """The overrides of the quickstart that make one run's config: the settings, the grid point and the learning
  rate (None: the quickstart's)."""
  s = settings
  strategy, gauge = split_method(method)
  scheme, alpha = PARTITIONS[partition]
  values = {
    "strategy": strategy,
    "rounds": s.rounds,
    "num_clients": s.num_clients,
    "clients_per_round": s.clients_per_round,
    "local_steps": s.local_steps,
    "batch_size": s.batch_size,
    "seed": seed,
    "model.path": _common.REPO / "experiments/base_model",
    "data.path": _common.REPO / "data/gsm8k",
    "data.max_seq_len": s.max_seq_len,
    "data.max_train_examples": s.train_examples,
    "data.partition": scheme,
    "data.min_client_size": s.min_client_size,
    "eval.max_examples": s.eval_examples,
    "eval.batch_size": s.eval_batch_size,
    "privacy.enabled": not math.isinf(epsilon),
    "client_chunk": _common.cpu_client_chunk(),
  }
  if gauge is not None:
    values["sketch.gauge"] = gauge
  if lr is not None:
    values["lr"] = repr(float(lr))
  if alpha is not None:
    values["data.dirichlet_alpha"] = alpha
  if not math.isinf(epsilon):
    values["privacy.target_epsilon"] = epsilon
  return _common.overrides(values)


def run_config(
  settings: Settings, method: str, epsilon: float, partition: str, seed: int, lr: float | None = None
) -> Config:
  """The config of one run (`run_overrides` applied to the quickstart's), as `fedask-jax train` would load it."""
  return load_config(_common.QUICKSTART, run_overrides(settings, method, epsilon, partition, seed, lr))


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
  data and validation split, one `FederatedRound` and one compiled round per (method, DP on/off, trained factor),
  one sampler per sampling mode, and per (partition, seed) the padded client data and the privacy plans."""

  def __init__(self, settings: Settings):
    self.settings = settings
    # The seed of the configs whose seed does not matter (the model, data, rounds, samplers): the first one run.
    self.seed = (settings.seeds or settings.tuning_seeds)[0]
    base = run_config(settings, settings.methods[0], math.inf, "iid", self.seed)
    self.model = runner.load_model(base)
    self.tokenizer = load_tokenizer(base.model.path)
    self.eval_data = runner.load_eval_data(base, self.tokenizer)
    self.records = runner.load_records(base, "train", base.data.max_train_examples)
    self.template = fdata.get_template(base.data.template, **base.data.template_fields)
    self.encoded = fdata.encode(self.records, self.template, self.tokenizer, base.data.max_seq_len)
    held = runner.load_records(base, "train", len(self.records) + settings.validation_examples)[len(self.records) :]
    if len(held) != settings.validation_examples:
      raise ValueError(
        f"the train split holds {len(self.records) + len(held)} problems: too few for "
        f"{len(self.records)} training and {settings.validation_examples} validation problems."
      )
    self.validation_data = fdata.encode(held, self.template, self.tokenizer, base.data.max_seq_len)
    n = settings.accuracy_problems
    self.problems = runner.load_records(base, "eval", n) if n else []
    n = self.num_examples = len(self.records)
    self.capacity = min(n, privacy.batch_capacity(n + 1, settings.batch_size / n, base.privacy.overflow_prob))
    self._rounds: dict[tuple[str, bool], FederatedRound] = {}
    self._compiled: dict[tuple[str, bool, str], Any] = {}
    self._samplers: dict[bool, Any] = {}
    self._clients: dict[tuple[str, int], tuple[fdata.ClientData, np.ndarray]] = {}
    self._plans: dict[tuple[float, str, int], tuple[privacy.PrivacyPlan | None, float | None]] = {}
    self._adapters: dict[int, Adapters] = {}
    self.compilations = Compilations()
    self.base_eval_loss = self.evaluate(self.initial_adapters(self.seed))

  # ----- shared, built once -----

  def federated_round(self, method: str, private: bool) -> FederatedRound:
    """The round of `method` with or without DP (its init, schedule, local training and frozen state); sigma
    and the learning rate are passed per call (`compiled`), so the DPConfig's sigma and the lr are placeholders."""
    if (method, private) not in self._rounds:
      config = run_config(self.settings, method, 1.0 if private else math.inf, "iid", self.seed)
      dp = (
        None
        if not private
        else DPConfig(
          clip_norm=config.privacy.clip_norm,
          noise_multiplier=1.0,
          expected_batch_size=float(config.batch_size),
          mechanism=config.privacy.mechanism,
        )
      )
      self._rounds[method, private] = FederatedRound(
        self.model,
        runner.make_strategy(config),
        optimizer=runner.make_optimizer(config),
        dp=dp,
        client_chunk=config.client_chunk,
      )
    return self._rounds[method, private]

  def compiled(self, method: str, private: bool, trained: str):
    """`simulation.round_step` of (method, DP, trained factor), jitted with the learning rate and sigma traced:
    (lr, state, frozen_state, batches, ids, weights, round_key[, sigma]) -> (state, metrics), the state donated.
    The local optimiser is the runner's (`runner.make_optimizer`) at the traced rate. The metrics: train_loss,
    clipped_fraction, the Frobenius norm of every layer's lora_a after the round [layers] (the frozen factor under
    DP) and, for the sketch strategies, their exactness certificate reconstruction_error."""
    key = (method, private, trained)
    if key not in self._compiled:
      fed = self.federated_round(method, private)
      config = run_config(self.settings, method, 1.0 if private else math.inf, "iid", self.seed)

      def one_round(lr, state, frozen_state, batches, ids, weights, round_key, *sigma):
        optimizer = runner.make_optimizer(dataclasses.replace(config, lr=lr))
        training = dataclasses.replace(fed.training, optimizer=optimizer)
        new, metrics = round_step(
          training,
          trained,
          state,
          frozen_state,
          batches,
          ids,
          weights,
          round_key,
          *sigma,
          client_chunk=fed.client_chunk,
          mesh=fed.mesh,
        )
        norms = jnp.stack([jnp.linalg.norm(f.lora_a) for f in new.adapters.values()])
        kept = ("train_loss", "clipped_fraction", "reconstruction_error")
        return new, dict({k: v for k, v in metrics.items() if k in kept}, lora_a_norm=norms)

      self._compiled[key] = jax.jit(one_round, donate_argnums=1)
    return self._compiled[key]

  def sampler(self, private: bool):
    if private not in self._samplers:
      config = run_config(self.settings, self.settings.methods[0], 1.0 if private else math.inf, "iid", self.seed)
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

  def plan(self, epsilon: float, partition: str, seed: int) -> tuple[privacy.PrivacyPlan | None, float | None]:
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
            f"the shared capacity {self.capacity}: the module docstring's bound does not hold for these settings."
          )
        spent = privacy.epsilon_spent(
          plan.schedule, plan.noise_multiplier, plan.accountant_delta, config.privacy.accountant
        )
        self._plans[key] = (plan, spent)
    return self._plans[key]

  def initial_adapters(self, seed: int) -> Adapters:
    """The runner's initial adapters for `seed` (`runner.load_model`: fold_in(run_key, ADAPTER_INIT_STREAM))."""
    if seed not in self._adapters:
      config = run_config(self.settings, self.settings.methods[0], math.inf, "iid", seed)
      self._adapters[seed] = to_adapters(nnx.state(runner.load_model(config), nnx.LoRAParam))
    return self._adapters[seed]

  def evaluate(self, adapters: Adapters, data: fdata.EncodedDataset | None = None) -> float:
    """Token-mean loss of the model with `adapters` on `data` (default: the held-out test problems)."""
    nnx.update(self.model, from_adapters(nnx.state(self.model, nnx.LoRAParam), adapters))
    data = self.eval_data if data is None else data
    with self.compilations.counting("evaluate"):
      return evaluation.evaluate(self.model, data, batch_size=self.settings.eval_batch_size).eval_loss

  def accuracy(self, adapters: Adapters) -> float | None:
    """GSM8K exact match on the first `accuracy_problems` test problems (greedy), or None when not asked for."""
    if not self.problems:
      return None
    nnx.update(self.model, from_adapters(nnx.state(self.model, nnx.LoRAParam), adapters))
    # One batch of all problems: one prompt shape, one compilation of the generation loop.
    return evaluation.exact_match(
      self.model,
      self.tokenizer,
      self.problems,
      template=self.template,
      max_new_tokens=self.settings.accuracy_tokens,
      batch_size=len(self.problems),
    ).accuracy

  def compile_counts(self) -> dict[str, int]:
    """Compilations since this grid was built (`Compilations`): of each round variant (`round_label`), each
    sampler and the evaluation (GSM8K generation not counted)."""
    return dict(sorted(self.compilations.counts.items()))

  def expected_compiles(self) -> dict[str, int]:
    """One compilation per (method, DP, trained factor) used, sampler and evaluation: what reuse should give
    (both held-out sets are evaluated in batches of one shape)."""
    expected = {round_label(m, p, t): 1 for m, p, t in self._compiled}
    expected.update({sampler_label(p): 1 for p in self._samplers})
    expected["evaluate"] = 1
    return dict(sorted(expected.items()))

  # ----- one run -----

  def run(
    self, method: str, epsilon: float, partition: str, seed: int, lr: float, *, validation: bool = False
  ) -> dict[str, Any]:
    """One run at learning rate `lr` (module docstring); returns its record. With `validation` (a tuning run) the
    loss is measured on the validation split only (`valid_loss`), otherwise on the test problems (`eval_loss`)."""
    began = time.perf_counter()
    s = self.settings
    private = not math.isinf(epsilon)
    fed, sample = self.federated_round(method, private), self.sampler(private)
    client_data, sizes = self.client_data(partition, seed)
    plan, spent = self.plan(epsilon, partition, seed)
    config = run_config(s, method, epsilon, partition, seed, lr)
    key = runner.run_key(config)
    # A copy: the round donates its state, and the seed's adapters serve every method.
    state = fed.init(s.num_clients, jax.tree.map(jnp.copy, self.initial_adapters(seed)))
    initial_norms = np.array([np.linalg.norm(np.asarray(f.lora_a, np.float64)) for f in state.adapters.values()])
    sigma = () if plan is None else (jnp.float32(plan.noise_multiplier),)
    per_round = []
    for t in range(1, s.rounds + 1):
      round_key = jax.random.fold_in(key, t)
      with self.compilations.counting(sampler_label(private)):
        ids, weights, batches = sample(round_key, client_data)
      trained = fed.trained(t)
      with self.compilations.counting(round_label(method, private, trained)):
        state, metrics = self.compiled(method, private, trained)(
          jnp.float32(lr), state, fed.frozen_state, batches, ids, weights, round_key, *sigma
        )
      per_round.append(metrics)
    per_round = jax.device_get(per_round)  # one transfer at the end: no host round trip inside the rounds
    record = {
      "kind": "run",
      "method": method,
      "partition": partition,
      "target_epsilon": eps_key(epsilon),
      "seed": seed,
      "lr": lr,
    }
    if validation:
      record["valid_loss"] = self.evaluate(state.adapters, self.validation_data)
    else:
      record["eval_loss"] = self.evaluate(state.adapters)
      record["perplexity"] = math.exp(record["eval_loss"])
      record["accuracy"] = self.accuracy(state.adapters)
    losses = [float(m["train_loss"]) for m in per_round]
    record.update(
      {
        "final_train_loss": losses[-1],
        "train_loss": losses,
        "clipped_fraction": float(np.mean([m["clipped_fraction"] for m in per_round])),
        "clipped_per_round": [float(m["clipped_fraction"]) for m in per_round],
        # ||lora_a_t||_F / ||lora_a_0||_F after round t, the mean over layers.
        "lora_a_scale": [float(np.mean(m["lora_a_norm"] / initial_norms)) for m in per_round],
        # The sketch's exactness certificate (module fedask_jax.sketch), the largest over the rounds that computed
        # it (NaN in the others: sketch.certify_every); None without any.
        "reconstruction_error": max(
          (e for m in per_round if "reconstruction_error" in m if math.isfinite(e := float(m["reconstruction_error"]))),
          default=None,
        ),
        "epsilon_spent": spent,
        "noise_multiplier": None if plan is None else plan.noise_multiplier,
        "sample_rate": None if plan is None else plan.schedule.sample_rate,
        "participation": None if plan is None else plan.schedule.participation,
        "participation_rate": None if plan is None else plan.schedule.participation_rate,
        "accountant": None if plan is None else config.privacy.accountant,
        "accountant_delta": None if plan is None else plan.accountant_delta,
        "capacity": self.capacity if private else s.batch_size,
        "client_sizes": sizes.tolist(),
        "settings": s.training(),
        "seconds": time.perf_counter() - began,
      }
    )
    return record


# ---------------------------------------------------------------------------------------------------------------
# The runs files.


def run_id(
  method: str, epsilon: float | None, partition: str, seed: int, lr: float
) -> tuple[str, float | None, str, int, float]:
  return (method, eps_key(epsilon), partition, int(seed), float(lr))


def read_runs(path: Path) -> list[dict[str, Any]]:
  """The run records of a runs file (the last record of each run: two invocations started on the same slice at
  once would both append it); [] when the file does not exist."""
  lines = runner.MetricsLog(path).read() if path.exists() else []
  return list(
    {
      run_id(r["method"], r["target_epsilon"], r["partition"], r["seed"], r["lr"]): r
      for r in lines
      if r.get("kind") == "run"
    }.values()
  )


def done_runs(lines: Iterable[dict[str, Any]], settings: Settings, path: Path) -> set[tuple]:
  """Ids of the finished runs; a run written under other training settings is an error (not comparable)."""
  done = set()
  for line in lines:
    if line.get("kind") != "run":
      continue
    if line["settings"] != json.loads(json.dumps(settings.training())):
      raise ValueError(
        f"{path} holds a run ({line['method']}, eps {eps_label(line['target_epsilon'])}, {line['partition']}, "
        f"seed {line['seed']}) made with other settings ({line['settings']}): use another --out, or move that file."
      )
    done.add(run_id(line["method"], line["target_epsilon"], line["partition"], line["seed"], line["lr"]))
  return done


# ---------------------------------------------------------------------------------------------------------------
# The learning rate: tuning on the validation split (module docstring: protocol).


def tuning_curves(settings: Settings, runs: Sequence[dict[str, Any]]) -> dict[tuple[str, float | None], dict]:
  """Per (method, epsilon) of `settings`: the lattice steps the protocol asks for so far, and per step the tuning
  seeds' validation losses; the chosen step once every asked-for run is done.

  Returns {(method, eps_key): {"steps": [k...], "losses": {k: [loss per seed done]}, "complete": bool,
  "best": k or None, "interior": bool}}. The edge rule adds the step beyond an edge that holds the best mean, up
  to `max_extension` steps beyond the base lattice, only once every run asked for so far is done."""
  losses: dict[tuple, dict[int, dict[int, float]]] = {}
  for r in runs:
    step = round(math.log2(r["lr"] / LR_TOP))
    losses.setdefault((r["method"], r["target_epsilon"]), {}).setdefault(step, {})[r["seed"]] = r["valid_loss"]
  lo, hi = min(settings.tuning_steps), max(settings.tuning_steps)
  out = {}
  for method in settings.methods:
    for epsilon in settings.epsilons:
      done = losses.get((method, eps_key(epsilon)), {})
      steps = sorted(settings.tuning_steps)
      complete = best = None
      while True:
        complete = all(len(done.get(k, {})) == len(settings.tuning_seeds) for k in steps)
        if not complete:
          best = None
          break
        best = min(steps, key=lambda k: np.mean(list(done[k].values())))
        if best == steps[0] and steps[0] > lo - settings.max_extension:
          steps.insert(0, steps[0] - 1)
        elif best == steps[-1] and steps[-1] < hi + settings.max_extension:
          steps.append(steps[-1] + 1)
        else:
          break
      out[method, eps_key(epsilon)] = {
        "steps": steps,
        "losses": {k: [done[k][s] for s in sorted(done[k])] for k in steps if k in done},
        "complete": complete,
        "best": best,
        "interior": best is not None and steps[0] < best < steps[-1],
      }
  return out


def tuned_lrs(settings: Settings, path: Path) -> dict[tuple[str, float | None], float]:
  """{(method, eps_key): the tuned learning rate} from the tuning runs file `path`; ValueError naming what is
  missing when the tuning of some (method, epsilon) of `settings` is not complete."""
  curves = tuning_curves(settings, read_runs(path))
  missing = [f"{m} eps {eps_label(e)}" for (m, e), c in curves.items() if not c["complete"]]
  if missing:
    raise ValueError(
      f"the learning-rate tuning in {path} is not complete for {', '.join(missing)}: run this mode "
      "with --tune first (the same --only-methods)."
    )
  return {key: lattice_lr(c["best"]) for key, c in curves.items()}


def tuning_points(settings: Settings, runs: Sequence[dict[str, Any]]) -> list[tuple[str, float, str, int, float]]:
  """The tuning runs the protocol asks for now and not done yet: (method, epsilon, "iid", seed, lr), seeds
  outermost (a seed's data and plans are built once)."""
  curves = tuning_curves(settings, runs)
  done = {run_id(r["method"], r["target_epsilon"], r["partition"], r["seed"], r["lr"]) for r in runs}
  points = [
    (m, e, "iid", seed, lattice_lr(k))
    for seed in settings.tuning_seeds
    for e in settings.epsilons
    for m in settings.methods
    for k in curves[m, eps_key(e)]["steps"]
  ]
  return [p for p in points if run_id(*p) not in done]


# ---------------------------------------------------------------------------------------------------------------
# Running.


def grid_points(
  settings: Settings, lrs: dict[tuple[str, float | None], float]
) -> list[tuple[str, float, str, int, float]]:
  """(method, epsilon, partition, seed, lr) in run order: partitions and seeds outermost, so a (partition, seed)'s
  client data and privacy plans are built once."""
  return [
    (m, e, p, s, lrs[m, eps_key(e)])
    for p in settings.partitions
    for s in settings.seeds
    for e in settings.epsilons
    for m in settings.methods
  ]


def _run_points(grid: Grid, points, path: Path, validation: bool, progress: bool) -> None:
  from tqdm import tqdm

  bar = tqdm(points, desc="tuning runs" if validation else "runs", unit="run", file=sys.stderr, disable=not progress)
  for method, epsilon, partition, seed, lr in bar:
    record = grid.run(method, epsilon, partition, seed, lr, validation=validation)
    runner.MetricsLog(path).append(record)
    loss = record["valid_loss" if validation else "eval_loss"]
    bar.set_postfix(last=f"{method} eps={eps_label(epsilon)} {partition} s{seed} lr {lr:.3g}: {loss:.4f}")


def _close_invocation(
  grid: Grid, path: Path, settings: Settings, command: str, runs: int, began: float, progress: bool
) -> None:
  counts, expected = grid.compile_counts(), grid.expected_compiles()
  runner.MetricsLog(path).append(
    {
      "kind": "invocation",
      "command": command,
      "runs": runs,
      "seconds": time.perf_counter() - began,
      "compile_counts": counts,
      "expected_compile_counts": expected,
      "base_eval_loss": grid.base_eval_loss,
      "capacity": grid.capacity,
      "device": _common.device_report(),
      "settings": settings.as_json(),
    }
  )
  if progress:
    print(f"compilations: {sum(counts.values())} (expected {sum(expected.values())}): {counts}", file=sys.stderr)


def _grid_for(settings: Settings, grid: Grid | None) -> Grid:
  if grid is not None and grid.settings != settings:
    raise ValueError("got a grid built for other settings: pass grid=None to build one for these.")
  return grid or Grid(settings)


def run_tuning(
  settings: Settings, path: Path, *, grid: Grid | None = None, progress: bool = True, command: str = ""
) -> tuple[Grid | None, int]:
  """Runs the tuning runs of `settings` (module docstring: protocol) not yet in `path`, adding edge extensions as
  they become due, until every (method, epsilon) has its chosen rate or hit the extension limit; returns (the
  grid used, None if nothing ran; the number of runs made)."""
  done_runs(runner.MetricsLog(path).read(), settings, path)
  began, made = time.perf_counter(), 0
  while todo := tuning_points(settings, read_runs(path)):
    grid = _grid_for(settings, grid)
    _run_points(grid, todo, path, True, progress)
    made += len(todo)
  if made:
    _close_invocation(grid, path, settings, command, made, began, progress)
  return grid, made


def run_grid(
  settings: Settings,
  path: Path,
  lrs: dict[tuple[str, float | None], float],
  *,
  grid: Grid | None = None,
  progress: bool = True,
  command: str = "",
) -> tuple[Grid | None, int]:
  """Runs every point of `settings` at its tuned rate `lrs[method, eps_key]` not yet in the runs file `path`,
  appending one line per run and one for the invocation; returns (the grid used, None if nothing ran; the
  number of runs made)."""
  done = done_runs(runner.MetricsLog(path).read(), settings, path)
  todo = [p for p in grid_points(settings, lrs) if run_id(*p) not in done]
  if not todo:
    return grid, 0
  began = time.perf_counter()
  grid = _grid_for(settings, grid)
  _run_points(grid, todo, path, False, progress)
  _close_invocation(grid, path, settings, command, len(todo), began, progress)
  return grid, len(todo)


# ---------------------------------------------------------------------------------------------------------------
# The report.


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (method, partition, target epsilon): mean and sample std (ddof 1; 0 for one seed) over seeds of
  the eval loss (and accuracy), the learning rate(s), the largest epsilon spent, the mean sigma, the seeds."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in runs:
    groups.setdefault((r["method"], r["partition"], r["target_epsilon"]), []).append(r)
  rows = []
  for (method, partition, epsilon), members in groups.items():
    loss = np.array([r["eval_loss"] for r in members], np.float64)
    acc = [r["accuracy"] for r in members if r.get("accuracy") is not None]
    spent = [r["epsilon_spent"] for r in members if r["epsilon_spent"] is not None]
    rows.append(
      {
        "method": method,
        "partition": partition,
        "target_epsilon": epsilon,
        "seeds": sorted(r["seed"] for r in members),
        "n": len(members),
        "lrs": sorted({r["lr"] for r in members}),
        "eval_loss_mean": float(loss.mean()),
        "eval_loss_std": float(loss.std(ddof=1)) if len(loss) > 1 else 0.0,
        "accuracy_mean": float(np.mean(acc)) if acc else None,
        "accuracy_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else (0.0 if acc else None),
        "epsilon_spent_max": max(spent) if spent else None,
        "noise_multiplier_mean": float(np.mean([r["noise_multiplier"] for r in members]))
        if members[0]["noise_multiplier"] is not None
        else None,
      }
    )
  return rows


def _method_order(names: Iterable[str]) -> list[str]:
  """`names` in the order of METHODS, others after them, sorted."""
  names = set(names)
  return [m for m in METHODS if m in names] + sorted(names - set(METHODS))


def is_fedask(method: str) -> bool:
  """Whether `method` is a FedASK variant (fedask:<gauge>); fedask-alt is not."""
  return split_method(method)[0] == "fedask"


class Cells(NamedTuple):
  """The summary rows by (method, partition, target epsilon), and the methods, partitions and epsilons present,
  in the grid's order (methods outside METHODS last; the non-private epsilon, None, last)."""

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
    methods=_method_order(r["method"] for r in rows),
    partitions=[p for p in PARTITIONS if any(r["partition"] == p for r in rows)],
    epsilons=sorted({r["target_epsilon"] for r in rows}, key=lambda e: math.inf if e is None else e),
  )


def paired_gap(
  runs: Sequence[dict[str, Any]], a: str, b: str, partition: str, epsilon: float | None
) -> tuple[float, float, int] | None:
  """(mean, standard error, n) over seeds of eval_loss(a) - eval_loss(b), paired by seed (same partition, initial
  adapters and run key), or None without common seeds. Negative: `a` is better."""
  pick = lambda m: {
    r["seed"]: r["eval_loss"]
    for r in runs
    if r["method"] == m and r["partition"] == partition and r["target_epsilon"] == epsilon
  }
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


def fedask_gaps(
  runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> dict[str, list[tuple[str, float | None, str, tuple[float, float, int]]]]:
  """Per FedASK variant (fedask:<gauge>): per cell (partition, epsilon), the best other method (lowest mean held-out
  loss among the methods that are not FedASK, fedask-alt included) and the paired gap FedASK minus it."""
  c = cells(rows)
  others = [m for m in c.methods if not is_fedask(m)]
  out = {}
  for variant in [m for m in c.methods if is_fedask(m)]:
    gaps = []
    for p, e in c.points:
      rivals = [m for m in others if (m, p, e) in c.cell]
      if (variant, p, e) not in c.cell or not rivals:
        continue
      best = min(rivals, key=lambda m: c.loss(m, p, e))
      gap = paired_gap(runs, variant, best, p, e)
      if gap is not None:
        gaps.append((p, e, best, gap))
    out[variant] = gaps
  return out


def best_or_tied(gap: tuple[float, float, int]) -> bool:
  """Better than, or within two paired standard errors of, the best other method (issue 14's rule)."""
  return gap[0] <= 2 * gap[1] if not math.isnan(gap[1]) else gap[0] <= 0


def variant_claim(variant: str, gaps: Sequence[tuple[str, float | None, str, tuple[float, float, int]]]) -> str:
  """The paper's claim for one FedASK variant: against the best other method of each cell, paired by seed."""
  private = [g for g in gaps if g[1] is not None]
  wins = sum(gap[0] < 0 for *_, gap in gaps)
  # "Clear": the paired mean gap exceeds two standard errors (a rough 95% two-sided t-band would need 4.3 standard
  # errors at 3 seeds; 2 is a lenient screen, stated as such).
  clear_wins = sum(gap[0] < -2 * gap[1] for *_, gap in gaps)
  clear_losses = sum(gap[0] > 2 * gap[1] for *_, gap in gaps)
  tied = sum(best_or_tied(gap) for *_, gap in private)
  per_cell = "; ".join(f"{where(p, e)}: {gap[0]:+.4f} +- {gap[1]:.4f} vs {best}" for p, e, best, gap in gaps)
  return (
    f"**{variant}** against the best other method of each cell: lower mean held-out loss in {wins} of "
    f"{len(gaps)} cells, by more than two paired standard errors in {clear_wins}, worse by more than two in "
    f"{clear_losses}; best or tied (within two paired standard errors) in {tied} of {len(private)} private "
    f"cells. Per cell, {variant} minus the best other method (paired by seed, mean +- standard error): "
    f"{per_cell}."
  )


def cell_gaps(runs: Sequence[dict[str, Any]], c: Cells, a: str, b: str, with_se: bool) -> tuple[int, int, str] | None:
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


def rival_finding(runs: Sequence[dict[str, Any]], c: Cells, variant: str, rival: str) -> str | None:
  """A FedASK variant minus `rival` in every cell, paired by seed."""
  if (gaps := cell_gaps(runs, c, variant, rival, with_se=True)) is None:
    return None
  better, count, per_cell = gaps
  return f"{variant} vs {rival} (negative = {variant} better): lower in {better} of {count} cells; {per_cell}."


def alternating_finding(runs: Sequence[dict[str, Any]], c: Cells) -> str | None:
  """fedask-alt (ours) minus fedask, both with the paper's gauge, in every cell."""
  if (gaps := cell_gaps(runs, c, "fedask-alt:balanced", "fedask:balanced", with_se=False)) is None:
    return None
  better, count, per_cell = gaps
  return (
    f"fedask-alt (our extension: the frozen factor alternates) vs fedask, both balanced: lower loss in "
    f"{better} of {count} cells ({per_cell})."
  )


def factors_finding(c: Cells) -> str | None:
  """Lemma 1's direction: the methods that noise one factor per DP round against those that noise both."""
  one = [m for m in c.methods if get_strategy(split_method(m)[0]).trained(1, True) != "both"]
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
    f"both ({', '.join(both)}), over partitions: {per_epsilon}."
  )


def privacy_cost_finding(c: Cells) -> str | None:
  """How much of the non-private result survives DP: per method, loss at epsilon minus the non-private loss."""
  if None not in c.epsilons or all(e is None for e in c.epsilons):
    return None
  costs = []
  for m in c.methods:
    for e in [e for e in c.epsilons if e is not None]:
      diffs = [
        c.loss(m, p, e) - c.loss(m, p, None) for p in c.partitions if (m, p, e) in c.cell and (m, p, None) in c.cell
      ]
      if diffs:
        costs.append(f"{m} eps {eps_label(e)}: {float(np.mean(diffs)):+.4f}")
  if not costs:
    return None
  return "Privacy cost (mean over partitions of loss at epsilon minus the non-private loss): " + "; ".join(costs) + "."


def dp_gain_finding(rows: Sequence[dict[str, Any]], base_loss: float | None) -> str | None:
  """The best DP cell's loss reduction from the base model, per epsilon: how far the DP runs moved at all."""
  private = [r for r in rows if r["target_epsilon"] is not None]
  if base_loss is None or not private:
    return None
  gains = []
  for e in sorted({r["target_epsilon"] for r in private}):
    top = min((r for r in private if r["target_epsilon"] == e), key=lambda r: r["eval_loss_mean"])
    gains.append(
      f"eps {eps_label(e)}: {base_loss - top['eval_loss_mean']:.4f} ({top['method']}, "
      f"{PARTITION_LABELS[top['partition']]})"
    )
  return (
    "Largest loss reduction from the base model under DP: " + "; ".join(gains) + ". Where it is small, the "
    "DP cells compare methods that barely moved, and differences smaller than the seed spread are not "
    "evidence either way."
  )


def range_finding(rows: Sequence[dict[str, Any]], base_loss: float | None) -> str | None:
  """The base model's loss and the best and worst cells."""
  if base_loss is None or not rows:
    return None
  best = min(rows, key=lambda r: r["eval_loss_mean"])
  worst = max(rows, key=lambda r: r["eval_loss_mean"])

  def name(r: dict[str, Any]) -> str:
    return f"{r['method']}, {PARTITION_LABELS[r['partition']]}, eps {eps_label(r['target_epsilon'])}"

  return (
    f"Every run starts from the base model's held-out loss {base_loss:.4f}; the best cell reaches "
    f"{best['eval_loss_mean']:.4f} ({name(best)}), the worst {worst['eval_loss_mean']:.4f} ({name(worst)})."
  )


def spent_finding(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> str | None:
  """The epsilon actually spent against the target."""
  spent = [r for r in rows if r["epsilon_spent_max"] is not None]
  if not spent:
    return None
  ratio = max(r["epsilon_spent_max"] / r["target_epsilon"] for r in spent)
  return (
    f"Epsilon actually spent (the smallest client, {accounting(runs)}) is at most {ratio:.4f} x the target in "
    "every private cell."
  )


def findings(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], base_loss: float | None) -> list[str]:
  """Sentences on the paper's claims and the gauges, generated from the numbers (each finding is left out where its
  methods or cells are missing)."""
  c = cells(rows)
  variants = [m for m in c.methods if is_fedask(m)]
  candidates = [variant_claim(v, gaps) for v, gaps in fedask_gaps(runs, rows).items() if gaps]
  candidates += [rival_finding(runs, c, v, rival) for rival in ("ffa-lora", "fedavg") for v in variants]
  candidates += [
    alternating_finding(runs, c),
    factors_finding(c),
    privacy_cost_finding(c),
    dp_gain_finding(rows, base_loss),
    range_finding(rows, base_loss),
    spent_finding(runs, rows),
  ]
  return [f for f in candidates if f is not None]


def accounting(runs: Sequence[dict[str, Any]]) -> str:
  """How the private runs were accounted, e.g. 'PLD, sampled participation'. Runs recorded before the records
  named their accountant and participation model were accounted with RDP and worst-case participation."""
  kinds = sorted(
    {
      (r.get("accountant", "rdp"), r.get("participation", "worst_case"))
      for r in runs
      if r["target_epsilon"] is not None
    }
  )
  return (
    "; ".join(
      f"{accountant.upper()}, {participation.replace('_', '-')} participation" for accountant, participation in kinds
    )
    or "no private runs"
  )


def mechanism_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (method, partition, epsilon) under DP, means over seeds of the clipped fraction in round 1, 2 and the
  last, and of ||lora_a_t|| / ||lora_a_0|| after round 1 and the last (the FedASK gauges' mechanism)."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for r in runs:
    if r["target_epsilon"] is not None and "clipped_per_round" in r:
      groups.setdefault((r["method"], r["partition"], r["target_epsilon"]), []).append(r)
  rows = []
  for (m, p, e), members in groups.items():
    clipped = np.mean([r["clipped_per_round"] for r in members], axis=0)
    scale = np.mean([r["lora_a_scale"] for r in members], axis=0)
    rows.append(
      {
        "method": m,
        "partition": p,
        "target_epsilon": e,
        "clipped": [float(clipped[0]), float(clipped[min(1, len(clipped) - 1)]), float(clipped[-1])],
        "clipped_mean": float(clipped.mean()),
        "scale": [float(scale[0]), float(scale[-1])],
      }
    )
  return rows


def _colors(methods: Sequence[str]) -> dict[str, Any]:
  cmap = plt.get_cmap("tab10")
  return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _finish(fig, axes, ylabel: str, title: str, path: Path) -> None:
  axes[0][0].set_ylabel(ylabel)
  axes[0][-1].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot(rows: Sequence[dict[str, Any]], base_loss: float | None, path: Path, title: str) -> None:
  """Eval loss vs epsilon per method, one panel per partition, error bars = sample std over seeds."""
  c = cells(rows)
  colors = _colors(c.methods)
  fig, axes = plt.subplots(1, len(c.partitions), figsize=(5 * len(c.partitions), 4), sharey=True, squeeze=False)
  x = np.arange(len(c.epsilons))
  for ax, p in zip(axes[0], c.partitions):
    for i, m in enumerate(c.methods):
      pts = [(j, c.cell[m, p, e]) for j, e in enumerate(c.epsilons) if (m, p, e) in c.cell]
      if not pts:
        continue
      offset = (i - (len(c.methods) - 1) / 2) * 0.04
      ax.errorbar(
        [j + offset for j, _ in pts],
        [r["eval_loss_mean"] for _, r in pts],
        yerr=[r["eval_loss_std"] for _, r in pts],
        marker="o",
        capsize=3,
        label=m,
        color=colors[m],
        linewidth=2.2 if is_fedask(m) else 1.2,
      )
    if base_loss is not None:
      ax.axhline(base_loss, color="gray", linestyle="--", linewidth=1, label="base model")
    ax.set_xticks(x, [eps_label(e) for e in c.epsilons])
    ax.set_xlabel("target epsilon (delta = 1e-5; inf = non-private)")
    ax.set_title(PARTITION_LABELS[p])
    ax.grid(alpha=0.3)
  _finish(fig, axes, "held-out loss (nats / answer token)", title, path)


def plot_tuning(curves: dict[tuple[str, float | None], dict], path: Path, title: str) -> None:
  """Validation loss against the learning rate per method (mean +- standard error over the tuning seeds), one
  panel per epsilon; the chosen rate circled."""
  epsilons = sorted({e for _, e in curves}, key=lambda e: math.inf if e is None else e)
  methods = _method_order(m for m, _ in curves)
  colors = _colors(methods)
  fig, axes = plt.subplots(1, len(epsilons), figsize=(4.5 * len(epsilons), 4), squeeze=False)
  for ax, e in zip(axes[0], epsilons):
    for m in methods:
      c = curves.get((m, e))
      if not c or not c["losses"]:
        continue
      steps = sorted(c["losses"])
      mean = [np.mean(c["losses"][k]) for k in steps]
      se = [
        np.std(c["losses"][k], ddof=1) / math.sqrt(len(c["losses"][k])) if len(c["losses"][k]) > 1 else 0.0
        for k in steps
      ]
      ax.errorbar(
        [lattice_lr(k) for k in steps],
        mean,
        yerr=se,
        marker="o",
        ms=3,
        capsize=2,
        label=m,
        color=colors[m],
        linewidth=2 if is_fedask(m) else 1,
      )
      if c["best"] is not None:
        ax.plot([lattice_lr(c["best"])], [np.mean(c["losses"][c["best"]])], "o", ms=10, mfc="none", color=colors[m])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate (AdamW)")
    ax.set_title(f"epsilon {eps_label(e)}")
    ax.grid(alpha=0.3, which="both")
  _finish(fig, axes, "validation loss (nats / answer token)", title, path)


def provenance(runs: Sequence[dict[str, Any]], invocations: Sequence[dict[str, Any]], command: str, stem: str) -> str:
  """The report's command and the invocations that made its runs (runs, minutes, device, jax)."""
  made = ", ".join(
    f"{i['runs']} runs in {i['seconds'] / 60:.1f} min on {i['device']['device_kind']} (jax {i['device']['jax']})"
    for i in invocations
  )
  return f"Generated by `{command}` from `{stem}_runs.jsonl` ({len(runs)} runs; {made})."


def setup_text(runs: Sequence[dict[str, Any]], c: Cells, settings: Settings) -> str:
  """Model, data, federation, training, DP, seeds and the held-out loss."""
  s = settings
  examples = "all the" if s.train_examples is None else f"the first {s.train_examples}"
  dirichlet = (
    f" (Dirichlet clients hold at least {s.min_client_size} examples)" if any(p != "iid" for p in c.partitions) else ""
  )
  seeds = sorted({r["seed"] for r in runs})
  return (
    "**Setup.** Embedded base model (1.05M-parameter Llama, `experiments/base_model`), GSM8K question -> worked "
    f"answer (plain template, calculator annotations stripped, {s.max_seq_len} tokens), {examples} training "
    f"problems over {s.num_clients} clients, {s.clients_per_round} per round, {s.rounds} rounds of "
    f"{s.local_steps} local AdamW steps at each method's tuned learning rate (below), batch {s.batch_size} (the "
    "expected Poisson batch under DP), LoRA r 8 on q_proj and v_proj, sketch oversampling 2, FedProx mu 0.01. "
    f"DP: example-level (epsilon, 1e-5) for every client, B-space DP-SGD with C = 1, sigma calibrated "
    f"({accounting(runs)}; {s.rounds} rounds of {s.local_steps} steps, {s.clients_per_round} of "
    f"{s.num_clients} clients per round) for the smallest client's rate q = {s.batch_size} / min_k n_k"
    f"{dirichlet}. Seeds {seeds}: the seed sets the partition, the initial adapters and every random draw; for "
    "one seed all methods see the same partition, start and client sampling. Held-out loss: token-mean "
    f"cross-entropy on the answers of the first {s.eval_examples} GSM8K test problems, never used for a choice. "
    "FedSA-LoRA is evaluated with its global adapters (the mean lora_b of the last round's clients). The FedASK "
    "variants differ only in the reconstruction's gauge (`fedask_jax.sketch.split_factors`): balanced is the "
    "paper's; orthonormal and norm hold lora_a, the factor frozen under DP, at its initial scale."
  )


def tuning_text(settings: Settings, tuning_stem: str) -> str:
  s = settings
  return (
    f"**Learning rates** (`{tuning_stem}_tuning_runs.jsonl`, figure `{tuning_stem}_tuning.png`). Tuned per method "
    f"and epsilon on a validation split (the {s.validation_examples} training problems after the first "
    f"{s.train_examples}, never trained on), IID, with seeds disjoint from the grid's, over the lattice 0.1 * 2^k "
    "fixed in advance (module docstring: protocol). Per cell: the chosen rate, its mean validation loss +- "
    "standard error over the tuning seeds, and the range of rates run; '(edge)' marks a rate on the edge of what "
    "was run (the extension limit reached)."
  )


def tuning_table(curves: dict[tuple[str, float | None], dict]) -> list[str]:
  """One row per method: per epsilon the chosen rate, its validation loss and the rates run."""
  epsilons = sorted({e for _, e in curves}, key=lambda e: math.inf if e is None else e)
  rows = []
  for m in _method_order(m for m, _ in curves):
    entries = []
    for e in epsilons:
      c = curves.get((m, e))
      if c is None or c["best"] is None:
        entries.append("(not complete)")
        continue
      losses = c["losses"][c["best"]]
      se = np.std(losses, ddof=1) / math.sqrt(len(losses)) if len(losses) > 1 else math.nan
      edge = "" if c["interior"] else " (edge)"
      entries.append(
        f"{lattice_lr(c['best']):.3g}{edge}: {np.mean(losses):.4f} +- {se:.4f} "
        f"[{lattice_lr(c['steps'][0]):.2g}, {lattice_lr(c['steps'][-1]):.2g}]"
      )
    rows.append([m, *entries])
  return _common.table(["method", *(f"eps {eps_label(e)}" for e in epsilons)], rows, "l" + "r" * len(epsilons))


def loss_table(c: Cells) -> list[str]:
  """One row per (epsilon, method): the tuned rate, the loss per partition (bold: the column's best), mean sigma,
  eps spent."""
  best = {
    (p, e): min((m for m in c.methods if (m, p, e) in c.cell), key=lambda m: c.loss(m, p, e))
    for p, e in c.points
    if any((m, p, e) in c.cell for m in c.methods)
  }
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
      lrs = sorted({lr for r in present if r for lr in r["lrs"]})
      sigma = [r["noise_multiplier_mean"] for r in present if r and r["noise_multiplier_mean"] is not None]
      spent = [r["epsilon_spent_max"] for r in present if r and r["epsilon_spent_max"] is not None]
      rows.append(
        [
          m,
          eps_label(e),
          ", ".join(f"{lr:.3g}" for lr in lrs),
          *losses,
          f"{np.mean(sigma):.3g}" if sigma else "-",
          f"{max(spent):.3f}" if spent else "-",
        ]
      )
  header = ["method", "epsilon", "lr", *(PARTITION_LABELS[p] for p in c.partitions), "sigma", "eps spent"]
  return _common.table(header, rows, "lrr" + "r" * len(c.partitions) + "rr")


def gaps_table(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[str]:
  """One row per FedASK variant: its paired gap to the best other method per cell, and issue 14's verdict."""
  c = cells(rows)
  points = [(p, e) for e in c.epsilons for p in c.partitions]
  lines = []
  for variant, entries in fedask_gaps(runs, rows).items():
    if not entries:  # no other method ran in this variant's cells
      continue
    by_cell = {(p, e): (best, g) for p, e, best, g in entries}
    row = []
    for point in points:
      if point not in by_cell:
        row.append("-")
        continue
      best, g = by_cell[point]
      text = f"{g[0]:+.3f} +- {g[1]:.3f} ({best})"
      row.append(f"**{text}**" if g[0] < 0 else text)
    private = [g for (_, e), (_, g) in by_cell.items() if e is not None]
    worse = sum(not best_or_tied(g) for g in private)
    verdict = "-" if not private else "yes" if not worse else f"no ({worse} of {len(private)} cells worse by > 2 SE)"
    lines.append([variant, *row, verdict])
  if not lines:
    return ["(no FedASK variant and other method ran in the same cell)"]
  header = ["FedASK variant", *(where(p, e) for p, e in points), "best or tied in every private cell"]
  return _common.table(header, lines, "l" + "r" * len(points) + "l")


def mechanism_table(runs: Sequence[dict[str, Any]]) -> list[str]:
  """IID, under DP: the clipped fraction and lora_a's scale of the FedASK variants and FFA-LoRA."""
  rows = [
    r
    for r in mechanism_rows(runs)
    if split_method(r["method"])[0] in ("fedask", "ffa-lora") and r["partition"] == "iid"
  ]
  methods = _method_order(r["method"] for r in rows)
  lines = []
  for r in sorted(rows, key=lambda r: (r["target_epsilon"], methods.index(r["method"]))):
    c, a = r["clipped"], r["scale"]
    lines.append(
      [
        r["method"],
        eps_label(r["target_epsilon"]),
        f"{c[0]:.2f} / {c[1]:.2f} / {c[2]:.2f} ({r['clipped_mean']:.2f})",
        f"{a[0]:.3g} / {a[1]:.3g}",
      ]
    )
  header = [
    "method",
    "epsilon",
    "clipped fraction, round 1 / 2 / last (mean over the run)",
    "‖lora_a_t‖ / ‖lora_a_0‖ after round 1 / last",
  ]
  return _common.table(header, lines, "lrrr")


def accuracy_note(runs: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], settings: Settings) -> str:
  """GSM8K exact match: how many problems were solved at all, and the best cell."""
  s = settings
  scored = [r for r in rows if r["accuracy_mean"] is not None]
  if not scored:
    return "- Task accuracy (GSM8K exact match) was not measured in these runs (settings.accuracy_problems = 0)."
  top = max(scored, key=lambda r: r["accuracy_mean"])
  solved = sum(round(r["accuracy"] * s.accuracy_problems) for r in runs if r.get("accuracy") is not None)
  best_cell = (
    f"the best cell mean is {top['accuracy_mean']:.3f} ({top['method']}, "
    f"{PARTITION_LABELS[top['partition']]}, eps {eps_label(top['target_epsilon'])}); "
    if solved
    else ""
  )
  return (
    "- Task accuracy, GSM8K exact match (`fedask_jax.evaluation.exact_match`: greedy, up to "
    f"{s.accuracy_tokens} new tokens, the first {s.accuracy_problems} test problems): {best_cell}{solved} "
    f"problems solved over all {len(runs)} runs together. A 1M-parameter model does not do grade-school "
    "arithmetic, so accuracy cannot separate the methods here (per-run values are in the JSON); the held-out "
    "loss does."
  )


def compile_notes(invocations: Sequence[dict[str, Any]]) -> list[str]:
  """Per invocation: its compilations against one per round variant, sampler and evaluation."""
  if not invocations:
    return []
  lines = [
    "",
    "Compile reuse (one compilation per round variant used, per sampler and for the evaluation; "
    "GSM8K generation not counted):",
  ]
  for inv in invocations:
    if "compile_counts" not in inv:  # an invocation cut off before its closing line (its "note" says how)
      lines.append(f"- `{inv['command']}`: {inv['runs']} runs; compilations not recorded: {inv['note']}.")
      continue
    counts = inv["compile_counts"]
    verdict = "as expected" if counts == inv["expected_compile_counts"] else "NOT as expected"
    detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
    lines.append(
      f"- `{inv['command']}`: {inv['runs']} runs, {sum(counts.values())} compilations, {verdict} ({detail})."
    )
  return lines


SCALE_NOTE = (
  "- Scale: the paper fine-tunes Llama-2-7B/13B for 800 rounds and scores task accuracy (MMLU 46.15 vs FedAvg "
  "45.13 non-private; 45.80 vs 42.07 at eps 1; GSM8K 22.7 vs FFA-LoRA 14.2 at eps 1). This is a 1M-parameter "
  "model for a few rounds, measured by held-out loss: it tests the direction of the claims at small scale, not "
  "their size."
)


def markdown(
  runs: Sequence[dict[str, Any]],
  rows: Sequence[dict[str, Any]],
  invocations: Sequence[dict[str, Any]],
  settings: Settings,
  command: str,
  stem: str,
  curves: dict | None,
  tuning_stem: str,
) -> str:
  c = cells(rows)
  base_loss = invocations[-1]["base_eval_loss"] if invocations else None
  tuning_settings = MODES[settings.lr_source] if settings.lr_source else settings
  return "\n".join(
    [
      "# Method comparison: held-out loss by method, privacy level and data distribution, at tuned learning rates",
      "",
      provenance(runs, invocations, command, stem),
      "",
      setup_text(runs, c, settings),
      "",
      tuning_text(tuning_settings, tuning_stem),
      "",
      *(tuning_table(curves) if curves else ["(no tuning runs yet)"]),
      "",
      "Held-out loss, mean +- sample std over seeds (bold: the lowest mean of the column's epsilon); lr: the tuned "
      "rate; sigma: mean noise multiplier over partitions and seeds; eps spent: the largest over partitions and "
      "seeds.",
      "",
      *loss_table(c),
      "",
      "**FedASK minus the best other method** of each cell (the lowest mean held-out loss among the methods that "
      "are not FedASK, fedask-alt included), paired by seed, mean +- standard error (bold: FedASK lower). Issue "
      "14's rule: a gauge becomes the default if it is best or tied (within two paired standard errors) in every "
      "private cell at both run lengths.",
      "",
      *gaps_table(runs, rows),
      "",
      "**Mechanism** (IID, under DP, means over seeds): the fraction of per-example gradients clipped and the scale "
      "of lora_a, the factor frozen under DP, against its initial scale.",
      "",
      *mechanism_table(runs),
      "",
      "## What the numbers show",
      "",
      *(f"- {f}" for f in findings(runs, rows, base_loss)),
      SCALE_NOTE,
      accuracy_note(runs, rows, settings),
      *compile_notes(invocations),
      "",
      f"![held-out loss vs epsilon]({stem}.png)",
      "",
      *([f"![validation loss vs learning rate]({tuning_stem}_tuning.png)", ""] if curves else []),
    ]
  )


def stems(mode: str) -> tuple[str, str]:
  """(the mode's stem, the stem of the mode whose tuning it uses)."""
  stem_of = lambda m: STEM if m == "full" else f"{STEM}_{m}"
  return stem_of(mode), stem_of(MODES[mode].lr_source or mode)


def tuning_settings_of(settings: Settings) -> Settings:
  """The settings whose tuning gives `settings` its rates: its own, or its lr_source mode's for its methods and
  epsilons."""
  if not settings.lr_source:
    return settings
  return dataclasses.replace(MODES[settings.lr_source], methods=settings.methods, epsilons=settings.epsilons)


def write_report(mode: str, out: Path, command: str, settings: Settings | None = None) -> dict[str, Any]:
  """Rebuilds `<stem>.md`, `.json`, `.png` and, for a mode with its own tuning, `<stem>_tuning.png` in `out`
  from the runs files; returns the JSON object."""
  settings = settings or MODES[mode]
  stem, tuning_stem = stems(mode)
  tuning_runs = read_runs(out / f"{tuning_stem}_tuning_runs.jsonl")
  curves = tuning_curves(tuning_settings_of(settings), tuning_runs) if tuning_runs else None
  if curves and not settings.lr_source:
    plot_tuning(
      curves,
      out / f"{stem}_tuning.png",
      f"Validation loss after {settings.rounds} rounds (IID, "
      f"{len(settings.tuning_seeds)} tuning seeds) against the learning rate",
    )
  path = out / f"{stem}_runs.jsonl"
  lines = runner.MetricsLog(path).read() if path.exists() else []
  runs = read_runs(path)
  invocations = [r for r in lines if r.get("kind") == "invocation"]
  result = {
    "command": command,
    "settings": settings.as_json(),
    "device": _common.device_report(),
    "tuning": None
    if curves is None
    else [
      {
        "method": m,
        "target_epsilon": e,
        **c,
        "lr": None if c["best"] is None else lattice_lr(c["best"]),
        "losses": {f"{lattice_lr(k):.6g}": v for k, v in c["losses"].items()},
      }
      for (m, e), c in curves.items()
    ],
  }
  if not runs:
    _common.save(out / f"{stem}.json", result)
    return result
  rows = summarize(runs)
  base_loss = invocations[-1]["base_eval_loss"] if invocations else None
  example = (settings.methods[0], settings.epsilons[0], settings.partitions[-1], settings.seeds[0])
  lr = next(r["lr"] for r in runs)
  config = {
    "base": str(_common.QUICKSTART.relative_to(_common.REPO)),
    "overrides": "run_overrides(settings, method, epsilon, partition, seed, lr), e.g. example",
    "example": {
      "run": [example[0], eps_key(example[1]), *example[2:], lr],
      "overrides": run_overrides(settings, *example, lr),
      "resolved": to_dict(run_config(settings, *example, lr)),
    },
  }
  result.update(
    {
      "config": config,
      "base_eval_loss": base_loss,
      "summary": rows,
      "runs": runs,
      "invocations": invocations,
      "findings": findings(runs, rows, base_loss),
      "fedask_gaps": {
        v: [
          {"partition": p, "target_epsilon": e, "best_other": b, "gap": g[0], "se": g[1], "n": g[2]}
          for p, e, b, g in gaps
        ]
        for v, gaps in fedask_gaps(runs, rows).items()
      },
      "mechanism": mechanism_rows(runs),
    }
  )
  _common.save(out / f"{stem}.json", result)
  (out / f"{stem}.md").write_text(
    markdown(runs, rows, invocations, settings, command, stem, curves, tuning_stem), encoding="utf-8"
  )
  plot(
    rows,
    base_loss,
    out / f"{stem}.png",
    f"Held-out loss after {settings.rounds} rounds, mean +- std over {len({r['seed'] for r in runs})} seeds",
  )
  return result


def main(argv: Sequence[str] | None = None) -> None:
  parser = _common.parser(
    __doc__, "the same as --mode quick", report_help="only rebuild the report from the runs files"
  )
  parser.add_argument(
    "--mode",
    choices=tuple(MODES),
    default=None,
    help="quick: a small grid for tests; cpu: the whole grid with short runs (a 2-core CPU); long: "
    "100 rounds for a subset; full (the default): the whole grid at full size (a GPU)",
  )
  parser.add_argument(
    "--tune",
    action="store_true",
    help="only the learning-rate tuning the mode needs (a grid invocation finishes it first)",
  )
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
    for m in chosen:
      try:
        split_method(m)
      except ValueError as error:
        parser.error(f"--only-methods: {error}")
    settings = dataclasses.replace(settings, methods=chosen)
  if args.only_partitions:
    chosen = tuple(p.strip() for p in args.only_partitions.split(","))
    if set(chosen) - set(PARTITIONS):
      parser.error(f"--only-partitions: choose from {','.join(PARTITIONS)}")
    settings = dataclasses.replace(settings, partitions=chosen)
  if args.seeds:
    settings = dataclasses.replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
  stem, tuning_stem = stems(mode)
  out = args.out or _common.RESULTS
  out.mkdir(parents=True, exist_ok=True)
  command = _common.command(NAME, argv)
  if not args.report:
    tuning_settings, tuning_path = tuning_settings_of(settings), out / f"{tuning_stem}_tuning_runs.jsonl"
    grid, _ = run_tuning(tuning_settings, tuning_path, command=command)
    if not args.tune:
      # The tuning's grid serves the runs too where the settings agree (the same mode, not long).
      shared = grid if grid is not None and grid.settings == settings else None
      run_grid(
        settings, out / f"{stem}_runs.jsonl", tuned_lrs(tuning_settings, tuning_path), grid=shared, command=command
      )
  write_report(mode, out, command)
  print(f"wrote {out}/{stem}.{{md,json,png}}")


if __name__ == "__main__":
  main()
