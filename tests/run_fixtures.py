"""A tiny end-to-end setup for the runner and CLI tests: a random Llama saved with transformers, a word-level
tokenizer trained with `tokenizers`, a learnable synthetic task in JSONL, and a config that trains on it in
seconds.

The task: the prompt is four letters, the response the same letters reversed, so a model can lower its
held-out loss by attending to the prompt; categories ("first letter") give the partitions something to
stratify on.
"""

import gzip
import json
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

LETTERS = list("abcdefgh")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def _records(n: int, seed: int) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    word = [rng.choice(LETTERS) for _ in range(4)]
    out.append({"prompt": " ".join(word) + " ->", "response": " ".join(reversed(word)), "category": word[0]})
  return out


def make_tiny_setup(root: Path) -> dict:
  """Writes root/model (config, safetensors, tokenizer) and root/{train.jsonl.gz, eval.jsonl}; returns the
  config dict of a small non-private run on them (paths absolute)."""
  train, held_out = _records(240, seed=1), _records(40, seed=2)
  backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.train_from_iterator(
    [r["prompt"] + " " + r["response"] for r in train],
    trainers.WordLevelTrainer(special_tokens=SPECIAL, show_progress=False),
  )
  backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
  )
  hf_config = transformers.LlamaConfig(
    vocab_size=backend.get_vocab_size(),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
  )
  transformers.set_seed(0)
  model_dir = root / "model"
  transformers.LlamaForCausalLM(hf_config).save_pretrained(model_dir)
  tokenizer.save_pretrained(model_dir)
  with gzip.open(root / "train.jsonl.gz", "wt") as f:
    f.writelines(json.dumps(r) + "\n" for r in train)
  (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
  return {
    "strategy": "fedavg",
    "rounds": 4,
    "num_clients": 4,
    "clients_per_round": 2,
    "local_steps": 3,
    "batch_size": 4,
    "lr": 1e-2,
    "seed": 0,
    "run_dir": str(root / "run"),
    "model": {"path": str(model_dir)},
    "data": {
      "source": "jsonl",
      "path": str(root / "train.jsonl.gz"),
      "eval_path": str(root / "eval.jsonl"),
      "template": "plain",
      "template_fields": {"prompt_field": "prompt", "response_field": "response", "separator": " "},
      "max_seq_len": 16,
    },
    "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "privacy": {"enabled": False},
    "eval": {"max_examples": 40, "batch_size": 20},
    "checkpoint": {"every": 2, "keep": 3},
  }


def compilation_cache_env(root: Path) -> dict:
  """Environment variables that give the CLI runs of a test module one persistent compilation cache: it only
  saves the later runs their compilations (a cached executable computes what a fresh one does)."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }


def metrics_lines(run_dir: Path) -> list[dict]:
  """metrics.jsonl's records, asserting that every line is whole."""
  text = (run_dir / "metrics.jsonl").read_text()
  assert text.endswith("\n")
  return [json.loads(line) for line in text.splitlines()]


def assert_same_run(run_dir: Path, reference: Path, rounds: int) -> None:
  """Same metrics lines (timings aside), one per round 0..rounds, and bit-identical final adapters."""
  without_timing = lambda records: [{k: v for k, v in r.items() if k != "timing"} for r in records]
  records = metrics_lines(run_dir)
  assert [r["round"] for r in records] == list(range(rounds + 1))
  assert without_timing(records) == without_timing(metrics_lines(reference))
  a = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
  b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def signal_on_line(process: subprocess.Popen, prefix: str, signum: int, timeout: float) -> str:
  """Sends `signum` to `process` (text stderr piped) once a line of its stderr starts with `prefix`; returns the
  rest of its stderr once it has exited (within `timeout` seconds), killing it if it is still running."""
  try:
    for line in process.stderr:
      if line.startswith(prefix):
        process.send_signal(signum)
        break
    else:
      pytest.fail(f"the run exited with {process.wait()} without printing {prefix!r}")
    err = process.stderr.read()
    process.wait(timeout=timeout)
  finally:
    if process.poll() is None:
      process.send_signal(signal.SIGKILL)
      process.wait(timeout=timeout)
  return err
