"""The corpora this project trains on: GSM8K (with a derived category for non-IID splits) and Tiny Shakespeare
(split by speaker).

GSM8K has no category column, so we derive one from the solution itself: the number of reasoning steps,
i.e. the non-empty lines of the worked answer before the final "#### <number>" line (Cobbe et al. write one
step per line, most with one calculator annotation <<a*b=c>>). It is a difficulty proxy, and a Dirichlet
split over it gives clients that see mostly short or mostly long solutions, a label-style skew. Counts run
from 2 to 11 steps; `gsm8k_category` buckets them as "2 steps" ... "5 steps" and "6+ steps" (train split:
1961 / 2149 / 1659 / 955 / 749 examples; test: 326 / 371 / 297 / 175 / 150).

Tiny Shakespeare has no play boundaries, so a speaker name (e.g. "First Citizen") pools that role across
plays; LEAF splits by (play, role), which this file cannot recover.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fedask_jax.data.encoding import EncodedDataset, encode
from fedask_jax.data.sources import Record, load_hf, load_jsonl, open_text
from fedask_jax.data.templates import AlpacaTemplate, Template

# The data carried in the repository (see data/*/SOURCE.md); absent from a wheel install.
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
GSM8K_HUB_ID = "openai/gsm8k"

GSM8K_ALPACA = AlpacaTemplate(instruction_field="question", input_field=None, response_field="answer")
"""The Alpaca template with GSM8K's fields: question -> instruction, answer -> response, no input."""

_FINAL_ANSWER = "####"
_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


def _split_answer(answer: str) -> tuple[str, str]:
  solution, marker, final = answer.rpartition(_FINAL_ANSWER)
  if not marker:
    raise ValueError(f"GSM8K answer {answer[-60:]!r} has no final '#### <number>' line: pass a GSM8K worked answer.")
  return solution, final


def gsm8k_num_steps(answer: str) -> int:
  """The number of reasoning steps of a GSM8K worked answer: its non-empty lines before '#### <number>'."""
  solution, _ = _split_answer(answer)
  return sum(1 for line in solution.splitlines() if line.strip())


def gsm8k_category(answer: str, *, max_steps: int = 6) -> str:
  """The derived GSM8K category: "k steps" for k < max_steps, f"{max_steps}+ steps" beyond (module doc)."""
  if max_steps < 2:
    raise ValueError(f"max_steps={max_steps}: must be >= 2 (GSM8K solutions have at least 2 steps).")
  steps = gsm8k_num_steps(answer)
  return f"{max_steps}+ steps" if steps >= max_steps else f"{steps} steps"


def gsm8k_final_answer(answer: str) -> str:
  """The final number of a GSM8K answer, normalised for exact match: '#### 1,200' -> '1200'."""
  _, final = _split_answer(answer)
  return final.strip().replace(",", "")


def strip_calculator_annotations(answer: str) -> str:
  """Removes GSM8K's calculator annotations: '48/2 = <<48/2=24>>24' -> '48/2 = 24'."""
  return _CALCULATOR_ANNOTATION.sub("", answer)


def load_gsm8k(
  split: str = "train",
  *,
  source: str | Path | None = None,
  max_records: int | None = None,
  max_steps: int = 6,
  strip_calculator: bool = False,
) -> list[Record]:
  """GSM8K records {"question", "answer", "category"} with the derived category (module doc).

  Args:
    split: "train" (7,473 problems) or "test" (1,319).
    source: None reads the files carried in data/gsm8k/ ({split}.jsonl.gz) and falls back to the hub
      (`openai/gsm8k`, config "main") when they are absent; an existing path reads that JSONL file, or
      {split}.jsonl[.gz] inside that folder; any other string is a hub id loaded through `datasets`.
    max_records: keep the first records only (file order).
    max_steps: the step count from which categories are pooled ("6+ steps").
    strip_calculator: remove the <<a*b=c>> annotations from the answers (shorter sequences; the model then
      never learns to emit them). The category is computed before stripping, from the same lines.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}: GSM8K has the splits 'train' and 'test'.")
  if source is None:
    carried = DATA_DIR / "gsm8k" / f"{split}.jsonl.gz"
    source = carried if carried.is_file() else GSM8K_HUB_ID
  if Path(source).is_dir():
    candidates = [Path(source) / f"{split}.jsonl.gz", Path(source) / f"{split}.jsonl"]
    found = [p for p in candidates if p.is_file()]
    if not found:
      raise ValueError(f"GSM8K folder {str(source)!r} holds neither {split}.jsonl.gz nor {split}.jsonl.")
    records = load_jsonl(found[0], max_records=max_records)
  elif Path(source).is_file():
    records = load_jsonl(source, max_records=max_records)
  else:
    records = load_hf(str(source), name="main", split=split, max_records=max_records)
  out = []
  for i, record in enumerate(records):
    if "question" not in record or "answer" not in record:
      raise ValueError(f"GSM8K record {i} has keys {sorted(record)}: it needs 'question' and 'answer'.")
    answer = record["answer"]
    out.append(
      {
        "question": record["question"],
        "answer": strip_calculator_annotations(answer) if strip_calculator else answer,
        "category": gsm8k_category(answer, max_steps=max_steps),
      }
    )
  return out


def gsm8k_eval_set(
  tokenizer: Any,
  max_seq_len: int,
  *,
  template: Template = GSM8K_ALPACA,
  max_examples: int | None = None,
  source: str | Path | None = None,
  strip_calculator: bool = False,
) -> tuple[EncodedDataset, list[str]]:
  """The held-out set: GSM8K test encoded as the training data is, and the reference final answers.

  Returns (encoded [N, L], answers): `encoded.input_ids[i, :encoded.prompt_length[i]]` is the prompt to
  generate from, `answers[i]` the normalised final number to match (`gsm8k_final_answer`). `max_examples`
  keeps the first test problems (file order), so every run evaluates on the same ones.
  """
  records = load_gsm8k("test", source=source, max_records=max_examples, strip_calculator=strip_calculator)
  answers = [gsm8k_final_answer(r["answer"]) for r in records]
  return encode(records, template, tokenizer, max_seq_len), answers


def load_tiny_shakespeare(path: str | Path | None = None) -> list[Record]:
  """Speeches of Tiny Shakespeare as records {"speaker", "text"}, in file order.

  The file is a sequence of speeches separated by blank lines, each a "Speaker name:" line followed by the
  spoken lines. A speaker line with no speech after it (the file keeps the speaker lines of asides whose text
  was cut, e.g. GLOUCESTER in 3 Henry VI) is skipped. `path` defaults to the carried
  data/tinyshakespeare/input.txt.gz (plain text also accepted).
  """
  path = Path(path) if path is not None else DATA_DIR / "tinyshakespeare" / "input.txt.gz"
  if not path.is_file():
    raise ValueError(f"Tiny Shakespeare file {str(path)!r} does not exist: pass the path of input.txt[.gz].")
  with open_text(path) as f:
    text = f.read()
  records = []
  for block in re.split(r"\n\s*\n", text):
    lines = block.strip().splitlines()
    if not lines:
      continue
    if not lines[0].endswith(":"):
      raise ValueError(
        f"{path}: the speech {block.strip()[:60]!r} does not start with a 'Speaker:' line; the file must be "
        "in Tiny Shakespeare's format (speeches separated by blank lines)."
      )
    speech = "\n".join(lines[1:])
    if speech.strip():
      records.append({"speaker": lines[0][:-1].strip(), "text": speech})
  return records
