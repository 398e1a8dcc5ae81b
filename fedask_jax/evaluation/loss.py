"""Held-out loss and perplexity (`fedask_jax.evaluation`).

**Loss and perplexity** (`evaluate`). eval_loss = sum_i sum_t m_i[t+1] CE(logits_i[t], ids_i[t+1]) /
sum_i sum_t m_i[t+1], over every example i of the held-out set (`fedask_jax.objectives.causal_lm_loss`'s token
mean, pooled over batches, so long answers weigh more, as in Hugging Face's eval loss); perplexity =
exp(eval_loss). On instruction data the mask m covers the response tokens; on plain text (`text_windows`) it
covers every token of non-overlapping L-token windows of the text stream `prefix d_1 EOS prefix d_2 EOS ...`
except each window's first token, which has no context. Each window starts without context, so text perplexity
depends on L (Hugging Face's "Perplexity of fixed-length models" guide); compare models at the same L.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedask_jax._checks import check_int
from fedask_jax.data.batching import shard_rows
from fedask_jax.data.encoding import EncodedDataset
from fedask_jax.evaluation._inputs import _batches, _check_batch_size, _eval_split, _pad, _special_prefix, _tokenize
from fedask_jax.objectives import max_targets, response_positions

Array = jax.Array


class EvalResult(NamedTuple):
  """eval_loss: token-mean cross-entropy (nats); perplexity: exp(eval_loss); tokens: target tokens scored;
  examples: examples evaluated."""

  eval_loss: float
  perplexity: float
  tokens: int
  examples: int


@functools.partial(jax.jit, static_argnums=(0, 5))
def _batch_sums(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  input_ids: Array,
  attention_mask: Array,
  loss_mask: Array,
  capacity: int | None,
) -> tuple[Array, Array]:
  """(summed cross-entropy, number of targets) of one batch [b, L]; the LM head at every position, or at the
  target positions only (`capacity` of them per row: `fedask_jax.objectives.response_positions`)."""
  model = nnx.merge(graphdef, state)
  if capacity is None:
    logits = model(input_ids, attention_mask)[:, :-1]
    labels, weights = input_ids[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  else:
    positions, weights = response_positions(loss_mask, capacity)
    logits = model(input_ids, attention_mask, logit_positions=positions)
    labels = jnp.take_along_axis(input_ids, positions + 1, axis=-1)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(nll * weights), jnp.sum(weights)


def evaluate(
  model: nnx.Module,
  data: EncodedDataset,
  *,
  batch_size: int = 16,
  mesh: jax.sharding.Mesh | None = None,
  capacity: int | None = None,
) -> EvalResult:
  """Token-mean cross-entropy of `model` on the targets of `data` [N, L] (module docstring).

  `model(input_ids [b, L], attention_mask [b, L]) -> logits [b, L, V]`, evaluated as it is (adapters included,
  dropout off). `data` is an instruction set (`fedask_jax.data.encode`, response targets) or plain text
  (`text_windows`, every token a target). Sums are accumulated in float64 on the host across batches.

  mesh: split each batch's rows over the devices of this 1-D mesh (`fedask_jax.simulation.client_mesh`), the
    model replicated, batch_size rounded up to a multiple of the device count; with several processes
    (`jax.distributed`) every process calls it with the same data, feeds the rows of its devices, and gets the
    result.
  capacity: compute the LM head at the target positions only, `capacity` per example (at least
    `fedask_jax.objectives.max_targets(data.loss_mask)`, e.g. `response_capacity(data.loss_mask)`; the model
    then takes `logit_positions`, as the library's models do): the same loss with the head's FLOPs proportional
    to the targets. None: at every position.
  """
  _check_batch_size(batch_size)
  n = data.num_examples
  if n == 0:
    raise ValueError("evaluate got an empty held-out set: check the eval split and eval.max_examples.")
  if capacity is not None and capacity < max_targets(data.loss_mask):
    raise ValueError(
      f"evaluate got capacity={capacity} but an example of the held-out set has {max_targets(data.loss_mask)} "
      "targets, which would be left out: use fedask_jax.objectives.response_capacity(data.loss_mask)."
    )
  graphdef, state = _eval_split(model)
  place = lambda *arrays: tuple(map(jnp.asarray, arrays))
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
    state = jax.device_put(state, NamedSharding(mesh, P()))
    place = lambda *arrays: shard_rows(arrays, mesh)
  total, count = 0.0, 0.0
  for rows, valid in _batches(n, batch_size):
    batch_total, batch_count = _batch_sums(
      graphdef,
      state,
      *place(data.input_ids[rows], data.attention_mask[rows], data.loss_mask[rows] & valid[:, None]),
      capacity,
    )
    # Scalars are whole on every device, the addressable ones included.
    total += float(batch_total.addressable_data(0))
    count += float(batch_count.addressable_data(0))
  if count == 0:
    raise ValueError(
      f"the held-out set's {n} examples have no target tokens (all truncated away?): raise data.max_seq_len."
    )
  loss = total / count
  return EvalResult(eval_loss=loss, perplexity=math.exp(loss), tokens=int(count), examples=n)


def text_windows(texts: Sequence[str], tokenizer: Any, seq_len: int) -> EncodedDataset:
  """Held-out plain text (e.g. Tiny Shakespeare speeches) as L-token windows for `evaluate` (module docstring).

  The documents are joined into one stream `prefix d_1 EOS prefix d_2 EOS ...` (prefix: the tokenizer's special
  prefix, as `fedask_jax.data.encode` uses it) and cut into ceil(S / L) non-overlapping windows [N, L]; the last
  is right-padded. Every real token but a window's first is a target (`loss_mask`); `prompt_length` is 0 and
  `full_length` the window's real tokens.
  """
  check_int("seq_len", seq_len, 2, hint=" (a context token and a target)")
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has no eos_token: documents are separated by EOS in the stream; set one.")
  documents = _tokenize(tokenizer, texts, _special_prefix(tokenizer))
  stream = [token for document in documents for token in document + [tokenizer.eos_token_id]]
  if len(stream) < 2:
    raise ValueError(f"text_windows got {len(texts)} documents, {len(stream)} tokens: pass some held-out text.")
  windows = [stream[start : start + seq_len] for start in range(0, len(stream), seq_len)]
  input_ids, attention_mask = _pad(windows, seq_len, left=False)
  loss_mask = attention_mask.copy()
  loss_mask[:, 0] = False
  return EncodedDataset(
    input_ids, attention_mask, loss_mask, np.zeros(len(windows), np.int32), attention_mask.sum(axis=1).astype(np.int32)
  )
