"""The shipped base model (experiments/base_model/) and the script that builds it (make_base_model.py)."""

import gzip
import importlib.util
import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from fedask_jax.models import load_pretrained

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "base_model"
DATA = REPO / "data"


def _load_script():
  spec = importlib.util.spec_from_file_location("make_base_model", REPO / "experiments" / "make_base_model.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


make_base_model = _load_script()


@pytest.fixture(scope="module")
def shipped():
  return AutoTokenizer.from_pretrained(SHIPPED), LlamaForCausalLM.from_pretrained(SHIPPED).eval()


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
  """Two `--quick` runs with the same seed; main() sets torch's global state, restored afterwards."""
  threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
  dirs = [make_base_model.main(["--quick", "--out", str(tmp_path_factory.mktemp(f"quick{i}"))]) for i in range(2)]
  torch.set_num_threads(threads)
  torch.use_deterministic_algorithms(deterministic)
  return dirs


def _gsm8k(split: str, n: int) -> list[dict]:
  with gzip.open(DATA / "gsm8k" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
    return [json.loads(line) for _, line in zip(range(n), f)]


def _card_value(directory: Path, row: str) -> float:
  return float(re.search(rf"\| {re.escape(row)}[^|]*\| ([0-9.]+) \|", (directory / "README.md").read_text())[1])


def test_shipped_files_are_complete_and_small():
  names = {p.name for p in SHIPPED.iterdir()}
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
  assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5_000_000


def test_shipped_config_matches_tokenizer(shipped):
  tokenizer, model = shipped
  config = model.config
  assert config.vocab_size == len(tokenizer)
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
    tokenizer.bos_token_id,
    tokenizer.eos_token_id,
    tokenizer.pad_token_id,
  )
  assert config.num_key_value_heads < config.num_attention_heads  # GQA, which the Flax model must handle
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("split", ["train", "test"])
def test_tokenizer_round_trips_gsm8k(shipped, split):
  tokenizer, _ = shipped
  for record in _gsm8k(split, 200):
    text = record["question"] + "\n" + record["answer"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert all(len(piece) == 1 for piece in pieces if any(c.isdigit() for c in piece)), pieces
  # The answer notation is one token each, not a run of byte pieces.
  assert all(len(tokenizer(s, add_special_tokens=False)["input_ids"]) == 1 for s in ("####", "<<", ">>", "\n"))


def test_shipped_model_is_pretrained(shipped):
  """Held-out Shakespeare: far below the best context-free (unigram) model of the same text, and as the card says."""
  tokenizer, model = shipped
  with gzip.open(DATA / "tinyshakespeare" / "input.txt.gz", "rt", encoding="utf-8") as f:
    _, held_out, _, _ = make_base_model.split_held_out(f.read(), ["unused"])
  windows = make_base_model.windows(make_base_model.document_stream(tokenizer, [held_out]), 512)
  with torch.no_grad():
    loss = model(input_ids=windows, labels=windows).loss.item()
  # The unigram entropy of the held-out targets themselves lower-bounds any model that ignores context
  # (even one fitted on this very text); a 1-nat margin means the context is really used.
  counts = np.bincount(windows[:, 1:].reshape(-1).numpy(), minlength=len(tokenizer))
  p = counts[counts > 0] / counts.sum()
  unigram_entropy = float(-(p * np.log(p)).sum())
  assert loss < unigram_entropy - 1.0, (loss, unigram_entropy, math.log(len(tokenizer)))
  # Same windows as the build's validation: the card reports these weights, up to float32 summation order.
  assert loss == pytest.approx(_card_value(SHIPPED, "validation, held-out Shakespeare"), abs=1e-3)


def test_flax_loader_matches_transformers(shipped):
  tokenizer, model = shipped
  record = _gsm8k("test", 1)[0]
  ids = np.array([tokenizer(record["question"] + "\n" + record["answer"])["input_ids"]])
  with torch.no_grad():
    expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
  logits = np.asarray(load_pretrained(SHIPPED)(jnp.asarray(ids), None))
  # Both run float32 with different op orders; logits are O(10), so 1e-4 absolute is ~1e-5 relative.
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_quick_build_is_loadable_trained_and_deterministic(quick_runs):
  first, second = quick_runs
  for name in ("model.safetensors", "tokenizer.json"):
    assert (first / name).read_bytes() == (second / name).read_bytes(), name
  tokenizer = AutoTokenizer.from_pretrained(first)
  model = LlamaForCausalLM.from_pretrained(first)
  assert model.config.vocab_size == len(tokenizer) == make_base_model.QUICK.vocab_size
  # At init (std 0.02) the loss is log(V) to within ~0.01; the 6 seeded steps must have moved it well below.
  assert _card_value(first, "validation, held-out Shakespeare") < math.log(len(tokenizer)) - 0.3


def test_rejects_non_positive_steps():
  with pytest.raises(ValueError, match="--steps=0"):
    make_base_model.main(["--quick", "--steps", "0"])
