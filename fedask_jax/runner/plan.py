"""Preparation: from a `Config` to an `Experiment`, everything checked before anything is compiled.

`prepare` does everything that can fail on bad input: it checks the run directory against the config, loads the
model, tokenizer and data, partitions the clients, plans the privacy (noise multiplier, sampling rate, batch
capacity) and builds the federated round.

Privacy (docs/design.md, section 4.5): `fedask_jax.privacy.plan_privacy` over the config's values and the
clients' example counts. Under `privacy.client_sizes` "public" (default) client k samples at q_k =
batch_size / n_k, one noise multiplier serves all clients, calibrated for the smallest client's rate, and the
server weights clients by n_k: the sizes are public metadata, and the guarantee is for neighbours of equal sizes
(README: privacy). Under "private" every client samples at the public rate `privacy.sample_rate`, the noisy sum
is divided by batch_size and the sampled clients weigh the same (`round_sampler`): nothing that touches a
client's examples depends on n_k, and the guarantee covers adding or removing an example. Participation is
"sampled" by default when clients_per_round < num_clients; the batch capacity is for n_k + 1 examples (rates
whose add-one overflow the slots cannot bound are refused), and the overflow's cost is taken out of delta. The
`epsilon` of each metrics line is the smallest client's epsilon after that many rounds (`PrivacyPlan.epsilon`).

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
  privacy: privacy.PrivacyPlan | None
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


def sample_rate(config: Config) -> float | None:
  """The public Poisson rate every client samples at under DP with privacy.client_sizes "private"
  (`privacy.plan_privacy`'s and `simulation.round_sampler`'s sample_rate); None otherwise."""
  p = config.privacy
  return p.sample_rate if p.enabled and p.client_sizes == "private" else None


def plan_privacy(config: Config, sizes: np.ndarray) -> tuple[privacy.PrivacyPlan | None, int]:
  """(privacy plan or None without DP, batch capacity) for clients of `sizes`: `fedask_jax.privacy.plan_privacy`
  with the config's values (module docstring); without DP the capacity is batch_size."""
  b = config.batch_size
  if not config.privacy.enabled:
    if b > int(sizes.max()):
      raise ConfigError(f"batch_size={b} exceeds the largest client's {int(sizes.max())} examples: lower batch_size.")
    return None, b
  p = config.privacy
  try:
    plan = privacy.plan_privacy(
      target_epsilon=p.target_epsilon,
      delta=p.delta,
      rounds=config.rounds,
      local_steps=config.local_steps,
      batch_size=b,
      client_sizes=sizes,
      clients_per_round=config.clients_per_round,
      participation=p.participation,
      overflow_prob=p.overflow_prob,
      accountant=p.accountant,
      sample_rate=sample_rate(config),
    )
  except ValueError as error:
    # The config has been validated, so what fails here is the plan's own cross-checks, whose arguments are the
    # config's keys of the same names (privacy.* for the privacy ones).
    raise ConfigError(f"{error} (the privacy plan of batch_size, rounds, local_steps and privacy.*)") from None
  return plan, plan.capacity


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
