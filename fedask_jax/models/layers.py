"""Building blocks shared by the model families: token embeddings, masked multi-head attention with grouped
key/value heads, and the key/value cache that makes the same attention code serve training, evaluation and
incremental decoding.

Shapes: b = batch, s = query tokens in this call, t = key slots (s without a cache, the cache length T with
one), h = query heads, kv = key/value heads (h is a multiple of kv: grouped-query attention), hd = head dim.

Masks follow Hugging Face: `token_mask` [b, s] is 1 for real tokens and 0 for padding. Attention is always
causal in slot order, and a padding slot is never attended to. Positions (RoPE angles or learned position
rows) count real tokens only, `position = (number of real tokens before this one)`, so a left- or
right-padded row gets the positions of the same row without padding (what Hugging Face's `generate` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class Embedding(nnx.Module):
  """A lookup table `embedding` [num_embeddings, features] (PyTorch's `nn.Embedding.weight`, same layout)."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any = jnp.float32):
    self.embedding = nnx.Param(jnp.zeros((num_embeddings, features), dtype))

  def __call__(self, ids: Array) -> Array:
    """ids [...] int -> [..., features]."""
    return jnp.take(self.embedding[...], ids, axis=0)

  def attend(self, x: Array) -> Array:
    """The tied output head: x [..., features] -> x @ embedding^T [..., num_embeddings]."""
    return jnp.matmul(x, self.embedding[...].T.astype(x.dtype))


class LayerCache(NamedTuple):
  """Keys and values of one attention layer: each [b, T, kv, hd]."""

  keys: Array
  values: Array


class KVCache(NamedTuple):
  """A static-size key/value cache for all layers.

  layers: one `LayerCache` per layer; key_mask: [b, T] bool, True where a slot holds a real token;
  length: [] int32, the number of slots written (the next write goes to slot `length`).
  """

  layers: tuple[LayerCache, ...]
  key_mask: Array
  length: Array


def init_cache(num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int, dtype: Any) -> KVCache:
  """An empty cache of `max_length` slots: keys/values [batch, max_length, num_kv_heads, head_dim] per layer."""
  shape = (batch, max_length, num_kv_heads, head_dim)
  layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers))
  return KVCache(layers, jnp.zeros((batch, max_length), bool), jnp.zeros((), jnp.int32))


def output_logits(hidden: Array, embedding: Embedding, lm_head: Any, positions: Array | None = None) -> Array:
  """Float32 next-token logits [b, s, V] from the last hidden states [b, s, d]: the model's own `lm_head`, or,
  when the head is tied (`lm_head` None), the input `embedding` transposed.

  positions: [b, P] int, or None: the logits at those positions only, [b, P, V] (a gather of the hidden states
  before the head, so the head's FLOPs and the logits' memory scale with P, not s; P static).
  """
  if positions is not None:
    if positions.ndim != 2 or positions.shape[0] != hidden.shape[0]:
      raise ValueError(f"positions has shape {positions.shape}: expected [b, P] with b = {hidden.shape[0]}.")
    hidden = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
  logits = embedding.attend(hidden) if lm_head is None else lm_head(hidden)
  return logits.astype(jnp.float32)


def token_mask_or_ones(input_ids: Array, attention_mask: Array | None) -> Array:
  """Checks shapes and returns the [b, s] bool token mask (all True when `attention_mask` is None)."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids has shape {input_ids.shape}: expected [batch, seq]; add a batch axis.")
  if attention_mask is None:
    return jnp.ones(input_ids.shape, bool)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(
      f"attention_mask has shape {attention_mask.shape} but input_ids has shape {input_ids.shape}: they must "
      "be equal (1 for real tokens, 0 for padding)."
    )
  return attention_mask.astype(bool)


def causal_lm_logits(
  backbone: Callable[[Array, Array, KVCache | None], tuple[Array, KVCache | None]],
  embedding: Embedding,
  lm_head: Any,
  input_ids: Array,
  attention_mask: Array | None,
  cache: KVCache | None,
  logit_positions: Array | None,
) -> Array | tuple[Array, KVCache]:
  """A language model's forward, shared by the model families: `backbone` (input_ids [b, s], token mask [b, s]
  bool, cache -> hidden states [b, s, d], updated cache) between the token mask (`token_mask_or_ones`) and the
  head (`output_logits`). Returns the logits, or (logits, updated cache) when given a `cache`; the arguments as
  in the models' `__call__` (e.g. `fedask_jax.models.llama.LlamaForCausalLM`)."""
  if cache is not None and logit_positions is not None:
    raise ValueError("logit_positions with a cache: decoding takes every new token's logits; pass one or the other.")
  token_mask = token_mask_or_ones(input_ids, attention_mask)
  hidden, new_cache = backbone(input_ids, token_mask, cache)
  logits = output_logits(hidden, embedding, lm_head, logit_positions)
  if cache is None:
    return logits
  assert new_cache is not None  # the backbone returns an updated cache whenever it is given one
  return logits, new_cache


class AttentionContext(NamedTuple):
  """What every layer of one forward call shares.

  positions: [b, s] int32 position of each token; mask: [b, s, t] bool, which key slots each query may attend;
  write_index: [] int32 first cache slot of this call's tokens (None without a cache);
  key_mask: [b, T] bool, the cache's key mask including this call's tokens (None without a cache).
  """

  positions: Array
  mask: Array
  write_index: Array | None
  key_mask: Array | None


def attention_context(token_mask: Array, cache: KVCache | None) -> AttentionContext:
  """Positions and the causal + padding mask of this call's tokens, without or with a cache.

  Without a cache, keys are the s tokens themselves. With one, this call's tokens go to slots
  `length .. length + s - 1` and may attend to every earlier real slot.
  """
  s = token_mask.shape[1]
  count = jnp.cumsum(token_mask.astype(jnp.int32), axis=1)
  if cache is None:
    positions = jnp.maximum(count - 1, 0)
    causal = jnp.tril(jnp.ones((s, s), bool))
    return AttentionContext(positions, causal[None] & token_mask[:, None, :], None, None)
  seen = jnp.sum(cache.key_mask, axis=1, dtype=jnp.int32)
  positions = jnp.maximum(seen[:, None] + count - 1, 0)
  key_mask = jax.lax.dynamic_update_slice(cache.key_mask, token_mask, (0, cache.length))
  query_slot = cache.length + jnp.arange(s)
  causal = jnp.arange(key_mask.shape[1])[None, :] <= query_slot[:, None]
  return AttentionContext(positions, causal[None] & key_mask[:, None, :], cache.length, key_mask)


def advance_cache(cache: KVCache, layers: Sequence[LayerCache | None], context: AttentionContext, s: int) -> KVCache:
  """The cache after a call that wrote s tokens: new per-layer keys/values and key mask, length + s."""
  written = tuple(layer for layer in layers if layer is not None)
  if len(written) != len(layers) or context.key_mask is None:
    raise ValueError(
      "advance_cache: every layer must return its updated cache and the context must come from "
      "attention_context(token_mask, cache) with a cache."
    )
  return KVCache(written, context.key_mask, cache.length + s)


def attend(
  q: Array, k: Array, v: Array, context: AttentionContext, scale: float, cache: LayerCache | None
) -> tuple[Array, LayerCache | None]:
  """softmax(q k^T * scale, masked) v, with grouped key/value heads and an optional cache.

  q: [b, s, h, hd]; k, v: [b, s, kv, hd] for this call's tokens. With a cache, k and v are written at
  `context.write_index` and the queries attend to the whole cache. Returns ([b, s, h, hd], updated cache).
  Scores and softmax are float32 whatever the compute dtype; masked scores are the most negative float32
  rather than -inf, so a query with no visible key (a padding token) gets finite, ignorable output instead
  of NaNs that would leak into gradients.
  """
  if cache is not None:
    assert context.write_index is not None  # attention_context sets it whenever there is a cache
    k = jax.lax.dynamic_update_slice_in_dim(cache.keys, k.astype(cache.keys.dtype), context.write_index, axis=1)
    v = jax.lax.dynamic_update_slice_in_dim(cache.values, v.astype(cache.values.dtype), context.write_index, axis=1)
    cache = LayerCache(k, v)
  b, s, h, hd = q.shape
  kv = k.shape[2]
  # Query head i uses key/value head i // (h // kv), as in Hugging Face's `repeat_kv`.
  q = q.reshape(b, s, kv, h // kv, hd)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(q.dtype)).astype(jnp.float32) * scale
  scores = jnp.where(context.mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, h, hd).astype(q.dtype), cache
