"""Data sources: local JSONL files, Hugging Face `datasets`, and tensorflow-datasets.

A source returns the whole dataset as a list of records (one dict per example, column name -> value), in the
order the source stores them. Lists rather than streams because every later step needs the dataset size:
partitions deal indices, and the DP sampling rate is q = batch_size / n_client (docs/design.md, section 4.5).
Dataset-specific helpers (GSM8K categories, Tiny Shakespeare speakers) live in `fedask_jax.data.corpora`.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedask_jax._checks import check_int

Record = dict[str, Any]

_GZIP_MAGIC = b"\x1f\x8b"


def _check_max_records(max_records: int | None) -> None:
  if max_records is not None:
    check_int("max_records", max_records, 1, hint=" (or None: all records)")


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
        raise ValueError(f"{path}:{line_number} is not valid JSON ({e.msg}): each line must be one JSON object.") from e
      if not isinstance(record, dict):
        raise ValueError(
          f"{path}:{line_number} holds a {type(record).__name__}, not a JSON object: each line must be one "
          "record such as {\"question\": ..., \"answer\": ...}."
        )
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
  """Records of a Hugging Face dataset: a hub id, a builder for local files, or a dataset saved on disk.

  `path` is a hub id (e.g. "openai/gsm8k" with name="main", which downloads), a builder for local files
  ("json", "csv", "parquet" with `data_files`, compressed files included; extra keyword arguments such as
  `cache_dir` go to `datasets.load_dataset`), or the directory of a `Dataset` or `DatasetDict` saved with
  `save_to_disk`, read with `datasets.load_from_disk`. `split` may be sliced or summed in `datasets`' split
  syntax ("train[95%:]", "train+test"); a saved `Dataset` is one split, named by its `split` attribute
  ("train" when it has none, as `datasets` names the split of local files).
  """
  import datasets  # Deferred: importing `datasets` costs about a second that the JSONL path should not pay.

  _check_max_records(max_records)
  if _is_saved_dataset(path):
    given = {
      key: value
      for key, value in (("name", name), ("data_files", data_files), *load_kwargs.items())
      if value is not None
    }
    if given:
      raise ValueError(
        f"load_hf({path!r}): a dataset saved with save_to_disk is read as it was saved; {sorted(given)} "
        "apply to datasets.load_dataset only: remove them."
      )
    dataset = _saved_split(datasets.load_from_disk(path), split, path)
  else:
    dataset = datasets.load_dataset(path, name, split=split, data_files=data_files, **load_kwargs)
    if not isinstance(dataset, datasets.Dataset):
      raise ValueError(
        f"datasets.load_dataset({path!r}, split={split!r}) returned a {type(dataset).__name__}, not one split: "
        "pass a single split name such as 'train'."
      )
  # `select` rather than appending "[:n]" to the split: a split that is already a slice ("train[95%:]", a
  # held-out tail of a dataset with one split) cannot be sliced twice in `datasets`' split syntax.
  if max_records is not None:
    dataset = dataset.select(range(min(max_records, len(dataset))))
  return dataset.to_list()


def _is_saved_dataset(path: str) -> bool:
  """Whether `path` is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
  folder = Path(path)
  return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _saved_split(saved: Any, split: str, path: str) -> Any:
  """The rows of `split` ("train", "train[95%:]", "train+test") of a saved `Dataset` or `DatasetDict`.

  `datasets.ReadInstruction` parses the spec and rounds percent boundaries as `load_dataset` does, so a sliced
  split selects the same rows from a saved dataset as from the files it was made of.
  """
  import datasets

  if isinstance(saved, datasets.DatasetDict):
    splits = dict(saved)
  else:
    splits = {"train" if saved.split is None else str(saved.split): saved}
  try:
    parts = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()})
  except ValueError as e:
    raise ValueError(
      f"load_hf({path!r}, split={split!r}): {e} The saved dataset has the splits {sorted(splits)}: name one, "
      "optionally sliced as 'train[:90%]'."
    ) from e
  return datasets.concatenate_datasets([splits[p.splitname].select(range(p.from_, p.to)) for p in parts])


def _tfds_converter(feature: Any) -> Callable[[Any], Any]:
  """A function from the numpy values that tfds decodes for `feature` to plain Python values.

  Text features (bytes in tfds) become str; other byte strings stay bytes (they need not be UTF-8); numpy
  scalars become Python scalars and arrays nested lists; Sequence features are lists (of dicts: a dict of lists,
  as tfds decodes them).
  """
  import tensorflow_datasets as tfds

  if isinstance(feature, tfds.features.FeaturesDict):
    converters = {key: _tfds_converter(value) for key, value in feature.items()}
    return lambda example: {key: convert(example[key]) for key, convert in converters.items()}
  if isinstance(feature, tfds.features.Sequence):
    if isinstance(feature.feature, tfds.features.FeaturesDict):
      converters = {key: _tfds_converter(tfds.features.Sequence(value)) for key, value in feature.feature.items()}
      return lambda example: {key: convert(example[key]) for key, convert in converters.items()}
    convert_item = _tfds_converter(feature.feature)
    return lambda values: [convert_item(value) for value in values]
  if isinstance(feature, tfds.features.Text):
    return lambda value: value.decode("utf-8")
  return lambda value: value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def _prepared_datasets(data_dir: Path) -> str:
  """The dataset folders in a tfds data_dir, for error messages."""
  names = [p.name for p in data_dir.iterdir() if p.is_dir() and p.name != "downloads"] if data_dir.is_dir() else []
  return ", ".join(sorted(names)) if names else "no datasets"


def load_tfds(
  name: str,
  *,
  split: str,
  data_dir: str | Path | None = None,
  max_records: int | None = None,
) -> list[Record]:
  """Records of a tensorflow-datasets dataset, read without TensorFlow when its files allow random access.

  `name` is a dataset name ("gsm8k_local", "mnist:3.0.1", "name/config") prepared in `data_dir` (tfds' default
  ~/tensorflow_datasets when None); a registered dataset not prepared yet is downloaded and prepared there as
  ArrayRecord. ArrayRecord (and Parquet) datasets are read through `tfds.data_source`, which needs
  tensorflow-datasets and array_record only; TFRecord ones, tfds' default format, through `tfds.load`, which also
  needs TensorFlow. `split` may be sliced in tfds' split syntax ("train[95%:]"). Records keep the stored order;
  Text features become str (`_tfds_converter`). Needs the optional extra: `pip install fedask-jax[tfds]`.
  """
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      f"load_tfds({name!r}) needs tensorflow-datasets, which is not installed: pip install fedask-jax[tfds]"
    ) from e
  _check_max_records(max_records)
  try:
    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
  except tfds.core.DatasetNotFoundError:
    # tfds' own message lists its whole catalogue (hundreds of lines); what helps is what the folder holds.
    where = (
      "tfds' default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
      if data_dir is None
      else (f"data_dir={str(data_dir)!r} (holding {_prepared_datasets(Path(data_dir))})")
    )
    raise ValueError(
      f"load_tfds({name!r}): tensorflow-datasets has no builder of that name and {where} has no such prepared "
      f"dataset: name a dataset prepared there, or point data_dir at the folder that holds {name}/<version>/."
    ) from None
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  convert = _tfds_converter(builder.info.features)
  # Capped after reading rather than with "[:n]" appended to the split, which a sliced split cannot take.
  if builder.info.available_file_formats() & tfds.core.FileFormat.with_random_access():
    source = builder.as_data_source(split=split)
    count = len(source) if max_records is None else min(max_records, len(source))
    return [convert(source[i]) for i in range(count)]
  if importlib.util.find_spec("tensorflow") is None:
    raise ValueError(
      f"load_tfds({name!r}): the dataset in {builder.data_dir} is stored as {builder.info.file_format.value}, "
      "which only TensorFlow reads: pip install tensorflow, or prepare it as ArrayRecord "
      "(tfds build --file_format=array_record), which tensorflow-datasets reads without TensorFlow."
    )
  # Without tfds' in-memory cache of small datasets: read once, and it warns when a capped read stops early.
  dataset = builder.as_dataset(split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  return [convert(example) for example in itertools.islice(tfds.as_numpy(dataset), max_records)]
