"""Tests for fedask_jax.data.sources and fedask_jax.data.corpora on the carried GSM8K and Tiny Shakespeare."""

import collections
import gzip
import json
import re
import sys

import pytest

from fedask_jax.data import corpora, sources

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


@pytest.mark.parametrize("content, match", [
    ('{"a": 1}\n{"a": \n', r"toy.jsonl:2 is not valid JSON"),
    ('[1, 2]\n', r"toy.jsonl:1 holds a list"),
])
def test_load_jsonl_rejects_bad_lines(tmp_path, content, match):
  path = tmp_path / "toy.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    sources.load_jsonl(path)


def test_load_hf_local_gzip_matches_jsonl(tmp_path):
  path = corpora.DATA_DIR / "gsm8k" / "test.jsonl.gz"
  via_datasets = sources.load_hf("json", data_files=str(path), split="train", cache_dir=str(tmp_path))
  assert via_datasets == sources.load_jsonl(path)
  head = sources.load_hf("json", data_files=str(path), split="train", max_records=5, cache_dir=str(tmp_path))
  assert head == via_datasets[:5]
  # A held-out tail given as a sliced split (experiments/configs/paper_llama2_7b_dolly.yaml), then capped.
  n = len(via_datasets)
  tail = sources.load_hf("json", data_files=str(path), split="train[95%:]", max_records=7, cache_dir=str(tmp_path))
  assert tail == via_datasets[round(0.95 * n):][:7]  # `datasets` rounds percent boundaries to the closest row


def test_load_tfds_names_the_extra_when_missing(monkeypatch):
  # A None entry in sys.modules makes `import tensorflow_datasets` raise ImportError even if it is installed.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=re.escape("pip install fedask-jax[tfds]")):
    sources.load_tfds("gsm8k", split="train")


def test_gsm8k_helpers_on_a_hand_checked_answer():
  answer = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
            "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 1,072")
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
