"""Preparation: from a `Config` to an `Experiment`, everything checked before anything is compiled.

`prepare` does everything that can fail on bad input: it checks the run directory against the config, loads the
model, tokenizer and data, partitions the clients, plans the privacy (noise multiplier, sampling rate, batch
capacity) and builds the federated round.

Privacy (docs/design.md, section 4.5). Under `privacy.client_sizes` "public" (default) client k samples each
local step's batch by Poisson sampling with rate q_k = batch_size / n_k, one noise multiplier serves all clients,
calibrated for the largest rate q = batch_size / min_k n_k (every client's data, the smallest client's included,
is then (target_epsilon, delta)-DP, and larger clients spend less), and the server weights clients by n_k. The
sizes are then public metadata, and the guarantee is for neighbours of equal sizes (README: privacy). Under
"private" every client samples at the public rate q = `privacy.sample_rate`, the noisy sum is divided by
batch_size and the sampled clients weigh the same (`round_sampler`): nothing that touches a client's examples
depends on n_k, and the guarantee covers adding or removing an example. The schedule accounted is
`privacy.DPSchedule.from_federation` (q, local_steps, rounds, q_c = clients_per_round / num_clients) under
`privacy.participation`: by default "sampled" when clients_per_round < num_clients (`sample_clients` draws
them uniformly with a fresh key each round, which that bound needs) and "worst_case" when all take part.
Batches have a fixed capacity: the largest over clients of `batch_capacity(n_k + 1, q_k, overflow_prob)`
(n_k + 1: the add-one neighbour). A batch cannot have more slots than the largest client has rows, so a rate
at which that client's add-one neighbour overflows them with probability above overflow_prob is refused. The
overflow's cost in delta, `overflow_delta(overflow_prob, schedule, target_epsilon)`, is taken out of delta
before calibration, so the total is delta. The `epsilon` of each metrics line is the smallest client's epsilon
after that many rounds (`schedule.after(t)`) at that reduced delta.

The LM head runs at the response positions only, in training and in the held-out evaluation
(`fedask_jax.objectives`, module docstring): `response_capacity` of the training set (its longest response,
rounded up to a multiple of 8) and of the held-out set. The loss is the full head's, so the capacity changes no
result and no privacy guarantee; it is a statistic of the raw training data, reported only with
privacy.release_diagnostics.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedask_jax import data as fdata
from fedask_jax import privacy
from fedask_jax.config import Config, ConfigError, check_encoded, check_model, check_records, lora_config
from fedask_jax.config.schema import SKETCH_KEYS
from fedask_jax.lora import inject_lora
from fedask_jax.models import load_pretrained, load_tokenizer
from fedask_jax.objectives import response_capacity
from fedask_jax.runner import processes
from fedask_jax.runner.rundir import check_run_dir
from fedask_jax.simulation import DPConfig, FederatedRound, response_example_loss
from fedask_jax.strategies import STRATEGIES, Strategy, get_strategy

# The adapters' init key is fold_in(run_key, ADAPTER_INIT_STREAM); round keys use fold_in(run_key, t), t >= 1.
ADAPTER_INIT_STREAM = 0


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """The DP parameters of a run (module docstring).

  noise_multiplier: sigma; schedule: what is accounted (q = batch_size / min_k n_k, or privacy.sample_rate
  with private client sizes; the participation model resolved); delta: the total delta; accountant_delta: delta
  minus overflow_delta, what epsilon is computed at; overflow_delta: the truncated-Poisson cost; capacity: slots
  per local step.
  """

  noise_multiplier: float
  schedule: privacy.DPSchedule
  delta: float
  accountant_delta: float
  overflow_delta: float
  capacity: int


@dataclasses.dataclass
class Experiment:
  """Everything `prepare` loaded and planned; `train` runs it. train_counts: the training set's
  train_examples, train_truncated (cut to data.max_seq_len) and train_without_targets (empty without training).
  head_capacity: the LM head's positions per example (module docstring), "train" (absent without training) and
  "eval"."""

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
  head_capacity: dict[str, int]
  train_counts: dict[str, int] = dataclasses.field(default_factory=dict)


def run_key(config: Config) -> jax.Array:
  """The run's root key: `jax.random.key(seed)`."""
  return jax.random.key(config.seed)


def load_model(config: Config) -> nnx.Module:
  """The base model with fresh adapters from `fold_in(run_key, ADAPTER_INIT_STREAM)` (float32, PEFT's init)."""
  model = load_pretrained(config.model.path, dtype=jnp.dtype(config.model.dtype))
  check_model(config, model)
  inject_lora(model, lora_config(config), jax.random.fold_in(run_key(config), ADAPTER_INIT_STREAM), dtype=jnp.float32)
  return model


def load_records(config: Config, split: str, max_records: int | None) -> list[dict[str, Any]]:
  """The records of the train or eval split of `config.data`'s source (`fedask_jax.data` loaders)."""
  d = config.data
  if d.source == "gsm8k":
    name = d.train_split if split == "train" else d.eval_split
    return fdata.load_gsm8k(name, source=d.path, max_records=max_records, strip_calculator=d.strip_calculator)
  held_out = d.source == "jsonl" and split != "train"
  path = d.eval_path if held_out else d.path
  if path is None:
    key = "eval_path" if held_out else "path"
    raise ConfigError(f"data.source={d.source!r} reads the {split} split from data.{key}, which is not set: set it.")
  if d.source == "jsonl":
    return fdata.load_jsonl(path, max_records=max_records)
  name = d.train_split if split == "train" else d.eval_split
  if d.source == "hf":
    return fdata.load_hf(path, split=name, name=d.name, max_records=max_records)
  return fdata.load_tfds(path, split=name, data_dir=d.data_dir, max_records=max_records)


def partition(config: Config, records: list[dict[str, Any]]) -> fdata.Partition:
  """The clients' partition of `records` (`config.data.partition`), checked against `num_clients`."""
  d = config.data
  if d.category_column is None:
    if d.partition != "iid":
      raise ConfigError(f"data.partition={d.partition!r} needs data.category_column (the column to split by).")
    parts = fdata.iid_partition([0] * len(records), config.num_clients, seed=config.seed)
  else:
    values = len(np.unique(np.asarray([r[d.category_column] for r in records])))
    try:
      parts = fdata.partition_records(
        records,
        d.partition,
        num_clients=config.num_clients,
        column=d.category_column,
        alpha=d.dirichlet_alpha,
        seed=config.seed,
        min_client_size=d.min_client_size,
      )
    except ValueError:
      # check_records has ruled out the other causes (a missing column, too few records), so for a Dirichlet
      # partition this is every draw leaving some client below min_client_size.
      if d.partition != "dirichlet":
        raise
      raise ConfigError(
        f"data.partition='dirichlet': every draw of Dirichlet(data.dirichlet_alpha={d.dirichlet_alpha:g}) over "
        f"the {values} values of {d.category_column!r} left some of the num_clients={config.num_clients} clients "
        f"with fewer than data.min_client_size={d.min_client_size} records: raise data.dirichlet_alpha (the "
        "paper: 0.1 to 1), or lower num_clients or data.min_client_size."
      ) from None
  if parts.num_clients != config.num_clients:
    dropped = values - parts.num_clients  # only a natural partition can differ
    reason = (
      f" ({dropped} of its {values} values have fewer than data.min_client_size={d.min_client_size} records)"
      if dropped
      else ""
    )
    raise ConfigError(
      f"data.partition='natural' over {d.category_column!r} gives {parts.num_clients} clients{reason} but "
      f"num_clients={config.num_clients}: set num_clients={parts.num_clients}"
      f"{' or lower data.min_client_size' if dropped else ''}."
    )
  return parts


def _client_rates(config: Config, sizes: np.ndarray) -> np.ndarray:
  """Each client's Poisson rate [C] under DP: batch_size / n_k with privacy.client_sizes "public", the public
  privacy.sample_rate for every client with "private"."""
  if config.privacy.client_sizes == "private":
    return np.full(len(sizes), config.privacy.sample_rate)
  return config.batch_size / np.asarray(sizes, np.float64)


def _check_slots(config: Config, sizes: np.ndarray, rates: np.ndarray) -> None:
  """Refuse a rate at which an add-one neighbour's batch overflows the slots more often than overflow_prob.

  Slots cannot outnumber the largest client's n examples (the padded rows), and the add-one neighbour of that
  client has n + 1: all n + 1 are sampled, which no capacity of n slots holds, with probability q^(n + 1) (the
  smaller clients' neighbours fit). The delta charged for overflow assumes at most overflow_prob per step.
  """
  p, largest = config.privacy, int(sizes.max())
  q = float(rates[np.argmax(sizes)])
  real = privacy.overflow_probability(largest + 1, q, largest)
  if real <= p.overflow_prob:
    return
  # q^(n + 1) <= overflow_prob  <=>  q <= overflow_prob^(1 / (n + 1)).
  ceiling = p.overflow_prob ** (1 / (largest + 1))
  if p.client_sizes == "private":
    fix = f"lower privacy.sample_rate to at most {ceiling:.3g}"
  elif int(largest * ceiling) >= 1:
    fix = f"lower batch_size to at most {int(largest * ceiling)}"
  else:
    fix = "no batch size does at these client sizes: use larger clients (fewer num_clients)"
  raise ConfigError(
    f"the largest client ({largest} examples) samples at the Poisson rate q = {q:.4g}: its add-one neighbour's "
    f"batch overflows the {largest} slots a batch can have (one per example row) with probability "
    f"q^{largest + 1} = {real:.3g} per step, above privacy.overflow_prob={p.overflow_prob:g}, so the delta charged "
    f"for overflow would not hold: {fix}, or raise privacy.overflow_prob (its cost in delta is checked against "
    "privacy.delta)."
  )


def plan_privacy(config: Config, sizes: np.ndarray) -> tuple[PrivacyPlan | None, int]:
  """(privacy plan or None without DP, batch capacity) for clients of `sizes` (module docstring)."""
  b, smallest, largest = config.batch_size, int(sizes.min()), int(sizes.max())
  if not config.privacy.enabled:
    if b > largest:
      raise ConfigError(f"batch_size={b} exceeds the largest client's {largest} examples: lower batch_size.")
    return None, b
  p = config.privacy
  if p.client_sizes == "public" and b > smallest:
    raise ConfigError(
      f"batch_size={b} exceeds the smallest client's {smallest} examples, so its Poisson rate "
      "q = batch_size / n would exceed 1: lower batch_size or num_clients, or raise data.min_client_size."
    )
  rates = _client_rates(config, sizes)
  _check_slots(config, sizes, rates)
  capacity = max(privacy.batch_capacity(int(n) + 1, float(q), p.overflow_prob) for n, q in set(zip(sizes, rates)))
  schedule = privacy.DPSchedule.from_federation(
    sample_rate=float(rates.max()),
    local_steps=config.local_steps,
    rounds=config.rounds,
    clients_per_round=config.clients_per_round,
    num_clients=config.num_clients,
    participation=p.participation,
  )
  overflow = privacy.overflow_delta(p.overflow_prob, schedule, p.target_epsilon)
  if overflow >= p.delta / 2:
    raise ConfigError(
      f"privacy.overflow_prob={p.overflow_prob:g} costs delta {overflow:.3g} over {schedule.describe()}, at "
      f"least half of privacy.delta={p.delta:g}: lower overflow_prob (e.g. 1e-12)."
    )
  sigma = privacy.calibrate_noise(schedule, p.target_epsilon, p.delta - overflow, p.accountant)
  return PrivacyPlan(sigma, schedule, p.delta, p.delta - overflow, overflow, capacity), capacity


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
  """The configured strategy; the sketch section's keys go to those strategies that take them."""
  params = inspect.signature(STRATEGIES[config.strategy]).parameters
  kwargs = dict(config.strategy_args)
  for key in SKETCH_KEYS:
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


# Measured: on a CPU, chunks of 4 were the fastest variant from K = 16 up and used 14x to 43x less memory than all
# K at once (benchmarks/README.md, "Full mode"); on an H100 chunking was 1.33x slower (benchmarks/gpu.md).
CPU_CLIENT_CHUNK = 4


def client_chunk(config: Config) -> int | None:
  """`config.client_chunk`, or when it is None: all clients at once on an accelerator, and on a CPU chunks of
  min(K, `CPU_CLIENT_CHUNK`) (the last chunk of a K that 4 does not divide holds the rest). On a CPU all K clients
  at once make every intermediate K times larger, past the caches. Results do not depend on the chunk beyond
  float32 summation order."""
  if config.client_chunk is not None or jax.default_backend() != "cpu":
    return config.client_chunk
  return min(config.clients_per_round, CPU_CLIENT_CHUNK)


def prepare(config: Config, *, for_training: bool = True) -> Experiment:
  """Loads and checks everything a run needs (module docstring); raises ValueError (ConfigError for the
  config's own rules) on bad input, before any round is compiled. `for_training=False` loads only what
  evaluation needs (model, tokenizer, held-out set).

  It first joins the run's processes when the config's `distributed` section names several
  (`fedask_jax.runner.processes.start`: call it before anything else uses JAX) and refuses configs that differ
  between them."""
  processes.start(config)
  if for_training:
    # The round splits the K sampled clients over every device of every process (`FederatedRound`'s mesh).
    devices = jax.device_count()
    if config.clients_per_round % devices:
      where = f" ({jax.process_count()} processes)" if jax.process_count() > 1 else ""
      raise ConfigError(
        f"clients_per_round={config.clients_per_round} cannot be split evenly over the {devices} devices"
        f"{where}: use a multiple of {devices}."
      )
    check_run_dir(config)
  model = load_model(config)
  tokenizer = load_tokenizer(config.model.path)
  eval_data = load_eval_data(config, tokenizer)
  head = {"eval": response_capacity(eval_data.loss_mask)}
  notes = [
    f"eval: {eval_data.num_examples} held-out examples, {eval_data.num_truncated} truncated to "
    f"{config.data.max_seq_len} tokens; LM head at {head['eval']} of {config.data.max_seq_len - 1} positions per "
    "example"
  ]
  if not for_training:
    return Experiment(config, Path(config.run_dir), model, tokenizer, eval_data, None, 0, None, None, notes, head)
  records = load_records(config, "train", config.data.max_train_examples)
  check_records(config, records, "train")
  template = fdata.get_template(config.data.template, **config.data.template_fields)
  encoded = fdata.encode(records, template, tokenizer, config.data.max_seq_len)
  check_encoded(config, encoded, "train")
  head["train"] = response_capacity(encoded.loss_mask)
  parts = partition(config, records)
  plan, capacity = plan_privacy(config, parts.sizes)
  dp = (
    None
    if plan is None
    else DPConfig(
      clip_norm=config.privacy.clip_norm,
      noise_multiplier=plan.noise_multiplier,
      expected_batch_size=float(config.batch_size),
      mechanism=config.privacy.mechanism,
    )
  )
  round_fn = FederatedRound(
    model,
    make_strategy(config),
    optimizer=make_optimizer(config),
    dp=dp,
    per_example_loss=response_example_loss(head["train"]),
    client_chunk=client_chunk(config),
  )
  if round_fn.mesh is not None:
    # The model takes the round's base weights, replicated over the mesh: one copy per device, which the sharded
    # evaluation reads as they are.
    nnx.update(model, round_fn.frozen_state)
  # Rounds 1 and 2 cover every strategy's choice of trained factor (fedask-alt alternates), so an impossible
  # combination (W-space DP with both factors trained) fails here rather than inside the loop.
  for t in range(1, min(config.rounds, 2) + 1):
    round_fn.trained(t)
  sizes = parts.sizes
  if config.privacy.release_diagnostics:
    notes.append(
      f"train: {encoded.num_examples} examples, {encoded.num_truncated} truncated to "
      f"{config.data.max_seq_len} tokens, {encoded.num_without_targets} without targets; "
      f"{parts.num_clients} clients of {int(sizes.min())} to {int(sizes.max())} examples; LM head at "
      f"{head['train']} of {config.data.max_seq_len - 1} positions per example"
    )
  else:
    notes.append("train: statistics of the training data withheld (privacy.release_diagnostics=false)")
  if plan is not None:
    slots = f", {capacity} slots per step" if config.privacy.release_diagnostics else ""
    notes.append(
      f"privacy: ({config.privacy.target_epsilon:g}, {config.privacy.delta:g})-DP, noise multiplier "
      f"{plan.noise_multiplier:.4f} ({config.privacy.accountant}, {plan.schedule.describe()}), client sizes "
      f"{config.privacy.client_sizes}{slots}"
    )
  client_data = jax.device_put(fdata.stack_clients(encoded, parts))
  train_counts = {
    "train_examples": encoded.num_examples,
    "train_truncated": encoded.num_truncated,
    "train_without_targets": encoded.num_without_targets,
  }
  return Experiment(
    config,
    Path(config.run_dir),
    model,
    tokenizer,
    eval_data,
    client_data,
    capacity,
    plan,
    round_fn,
    notes,
    head,
    train_counts,
  )
