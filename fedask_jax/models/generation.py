"""Autoregressive generation with a static key/value cache, compiled end to end, for evaluation.

One jitted function runs the prompt through the model once (prefill, filling cache slots 0..P-1) and then
a `lax.while_loop` of single-token steps (slots P, P+1, ...), each attending to the cache through the same
attention code as the uncached forward (`fedask_jax.models.layers.attend`). The cache holds
P + max_new_tokens slots, so shapes are static and one compilation serves every batch of the same shape.

Padding: prompts may be left-padded (the usual choice), right-padded, or mixed; `prompt_mask` marks the real
tokens. Padding slots are never attended to and positions count real tokens only, so every row generates
what it would generate alone and unpadded. The first new token is predicted at each row's last real token.

Decoding: greedy (temperature 0) or sampling from softmax(logits / temperature), the draw for step i using
`fold_in(key, i)`. No top-k/top-p.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedask_jax._checks import check_int

Array = jax.Array


def generate(
  model: nnx.Module,
  input_ids: Array,
  prompt_mask: Array | None = None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  key: Array | None = None,
  eos_token_id: int | None = None,
) -> Array:
  """New tokens after each prompt.

  Args:
    model: a `LlamaForCausalLM` or `GPT2LMHeadModel` (any model with `__call__(ids, mask, cache=)` and
      `init_cache`); adapters, if any, are used; dropout is off.
    input_ids: [b, P] int prompts.
    prompt_mask: [b, P], 1 for real tokens, 0 for padding (None: no padding). Every row needs a real token.
    max_new_tokens: N >= 1 tokens to generate.
    temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature).
    key: PRNG key, required when temperature > 0.
    eos_token_id: when given, a row stops at its first eos; its remaining tokens are eos_token_id, and the loop
      ends early once every row has stopped.

  Returns [b, N] int32 tokens. Call it from Python, not inside `jit`: it checks the inputs on the host
  and compiles (once per model structure and shape) by itself.
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids has shape {input_ids.shape}: expected [batch, prompt_len].")
  prompt_mask = jnp.ones(input_ids.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask).astype(bool)
  if prompt_mask.shape != input_ids.shape:
    raise ValueError(f"prompt_mask has shape {prompt_mask.shape}, input_ids {input_ids.shape}: they must be equal.")
  empty = np.flatnonzero(~np.asarray(prompt_mask).any(axis=1))
  if empty.size:
    raise ValueError(f"prompt rows {empty.tolist()} have no real token (prompt_mask all 0): every row needs one.")
  check_int("max_new_tokens", max_new_tokens, 1)
  if temperature < 0:
    raise ValueError(f"temperature={temperature}: must be >= 0 (0 is greedy decoding).")
  if temperature > 0 and key is None:
    raise ValueError(f"temperature={temperature} samples tokens: pass a PRNG key (jax.random.key(seed)).")
  config = getattr(model, "config", None)
  if config is None:
    raise ValueError(f"generate: {type(model).__name__} has no `config`; pass a LlamaForCausalLM or GPT2LMHeadModel.")
  limit = config.max_positions
  longest = int(np.asarray(prompt_mask).sum(axis=1).max()) + max_new_tokens
  if limit is not None and longest > limit:
    raise ValueError(
      f"a row would reach {longest} tokens (its prompt plus max_new_tokens={max_new_tokens}), beyond the "
      f"model's {limit} learned positions: shorten the prompt or generate fewer tokens."
    )
  key = jax.random.key(0) if key is None else key
  eval_model = nnx.view(model, deterministic=True, raise_if_not_found=False)
  graphdef, state = nnx.split(eval_model)
  return _generate(
    graphdef,
    state,
    input_ids,
    prompt_mask,
    key,
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    eos_token_id=eos_token_id,
  )


def _pick(logits: Array, key: Array, step: Array, temperature: float) -> Array:
  """logits [b, V] -> tokens [b]: argmax, or a sample from softmax(logits / temperature)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(jax.random.fold_in(key, step), logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "eos_token_id"))
def _generate(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  input_ids: Array,
  prompt_mask: Array,
  key: Array,
  *,
  max_new_tokens: int,
  temperature: float,
  eos_token_id: int | None,
) -> Array:
  model = nnx.merge(graphdef, state)
  b, p = input_ids.shape
  cache = model.init_cache(b, p + max_new_tokens)
  logits, cache = model(input_ids, prompt_mask, cache=cache)
  last_real = jnp.max(jnp.where(prompt_mask, jnp.arange(p), -1), axis=1)
  first = _pick(logits[jnp.arange(b), last_real], key, jnp.int32(0), temperature)
  fill = 0 if eos_token_id is None else eos_token_id
  tokens = jnp.full((b, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
  done = jnp.zeros((b,), bool) if eos_token_id is None else first == eos_token_id

  def cond(carry):
    step, _, _, _, done = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, previous, cache, tokens, done = carry
    logits, cache = model(previous[:, None], jnp.ones((b, 1), bool), cache=cache)
    token = _pick(logits[:, 0], key, step, temperature)
    if eos_token_id is not None:
      token = jnp.where(done, eos_token_id, token)
      done = done | (token == eos_token_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    return step + 1, token, cache, tokens, done

  carry = (jnp.int32(1), first, cache, tokens, done)
  return jax.lax.while_loop(cond, body, carry)[3]
