"""The server's step of a round (`server_step`): the strategy's update, leaving out the clients whose result
is not finite.

Faults are handled inside the compiled round (no host round trip): client k is valid when every leaf of its
result is finite (`finite_clients`). An invalid client (NaN or Inf, e.g. a diverged local run) gets weight 0,
the valid clients' weights are renormalised to sum to 1, and its result is replaced by its start
(`strategy.client_start`'s adapters and a zero mean gradient) with `jnp.where` before the strategy sees it, so
that nothing non-finite enters a weighted sum (NaN * 0 is NaN) or the strategy's per-client state (FedSA-LoRA
keeps that client's lora_b; SCAFFOLD keeps that client's control variate c_k, and so c, as if it had not been
sampled). A round without a valid client returns the whole state (adapters and strategy state) unchanged, with
metric `skipped` 1. Under DP a NaN example alone does not get this far: the clipping zeroes non-finite
per-example gradients (jax_privacy's nan_safe), so its client stays valid.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedask_jax.adapters import Adapters
from fedask_jax.numerics import normalise_weights
from fedask_jax.strategies.base import ClientResult, Strategy

Array = jax.Array


class ServerState(NamedTuple):
  """adapters: the global adapters; strategy_state: the strategy's state (per-client parts [N, ...])."""

  adapters: Adapters
  strategy_state: Any


def finite_clients(results: ClientResult) -> Array:
  """valid [K] bool: every entry of client k's result (its adapters and mean gradient, leaves [K, ...]) is
  finite."""
  finite = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(results)]
  return functools.reduce(jnp.logical_and, finite)


def server_step(
  strategy: Strategy, state: ServerState, results: ClientResult, weights: Array, client_ids: Array, key: Array
) -> tuple[ServerState, dict[str, Array]]:
  """`strategy.server_update` on the clients' results [K] (pure), leaving out the clients whose result is not
  finite (module docstring): weights w_k valid_k / sum_j w_j valid_j, invalid results replaced by the client's
  start, and the state returned unchanged when no client is valid.

  weights [K] non-negative, any scale (normalised here: the one place on the round's path); key: the server's
  key (`server_key(round_key)` in a round). Returns (new state, metrics): the strategy's metrics plus
  client_valid [K] bool, invalid_clients [] int32 and skipped [] int32 (1: no valid client, state unchanged;
  the strategy's metrics are then meaningless).
  """
  valid = finite_clients(results)
  weights = normalise_weights(jnp.where(valid, jnp.asarray(weights, jnp.float32), 0.0))
  starts, _ = jax.vmap(strategy.client_start, in_axes=(None, None, 0))(state.strategy_state, state.adapters, client_ids)
  # A select, not a multiplication by valid_k: NaN * 0 is NaN.
  keep = lambda x, start: jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, start)
  results = ClientResult(
    jax.tree.map(keep, results.adapters, starts),
    jax.tree.map(lambda g: keep(g, jnp.zeros_like(g)), results.mean_gradient),
  )
  adapters, strategy_state, metrics = strategy.server_update(
    state.strategy_state, state.adapters, results, weights, client_ids, key
  )
  adapters = jax.tree.map(lambda new, old: new.astype(old.dtype), adapters, state.adapters)
  skipped = ~jnp.any(valid)
  new_state = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), ServerState(adapters, strategy_state), state)
  return new_state, dict(
    metrics, client_valid=valid, invalid_clients=jnp.sum(~valid, dtype=jnp.int32), skipped=skipped.astype(jnp.int32)
  )
