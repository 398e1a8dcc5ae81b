"""Tokenisation for supervised fine-tuning: fixed-length sequences with a loss mask over the response.

Each example becomes `prefix + tokens(prompt) + tokens(response) + [EOS]`, where `prefix` is whatever the
tokenizer's post-processor puts before a single sequence (Llama: BOS) and EOS is appended so the model
learns to stop. Prompt and response are tokenised separately: the training prefix is then exactly the token
sequence the model is given when it generates from the prompt alone at evaluation time, and the
prompt/response boundary is exact. (Stanford Alpaca tokenises `prompt + response` jointly and masks
`len(tokens(prompt))` positions, which is off where a token straddles the boundary.)

Sequences are right-padded to a static `max_seq_len` L. A longer sequence keeps its first L tokens (the
prompt first; the response is cut from the right, losing EOS) and counts in `num_truncated`; one whose
prompt fills all L positions keeps no response token and counts in `num_without_targets` (it stays, so that
indices match the records, but contributes no loss).

Alignment: `loss_mask[i, t]` is True when token `input_ids[i, t]` is a target (a response token or the
final EOS), i.e. the token to predict from positions < t. The loss (`fedask_jax.objectives.causal_lm_loss`)
therefore compares logits[:, :-1] with input_ids[:, 1:] weighted by loss_mask[:, 1:].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from fedask_jax._checks import check_int
from fedask_jax.data.sources import Record
from fedask_jax.data.templates import Template


class EncodedDataset(NamedTuple):
  """N examples encoded to length L (host numpy arrays).

  Attributes:
    input_ids: [N, L] int32, right-padded with the pad id.
    attention_mask: [N, L] bool, True on real tokens (a prefix of each row).
    loss_mask: [N, L] bool, True on target tokens: the response and its EOS (module doc: alignment).
    prompt_length: [N] int32, tokens of the prompt including the special prefix, capped at L; the
      generation prompt is `input_ids[i, :prompt_length[i]]`.
    full_length: [N] int32, the untruncated length prefix + prompt + response + EOS.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  prompt_length: np.ndarray
  full_length: np.ndarray

  @property
  def num_examples(self) -> int:
    return self.input_ids.shape[0]

  @property
  def max_seq_len(self) -> int:
    return self.input_ids.shape[1]

  @property
  def num_truncated(self) -> int:
    """Examples longer than L, cut to L tokens."""
    return int(np.sum(self.full_length > self.max_seq_len))

  @property
  def num_without_targets(self) -> int:
    """Examples whose prompt fills all L positions, so that no response token remains."""
    return int(np.sum(self.prompt_length >= self.max_seq_len))

  def subset(self, indices: Sequence[int] | np.ndarray) -> EncodedDataset:
    """The examples at `indices` (e.g. `np.arange(max_examples)`), in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    return EncodedDataset(*(field[indices] for field in self))


def _special_prefix(tokenizer: Any) -> list[int]:
  """The special tokens the tokenizer's post-processor puts before a single sequence (Llama: [BOS]).

  Found by encoding a probe with and without special tokens, so it follows the tokenizer's own definition
  (transformers' `add_bos_token`, a tokenizer.json TemplateProcessing, or none). Special tokens it puts after
  the sequence are not used: `encode` ends every example with EOS itself.
  """
  probe = "a"
  plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
  full = tokenizer(probe, add_special_tokens=True)["input_ids"]
  for start in range(len(full) - len(plain) + 1):
    if full[start : start + len(plain)] == plain:
      return list(full[:start])
  raise ValueError(
    f"the tokenizer encodes {probe!r} as {plain} without special tokens but {full} with them, which does not "
    "contain the former: its post-processor rewrites the sequence; use a tokenizer that only adds tokens."
  )


def encode_pairs(
  prompts: Sequence[str],
  responses: Sequence[str],
  tokenizer: Any,
  max_seq_len: int,
  *,
  pad_id: int | None = None,
) -> EncodedDataset:
  """Encodes (prompt, response) pairs into fixed-length arrays with a response-only loss mask (module doc).

  Args:
    prompts, responses: N texts each.
    tokenizer: a transformers fast tokenizer (`PreTrainedTokenizerFast` loaded from a tokenizer.json); it
      must define `eos_token_id`.
    max_seq_len: L, the static sequence length.
    pad_id: the id written at padded positions. Default: the tokenizer's pad token, else its EOS. Padded
      positions are excluded by both masks, so the id only has to be a valid embedding row.

  Returns:
    An `EncodedDataset` with arrays [N, L].
  """
  if len(prompts) != len(responses):
    raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses: pass one response per prompt.")
  check_int("max_seq_len", max_seq_len, 2, hint=" (a prompt token and a target)")
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    raise ValueError(
      "the tokenizer has no eos_token: set one (e.g. PreTrainedTokenizerFast(..., eos_token='</s>')); "
      "responses end with EOS so that the model learns to stop."
    )
  if pad_id is None:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
  prefix = _special_prefix(tokenizer)
  n = len(prompts)
  input_ids = np.full((n, max_seq_len), pad_id, np.int32)
  attention_mask = np.zeros((n, max_seq_len), bool)
  loss_mask = np.zeros((n, max_seq_len), bool)
  prompt_length = np.zeros((n,), np.int32)
  full_length = np.zeros((n,), np.int32)
  if n == 0:
    return EncodedDataset(input_ids, attention_mask, loss_mask, prompt_length, full_length)
  prompt_tokens = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
  response_tokens = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
  for i, (p, r) in enumerate(zip(prompt_tokens, response_tokens)):
    tokens = prefix + p + r + [eos_id]
    num_prompt = len(prefix) + len(p)
    length = min(len(tokens), max_seq_len)
    input_ids[i, :length] = tokens[:length]
    attention_mask[i, :length] = True
    loss_mask[i, num_prompt:length] = True
    prompt_length[i] = min(num_prompt, max_seq_len)
    full_length[i] = len(tokens)
  return EncodedDataset(input_ids, attention_mask, loss_mask, prompt_length, full_length)


def encode(
  records: Sequence[Record],
  template: Template,
  tokenizer: Any,
  max_seq_len: int,
  *,
  pad_id: int | None = None,
) -> EncodedDataset:
  """Applies `template` to each record and encodes the (prompt, response) pairs (`encode_pairs`)."""
  pairs = [template(record) for record in records]
  return encode_pairs([p for p, _ in pairs], [r for _, r in pairs], tokenizer, max_seq_len, pad_id=pad_id)
