"""Reading a config: YAML files, dotted command-line overrides, and typed dataclasses built from the nested
dicts they give.

An override is `key=value`, `key` a dotted path (`privacy.delta`), `value` parsed as a YAML scalar or flow
collection (`lora.target_modules=[q_proj,v_proj]`, `eval.max_examples=null`).

Building checks keys and types (item 1 of `fedask_jax.config.validation`'s rules; the ranges come after):

- Unknown keys are errors, with a did-you-mean (difflib) from the section's keys; so are unknown `strategy_args`
  (from the strategy's signature).
- Types follow the dataclass annotations (for `strategy_args`, the strategy's annotations). An int is accepted
  where a float is expected, and so is a string that Python's `float()` reads (`1e-5`: PyYAML reads exponents
  without a dot as strings); NaN and infinities are refused; a bool is never a number and a number never a
  bool. A `Literal[...]` field accepts only its listed values (with a suggestion).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from fedask_jax.config.schema import SKETCH_KEYS, Config, ConfigError
from fedask_jax.strategies import STRATEGIES

# ---------------------------------------------------------------------------------------------------------------
# Building typed configs from nested dicts.


def suggest(name: str, choices: Sequence[str]) -> str:
  """A message's hint " Did you mean 'x'?", x the choice closest to `name`; "" when none is close."""
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
      raise ConfigError(f"{key}={value!r}: must be one of {list(args)}.{suggest(value, [str(a) for a in args])}")
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
        f"unknown key {prefix + str(key)!r} in {where}.{suggest(key, list(fields))} Known keys: {sorted(fields)}."
      )
    tp = hints[key]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
      kwargs[key] = _build(tp, value, f"{prefix}{key}.")
    else:
      kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
  return cls(**kwargs)


def build_config(raw: Mapping[str, Any]) -> Config:
  """A `Config` from nested dicts, every key and type checked (`strategy_args` against the strategy's signature);
  its ranges are not checked yet (`fedask_jax.config.validation.validate`)."""
  config = _build(Config, raw, "")
  return dataclasses.replace(config, strategy_args=strategy_args(config))


def strategy_args(config: Config) -> dict[str, Any]:
  """config.strategy_args checked against the strategy's signature: known names, and values of the annotated
  types (converted as `_coerce` does, so that `mu: 1e-3` from YAML becomes a float)."""
  name = config.strategy
  if name not in STRATEGIES:
    raise ConfigError(
      f"strategy={name!r}: unknown strategy; choose one of {sorted(STRATEGIES)}.{suggest(name, list(STRATEGIES))}"
    )
  hints = typing.get_type_hints(STRATEGIES[name])
  params = list(inspect.signature(STRATEGIES[name]).parameters)
  args = {}
  for key, value in config.strategy_args.items():
    if key in SKETCH_KEYS:
      raise ConfigError(f"strategy_args.{key}: set it as sketch.{key} instead.")
    if key not in params:
      raise ConfigError(
        f"strategy_args.{key}: strategy {name!r} takes no such hyper-parameter."
        f"{suggest(key, params)} It takes {sorted(params)}."
      )
    args[key] = _coerce(value, hints.get(key, Any), f"strategy_args.{key}")
  return args


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
# Overrides and YAML files.


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
        raise ConfigError(f"override {text!r}: {'.'.join(parts[: depth + 1])} is a value ({child!r}), not a section.")
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
