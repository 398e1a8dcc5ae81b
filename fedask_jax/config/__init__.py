"""Run configuration: typed dataclasses with defaults, read from YAML with dotted command-line overrides, and
validated before anything is compiled.

    config = load_config("experiments/configs/quickstart.yaml", ["rounds=20", "privacy.target_epsilon=6"])

- `schema`: the sections and their keys (`Config`, `PrivacyConfig`, ...), every key documented.
- `parsing`: YAML files, `key=value` overrides, typed configs from nested dicts and back (`to_dict`,
  `config_diff`).
- `validation`: the ranges and cross-field rules (`validate`), and the checks against the model and data a
  config names (`check_model`, `check_records`, `check_encoded`); its docstring says what is checked, and where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedask_jax.config.parsing import (
  apply_overrides,
  build_config,
  config_diff,
  flatten,
  parse_override,
  read_yaml,
  to_dict,
)
from fedask_jax.config.schema import (
  CheckpointConfig,
  Config,
  ConfigError,
  DataConfig,
  DistributedConfig,
  EvalConfig,
  LoRASection,
  ModelConfig,
  OptimizerConfig,
  PrivacyConfig,
  SketchConfig,
)
from fedask_jax.config.validation import check_encoded, check_model, check_records, lora_config, validate

__all__ = [
  "CheckpointConfig",
  "Config",
  "ConfigError",
  "DataConfig",
  "DistributedConfig",
  "EvalConfig",
  "LoRASection",
  "ModelConfig",
  "OptimizerConfig",
  "PrivacyConfig",
  "SketchConfig",
  "apply_overrides",
  "check_encoded",
  "check_model",
  "check_records",
  "config_diff",
  "flatten",
  "from_dict",
  "load_config",
  "lora_config",
  "parse_override",
  "read_yaml",
  "to_dict",
  "validate",
]


def from_dict(raw: Mapping[str, Any]) -> Config:
  """A validated `Config` from nested dicts (unknown keys, types, ranges all checked)."""
  config = build_config(raw)
  validate(config)
  return config


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
  """The validated config of YAML file `path` (None: the defaults) with `key=value` overrides applied."""
  raw = read_yaml(path) if path is not None else {}
  return from_dict(apply_overrides(raw, overrides))
