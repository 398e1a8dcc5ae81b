"""The run directory (`config.run_dir`): its files, the check that it belongs to the config, and the metrics
log.

- `config.yaml`: the resolved config (`stored_config`: without its `distributed` section, which says how the run
  is executed, not what it computes). A run directory belongs to one config: `prepare` refuses another one,
  naming the keys that differ (run_dir itself and the `distributed` section excepted).
- `metrics.jsonl`: one JSON object per line: round 0 (the base model's eval loss) and one per round (train
  loss, epsilon spent so far, the compiled round's metrics, the eval loss when evaluated, and `timing`, the
  wall-clock seconds of the round and whether it included a compilation). Each line is written whole
  (write, flush, fsync), as strict JSON: a value that is not a finite number is written null (FedASK's
  `reconstruction_error` in the rounds without the exactness certificate, `sketch.certify_every`; a client's
  loss that is NaN), so every JSON reader parses it.
- `checkpoints/<round>/`: orbax checkpoints (`fedask_jax.checkpoint.state`) of the server state (the global
  adapters and the strategy's state: SCAFFOLD's control variates, FedSA-LoRA's per-client factors), the run
  key and the round, with the privacy ledger. Clients' optimisers start afresh every round
  (`fedask_jax.simulation`), so there is no optimiser state to keep.
- `loss.png`, `epsilon.png`, `summary.json`, and `adapter/`: the final global adapter in PEFT's format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedask_jax.config import Config, ConfigError, DistributedConfig, config_diff, from_dict, read_yaml, to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
# Keys a run may change between launches: where its directory is, and its processes (a new coordinator port).
_RELAUNCH_KEYS = ("run_dir",) + tuple(f"distributed.{f.name}" for f in dataclasses.fields(DistributedConfig))


def stored_config(config: Config) -> dict[str, Any]:
  """What `config.yaml` holds: the config as nested dicts, without its `distributed` section."""
  raw = to_dict(config)
  del raw["distributed"]
  return raw


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
        "against the config they were trained with: choose a new run_dir."
      )
    return
  try:
    stored = from_dict(read_yaml(path))
  except ConfigError as error:
    raise ConfigError(f"{path} holds an invalid config ({error}): use another run_dir.") from None
  differ = config_diff(stored, config, ignore=_RELAUNCH_KEYS)
  if differ:
    detail = ", ".join(f"{k}: {_lookup(stored, k)!r} -> {_lookup(config, k)!r}" for k in differ[:8])
    if len(differ) > 8:
      detail += f", and {len(differ) - 8} more: {', '.join(differ[8:])}"
    raise ConfigError(
      f"run_dir {config.run_dir!r} holds a run with a different config ({detail}): resume with the same config "
      "or choose a new run_dir."
    )


def _lookup(config: Config, dotted: str) -> Any:
  value: Any = to_dict(config)
  for part in dotted.split("."):
    value = value.get(part) if isinstance(value, dict) else None
  return value


class MetricsLog:
  """`metrics.jsonl`: one JSON object per round, each line written whole (write, flush, fsync) as strict JSON
  (`json_line`)."""

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
        f.write(json_line(record))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)
    return kept

  def append(self, record: dict[str, Any]) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json_line(record))
      f.flush()
      os.fsync(f.fileno())


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  return value


def json_line(record: dict[str, Any]) -> str:
  """`record` as one line of strict JSON (RFC 8259 has no NaN or Infinity): non-finite floats, at any depth,
  become null."""
  return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def to_json(value: Any) -> Any:
  """A pytree of arrays -> the same tree of Python scalars and (nested) lists."""
  return jax.tree.map(lambda x: np.asarray(x).tolist(), value)
