"""Run configuration: typed dataclasses with defaults, read from YAML with dotted command-line overrides, and
validated before anything is compiled.

    config = load_config("experiments/configs/quickstart.yaml", ["rounds=20", "privacy.target_epsilon=6"])

An override is `key=value`, `key` a dotted path (`privacy.delta`), `value` parsed as a YAML scalar or flow
collection (`lora.target_modules=[q_proj,v_proj]`, `eval.max_examples=null`).

Validation. Every violation raises `ConfigError`, a ValueError whose message names the key, the value, the rule
and the fix; `fedask-jax` prints it as one line `error: ...` and exits with code 2. It happens in two places,
both before the federated round is built:
1. `load_config` / `from_dict`, on the config alone (nothing loaded yet):
   - Unknown keys are errors, with a did-you-mean (difflib) from the section's keys; so are unknown
     `strategy_args` (from the strategy's signature) and `data.template_fields` keys (from the template's fields).
   - Types follow the dataclass annotations (for `strategy_args`, the strategy's annotations). An int is
     accepted where a float is expected, and so is a string that Python's `float()` reads (`1e-5`: PyYAML
     reads exponents without a dot as strings); NaN and infinities are refused; a bool is never a number and a
     number never a bool. A `Literal[...]` field accepts only its listed values (with a suggestion).
   - Ranges and cross-field rules (`validate`): every numeric key has a range (e.g. 0 < privacy.delta < 1,
     0 <= seed < 2^32), and keys that depend on each other agree (clients_per_round <= num_clients,
     optimizer.warmup_steps < local_steps, data.eval_path only with data.source "jsonl", ...).
2. `fedask_jax.runner.prepare`, against what the config names:
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
- With DP, batch_size is the expected Poisson batch, and q_k = batch_size / n_k must be a probability for every
  client: batch_size <= min_k n_k, or an error suggests lowering batch_size or num_clients or raising
  data.min_client_size.
- Without DP, each local step draws min(batch_size, n_k) distinct examples uniformly: a client smaller than
  batch_size trains on all its examples at every step; batch_size may not exceed the largest client.

Paths (model.path, data.path, data.eval_path, run_dir) are used as written: a relative path is relative to the
working directory the command runs in, which for the configs under experiments/configs is the repository root.

Privacy semantics (design.md section 4): per local step each client samples its examples by Poisson sampling
with rate q_k = batch_size / n_k; the noise multiplier is calibrated once, for the largest rate
q = batch_size / min_k n_k, so that every client's data (including the smallest client's) meets
(target_epsilon, delta); larger clients spend less.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from flax import nnx

from fedask_jax.data.encoding import EncodedDataset
from fedask_jax.data.templates import get_template
from fedask_jax.lora import Linear, LoRAConfig, path_name
from fedask_jax.strategies import STRATEGIES


# Alpaca's input section is left out for a record without the input column (templates.AlpacaTemplate).
_OPTIONAL_FIELDS = ("input_field",)


class ConfigError(ValueError):
  """A configuration problem, reported to the user as one line (`fedask-jax` exits with code 2)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The frozen base model.

  Attributes:
    path: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files) or a hub id.
    dtype: parameter and compute dtype of the base model (adapters stay float32, as PEFT's default).
  """

  path: str = "experiments/base_model"
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training and held-out data (`fedask_jax.data`).

  Attributes:
    source: "gsm8k" (`load_gsm8k`: records with a derived `category`; `path` is a folder, file or hub id,
      None the carried data/gsm8k), "jsonl" (local JSON-lines files `path` and `eval_path`), "hf" (Hugging
      Face `datasets`: `path` a hub id, a builder or a `save_to_disk` folder, `name` its config, `train_split`
      / `eval_split`) or "tfds" (tensorflow-datasets `path` with `train_split` / `eval_split`, `data_dir`;
      ArrayRecord datasets are read without TensorFlow).
    path: see `source`.
    eval_path: the held-out JSONL file (source "jsonl" only).
    name: the Hugging Face dataset config (source "hf").
    data_dir: tensorflow-datasets' data directory (source "tfds").
    train_split, eval_split: split names (sources "gsm8k", "hf", "tfds").
    template: "alpaca" or "plain" (`fedask_jax.data.templates`).
    template_fields: the template's field names, e.g. {instruction_field: question, input_field: null,
      response_field: answer} for Alpaca on GSM8K.
    max_seq_len: L, tokens per example (longer ones are truncated and counted).
    max_train_examples: keep the first examples of the training split only (None: all).
    partition: "iid" (stratified by `category_column`), "dirichlet" (Dirichlet(`dirichlet_alpha`) over
      `category_column`) or "natural" (one client per value of `category_column`).
    category_column: the records' category column (iid, dirichlet) or client column (natural); None for
      iid means no stratification.
    dirichlet_alpha: the Dirichlet concentration (the paper: 0.1, 0.5, 1.0).
    min_client_size: dirichlet and natural partitions give every client at least this many examples.
    strip_calculator: remove GSM8K's <<a*b=c>> calculator annotations (source "gsm8k").
  """

  source: Literal["gsm8k", "jsonl", "hf", "tfds"] = "gsm8k"
  path: str | None = None
  eval_path: str | None = None
  name: str | None = None
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  template: Literal["alpaca", "plain"] = "alpaca"
  template_fields: dict[str, str | None] = dataclasses.field(
      default_factory=lambda: {"instruction_field": "question", "input_field": None, "response_field": "answer"})
  max_seq_len: int = 256
  max_train_examples: int | None = None
  partition: Literal["iid", "dirichlet", "natural"] = "iid"
  category_column: str | None = "category"
  dirichlet_alpha: float = 0.5
  min_client_size: int = 1
  strip_calculator: bool = False


@dataclasses.dataclass(frozen=True)
class LoRASection:
  """LoRA hyper-parameters (`fedask_jax.lora.LoRAConfig`, PEFT's semantics)."""

  rank: int = 8
  alpha: float = 16.0
  target_modules: tuple[str, ...] = ("q_proj", "v_proj")
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class SketchConfig:
  """FedASK's sketch: width r + oversample; certify reports the aggregation error each round."""

  oversample: int = 2
  certify: bool = True


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """Example-level DP of every client's data (design.md section 4).

  Attributes:
    enabled: DP-SGD on (Poisson sampling, clipping, noise) or off (uniform minibatches, no noise).
    target_epsilon, delta: the guarantee; sigma is calibrated to meet it (module docstring: which q).
    clip_norm: C, the per-example clipping norm.
    accountant: "rdp" or "pld" (`dp_accounting`).
    participation: "worst_case" (rigorous: every round may include a client) or "expected" (the official
      code's heuristic; under-states epsilon).
    mechanism: "b_space" (clip and noise the trained factor's gradient, the official code) or "w_space"
      (clip dl/dW and project the noise, the paper's equation).
    overflow_prob: per-step probability that a Poisson batch overflows its fixed capacity. Its cost in delta
      (`fedask_jax.privacy.overflow_delta`) is taken out of `delta` before calibration, so the run as a whole
      is (target_epsilon, delta)-DP; 1e-12 costs a few slots and almost none of delta.
  """

  enabled: bool = True
  target_epsilon: float = 3.0
  delta: float = 1e-5
  clip_norm: float = 1.0
  accountant: Literal["rdp", "pld"] = "rdp"
  participation: Literal["worst_case", "expected"] = "worst_case"
  mechanism: Literal["b_space", "w_space"] = "b_space"
  overflow_prob: float = 1e-12


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The clients' local optimiser (optax), reset at the start of every round.

  name: "adamw" (the paper), "adam" or "sgd"; weight_decay: AdamW's decoupled decay; warmup_steps: linear
  warm-up over the first local steps of each round, then constant (the paper: 3).
  """

  name: Literal["adamw", "adam", "sgd"] = "adamw"
  weight_decay: float = 0.0
  warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation (token-mean cross-entropy on the responses, and its perplexity).

  every: evaluate every this many rounds (0: only before training and at the end); max_examples: the first
  examples of the held-out split (None: all); batch_size: examples per forward pass.
  """

  every: int = 0
  max_examples: int | None = 200
  batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of the whole server state: every this many rounds and at the end, keeping `keep`."""

  every: int = 10
  keep: int = 2


@dataclasses.dataclass(frozen=True)
class Config:
  """A federated fine-tuning run.

  Attributes:
    strategy: a name of `fedask_jax.strategies.STRATEGIES`.
    strategy_args: the strategy's other hyper-parameters (e.g. {mu: 0.01} for fedprox); the sketch's come from
      `sketch`.
    rounds: T, federated rounds.
    num_clients: C, clients in the federation (for a natural partition: the number of natural clients).
    clients_per_round: K, clients sampled each round (uniformly without replacement).
    local_steps: tau, local optimiser steps per round.
    batch_size: examples per local step (the expected Poisson batch under DP).
    lr: the local learning rate.
    seed: run seed; every random draw derives from it (round keys `fold_in(run_key, round)`).
    run_dir: where metrics, checkpoints, plots and the adapter go.
    client_chunk: clients trained at once inside the round (memory); None: all K at once on an accelerator,
      chunks of up to 4 on a CPU (`fedask_jax.runner.client_chunk`).
  """

  strategy: str = "fedask"
  strategy_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  rounds: int = 100
  num_clients: int = 10
  clients_per_round: int = 2
  local_steps: int = 10
  batch_size: int = 6
  lr: float = 5e-4
  seed: int = 0
  run_dir: str = "runs/default"
  client_chunk: int | None = None
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  lora: LoRASection = dataclasses.field(default_factory=LoRASection)
  sketch: SketchConfig = dataclasses.field(default_factory=SketchConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------------------------
# Building typed configs from nested dicts.


def _suggest(name: str, choices: Sequence[str]) -> str:
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
  if typing.get_origin(tp) is Literal:
    return " | ".join(repr(a) for a in typing.get_args(tp))
  if isinstance(tp, type):
    return tp.__name__
  return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """`value` checked against annotation `tp` (and lightly converted: int -> float, list -> tuple)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _coerce(value, arg, key)
      except ConfigError as error:
        errors.append(error)
    if len(errors) == 1:
      raise errors[0]
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}.")
  if origin is Literal:
    if value not in args:
      raise ConfigError(
          f"{key}={value!r}: must be one of {list(args)}.{_suggest(value, [str(a) for a in args])}")
    return value
  if origin in (tuple, list):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}={value!r}: expected a list, e.g. {key}=[q_proj,v_proj].")
    return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
  if origin is dict:
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}={value!r}: expected a mapping, e.g. {key}={{name: value}}.")
    return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}={value!r}: expected true or false.")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}={value!r}: expected an integer.")
    return value
  if tp is float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      number = float(value)
    elif isinstance(value, str):
      try:
        number = float(value)
      except ValueError:
        pass
    if number is None or not math.isfinite(number):
      raise ConfigError(f"{key}={value!r}: expected a finite number.")
    return number
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}={value!r}: expected a string (quote it in YAML).")
    return value
  raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
  """An instance of dataclass `cls` from the mapping `raw`, every key and type checked."""
  where = prefix.rstrip(".") or "the config"
  if raw is None:
    raw = {}
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{where} must be a mapping of keys to values, got {raw!r}.")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in raw.items():
    if key not in fields:
      raise ConfigError(
          f"unknown key {prefix + str(key)!r} in {where}.{_suggest(key, list(fields))} Known keys: {sorted(fields)}.")
    tp = hints[key]
    if dataclasses.is_dataclass(tp):
      kwargs[key] = _build(tp, value, f"{prefix}{key}.")
    else:
      kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
  return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
  """A config as plain nested dicts, lists and scalars (what `config.yaml` in a run directory holds)."""
  out = {}
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if dataclasses.is_dataclass(value):
      value = to_dict(value)
    elif isinstance(value, tuple):
      value = list(value)
    elif isinstance(value, dict):
      value = dict(value)
    out[f.name] = value
  return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; the leaves of a config dict by dotted key."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_diff(a: Config, b: Config, *, ignore: Sequence[str] = ()) -> list[str]:
  """Dotted keys whose values differ between two configs (e.g. ["lr", "privacy.delta"]), sorted."""
  fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
  return sorted(k for k in set(fa) | set(fb) if k not in ignore and fa.get(k, None) != fb.get(k, None))


# ---------------------------------------------------------------------------------------------------------------
# Overrides, loading and validation.


def parse_override(text: str) -> tuple[list[str], Any]:
  """'privacy.delta=1e-6' -> (['privacy', 'delta'], 1e-06); the value is parsed as YAML."""
  key, sep, value = text.partition("=")
  key = key.strip()
  if not sep or not key:
    raise ConfigError(f"override {text!r} is not key=value: write e.g. rounds=20 or privacy.target_epsilon=6.")
  parts = key.split(".")
  if any(not p for p in parts) or any(c.isspace() for c in key):
    raise ConfigError(f"override key {key!r} is not a dotted name: write e.g. lora.rank=16.")
  try:
    parsed = yaml.safe_load(value) if value.strip() else ""
  except yaml.YAMLError as error:
    raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(error).splitlines()[0]}).") from None
  return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """A copy of the nested dict `raw` with each 'key=value' override set (intermediate sections created)."""
  out = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
  for text in overrides:
    parts, value = parse_override(text)
    node = out
    for depth, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if child is None:
        child = node[part] = {}
      if not isinstance(child, dict):
        raise ConfigError(
            f"override {text!r}: {'.'.join(parts[:depth + 1])} is a value ({child!r}), not a section.")
      node = child
    node[parts[-1]] = value
  return out


def read_yaml(path: str | Path) -> dict[str, Any]:
  """The mapping in a YAML file, or a ConfigError saying why it is not one."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist: pass --config PATH to a YAML file.")
  try:
    with open(path, encoding="utf-8") as f:
      raw = yaml.safe_load(f)
  except yaml.YAMLError as error:
    raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(error).split())}") from None
  if raw is None:
    return {}
  if not isinstance(raw, dict):
    raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, not {type(raw).__name__}.")
  return raw


def from_dict(raw: Mapping[str, Any]) -> Config:
  """A validated `Config` from nested dicts (unknown keys, types, ranges all checked)."""
  config = _build(Config, raw, "")
  config = dataclasses.replace(config, strategy_args=_strategy_args(config))
  validate(config)
  return config


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
  """The validated config of YAML file `path` (None: the defaults) with `key=value` overrides applied."""
  raw = read_yaml(path) if path is not None else {}
  return from_dict(apply_overrides(raw, overrides))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _strategy_args(config: Config) -> dict[str, Any]:
  """config.strategy_args checked against the strategy's signature: known names, and values of the annotated
  types (converted as `_coerce` does, so that `mu: 1e-3` from YAML becomes a float)."""
  name = config.strategy
  _require(name in STRATEGIES, f"strategy={name!r}: unknown strategy; choose one of {sorted(STRATEGIES)}."
           f"{_suggest(name, list(STRATEGIES))}")
  hints = typing.get_type_hints(STRATEGIES[name])
  params = list(inspect.signature(STRATEGIES[name]).parameters)
  args = {}
  for key, value in config.strategy_args.items():
    if key in ("oversample", "certify"):
      raise ConfigError(f"strategy_args.{key}: set it as sketch.{key} instead.")
    _require(key in params,
             f"strategy_args.{key}: strategy {name!r} takes no such hyper-parameter."
             f"{_suggest(key, params)} It takes {sorted(params)}.")
    args[key] = _coerce(value, hints.get(key, Any), f"strategy_args.{key}")
  return args


def _check_strategy(config: Config) -> None:
  """Builds the strategy as the runner does (`runner.make_strategy`), so that its own range checks (e.g.
  fedprox's mu >= 0) fail here, before anything is loaded."""
  args = _strategy_args(config)
  params = inspect.signature(STRATEGIES[config.strategy]).parameters
  sketch = {k: getattr(config.sketch, k) for k in ("oversample", "certify") if k in params}
  try:
    STRATEGIES[config.strategy](**args, **sketch)
  except ValueError as error:
    raise ConfigError(f"strategy_args of {config.strategy!r}: {error}") from None


def _check_data(d: DataConfig) -> None:
  for key in ("path", "eval_path", "name", "data_dir", "train_split", "eval_split"):
    _require(getattr(d, key) != "", f"data.{key} is an empty string: name it, or set it to null.")
  _require(d.max_seq_len >= 2, f"data.max_seq_len={d.max_seq_len}: must be >= 2 (a prompt token and a target).")
  _require(d.max_train_examples is None or d.max_train_examples >= 1,
           f"data.max_train_examples={d.max_train_examples}: must be >= 1 or null (all).")
  _require(d.dirichlet_alpha > 0, f"data.dirichlet_alpha={d.dirichlet_alpha}: the concentration must be > 0.")
  _require(d.min_client_size >= 1, f"data.min_client_size={d.min_client_size}: must be >= 1.")
  if d.source in ("jsonl", "hf", "tfds"):
    _require(d.path is not None, f"data.path is required for data.source={d.source!r}.")
  if d.source == "jsonl":
    _require(d.eval_path is not None,
             "data.eval_path is required for data.source='jsonl': name the held-out JSONL file.")
  else:
    _require(d.eval_path is None, f"data.eval_path is for data.source='jsonl'; with {d.source!r} use data.eval_split.")
  if d.source == "gsm8k":
    for key in ("train_split", "eval_split"):
      split = getattr(d, key)
      _require(split in ("train", "test"), f"data.{key}={split!r}: GSM8K has the splits 'train' and 'test'."
               f"{_suggest(split, ['train', 'test'])}")
  # Keys that only one source reads would otherwise be ignored without a word.
  for key, source in (("name", "hf"), ("data_dir", "tfds")):
    _require(getattr(d, key) is None or d.source == source,
             f"data.{key} is read by data.source={source!r} only (data.source={d.source!r}): remove it.")
  _require(not d.strip_calculator or d.source == "gsm8k",
           f"data.strip_calculator removes GSM8K's <<a*b=c>> annotations; data.source={d.source!r}: remove it.")
  if d.source == "tfds":
    _require(importlib.util.find_spec("tensorflow_datasets") is not None,
             "data.source='tfds' needs tensorflow-datasets, which is not installed: pip install fedask-jax[tfds].")
  accepted = [f.name for f in dataclasses.fields(get_template(d.template))]
  for key, column in d.template_fields.items():
    _require(key in accepted,
             f"data.template_fields: template {d.template!r} got fields {sorted(d.template_fields)} but accepts "
             f"{accepted}: {key!r} is not one of them.{_suggest(key, accepted)}")
    _require(column is not None or key in _OPTIONAL_FIELDS,
             f"data.template_fields.{key} is null: template {d.template!r} needs a value (only "
             f"{' and '.join(_OPTIONAL_FIELDS)} may be null).")
  _require(d.partition == "iid" or d.category_column is not None,
           f"data.partition={d.partition!r} needs data.category_column (the column to split by).")


def validate(config: Config) -> None:
  """Ranges and cross-field rules (module docstring, item 1); raises ConfigError naming the key, the rule and
  the fix."""
  c = config
  for key in ("rounds", "num_clients", "clients_per_round", "local_steps", "batch_size"):
    _require(getattr(c, key) >= 1, f"{key}={getattr(c, key)}: must be >= 1.")
  _require(c.clients_per_round <= c.num_clients,
           f"clients_per_round={c.clients_per_round} exceeds num_clients={c.num_clients}: sample at most "
           f"{c.num_clients} clients per round.")
  _require(c.lr > 0, f"lr={c.lr}: the learning rate must be > 0.")
  # With 64-bit types off (JAX's default), jax.random.key keeps a seed's low 32 bits: seed 2^32 + s is seed s.
  _require(0 <= c.seed < 2**32, f"seed={c.seed}: must be in [0, 2^32) (JAX keys keep only the low 32 bits, so a "
           "larger seed repeats a smaller one's draws).")
  _require(bool(c.run_dir), "run_dir is empty: name the directory for metrics and checkpoints.")
  _require(bool(c.model.path), "model.path is empty: name a checkpoint directory or a hub id.")
  if c.client_chunk is not None:
    _require(1 <= c.client_chunk <= c.clients_per_round and c.clients_per_round % c.client_chunk == 0,
             f"client_chunk={c.client_chunk}: must divide clients_per_round={c.clients_per_round} "
             "(or be null: all clients at once).")

  _check_data(c.data)

  lo = c.lora
  _require(lo.rank >= 1, f"lora.rank={lo.rank}: must be >= 1.")
  _require(lo.alpha > 0, f"lora.alpha={lo.alpha}: must be > 0 (PEFT uses alpha = 2 * rank).")
  _require(0 <= lo.dropout < 1, f"lora.dropout={lo.dropout}: must be in [0, 1).")
  _require(len(lo.target_modules) >= 1, "lora.target_modules is empty: name modules, e.g. [q_proj, v_proj].")
  _require(all(lo.target_modules), f"lora.target_modules={list(lo.target_modules)} holds an empty name: remove it.")
  _require(c.sketch.oversample >= 0, f"sketch.oversample={c.sketch.oversample}: must be >= 0.")
  _check_strategy(c)

  p = c.privacy
  _require(0 < p.delta < 1, f"privacy.delta={p.delta}: must be in (0, 1), e.g. 1e-5.")
  _require(p.target_epsilon > 0, f"privacy.target_epsilon={p.target_epsilon}: must be > 0 (the paper: 1, 3, 6).")
  # The bound keeps exp(epsilon) (overflow_delta) finite; a guarantee with e^100 as likelihood ratio says nothing.
  _require(p.target_epsilon <= 100,
           f"privacy.target_epsilon={p.target_epsilon}: must be <= 100 (beyond, the guarantee bounds nothing); "
           "to train without DP set privacy.enabled=false.")
  _require(p.clip_norm > 0, f"privacy.clip_norm={p.clip_norm}: the clipping norm must be > 0 (the paper: 1.0).")
  _require(0 < p.overflow_prob < 1, f"privacy.overflow_prob={p.overflow_prob}: must be in (0, 1), e.g. 1e-12.")

  o = c.optimizer
  _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0.")
  _require(o.weight_decay == 0 or o.name == "adamw",
           f"optimizer.weight_decay={o.weight_decay} applies to adamw only (optimizer.name={o.name!r}).")
  _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0.")
  # Clients' optimisers restart every round (runner.make_optimizer), and so does the warm-up.
  _require(o.warmup_steps < c.local_steps or o.warmup_steps == 0,
           f"optimizer.warmup_steps={o.warmup_steps} is not below local_steps={c.local_steps}: the warm-up restarts "
           f"every round, so lr={c.lr:g} would never be reached; use warmup_steps < {c.local_steps} (or 0).")
  _require(c.eval.every >= 0, f"eval.every={c.eval.every}: must be >= 0 (0: only before and after training).")
  _require(c.eval.max_examples is None or c.eval.max_examples >= 1,
           f"eval.max_examples={c.eval.max_examples}: must be >= 1 or null (all).")
  _require(c.eval.batch_size >= 1, f"eval.batch_size={c.eval.batch_size}: must be >= 1.")
  _require(c.checkpoint.every >= 0, f"checkpoint.every={c.checkpoint.every}: must be >= 0 (0: only at the end).")
  _require(c.checkpoint.keep >= 1, f"checkpoint.keep={c.checkpoint.keep}: must be >= 1.")


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
  columns = {f"data.template_fields.{key}": column for key, column in d.template_fields.items()
             if key.endswith("_field") and column is not None and key not in _OPTIONAL_FIELDS}
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
          f"{' (or null: an unstratified iid split)' if unstratified else ''}.{_suggest(column, present)}")
  if split != "train" or d.partition == "natural":
    return
  n, k = len(records), config.num_clients
  cap = f" (data.max_train_examples={d.max_train_examples})" if d.max_train_examples is not None else ""
  _require(n >= k, f"num_clients={k} exceeds the {n} training records{cap}: {k - n} of the {k} clients would be "
           f"empty; lower num_clients to at most {n} or use more data.")
  _require(d.partition != "dirichlet" or d.min_client_size * k <= n,
           f"data.min_client_size={d.min_client_size} for each of num_clients={k} needs {d.min_client_size * k} "
           f"training records, but there are {n}{cap}: lower data.min_client_size or num_clients.")


def check_encoded(config: Config, encoded: EncodedDataset, split: Literal["train", "eval"]) -> None:
  """A split whose every example lost its whole response to truncation at data.max_seq_len is an error (nothing
  to train on or evaluate); partly truncated splits are counted in the run's notes instead."""
  n, length = encoded.num_examples, config.data.max_seq_len
  _require(encoded.num_without_targets < n,
           f"data.max_seq_len={length}: the prompt fills all {length} tokens in every one of the {n} {split} "
           f"examples, so no response token is left; raise data.max_seq_len (the longest example has "
           f"{int(encoded.full_length.max())} tokens).")


def check_model(config: Config, model: nnx.Module) -> None:
  """The base model against the config, before adapters are added.

  lora.rank <= min(in, out) of every `Linear` that lora.target_modules selects (an in x out update has rank at
  most min(in, out)), and data.max_seq_len <= the model's `config.max_positions` where it has one (GPT-2's
  learned position table; rotary models have none). Target modules that select nothing are left to
  `fedask_jax.lora.inject_lora`, whose error lists the model's linear layers.
  """
  lo = config.lora
  lora = LoRAConfig(rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout)
  linears = [(path_name(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
  bounds = {name: min(m.in_features, m.out_features) for name, m in linears if lora.matches(name)}
  too_small = [name for name, bound in bounds.items() if bound < lo.rank]
  if too_small:
    name = min(too_small, key=bounds.get)
    layer = dict(linears)[name]
    more = len(too_small) - 1
    others = f" (and {more} more targeted layer{'s' if more > 1 else ''})" if more else ""
    raise ConfigError(
        f"lora.rank={lo.rank} exceeds min(in, out) = {bounds[name]} of {name} ({layer.in_features} x "
        f"{layer.out_features}, in x out){others}, selected by lora.target_modules={list(lo.target_modules)}: "
        f"choose lora.rank <= {min(bounds.values())}, or leave that module out of target_modules.")
  positions = getattr(getattr(model, "config", None), "max_positions", None)
  _require(positions is None or config.data.max_seq_len <= positions,
           f"data.max_seq_len={config.data.max_seq_len} exceeds the {positions} positions of model.path="
           f"{config.model.path!r} (a learned position table): lower data.max_seq_len to at most {positions}.")
