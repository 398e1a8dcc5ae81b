"""Run configuration: typed dataclasses with defaults, read from YAML with dotted command-line overrides, and
validated before anything is loaded or compiled.

    config = load_config("experiments/configs/quickstart.yaml", ["rounds=20", "privacy.target_epsilon=6"])

Rules (each violation raises `ConfigError`, a ValueError whose message names the key, the value, the rule and
the fix):
- Unknown keys are errors, with a did-you-mean suggestion (difflib) from the section's keys.
- Types are checked against the dataclass annotations. An int is accepted where a float is expected, and a
  string that Python's `float()` reads (`1e-5`: PyYAML reads exponents without a dot as strings) too; a bool is
  never an int. A `Literal[...]` field accepts only its listed values (with a suggestion).
- Ranges and cross-field rules (`validate`): clients_per_round <= num_clients, 0 < delta < 1, ...
- An override is `key=value`, `key` a dotted path (`privacy.delta`), `value` parsed as a YAML scalar or flow
  collection (`lora.target_modules=[q_proj,v_proj]`, `eval.max_examples=null`).

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
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from fedask_jax.data.templates import get_template
from fedask_jax.strategies import STRATEGIES


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
      Face `datasets`: `path` a hub id or builder, `name` its config, `train_split` / `eval_split`) or
      "tfds" (tensorflow-datasets `path` with `train_split` / `eval_split`, `data_dir`).
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
    client_chunk: clients trained at once inside the round (memory); None: all K at once.
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
  validate(config)
  return config


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
  """The validated config of YAML file `path` (None: the defaults) with `key=value` overrides applied."""
  raw = read_yaml(path) if path is not None else {}
  return from_dict(apply_overrides(raw, overrides))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _strategy_parameters(name: str) -> dict[str, inspect.Parameter]:
  _require(name in STRATEGIES, f"strategy={name!r}: unknown strategy; choose one of {sorted(STRATEGIES)}."
           f"{_suggest(name, list(STRATEGIES))}")
  return dict(inspect.signature(STRATEGIES[name]).parameters)


def validate(config: Config) -> None:
  """Ranges and cross-field rules; raises ConfigError naming the key, the rule and the fix."""
  c = config
  for key in ("rounds", "num_clients", "clients_per_round", "local_steps", "batch_size"):
    _require(getattr(c, key) >= 1, f"{key}={getattr(c, key)}: must be >= 1.")
  _require(c.clients_per_round <= c.num_clients,
           f"clients_per_round={c.clients_per_round} exceeds num_clients={c.num_clients}: sample at most "
           f"{c.num_clients} clients per round.")
  _require(c.lr > 0, f"lr={c.lr}: the learning rate must be > 0.")
  _require(c.seed >= 0, f"seed={c.seed}: must be >= 0.")
  _require(bool(c.run_dir), "run_dir is empty: name the directory for metrics and checkpoints.")
  if c.client_chunk is not None:
    _require(1 <= c.client_chunk <= c.clients_per_round and c.clients_per_round % c.client_chunk == 0,
             f"client_chunk={c.client_chunk}: must divide clients_per_round={c.clients_per_round} "
             "(or be null: all clients at once).")

  params = _strategy_parameters(c.strategy)
  for key in c.strategy_args:
    if key in ("oversample", "certify"):
      raise ConfigError(f"strategy_args.{key}: set it as sketch.{key} instead.")
    _require(key in params,
             f"strategy_args.{key}: strategy {c.strategy!r} takes no such hyper-parameter."
             f"{_suggest(key, list(params))} It takes {sorted(params)}.")

  d = c.data
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
  try:
    get_template(d.template, **d.template_fields)
  except ValueError as error:
    raise ConfigError(f"data.template_fields: {error}") from None
  _require(d.partition == "iid" or d.category_column is not None,
           f"data.partition={d.partition!r} needs data.category_column (the column to split by).")

  lo = c.lora
  _require(lo.rank >= 1, f"lora.rank={lo.rank}: must be >= 1.")
  _require(lo.alpha > 0, f"lora.alpha={lo.alpha}: must be > 0 (PEFT uses alpha = 2 * rank).")
  _require(0 <= lo.dropout < 1, f"lora.dropout={lo.dropout}: must be in [0, 1).")
  _require(len(lo.target_modules) >= 1, "lora.target_modules is empty: name modules, e.g. [q_proj, v_proj].")
  _require(c.sketch.oversample >= 0, f"sketch.oversample={c.sketch.oversample}: must be >= 0.")

  p = c.privacy
  _require(0 < p.delta < 1, f"privacy.delta={p.delta}: must be in (0, 1), e.g. 1e-5.")
  _require(p.target_epsilon > 0, f"privacy.target_epsilon={p.target_epsilon}: must be > 0 (the paper: 1, 3, 6).")
  _require(p.clip_norm > 0, f"privacy.clip_norm={p.clip_norm}: the clipping norm must be > 0 (the paper: 1.0).")
  _require(0 < p.overflow_prob < 1, f"privacy.overflow_prob={p.overflow_prob}: must be in (0, 1), e.g. 1e-12.")

  o = c.optimizer
  _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay}: must be >= 0.")
  _require(o.weight_decay == 0 or o.name == "adamw",
           f"optimizer.weight_decay={o.weight_decay} applies to adamw only (optimizer.name={o.name!r}).")
  _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0.")
  _require(c.eval.every >= 0, f"eval.every={c.eval.every}: must be >= 0 (0: only before and after training).")
  _require(c.eval.max_examples is None or c.eval.max_examples >= 1,
           f"eval.max_examples={c.eval.max_examples}: must be >= 1 or null (all).")
  _require(c.eval.batch_size >= 1, f"eval.batch_size={c.eval.batch_size}: must be >= 1.")
  _require(c.checkpoint.every >= 0, f"checkpoint.every={c.checkpoint.every}: must be >= 0 (0: only at the end).")
  _require(c.checkpoint.keep >= 1, f"checkpoint.keep={c.checkpoint.keep}: must be >= 1.")
