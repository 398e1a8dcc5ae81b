"""Validation: every rule a config obeys, checked before the federated round is built.

Every violation raises `ConfigError`, a ValueError whose message names the key, the value, the rule and the fix;
`fedask-jax` prints it as one line `error: ...` and exits with code 2. It happens in two places, both before the
federated round is built:

1. `load_config` / `from_dict`, on the config alone (nothing loaded yet):

   - Keys and types (`fedask_jax.config.parsing`): unknown keys are errors, with a did-you-mean; values have
     the annotated types. `data.template_fields` keys are checked against the template's fields (`validate`).
   - Ranges and cross-field rules (`validate`): every numeric key has a range (e.g. 0 < privacy.delta < 1,
     0 <= seed < 2^32), and keys that depend on each other agree (clients_per_round <= num_clients,
     optimizer.warmup_steps < local_steps, data.eval_path only with data.source "jsonl", the distributed
     section's three keys together, ...).

2. `fedask_jax.runner.prepare`, against what the config names:

   - the processes (`runner.processes.start`): in a multi-process run every process has the same config (the
     keys that differ from process 0's are named), and clients_per_round is a multiple of the device count;
   - the run directory (`runner.check_run_dir`): one that holds another config is refused, naming the keys
     that differ (a run is resumed only with the config it started with: sigma depends on every round);
   - the model (`check_model`): lora.rank <= min(in, out) of every targeted layer, data.max_seq_len within a
     model's learned positions; target modules that match no layer list the model's linear layers
     (`fedask_jax.lora.inject_lora`);
   - the data (`check_records`, `check_encoded`): no empty split, every column the template and the partition
     read present in every record, at least one record per client. Sequences longer than data.max_seq_len
     are truncated and counted (the run's notes); a split left without any response token is an error;
   - the batch size against the clients (below) and the privacy plan (`runner.plan_privacy`).

Batch-size policy (against the partition's client sizes n_k):

- With DP and privacy.client_sizes "public", batch_size is the expected Poisson batch, and q_k = batch_size / n_k
  must be a probability for every client: batch_size <= min_k n_k, or an error suggests lowering batch_size or
  num_clients or raising data.min_client_size. With "private", every client samples at privacy.sample_rate.
- With DP, the largest client's rate must leave its add-one neighbour's batch room in the slots (at most the
  largest client's size) with probability 1 - privacy.overflow_prob (`runner.plan_privacy`), or an error names
  the rate to lower to.
- Without DP, each local step draws min(batch_size, n_k) distinct examples uniformly: a client smaller than
  batch_size trains on all its examples at every step; batch_size may not exceed the largest client.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from flax import nnx

from fedask_jax.config.parsing import strategy_args, suggest
from fedask_jax.config.schema import SKETCH_KEYS, Config, ConfigError, SketchConfig
from fedask_jax.data.encoding import EncodedDataset
from fedask_jax.data.templates import get_template
from fedask_jax.lora import Linear, LoRAConfig, path_name
from fedask_jax.strategies import STRATEGIES

# Alpaca's input section is left out for a record without the input column (templates.AlpacaTemplate).
_OPTIONAL_FIELDS = ("input_field",)


# ---------------------------------------------------------------------------------------------------------------
# One helper per kind of rule; each message reads `key=value: rule`.


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _value(config: Config, key: str) -> Any:
  value: Any = config
  for part in key.split("."):
    value = getattr(value, part)
  return value


def _at_least(config: Config, key: str, bound: int, note: str = "", *, null: str | None = None) -> None:
  """The rule `key` >= `bound`; with `null` (what null means, e.g. "all"), null passes too."""
  value = _value(config, key)
  or_null = f" or null ({null})" if null is not None else ""
  _require((value is None and null is not None) or value >= bound, f"{key}={value}: must be >= {bound}{or_null}{note}.")


def _positive(config: Config, key: str, note: str = "", *, what: str = "") -> None:
  """The rule `key` > 0; `what` names the quantity in the message (e.g. "the learning rate")."""
  value = _value(config, key)
  _require(value > 0, f"{key}={value}: {what + ' ' if what else ''}must be > 0{note}.")


def _in_unit_interval(config: Config, key: str, note: str = "", *, zero: bool = False) -> None:
  """The rule 0 < `key` < 1 (a probability), or 0 <= `key` < 1 with `zero`."""
  value = _value(config, key)
  _require(
    (0 <= value if zero else 0 < value) and value < 1, f"{key}={value}: must be in {'[' if zero else '('}0, 1){note}."
  )


# ---------------------------------------------------------------------------------------------------------------
# The config alone (module docstring, item 1); `from_dict` calls `validate`.


def _check_strategy(config: Config) -> None:
  """Builds the strategy as the runner does (`runner.make_strategy`), so that its own range checks (e.g.
  fedprox's mu >= 0) fail here, before anything is loaded."""
  args = strategy_args(config)
  params = inspect.signature(STRATEGIES[config.strategy]).parameters
  sketch = {k: getattr(config.sketch, k) for k in SKETCH_KEYS if k in params}
  default = SketchConfig().gauge
  if config.sketch.gauge != default and "gauge" not in params:
    raise ConfigError(
      f"sketch.gauge={config.sketch.gauge!r} is read by the sketch strategies (fedask, fedask-alt) "
      f"only; strategy={config.strategy!r}: remove it (or set it to {default!r})."
    )
  try:
    STRATEGIES[config.strategy](**args, **sketch)
  except ValueError as error:
    raise ConfigError(f"strategy_args of {config.strategy!r}: {error}") from None


def _check_data(config: Config) -> None:
  d = config.data
  for key in ("path", "eval_path", "name", "data_dir", "train_split", "eval_split"):
    _require(getattr(d, key) != "", f"data.{key} is an empty string: name it, or set it to null.")
  _at_least(config, "data.max_seq_len", 2, " (a prompt token and a target)")
  _at_least(config, "data.max_train_examples", 1, null="all")
  _positive(config, "data.dirichlet_alpha", what="the concentration")
  _at_least(config, "data.min_client_size", 1)
  if d.source in ("jsonl", "hf", "tfds"):
    _require(d.path is not None, f"data.path is required for data.source={d.source!r}.")
  if d.source == "jsonl":
    _require(
      d.eval_path is not None, "data.eval_path is required for data.source='jsonl': name the held-out JSONL file."
    )
  else:
    _require(d.eval_path is None, f"data.eval_path is for data.source='jsonl'; with {d.source!r} use data.eval_split.")
  if d.source == "gsm8k":
    for key in ("train_split", "eval_split"):
      split = getattr(d, key)
      _require(
        split in ("train", "test"),
        f"data.{key}={split!r}: GSM8K has the splits 'train' and 'test'.{suggest(split, ['train', 'test'])}",
      )
  # Keys that only one source reads would otherwise be ignored without a word.
  for key, source in (("name", "hf"), ("data_dir", "tfds")):
    _require(
      getattr(d, key) is None or d.source == source,
      f"data.{key} is read by data.source={source!r} only (data.source={d.source!r}): remove it.",
    )
  _require(
    not d.strip_calculator or d.source == "gsm8k",
    f"data.strip_calculator removes GSM8K's <<a*b=c>> annotations; data.source={d.source!r}: remove it.",
  )
  if d.source == "tfds":
    _require(
      importlib.util.find_spec("tensorflow_datasets") is not None,
      "data.source='tfds' needs tensorflow-datasets, which is not installed: pip install fedask-jax[tfds].",
    )
  accepted = [f.name for f in dataclasses.fields(get_template(d.template))]
  for key, column in d.template_fields.items():
    _require(
      key in accepted,
      f"data.template_fields: template {d.template!r} got fields {sorted(d.template_fields)} but accepts "
      f"{accepted}: {key!r} is not one of them.{suggest(key, accepted)}",
    )
    _require(
      column is not None or key in _OPTIONAL_FIELDS,
      f"data.template_fields.{key} is null: template {d.template!r} needs a value (only "
      f"{' and '.join(_OPTIONAL_FIELDS)} may be null).",
    )
  _require(
    d.partition == "iid" or d.category_column is not None,
    f"data.partition={d.partition!r} needs data.category_column (the column to split by).",
  )


def _check_distributed(config: Config) -> None:
  d = config.distributed
  given = [
    f"distributed.{key}"
    for key in ("coordinator_address", "num_processes", "process_id")
    if getattr(d, key) is not None
  ]
  if d.auto:
    _require(
      not given,
      f"distributed.auto=true lets JAX read the processes from the cluster (SLURM, Cloud TPU, "
      f"Open MPI): remove {' and '.join(given)}.",
    )
  elif given:
    _require(
      len(given) == 3,
      f"{' and '.join(given)} set without the others: a multi-process run needs "
      "distributed.coordinator_address, num_processes and process_id (or distributed.auto=true where JAX "
      "detects them: SLURM, Cloud TPU).",
    )
    _at_least(config, "distributed.num_processes", 1)
    assert d.process_id is not None and d.num_processes is not None and d.coordinator_address is not None  # all given
    _require(
      0 <= d.process_id < d.num_processes,
      f"distributed.process_id={d.process_id}: must be in [0, distributed.num_processes={d.num_processes}).",
    )
    host, _, port = d.coordinator_address.rpartition(":")
    _require(
      bool(host) and port.isdigit() and 0 < int(port) < 2**16,
      f"distributed.coordinator_address={d.coordinator_address!r}: expected host:port, e.g. 10.0.0.1:1234.",
    )
  _at_least(config, "distributed.heartbeat_timeout", 1, " (seconds)")


def lora_config(config: Config) -> LoRAConfig:
  """The `fedask_jax.lora.LoRAConfig` of the config's lora section (its checks raise ValueError)."""
  lo = config.lora
  return LoRAConfig(rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout)


def validate(config: Config) -> None:
  """Ranges and cross-field rules (module docstring, item 1); raises ConfigError naming the key, the rule and
  the fix."""
  c = config
  for key in ("rounds", "num_clients", "clients_per_round", "local_steps", "batch_size"):
    _at_least(c, key, 1)
  _require(
    c.clients_per_round <= c.num_clients,
    f"clients_per_round={c.clients_per_round} exceeds num_clients={c.num_clients}: sample at most "
    f"{c.num_clients} clients per round.",
  )
  _positive(c, "lr", what="the learning rate")
  # With 64-bit types off (JAX's default), jax.random.key keeps a seed's low 32 bits: seed 2^32 + s is seed s.
  _require(
    0 <= c.seed < 2**32,
    f"seed={c.seed}: must be in [0, 2^32) (JAX keys keep only the low 32 bits, so a "
    "larger seed repeats a smaller one's draws).",
  )
  _require(bool(c.run_dir), "run_dir is empty: name the directory for metrics and checkpoints.")
  _require(bool(c.model.path), "model.path is empty: name a checkpoint directory or a hub id.")
  _require(
    c.client_chunk is None or c.client_chunk >= 1,
    f"client_chunk={c.client_chunk}: must be >= 1 (or null: the backend's default); it need not divide "
    "clients_per_round (the last chunk holds the rest).",
  )

  _check_data(c)

  try:  # the lora section's rules are LoRAConfig's own, and its messages name the config keys
    lora_config(c)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _at_least(c, "sketch.oversample", 0)
  _at_least(c, "sketch.certify_every", 0)
  _check_strategy(c)

  p = c.privacy
  _in_unit_interval(c, "privacy.delta", ", e.g. 1e-5")
  _positive(c, "privacy.target_epsilon", " (the paper: 1, 3, 6)")
  # The bound keeps exp(epsilon) (overflow_delta) finite; a guarantee with e^100 as likelihood ratio says nothing.
  _require(
    p.target_epsilon <= 100,
    f"privacy.target_epsilon={p.target_epsilon}: must be <= 100 (beyond, the guarantee bounds nothing); "
    "to train without DP set privacy.enabled=false.",
  )
  _positive(c, "privacy.clip_norm", " (the paper: 1.0)", what="the clipping norm")
  _in_unit_interval(c, "privacy.overflow_prob", ", e.g. 1e-12")
  if p.client_sizes == "private":
    _require(
      p.sample_rate is not None and 0 < p.sample_rate <= 1,
      f"privacy.sample_rate={p.sample_rate}: privacy.client_sizes='private' needs a public Poisson rate in "
      f"(0, 1], e.g. batch_size={c.batch_size} over a public estimate of a client's number of examples.",
    )
  else:
    _require(
      p.sample_rate is None,
      f"privacy.sample_rate={p.sample_rate} is the public rate of privacy.client_sizes='private'; with "
      "'public' each client's rate is batch_size / n_k: remove it, or set privacy.client_sizes=private.",
    )

  o = c.optimizer
  _at_least(c, "optimizer.weight_decay", 0)
  _require(
    o.weight_decay == 0 or o.name == "adamw",
    f"optimizer.weight_decay={o.weight_decay} applies to adamw only (optimizer.name={o.name!r}).",
  )
  _at_least(c, "optimizer.warmup_steps", 0)
  # Clients' optimisers restart every round (runner.make_optimizer), and so does the warm-up.
  _require(
    o.warmup_steps < c.local_steps or o.warmup_steps == 0,
    f"optimizer.warmup_steps={o.warmup_steps} is not below local_steps={c.local_steps}: the warm-up restarts "
    f"every round, so lr={c.lr:g} would never be reached; use warmup_steps < {c.local_steps} (or 0).",
  )
  _at_least(c, "eval.every", 0, " (0: only before and after training)")
  _at_least(c, "eval.max_examples", 1, null="all")
  _at_least(c, "eval.batch_size", 1)
  _at_least(c, "checkpoint.every", 0, " (0: only at the end)")
  _at_least(c, "checkpoint.keep", 1)
  _check_distributed(c)


# ---------------------------------------------------------------------------------------------------------------
# The config against what it names (module docstring, item 2); `fedask_jax.runner.prepare` calls these.


def _split_source(config: Config, split: str) -> str:
  d = config.data
  if d.source == "jsonl":
    return f"data.path={d.path!r}" if split == "train" else f"data.eval_path={d.eval_path!r}"
  return f"data.{split}_split={getattr(d, split + '_split')!r} of data.source={d.source!r}"


def check_records(config: Config, records: Sequence[Mapping[str, Any]], split: Literal["train", "eval"]) -> None:
  """The records of `split` against the config, before encoding and partitioning.

  The split is not empty; every column that data.template_fields names (and, for "train", data.category_column)
  is in every record; for "train", each of the num_clients clients can get a record (and, for a Dirichlet
  partition, data.min_client_size of them). Raises ConfigError naming the column, the records that lack it
  and the columns they have.
  """
  d = config.data
  where = _split_source(config, split)
  _require(len(records) > 0, f"{where}: the {split} split has no records: point it at a non-empty dataset.")
  columns = {
    f"data.template_fields.{key}": column
    for key, column in d.template_fields.items()
    if key.endswith("_field") and column is not None and key not in _OPTIONAL_FIELDS
  }
  if split == "train" and d.category_column is not None:
    columns["data.category_column"] = d.category_column
  for key, column in columns.items():
    missing = [i for i, record in enumerate(records) if column not in record]
    if missing:
      present = sorted(records[missing[0]])
      unstratified = d.partition == "iid" and key == "data.category_column"
      raise ConfigError(
        f"{key}={column!r}: {len(missing)} of the {len(records)} {split} records ({where}) have no such column; "
        f"record {missing[0]} has {present}: set {key} to one of them"
        f"{' (or null: an unstratified iid split)' if unstratified else ''}.{suggest(column, present)}"
      )
  if split != "train" or d.partition == "natural":
    return
  n, k = len(records), config.num_clients
  cap = f" (data.max_train_examples={d.max_train_examples})" if d.max_train_examples is not None else ""
  _require(
    n >= k,
    f"num_clients={k} exceeds the {n} training records{cap}: {k - n} of the {k} clients would be "
    f"empty; lower num_clients to at most {n} or use more data.",
  )
  _require(
    d.partition != "dirichlet" or d.min_client_size * k <= n,
    f"data.min_client_size={d.min_client_size} for each of num_clients={k} needs {d.min_client_size * k} "
    f"training records, but there are {n}{cap}: lower data.min_client_size or num_clients.",
  )


def check_encoded(config: Config, encoded: EncodedDataset, split: Literal["train", "eval"]) -> None:
  """A split whose every example lost its whole response to truncation at data.max_seq_len is an error (nothing
  to train on or evaluate); partly truncated splits are counted in the run's notes instead."""
  n, length = encoded.num_examples, config.data.max_seq_len
  _require(
    encoded.num_without_targets < n,
    f"data.max_seq_len={length}: the prompt fills all {length} tokens in every one of the {n} {split} "
    f"examples, so no response token is left; raise data.max_seq_len (the longest example has "
    f"{int(encoded.full_length.max())} tokens).",
  )


def check_model(config: Config, model: nnx.Module) -> None:
  """The base model against the config, before adapters are added.

  lora.rank <= min(in, out) of every `Linear` that lora.target_modules selects (an in x out update has rank at
  most min(in, out)), and data.max_seq_len <= the model's `config.max_positions` where it has one (GPT-2's
  learned position table; rotary models have none). Target modules that select nothing are left to
  `fedask_jax.lora.inject_lora`, whose error lists the model's linear layers.
  """
  lo = config.lora
  lora = lora_config(config)
  linears = [(path_name(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
  bounds = {name: min(m.in_features, m.out_features) for name, m in linears if lora.matches(name)}
  too_small = [name for name, bound in bounds.items() if bound < lo.rank]
  if too_small:
    name = min(too_small, key=bounds.__getitem__)
    layer = dict(linears)[name]
    more = len(too_small) - 1
    others = f" (and {more} more targeted layer{'s' if more > 1 else ''})" if more else ""
    raise ConfigError(
      f"lora.rank={lo.rank} exceeds min(in, out) = {bounds[name]} of {name} ({layer.in_features} x "
      f"{layer.out_features}, in x out){others}, selected by lora.target_modules={list(lo.target_modules)}: "
      f"choose lora.rank <= {min(bounds.values())}, or leave that module out of target_modules."
    )
  positions = getattr(getattr(model, "config", None), "max_positions", None)
  _require(
    positions is None or config.data.max_seq_len <= positions,
    f"data.max_seq_len={config.data.max_seq_len} exceeds the {positions} positions of model.path="
    f"{config.model.path!r} (a learned position table): lower data.max_seq_len to at most {positions}.",
  )
