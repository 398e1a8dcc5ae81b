"""What every evaluation shares (`fedask_jax.evaluation`): static-size batches, the model with dropout off, and
prompts tokenised and padded as for training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from fedask_jax._checks import check_int
from fedask_jax.data.encoding import encode_pairs

Array = jax.Array


def _check_batch_size(batch_size: Any) -> None:
  check_int("batch_size", batch_size, 1)


def _batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(rows [batch_size], valid [batch_size]) covering 0..n-1; the last batch repeats row 0 where not valid."""
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    valid = rows < n
    yield np.where(valid, rows, 0), valid


def _eval_split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
  """A split of `model` with dropout off; the caller's model keeps its mode."""
  return nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))


def _special_prefix(tokenizer: Any) -> list[int]:
  """The ids `encode` puts before every prompt (Llama: [BOS]; GPT-2: none): an empty pair's prompt."""
  probe = encode_pairs([""], [""], tokenizer, max_seq_len=16)
  return probe.input_ids[0, : probe.prompt_length[0]].tolist()


def _tokenize(tokenizer: Any, texts: Sequence[str], prefix: list[int]) -> list[list[int]]:
  if not texts:
    return []
  return [prefix + ids for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _pad(rows: Sequence[Sequence[int]], width: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
  """Token rows -> (ids [n, width] int32, mask [n, width] bool), padded on the left or the right.

  Padded slots hold id 0, a valid embedding row that the mask keeps out of attention and of every score.
  """
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    span = slice(width - len(row), width) if left else slice(0, len(row))
    ids[i, span] = row
    mask[i, span] = True
  return ids, mask
