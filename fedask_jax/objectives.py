"""Training and evaluation objectives shared by the simulation (per-example losses for DP-SGD) and the runner.

`causal_lm_loss` is next-token cross-entropy restricted to target tokens: the logits at position t predict
token t+1, so logits[..., :-1, :] are scored against input_ids[..., 1:] with weights loss_mask[..., 1:]
(`fedask_jax.data.encoding`: the loss mask marks the tokens to predict, i.e. the response and its EOS).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class CausalLMLoss(NamedTuple):
  """per_example: [...] mean cross-entropy over each example's targets (0 for an example without targets);
  token_mean: [] mean over all target tokens of all examples (long answers weigh more)."""

  per_example: Array
  token_mean: Array


def causal_lm_loss(logits: Array, input_ids: Array, loss_mask: Array) -> CausalLMLoss:
  """Next-token cross-entropy on the target tokens.

  Args:
    logits: [..., L, V] the model's outputs at every position (any float dtype; computed in float32).
    input_ids: [..., L] int tokens.
    loss_mask: [..., L] bool or {0, 1}: True at target tokens (the token at t is predicted from logits t-1).

  Returns:
    `CausalLMLoss(per_example [...], token_mean [])`, with
    per_example = sum_t m[t+1] CE(logits[t], ids[t+1]) / max(1, sum_t m[t+1]) and token_mean the same ratio
    summed over all examples. The per-example mean is what DP-SGD clips (one gradient per example).
  """
  if logits.shape[:-1] != input_ids.shape or input_ids.shape != loss_mask.shape:
    raise ValueError(
        f"causal_lm_loss got logits {logits.shape}, input_ids {input_ids.shape}, loss_mask {loss_mask.shape}: "
        "need logits [..., L, V] with input_ids and loss_mask [..., L].")
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits[..., :-1, :].astype(jnp.float32), input_ids[..., 1:])
  weights = loss_mask[..., 1:].astype(jnp.float32)
  total = jnp.sum(nll * weights, axis=-1)
  count = jnp.sum(weights, axis=-1)
  return CausalLMLoss(
      per_example=total / jnp.maximum(count, 1.0),
      token_mean=jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0))
