"""SCAFFOLD (Karimireddy et al., ICML 2020), option II, with server learning rate 1, on LoRA factors.

Server control c and client controls c_i (zero at the start) live on the trained factors (both). A client
starts from the global adapters x and adds the correction `c - c_i` to its gradient at every local step. After
tau steps ending at y_i, option II sets `c_i+ = c_i - c + (x - y_i) / (tau lr)`. With plain SGD (step
`y <- y - lr (g + c - c_i)`) that expression is exactly the mean of the client's raw gradients g over its local
steps, which is what we store (`ClientResult.mean_gradient`): identical to option II under SGD, and still in
gradient units under an adaptive optimiser (AdamW), where `(x - y_i) / (tau lr)` would be in update units
and would not match the gradient it corrects. The server sets `x <- sum_k w_k y_k` (learning rate 1) and
`c <- c + (1/N) sum_{k in S} (c_k+ - c_k)` (N clients in all, the paper's rule), so c stays the mean of all c_i.

Under DP the gradients are privatised, so c_i, c and the correction are post-processing: the correction is
added after clipping and noise and is not clipped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedask_jax.adapters import Adapters
from fedask_jax.strategies.base import (
  ClientResult,
  Strategy,
  gather_clients,
  replicate,
  scatter_clients,
  train_both,
  weighted_mean,
)

Array = jax.Array


class ScaffoldState(NamedTuple):
  """server_control: c, adapters-shaped; client_controls: every c_i, [num_clients, ...]."""

  server_control: Adapters
  client_controls: Adapters


def init(adapters: Adapters, num_clients: int) -> ScaffoldState:
  """c = c_i = 0."""
  zeros = jax.tree.map(jnp.zeros_like, adapters)
  return ScaffoldState(zeros, replicate(zeros, num_clients))


def client_start(state: ScaffoldState, global_adapters: Adapters, client_id: Array) -> tuple[Adapters, Adapters]:
  """Start from the global adapters; context = the correction c - c_i."""
  own = gather_clients(state.client_controls, client_id)
  return global_adapters, jax.tree.map(jnp.subtract, state.server_control, own)


def correction(context: Adapters, params: Adapters, start: Adapters) -> Adapters:
  """c - c_i on the trained factors (the context restricted to params' structure)."""
  del start
  return jax.tree.map(lambda p, c: c.astype(p.dtype), params, context)


def server_update(
  state: ScaffoldState, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array, key: Array
) -> tuple[Adapters, ScaffoldState, dict[str, Array]]:
  """x = sum_k w_k y_k; c_k <- mean gradient of client k; c += (1/N) sum_k (c_k+ - c_k).

  A client of weight 0 (left out of the round: `fedask_jax.simulation.server_step` zeroes the weight of a
  non-finite client) keeps its c_k, so it changes neither c_k nor c, as if it had not been sampled."""
  del global_adapters, key
  num_clients = jax.tree.leaves(state.client_controls)[0].shape[0]
  old = gather_clients(state.client_controls, client_ids)
  kept = lambda n, o: jnp.where((weights > 0).reshape((-1,) + (1,) * (o.ndim - 1)), n.astype(o.dtype), o)
  new = jax.tree.map(kept, results.mean_gradient, old)
  server_control = jax.tree.map(
    lambda c, n, o: c + jnp.sum(n.astype(c.dtype) - o, axis=0) / num_clients, state.server_control, new, old
  )
  client_controls = scatter_clients(state.client_controls, client_ids, new)
  return weighted_mean(results.adapters, weights), ScaffoldState(server_control, client_controls), {}


def scaffold() -> Strategy:
  """SCAFFOLD (option II, server learning rate 1): both factors trained with control-variate correction."""
  return Strategy(
    name="scaffold",
    trained=train_both,
    init=init,
    client_start=client_start,
    gradient_correction=correction,
    server_update=server_update,
  )
