"""Tests for fedask_jax.data.sources and fedask_jax.data.corpora on the carried GSM8K and Tiny Shakespeare.

Every source is read for real and offline: local files and saved datasets through Hugging Face `datasets`, and
datasets that the tests prepare in TFDS's ArrayRecord format through tensorflow-datasets, without TensorFlow.
"""

import collections
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from fedask_jax import runner
from fedask_jax.config import check_records, load_config
from fedask_jax.data import corpora, sources

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "quickstart.yaml"

GSM8K_SIZES = {"train": 7473, "test": 1319}  # data/gsm8k/SOURCE.md


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_jsonl_reads_carried_gzip_files(split):
  records = sources.load_jsonl(corpora.DATA_DIR / "gsm8k" / f"{split}.jsonl.gz")
  assert len(records) == GSM8K_SIZES[split]
  assert all(set(r) == {"question", "answer"} for r in records)


def test_load_jsonl_plain_file_and_max_records(tmp_path):
  path = tmp_path / "toy.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}\n')
  assert sources.load_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
  assert sources.load_jsonl(path, max_records=2) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
  "content, match",
  [
    ('{"a": 1}\n{"a": \n', r"toy.jsonl:2 is not valid JSON"),
    ('[1, 2]\n', r"toy.jsonl:1 holds a list"),
  ],
)
def test_load_jsonl_rejects_bad_lines(tmp_path, content, match):
  path = tmp_path / "toy.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    sources.load_jsonl(path)


@pytest.fixture
def hf_offline(monkeypatch):
  """No network for `datasets`: the variables for child processes, and the flags `datasets` and huggingface_hub
  read at import (they are imported already when another test ran first)."""
  import datasets
  import huggingface_hub

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


GSM8K_TEST = corpora.DATA_DIR / "gsm8k" / "test.jsonl.gz"


def test_load_hf_local_gzip_matches_jsonl(tmp_path, hf_offline):
  via_datasets = sources.load_hf("json", data_files=str(GSM8K_TEST), split="train", cache_dir=str(tmp_path))
  assert via_datasets == sources.load_jsonl(GSM8K_TEST)
  head = sources.load_hf("json", data_files=str(GSM8K_TEST), split="train", max_records=5, cache_dir=str(tmp_path))
  assert head == via_datasets[:5]
  # A held-out tail given as a sliced split (experiments/configs/paper_llama2_7b_dolly.yaml), then capped.
  n = len(via_datasets)
  tail = sources.load_hf(
    "json", data_files=str(GSM8K_TEST), split="train[95%:]", max_records=7, cache_dir=str(tmp_path)
  )
  assert tail == via_datasets[round(0.95 * n) :][:7]  # `datasets` rounds percent boundaries to the closest row


def test_load_hf_parquet_keeps_column_types(tmp_path, hf_offline):
  import pyarrow as pa
  import pyarrow.parquet as pq

  # Independent reference: the rows as pyarrow itself reads them back from the file.
  table = pa.table(
    {
      "text": ["é ü", "b", ""],
      "label": pa.array([1, -2, 3], pa.int32()),
      "score": [0.5, 1.25, -3.0],
      "tokens": [[1, 2], [], [3]],
      "raw": [b"\xff\x00", b"ok", b""],
      "maybe": ["x", None, "z"],
    }
  )
  path = tmp_path / "toy.parquet"
  pq.write_table(table, path)
  records = sources.load_hf("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
  assert records == pq.read_table(path).to_pylist()
  assert [type(records[0][k]) for k in ("text", "label", "score", "tokens", "raw")] == [str, int, float, list, bytes]


@pytest.fixture
def saved_gsm8k(tmp_path):
  """The carried GSM8K test problems (with their `category`) saved with `save_to_disk`: as one `Dataset`, and as
  a `DatasetDict` whose "train" is the first 1,000 problems and "test" the other 319; returns (records, dataset
  dir, dict dir)."""
  import datasets

  records = corpora.load_gsm8k("test")
  datasets.Dataset.from_list(records).save_to_disk(tmp_path / "dataset")
  datasets.DatasetDict(
    {"train": datasets.Dataset.from_list(records[:1000]), "test": datasets.Dataset.from_list(records[1000:])}
  ).save_to_disk(tmp_path / "dict")
  return records, str(tmp_path / "dataset"), str(tmp_path / "dict")


def test_load_hf_saved_dataset(saved_gsm8k, hf_offline):
  records, dataset_dir, dict_dir = saved_gsm8k
  assert sources.load_hf(dataset_dir, split="train") == records  # a Dataset without a split name is "train"
  assert sources.load_hf(dataset_dir, split="train", max_records=3) == records[:3]
  assert sources.load_hf(dict_dir, split="test") == records[1000:]
  assert sources.load_hf(dict_dir, split="train+test") == records
  assert sources.load_hf(dict_dir, split="test[:10]+train[-2:]") == records[1000:1010] + records[998:1000]
  # A sliced split selects the same rows from a saved dataset as `load_dataset` from the files it was made of.
  n = len(records)
  assert sources.load_hf(dataset_dir, split="train[95%:]", max_records=20) == records[round(0.95 * n) :][:20]
  with pytest.raises(ValueError, match=r"Unknown split \"validation\".*has the splits \['test', 'train'\]"):
    sources.load_hf(dict_dir, split="validation")
  with pytest.raises(ValueError, match=r"\['cache_dir', 'name'\] apply to datasets.load_dataset only"):
    sources.load_hf(dict_dir, split="test", name="main", cache_dir="/tmp")


def test_runner_reads_a_saved_hf_dataset(saved_gsm8k, hf_offline):
  records, _, dict_dir = saved_gsm8k
  config = load_config(QUICKSTART, ["data.source=hf", f"data.path={dict_dir}", "data.strip_calculator=false"])
  train = runner.load_records(config, "train", config.data.max_train_examples)
  held_out = runner.load_records(config, "eval", config.eval.max_examples)
  check_records(config, train, "train")
  check_records(config, held_out, "eval")
  assert (train, held_out) == (records[:1000], records[1000 : 1000 + config.eval.max_examples])


def test_load_tfds_names_the_extra_when_missing(monkeypatch):
  # A None entry in sys.modules makes `import tensorflow_datasets` raise ImportError even if it is installed.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=re.escape("pip install fedask-jax[tfds]")):
    sources.load_tfds("gsm8k", split="train")


def _write_tfds(data_dir, dataset_name, features, splits):
  """Prepares dataset `dataset_name` (FeaturesDict `features`, split -> examples) as ArrayRecord files in `data_dir`, in
  the examples' order, the way a dataset author's `tfds build --file_format=array_record` does; no TensorFlow."""
  import tensorflow_datasets as tfds

  class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # read back from its files
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples):
      yield from enumerate(examples)

  LocalBuilder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tfds_gsm8k(tmp_path_factory):
  """The carried GSM8K test problems (with their `category`) as TFDS dataset "gsm8k_local" (train: the first
  1,000, test: the other 319); returns (records, data_dir)."""
  import tensorflow_datasets as tfds

  records = corpora.load_gsm8k("test")
  data_dir = tmp_path_factory.mktemp("tfds")
  features = tfds.features.FeaturesDict({key: tfds.features.Text() for key in ("question", "answer", "category")})
  _write_tfds(data_dir, "gsm8k_local", features, {"train": records[:1000], "test": records[1000:]})
  return records, data_dir


def test_load_tfds_reads_array_record_without_tensorflow(tfds_gsm8k):
  records, data_dir = tfds_gsm8k
  assert sources.load_tfds("gsm8k_local", split="train", data_dir=data_dir) == records[:1000]
  assert sources.load_tfds("gsm8k_local:1.0.0", split="test", data_dir=data_dir, max_records=5) == records[1000:1005]
  # A sliced split, then capped (the cap is not appended to the split, which could not take a second slice);
  # tfds rounds 90% of 319 = 287.1 to row 287.
  assert sources.load_tfds("gsm8k_local", split="test[90%:]", data_dir=data_dir, max_records=20) == records[1287:1307]
  assert sources.load_tfds("gsm8k_local", split="test", data_dir=data_dir, max_records=10_000) == records[1000:]
  assert "tensorflow" not in sys.modules  # tfds imports TensorFlow lazily; this path never needs it


def test_load_tfds_converts_feature_types(tmp_path):
  import tensorflow_datasets as tfds

  features = tfds.features.FeaturesDict(
    {
      "text": tfds.features.Text(),
      "raw": tfds.features.Tensor(shape=(), dtype=np.object_),
      "n": tfds.features.Scalar(dtype=np.int32),
      "x": np.float32,
      "label": tfds.features.ClassLabel(names=["a", "b"]),
      "vec": tfds.features.Tensor(shape=(2,), dtype=np.int64),
      "tags": tfds.features.Sequence(tfds.features.Text()),
      "steps": tfds.features.Sequence({"k": np.int32, "say": tfds.features.Text()}),
    }
  )
  examples = [
    {
      "text": "é ü",
      "raw": b"\xff\x00",
      "n": -7,
      "x": 0.25,
      "label": 1,
      "vec": [3, -4],
      "tags": ["p", "q"],
      "steps": [{"k": 1, "say": "one"}, {"k": 2, "say": "two"}],
    },
    {"text": "", "raw": b"", "n": 0, "x": -1.5, "label": 0, "vec": [0, 0], "tags": [], "steps": []},
  ]
  _write_tfds(tmp_path, "typed_local", features, {"train": examples})
  # Text becomes str; other byte strings stay bytes (b"\xff" is no UTF-8); numbers and arrays become Python
  # scalars and lists; a sequence of dicts is a dict of lists (tfds' layout). The values are exact in float32.
  expected = [
    {**examples[0], "steps": {"k": [1, 2], "say": ["one", "two"]}},
    {**examples[1], "steps": {"k": [], "say": []}},
  ]
  records = sources.load_tfds("typed_local", split="train", data_dir=tmp_path)
  assert records == expected
  assert {k: type(v) for k, v in records[0].items()} == {k: type(v) for k, v in expected[0].items()}


def test_load_tfds_unknown_dataset_names_the_folder(tfds_gsm8k):
  _, data_dir = tfds_gsm8k
  with pytest.raises(ValueError, match=re.escape(f"data_dir='{data_dir}' (holding gsm8k_local) has no such prepared")):
    sources.load_tfds("gsm8k_locla", split="train", data_dir=data_dir)


def test_load_tfds_tfrecord_needs_tensorflow(tfds_gsm8k, tmp_path, monkeypatch):
  _, data_dir = tfds_gsm8k
  # A TFRecord dataset (tfds' default format) needs TensorFlow to be written, so this one is the ArrayRecord
  # dataset with its recorded format changed: load_tfds must choose by the recorded format.
  shutil.copytree(data_dir / "gsm8k_local", tmp_path / "gsm8k_local")
  info_path = tmp_path / "gsm8k_local" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  assert info["fileFormat"] == "array_record"
  info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if TensorFlow were not installed
  with pytest.raises(
    ValueError,
    match=r"stored as tfrecord, which only TensorFlow reads: pip install tensorflow, "
    r"or prepare it as ArrayRecord \(tfds build --file_format=array_record\)",
  ):
    sources.load_tfds("gsm8k_local", split="train", data_dir=tmp_path)


def test_runner_reads_a_tfds_dataset(tfds_gsm8k):
  records, data_dir = tfds_gsm8k
  config = load_config(
    QUICKSTART,
    [
      "data.source=tfds",
      "data.path=gsm8k_local",
      f"data.data_dir={data_dir}",
      "data.strip_calculator=false",
      "data.max_train_examples=600",
    ],
  )
  train = runner.load_records(config, "train", config.data.max_train_examples)
  held_out = runner.load_records(config, "eval", config.eval.max_examples)
  check_records(config, train, "train")
  check_records(config, held_out, "eval")
  assert (train, held_out) == (records[:600], records[1000 : 1000 + config.eval.max_examples])


def test_gsm8k_helpers_on_a_hand_checked_answer():
  answer = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 1,072"
  )
  assert corpora.gsm8k_num_steps(answer) == 2
  assert corpora.gsm8k_category(answer) == "2 steps"
  assert corpora.gsm8k_category(answer, max_steps=2) == "2+ steps"
  assert corpora.gsm8k_final_answer(answer) == "1072"
  assert corpora.strip_calculator_annotations(answer).startswith("Natalia sold 48/2 = 24 clips in May.\n")
  with pytest.raises(ValueError, match="no final '#### <number>' line"):
    corpora.gsm8k_num_steps("no final line")


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_gsm8k_category_matches_line_counts(split):
  records = corpora.load_gsm8k(split)
  assert len(records) == GSM8K_SIZES[split]
  # Independent reference: count the lines of the raw file's answers with a regex, not with the helper.
  with gzip.open(corpora.DATA_DIR / "gsm8k" / f"{split}.jsonl.gz", "rt") as f:
    raw = [json.loads(line)["answer"] for line in f]
  expected = [min(len(re.findall(r"^.*\S.*$", a.split("####")[0], re.M)), 6) for a in raw]
  assert [r["category"] for r in records] == [f"{k}+ steps" if k == 6 else f"{k} steps" for k in expected]
  counts = collections.Counter(r["category"] for r in records)
  assert set(counts) == {"2 steps", "3 steps", "4 steps", "5 steps", "6+ steps"}


def test_load_gsm8k_sources_agree(tmp_path):
  carried = corpora.load_gsm8k("test", max_records=3)
  folder = tmp_path / "gsm8k"
  folder.mkdir()
  with gzip.open(corpora.DATA_DIR / "gsm8k" / "test.jsonl.gz", "rt") as f:
    (folder / "test.jsonl").write_text("".join(f.readlines()[:3]))
  assert corpora.load_gsm8k("test", source=folder) == carried
  assert corpora.load_gsm8k("test", source=folder / "test.jsonl") == carried
  stripped = corpora.load_gsm8k("test", source=folder, strip_calculator=True)
  assert all("<<" not in r["answer"] for r in stripped)
  assert [r["category"] for r in stripped] == [r["category"] for r in carried]
  with pytest.raises(ValueError, match="splits 'train' and 'test'"):
    corpora.load_gsm8k("validation")


def test_load_tiny_shakespeare_speeches():
  records = corpora.load_tiny_shakespeare()
  with gzip.open(corpora.DATA_DIR / "tinyshakespeare" / "input.txt.gz", "rt") as f:
    text = f.read()
  # Independent reference: a speaker line is a line ending in ':' right after a blank line (or the start);
  # every other non-empty line is speech.
  lines = text.split("\n")
  speaker_lines = {i for i, line in enumerate(lines) if line.endswith(":") and (i == 0 or not lines[i - 1].strip())}
  speech_lines = [line for i, line in enumerate(lines) if line.strip() and i not in speaker_lines]
  assert sum(len(r["text"].split("\n")) for r in records) == len(speech_lines)
  assert records[0] == {"speaker": "First Citizen", "text": "Before we proceed any further, hear me speak."}
  # The file keeps the speaker lines of cut asides (a speaker line then a blank line); they carry no speech.
  gloucester = sum(1 for i in speaker_lines if lines[i] == "GLOUCESTER:" and lines[i + 1].strip())
  assert sum(r["speaker"] == "GLOUCESTER" for r in records) == gloucester


def test_load_tiny_shakespeare_rejects_other_formats(tmp_path):
  path = tmp_path / "input.txt"
  path.write_text("not a speaker line\nsome text\n")
  with pytest.raises(ValueError, match="does not start with a 'Speaker:' line"):
    corpora.load_tiny_shakespeare(path)
