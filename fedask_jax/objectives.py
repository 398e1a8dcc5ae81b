"""Training and evaluation objectives shared by the simulation (per-example losses for DP-SGD) and the runner.

`causal_lm_loss` is next-token cross-entropy restricted to target tokens: the logits at position t predict
token t+1, so logits[..., :-1, :] are scored against input_ids[..., 1:] with weights loss_mask[..., 1:]
(`fedask_jax.data.encoding`: the loss mask marks the tokens to predict, i.e. the response and its EOS).

Only the target tokens' logits count, so the LM head can run at those positions alone (`response_positions`,
then the model's `logit_positions` and `response_loss`): a fixed capacity P of positions per example keeps the
shapes static, and the head's FLOPs and the logits' memory scale with P instead of the sequence length L.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedask_jax._checks import check_int

Array = jax.Array


class CausalLMLoss(NamedTuple):
  """per_example: [...] mean cross-entropy over each example's targets (0 for an example without targets);
  token_mean: [] mean over all target tokens of all examples (long answers weigh more)."""

  per_example: Array
  token_mean: Array


def _weighted_loss(nll: Array, weights: Array) -> CausalLMLoss:
  """Per-example and token means of the cross-entropies nll [..., T] with weights [..., T] (0 or 1)."""
  total = jnp.sum(nll * weights, axis=-1)
  count = jnp.sum(weights, axis=-1)
  return CausalLMLoss(
    per_example=total / jnp.maximum(count, 1.0), token_mean=jnp.sum(total) / jnp.maximum(jnp.sum(count), 1.0)
  )


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
      "need logits [..., L, V] with input_ids and loss_mask [..., L]."
    )
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[..., :-1, :].astype(jnp.float32), input_ids[..., 1:])
  weights = loss_mask[..., 1:].astype(jnp.float32)
  return _weighted_loss(nll, weights)


def max_targets(loss_mask: Any) -> int:
  """The largest number of target tokens of any example (host side, e.g. on the encoded data set): the least
  capacity for `response_positions`. loss_mask [..., L]; as `causal_lm_loss`, the first position is no target."""
  return int(np.max(np.sum(np.asarray(loss_mask)[..., 1:] != 0, axis=-1), initial=0))


#: `response_capacity` rounds up to a multiple of this: data sets whose longest responses differ by a few tokens
#: (another data.max_train_examples, another seed's split) get the same shapes.
CAPACITY_MULTIPLE = 8


def response_capacity(loss_mask: Any) -> int:
  """A static capacity for `response_positions` from the data (host side): `max_targets(loss_mask)` rounded up
  to a multiple of `CAPACITY_MULTIPLE`, at most L - 1 (every position that predicts a token) and at least 1.
  Any capacity from `max_targets` up gives the same loss; the rounding only keeps shapes stable."""
  mask = np.asarray(loss_mask)
  rounded = -(-max_targets(mask) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
  return max(1, min(rounded, mask.shape[-1] - 1))


def response_positions(loss_mask: Array, capacity: int) -> tuple[Array, Array]:
  """The positions whose logits predict a target token, padded to a fixed `capacity` P: (positions [..., P]
  int32, weights [..., P] float32).

  Position t (0 <= t < L - 1) predicts token t + 1, so the positions are the t with loss_mask[t + 1], in order;
  the slots beyond an example's count hold position 0 with weight 0. `capacity` (static) must be at least every
  example's number of targets (`max_targets`): under jit the extra ones cannot raise, and would be left out.
  """
  capacity = check_int(
    "capacity",
    capacity,
    1,
    what="the response capacity (positions per example)",
    hint="; use max_targets(loss_mask) of the data",
  )
  targets = loss_mask[..., 1:] != 0
  flat = targets.reshape(-1, targets.shape[-1])
  positions = jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=0)[0])(flat)
  count = jnp.sum(flat, axis=-1, keepdims=True)
  weights = (jnp.arange(capacity) < count).astype(jnp.float32)
  shape = targets.shape[:-1] + (capacity,)
  return positions.astype(jnp.int32).reshape(shape), weights.reshape(shape)


def response_loss(logits: Array, input_ids: Array, positions: Array, weights: Array) -> CausalLMLoss:
  """`causal_lm_loss` from the logits at the target positions only.

  Args:
    logits: [..., P, V] the model's outputs at `positions` (`logit_positions`; computed in float32).
    input_ids: [..., L] int tokens.
    positions, weights: [..., P] from `response_positions(loss_mask, P)`.

  Returns:
    `CausalLMLoss` equal to `causal_lm_loss(full logits, input_ids, loss_mask)` whenever every example has at
    most P targets: the same cross-entropies, weights and normalisation, summed in another order.
  """
  if logits.shape[:-1] != positions.shape or positions.shape != weights.shape:
    raise ValueError(
      f"response_loss got logits {logits.shape}, positions {positions.shape}, weights {weights.shape}: need "
      f"logits [..., P, V] with positions and weights [..., P]."
    )
  labels = jnp.take_along_axis(input_ids, positions + 1, axis=-1)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return _weighted_loss(nll, weights)
