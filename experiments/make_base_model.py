"""Build the small pretrained base model that the quickstart fine-tunes (experiments/base_model/).

    python experiments/make_base_model.py --out experiments/base_model   # the shipped checkpoint
    python experiments/make_base_model.py --quick                        # smoke run into a temp dir

What it makes, from the files the repository carries (data/*/SOURCE.md):
- a byte-level BPE tokenizer (vocab 2048, `<pad>`=0, `<s>`=1, `</s>`=2) trained with `tokenizers` on Tiny
  Shakespeare and the GSM8K *train* questions and answers (never the test split). Digits are split one per
  token (as Llama does) so numbers tokenize uniformly for arithmetic; the rest is GPT-2 style byte-level BPE,
  so `<<`, `>>`, `####` and newlines are ordinary tokens learnt by the merges. Encoding prepends `<s>` and
  appends nothing (the Llama convention; the flag lives in tokenizer.json's post-processor, so a loaded
  tokenizer's `add_bos_token` reads False although it adds `<s>`); saved from `PreTrainedTokenizerFast`.
- a Llama-style decoder (hidden 128, 4 layers, 4 query / 2 key-value heads, SwiGLU 384, RoPE theta 1e4,
  tied embeddings; about 1.05 M parameters, 4.2 MB in float32) pretrained as a causal LM on Tiny Shakespeare
  (first 95% of the text) and the GSM8K train *questions only*. The worked answers are left to the
  federated fine-tuning, so the quickstart has a format to learn and shows a clear drop in answer loss.

Validation: the last 5% of Shakespeare and the last 5% of the GSM8K train questions (both held out from
pretraining). The model card also records the base model's loss on GSM8K *test* answers (response tokens
only, prompt = question + newline) as the reference the quickstart's fine-tuning should beat.

Why PyTorch: the Flax model code (`fedask_jax.models`) was written in parallel with this script, and
`transformers.LlamaForCausalLM` gives a reference implementation whose `save_pretrained` output is exactly
the Hugging Face format our loader has to read. torch is a dev dependency only; the library never imports it.
The run is seeded (`torch.manual_seed`, a seeded batch generator, deterministic algorithms, a fixed thread
count), so the same command gives the same bytes on the same software stack. One thread by default: on a
shared, oversubscribed 2-core machine two OpenMP threads spin-wait for each other (measured at load ~10:
17.6 s/step with 2 threads vs 4.2 s/step with 1, and 6x the CPU time).
"""

import argparse
import dataclasses
import gzip
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
HELD_OUT_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class BuildConfig:
  """Everything that defines a build; `--quick` swaps in `QUICK` (same architecture, tiny everything)."""

  vocab_size: int = 2048
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  intermediate_size: int = 384
  max_position_embeddings: int = 512
  rope_theta: float = 10000.0
  # Pretraining windows span the full position range: a GSM8K question + answer is 213 tokens on average but
  # 321 at the 90th percentile, so a fine-tuning run may well use positions 256..511.
  seq_len: int = 512
  batch_size: int = 8
  steps: int = 1000
  peak_lr: float = 3e-3
  final_lr_fraction: float = 0.1
  warmup_steps: int = 50
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  eval_every: int = 100
  # Data caps (None = all) only `--quick` uses, to keep its run to seconds.
  shakespeare_chars: int | None = None
  gsm8k_train_records: int | None = None
  gsm8k_test_records: int | None = None


QUICK = BuildConfig(
  vocab_size=320,
  seq_len=64,
  batch_size=4,
  steps=6,
  warmup_steps=2,
  eval_every=3,
  shakespeare_chars=40_000,
  gsm8k_train_records=200,
  gsm8k_test_records=16,
)


def read_corpora(data_dir: Path, cfg: BuildConfig) -> tuple[str, list[dict], list[dict]]:
  """Tiny Shakespeare text, GSM8K train records, GSM8K test records (dicts with "question", "answer")."""
  with gzip.open(data_dir / "tinyshakespeare" / "input.txt.gz", "rt", encoding="utf-8") as f:
    shakespeare = f.read()[: cfg.shakespeare_chars]

  def jsonl(name: str, limit: int | None) -> list[dict]:
    with gzip.open(data_dir / "gsm8k" / name, "rt", encoding="utf-8") as f:
      return [json.loads(line) for line in f][:limit]

  return shakespeare, jsonl("train.jsonl.gz", cfg.gsm8k_train_records), jsonl("test.jsonl.gz", cfg.gsm8k_test_records)


def split_held_out(shakespeare: str, questions: list[str]) -> tuple[str, str, list[str], list[str]]:
  """Last 5% of Shakespeare (cut at a line start) and of the questions go to validation."""
  cut = shakespeare.index("\n", int(len(shakespeare) * (1 - HELD_OUT_FRACTION))) + 1
  n_val = max(1, int(len(questions) * HELD_OUT_FRACTION))
  return shakespeare[:cut], shakespeare[cut:], questions[:-n_val], questions[-n_val:]


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
  """Byte-level BPE with single-digit pre-tokens; encodes as `<s> text` (no `</s>`)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[PAD, BOS, EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer)
  tokenizer.post_processor = processors.TemplateProcessing(
    single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
  )
  return PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    bos_token=BOS,
    eos_token=EOS,
    pad_token=PAD,
    add_bos_token=True,
    add_eos_token=False,
    model_max_length=max_length,
  )


def llama_config(cfg: BuildConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
  """The transformers config: the architecture of `cfg`, the tokenizer's vocabulary and special ids."""
  return LlamaConfig(
    vocab_size=len(tokenizer),
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    max_position_embeddings=cfg.max_position_embeddings,
    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    tie_word_embeddings=True,
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )


def document_stream(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
  """`<s> doc </s>` for each document, concatenated: int64 [total tokens]."""
  # The backend encoder skips the wrapper's model_max_length warning: a whole play is one document here.
  encodings = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  return torch.tensor([t for e in encodings for t in (bos, *e.ids, eos)], dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
  """Non-overlapping windows of a stream (remainder dropped): [n, seq_len]."""
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f"stream of {len(stream)} tokens is shorter than seq_len={seq_len}; use more data.")
  return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def lm_loss(model: LlamaForCausalLM, tokens: torch.Tensor, batch_size: int = 16) -> float:
  """Mean next-token loss (nats) over all windows `tokens` [n, seq_len]."""
  model.eval()
  total, count = 0.0, 0
  for chunk in tokens.split(batch_size):
    logits = model(input_ids=chunk).logits[:, :-1]
    total += torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
    ).item()
    count += chunk[:, 1:].numel()
  model.train()
  return total / count


def prompt_response_ids(tokenizer: PreTrainedTokenizerFast, record: dict) -> tuple[list[int], list[int]]:
  """GSM8K example as (prompt, response) ids: `<s> question \\n` and `answer </s>`."""
  encoder = tokenizer.backend_tokenizer
  prompt = encoder.encode(record["question"] + "\n").ids
  return prompt, encoder.encode(record["answer"], add_special_tokens=False).ids + [tokenizer.eos_token_id]


@torch.no_grad()
def response_loss(
  model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, records: list[dict], max_len: int, batch_size: int = 16
) -> float:
  """Mean loss (nats/token) of the answer tokens given the question, over `records`, truncated to max_len."""
  pairs = sorted((prompt_response_ids(tokenizer, r) for r in records), key=lambda pr: len(pr[0]) + len(pr[1]))
  model.eval()
  total, count = 0.0, 0
  # Length-sorted batches padded to their own longest example: the sum over tokens does not depend on order.
  for start in range(0, len(pairs), batch_size):
    batch = [(prompt, (prompt + response)[:max_len]) for prompt, response in pairs[start : start + batch_size]]
    ids = torch.full((len(batch), max(len(seq) for _, seq in batch)), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    for i, (prompt, seq) in enumerate(batch):
      ids[i, : len(seq)] = torch.tensor(seq)
      labels[i, len(prompt) : len(seq)] = torch.tensor(seq[len(prompt) :], dtype=torch.long)
    # No attention mask needed: with right padding and causal attention no real token attends to a pad,
    # and the pads' own predictions carry label -100.
    logits = model(input_ids=ids).logits[:, :-1]
    total += torch.nn.functional.cross_entropy(
      logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
    ).item()
    count += (labels[:, 1:] != -100).sum().item()
  model.train()
  return total / count


def learning_rate(step: int, cfg: BuildConfig) -> float:
  """Linear warm-up to peak_lr, then cosine decay to final_lr_fraction * peak_lr at the last step."""
  if step < cfg.warmup_steps:
    return cfg.peak_lr * (step + 1) / cfg.warmup_steps
  progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
  cosine = 0.5 * (1 + math.cos(math.pi * progress))
  return cfg.peak_lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * cosine)


def pretrain(
  model: LlamaForCausalLM, train_stream: torch.Tensor, val_sets: dict[str, torch.Tensor], cfg: BuildConfig, seed: int
) -> tuple[float, dict[str, float]]:
  """AdamW on random windows of the training stream; returns (final train loss, final val losses)."""
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]  # RMSNorm gains
  optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=cfg.peak_lr,
    betas=(0.9, 0.95),
  )
  batches = torch.Generator().manual_seed(seed)
  recent: list[float] = []
  start = time.perf_counter()
  for step in range(cfg.steps):
    offsets = torch.randint(0, len(train_stream) - cfg.seq_len, (cfg.batch_size,), generator=batches)
    input_ids = torch.stack([train_stream[o : o + cfg.seq_len] for o in offsets])
    for group in optimizer.param_groups:
      group["lr"] = learning_rate(step, cfg)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # The reported train loss is the mean over the last eval_every steps (a single batch is noisy).
    recent = (recent + [loss.item()])[-cfg.eval_every :]
    if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
      val = {name: lm_loss(model, data) for name, data in val_sets.items()}
      elapsed = time.perf_counter() - start
      print(
        f"step {step + 1}/{cfg.steps}  train {np.mean(recent):.4f}  "
        + "  ".join(f"val_{k} {v:.4f}" for k, v in val.items())
        + f"  {elapsed:.0f}s ({(step + 1) / elapsed:.2f} steps/s)",
        flush=True,
      )
  return float(np.mean(recent)), val


def token_length_stats(tokenizer: PreTrainedTokenizerFast, records: list[dict]) -> dict[str, float]:
  """Tokens per GSM8K example `<s> question \\n answer </s>`: mean, percentiles, share fitting 256/512."""
  lengths = np.array([sum(map(len, prompt_response_ids(tokenizer, r))) for r in records])
  return {
    "mean": float(lengths.mean()),
    "p50": float(np.percentile(lengths, 50)),
    "p90": float(np.percentile(lengths, 90)),
    "p99": float(np.percentile(lengths, 99)),
    "max": int(lengths.max()),
    "fit_256": float((lengths <= 256).mean()),
    "fit_512": float((lengths <= 512).mean()),
  }


MODEL_CARD = """\
# fedask-jax base model (tiny Llama, pretrained on Tiny Shakespeare + GSM8K questions)

The small *pretrained* causal LM that the README's quickstart fine-tunes with federated DP LoRA (FedASK).
Built by this repository from its own carried data; Hugging Face format, loads with
`transformers.AutoTokenizer` / `transformers.LlamaForCausalLM` and with `fedask_jax.models`.

Produced by (deterministic under the seed and thread count on the same software stack; {wall:.0f} s of
pretraining on a shared 2-core CPU):

    {command}

## Model
- Llama architecture: hidden {hidden}, {layers} layers, {heads} query heads / {kv_heads} key-value heads (GQA),
  SwiGLU intermediate {inter}, RMSNorm, RoPE theta {rope:g}, max positions {max_pos}, tied input/output
  embeddings; {params:,} parameters, float32 safetensors ({weight_bytes:,} bytes).
- Tokenizer: byte-level BPE, {vocab} tokens (`<pad>`=0, `<s>`=1, `</s>`=2); digits are split one per
  token; encoding prepends `<s>` and does not append `</s>`.

## Data (licences)
- Tiny Shakespeare (public domain text; karpathy/char-rnn, see data/tinyshakespeare/SOURCE.md): first 95%
  for pretraining, last 5% held out.
- GSM8K (MIT, OpenAI; see data/gsm8k/SOURCE.md): the tokenizer saw train questions and answers; the model was
  pretrained on train *questions only* (last 5% held out). The test split was used only for the reference
  loss below.

## Training
Causal LM on random {seq_len}-token windows of `<s> document </s>` streams, batch {batch}, {steps} steps
({tokens:.1f} M tokens), AdamW (betas 0.9/0.95, weight decay {wd} on matrices), {warmup} warm-up steps to
lr {lr:g} then cosine decay to {final_frac:g} x, gradient clipping {clip}, seed {seed}.

| loss (nats/token) | value |
|---|---|
| train (mean of last {eval_every} steps) | {train_loss:.3f} |
| validation, held-out Shakespeare | {val_shakespeare:.3f} |
| validation, held-out GSM8K train questions | {val_questions:.3f} |
| GSM8K **test** answers given the question (response tokens only) | {test_answer_loss:.3f} |
| uniform over the vocabulary, log({vocab}) | {log_vocab:.3f} |

Tokens per GSM8K train example (`<s> question \\n answer </s>`): mean {len_mean:.0f}, median {len_p50:.0f},
90th percentile {len_p90:.0f}, 99th {len_p99:.0f}, max {len_max}; {len_fit_256:.1%} fit in 256 tokens,
{len_fit_512:.1%} in 512.

## What it can and cannot do
- Can: continue Shakespeare-like dialogue and GSM8K-like word-problem questions with plausible local syntax;
  it gives a far better than uniform starting point for fine-tuning.
- Cannot: solve or even format answers. It never saw a worked answer, so the calculator notation
  (`<<a*b=c>>`), `####` and the answer style are learnt only in fine-tuning (those tokens' embeddings were
  trained only as outputs to be unlikely). It is a ~1 M-parameter toy for demonstrating and testing
  federated DP fine-tuning, not a useful language model.
"""


def main(argv: list[str] | None = None) -> Path:
  """Builds tokenizer and model, pretrains, writes the checkpoint and its card; returns the output directory."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--out",
    type=Path,
    default=None,
    help="output directory (default: experiments/base_model, or a temp dir with --quick)",
  )
  parser.add_argument("--steps", type=int, default=None, help=f"pretraining steps (default {BuildConfig.steps})")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results may depend on it)")
  parser.add_argument("--data-dir", type=Path, default=REPO / "data")
  parser.add_argument("--quick", action="store_true", help="tiny data and a few steps, for a smoke test")
  args = parser.parse_args(argv)
  cfg = QUICK if args.quick else BuildConfig()
  if args.steps is not None:
    if args.steps < 1:
      raise ValueError(f"--steps={args.steps} must be >= 1; pass a positive number of pretraining steps.")
    cfg = dataclasses.replace(cfg, steps=args.steps)
  if args.threads < 1:
    raise ValueError(f"--threads={args.threads} must be >= 1; pass the number of torch CPU threads.")
  out = args.out or (
    Path(tempfile.mkdtemp(prefix="base_model_quick_")) if args.quick else REPO / "experiments" / "base_model"
  )

  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  torch.use_deterministic_algorithms(True)

  shakespeare, train_records, test_records = read_corpora(args.data_dir, cfg)
  questions = [r["question"] for r in train_records]
  tokenizer = train_tokenizer(
    [shakespeare] + questions + [r["answer"] for r in train_records], cfg.vocab_size, cfg.max_position_embeddings
  )
  sh_train, sh_val, q_train, q_val = split_held_out(shakespeare, questions)
  train_stream = torch.cat([document_stream(tokenizer, [sh_train]), document_stream(tokenizer, q_train)])
  val_sets = {
    "shakespeare": windows(document_stream(tokenizer, [sh_val]), cfg.seq_len),
    "questions": windows(document_stream(tokenizer, q_val), cfg.seq_len),
  }
  print(
    f"tokenizer vocab {len(tokenizer)}; train stream {len(train_stream):,} tokens; "
    f"val windows {[len(v) for v in val_sets.values()]}",
    flush=True,
  )

  model = LlamaForCausalLM(llama_config(cfg, tokenizer))
  n_params = sum(p.numel() for p in model.parameters())
  print(f"model parameters {n_params:,}", flush=True)
  start = time.perf_counter()
  train_loss, val = pretrain(model, train_stream, val_sets, cfg, args.seed)
  wall = time.perf_counter() - start
  test_answer_loss = response_loss(model, tokenizer, test_records, cfg.max_position_embeddings)
  print(f"GSM8K test answer loss {test_answer_loss:.4f} (nats/token)", flush=True)

  out.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(out)
  tokenizer.save_pretrained(out)
  lengths = token_length_stats(tokenizer, train_records)
  shown_out = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out
  command = (
    f"python experiments/make_base_model.py --out {shown_out} --steps {cfg.steps} --seed {args.seed} "
    f"--threads {args.threads}" + " --quick" * args.quick
  )
  (out / "README.md").write_text(
    MODEL_CARD.format(
      command=command,
      wall=wall,
      steps=cfg.steps,
      seed=args.seed,
      hidden=cfg.hidden_size,
      layers=cfg.num_layers,
      heads=cfg.num_heads,
      kv_heads=cfg.num_kv_heads,
      inter=cfg.intermediate_size,
      rope=cfg.rope_theta,
      max_pos=cfg.max_position_embeddings,
      params=n_params,
      weight_bytes=(out / "model.safetensors").stat().st_size,
      vocab=len(tokenizer),
      seq_len=cfg.seq_len,
      batch=cfg.batch_size,
      tokens=cfg.steps * cfg.batch_size * cfg.seq_len / 1e6,
      wd=cfg.weight_decay,
      warmup=cfg.warmup_steps,
      lr=cfg.peak_lr,
      final_frac=cfg.final_lr_fraction,
      clip=cfg.grad_clip,
      eval_every=cfg.eval_every,
      train_loss=train_loss,
      val_shakespeare=val["shakespeare"],
      val_questions=val["questions"],
      test_answer_loss=test_answer_loss,
      log_vocab=math.log(len(tokenizer)),
      **{f"len_{k}": v for k, v in lengths.items()},
    )
  )
  print(
    f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()):,} bytes); tokens per GSM8K example: {lengths}",
    flush=True,
  )
  return out


if __name__ == "__main__":
  main()
