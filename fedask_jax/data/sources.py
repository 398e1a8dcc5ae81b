"""Data sources: local JSONL files, Hugging Face `datasets`, and tensorflow-datasets.

A source returns the whole dataset as a list of records (one dict per example, column name -> value), in the
order the source stores them. Lists rather than streams because every later step needs the dataset size:
partitions deal indices, and the DP sampling rate is q = batch_size / n_client (design.md section 4).
Dataset-specific helpers (GSM8K categories, Tiny Shakespeare speakers) live in `fedask_jax.data.corpora`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, TextIO

Record = dict[str, Any]

_GZIP_MAGIC = b"\x1f\x8b"


def _check_max_records(max_records: int | None) -> None:
  if max_records is not None and (not isinstance(max_records, int) or max_records < 1):
    raise ValueError(f"max_records={max_records!r}: must be None (all records) or an integer >= 1.")


def open_text(path: str | Path) -> TextIO:
  """Opens a UTF-8 text file for reading, gunzipping it when it is gzip-compressed (magic bytes, not suffix)."""
  with open(path, "rb") as f:
    compressed = f.read(2) == _GZIP_MAGIC
  return gzip.open(path, "rt", encoding="utf-8") if compressed else open(path, encoding="utf-8")


def load_jsonl(path: str | Path, *, max_records: int | None = None) -> list[Record]:
  """Records of a JSON-lines file, plain or gzip-compressed (detected from the file's magic bytes).

  Blank lines are skipped; a line that is not a JSON object fails with its line number. `max_records` keeps
  the first records only (file order).
  """
  _check_max_records(max_records)
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"JSONL source {str(path)!r} is not a file: pass the path of a .jsonl or .jsonl.gz file.")
  records: list[Record] = []
  with open_text(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number} is not valid JSON ({e.msg}): each line must be one JSON object.")
      if not isinstance(record, dict):
        raise ValueError(
            f"{path}:{line_number} holds a {type(record).__name__}, not a JSON object: each line must be one "
            "record such as {\"question\": ..., \"answer\": ...}.")
      records.append(record)
      if max_records is not None and len(records) == max_records:
        break
  return records


def load_hf(
    path: str,
    *,
    split: str,
    name: str | None = None,
    data_files: str | list[str] | dict[str, Any] | None = None,
    max_records: int | None = None,
    **load_kwargs: Any,
) -> list[Record]:
  """Records of a Hugging Face dataset through `datasets.load_dataset(path, name, split=..., data_files=...)`.

  `path` is a hub id (e.g. "openai/gsm8k" with name="main", which downloads) or a builder for local files
  ("json", "csv", "parquet" with `data_files`, compressed files included). Extra keyword arguments go to
  `load_dataset` (e.g. `cache_dir`, `revision`).
  """
  import datasets  # Deferred: importing `datasets` costs about a second that the JSONL path should not pay.

  _check_max_records(max_records)
  dataset = datasets.load_dataset(path, name, split=split, data_files=data_files, **load_kwargs)
  if not isinstance(dataset, datasets.Dataset):
    raise ValueError(
        f"datasets.load_dataset({path!r}, split={split!r}) returned a {type(dataset).__name__}, not one split: "
        "pass a single split name such as 'train'.")
  # `select` rather than appending "[:n]" to the split: a split that is already a slice ("train[95%:]", a
  # held-out tail of a dataset with one split) cannot be sliced twice in `datasets`' split syntax.
  if max_records is not None:
    dataset = dataset.select(range(min(max_records, len(dataset))))
  return dataset.to_list()


def _from_numpy(value: Any) -> Any:
  """tfds yields bytes for text features and numpy scalars for numbers; records hold str and Python scalars."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _from_numpy(v) for k, v in value.items()}
  if hasattr(value, "ndim") and value.ndim == 0:
    return _from_numpy(value.item())
  return value


def load_tfds(
    name: str,
    *,
    split: str,
    data_dir: str | Path | None = None,
    max_records: int | None = None,
) -> list[Record]:
  """Records of a tensorflow-datasets dataset (`tfds.load(name, split=..., data_dir=...)`).

  Needs the optional extra: `pip install fedask-jax[tfds]`. Byte strings are decoded as UTF-8.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
        f"load_tfds({name!r}) needs tensorflow-datasets, which is not installed: "
        "pip install fedask-jax[tfds]") from e
  _check_max_records(max_records)
  if max_records is not None:
    split = f"{split}[:{max_records}]"
  dataset = tfds.load(name, split=split, data_dir=None if data_dir is None else str(data_dir))
  return [_from_numpy(dict(example)) for example in tfds.as_numpy(dataset)]
