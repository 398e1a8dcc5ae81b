"""Held-out evaluation: the token-mean next-token cross-entropy on the response tokens, and its perplexity.

eval_loss = sum_i sum_t m_i[t+1] CE(logits_i[t], ids_i[t+1]) / sum_i sum_t m_i[t+1], over every example i of the
held-out set (`fedask_jax.objectives.causal_lm_loss`'s token mean, pooled over batches, so long answers weigh
more, as in Hugging Face's eval loss); perplexity = exp(eval_loss).

Batches have a static size: the last one is padded with rows whose loss mask is all False, so the whole set is
evaluated by one compiled function.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedask_jax.data.encoding import EncodedDataset

Array = jax.Array


class EvalResult(NamedTuple):
  """eval_loss: token-mean cross-entropy (nats); perplexity: exp(eval_loss); tokens: target tokens scored;
  examples: examples evaluated."""

  eval_loss: float
  perplexity: float
  tokens: int
  examples: int


@functools.partial(jax.jit, static_argnums=0)
def _batch_sums(graphdef: nnx.GraphDef, state: nnx.State, input_ids: Array, attention_mask: Array,
                loss_mask: Array) -> tuple[Array, Array]:
  """(summed cross-entropy, number of targets) of one batch [b, L]."""
  model = nnx.merge(graphdef, state)
  logits = model(input_ids, attention_mask)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
  weights = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def evaluate(model: nnx.Module, data: EncodedDataset, *, batch_size: int = 16) -> EvalResult:
  """Token-mean cross-entropy of `model` on the targets of `data` [N, L] (module docstring).

  `model(input_ids [b, L], attention_mask [b, L]) -> logits [b, L, V]`, evaluated as it is (adapters included,
  dropout off). Sums are accumulated in float64 on the host across batches.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1.")
  n = data.num_examples
  if n == 0:
    raise ValueError("evaluate got an empty held-out set: check the eval split and eval.max_examples.")
  # A view with dropout off; the caller's model keeps its mode.
  graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
  total, count = 0.0, 0.0
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    valid = rows < n
    rows = np.where(valid, rows, 0)
    # Padding rows repeat example 0 with an all-False loss mask: valid tokens, no contribution.
    batch_total, batch_count = _batch_sums(
        graphdef, state, jnp.asarray(data.input_ids[rows]), jnp.asarray(data.attention_mask[rows]),
        jnp.asarray(data.loss_mask[rows] & valid[:, None]))
    total += float(batch_total)
    count += float(batch_count)
  if count == 0:
    raise ValueError(
        f"the held-out set's {n} examples have no target tokens (all truncated away?): raise data.max_seq_len.")
  loss = total / count
  return EvalResult(eval_loss=loss, perplexity=math.exp(loss), tokens=int(count), examples=n)
