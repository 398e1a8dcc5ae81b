"""The interface every federated strategy implements, and the pytree helpers strategies share.

A strategy is a `Strategy`: a named bundle of pure functions (optax's `GradientTransformation`, FedJAX's
algorithms), with every piece of state explicit. What `fedask_jax.simulation` does with it in round t
(1-based), for K sampled clients with weights w_k (proportional to client sizes, normalised to sum 1 over the
clients whose update is valid):

1. `trained(t, private)` (host side, static): which LoRA factors clients train this round, "lora_a", "lora_b"
   or "both" (factor names: `fedask_jax.lora`); the other factor stays bit-identical during local training.
   Static so that the compiled round computes (and, under DP, clips and noises) gradients of the trained
   factors only.
2. `client_start(state, global_adapters, client_id) -> (start_adapters, context)`, once per client: where its
   local training starts (the global adapters, or with its own factor for personalised methods) and a
   per-client context for the local objective (e.g. SCAFFOLD's correction c - c_i).
3. `gradient_correction(context, params, start_params) -> correction` (or None): a term added to the
   client's (privatised) gradient of the trained factors at every local step, e.g. FedProx's
   mu (theta - theta_global). It depends on the client's data only through already-privatised quantities,
   so under DP it is post-processing and is neither clipped nor noised.
4. `server_update(state, global_adapters, results, weights, client_ids, key) -> (adapters, state, metrics)`:
   the server's step from the K clients' results (`ClientResult`, stacked on a leading [K] axis), with normalised
   weights [K] (sum 1, or all zero when no client is valid).

`init(adapters, num_clients) -> state` builds the strategy's server state; per-client state (FedSA-LoRA's
lora_b, SCAFFOLD's c_i) lives there with a leading [num_clients] axis, indexed by client id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedask_jax._checks import check_int
from fedask_jax.adapters import Adapters, Trained
from fedask_jax.numerics import compute_dtype, einsum

Array = jax.Array


class ClientResult(NamedTuple):
  """What one client's local training hands to the server (a leading [K] axis after the round's vmap).

  Attributes:
    adapters: the client's final adapters, both factors (the frozen one equal to its start).
    mean_gradient: trained subset (frozen factor None); the mean over local steps of the gradient the client
      computed, privatised under DP, before the strategy's `gradient_correction` was added.
  """

  adapters: Adapters
  mean_gradient: Adapters


class Strategy(NamedTuple):
  """A federated method as pure functions (module docstring gives the protocol).

  name: registry name. trained: (round t >= 1, private) -> "lora_a" | "lora_b" | "both", static. init: (global
  adapters, num_clients) -> strategy state. client_start: (state, global adapters, client id []) -> (start
  adapters, context). gradient_correction: (context, trained params, trained start params) -> trained-subset
  correction, or None for plain local training. server_update: (state, global adapters, ClientResult [K],
  normalised weights [K], client ids [K], key) -> (new global adapters, new state, {metric name: array}).
  """

  name: str
  trained: Callable[[int, bool], Trained]
  init: Callable[[Adapters, int], Any]
  client_start: Callable[[Any, Adapters, Array], tuple[Adapters, Any]]
  gradient_correction: Callable[[Any, Adapters, Adapters], Adapters] | None
  server_update: Callable[[Any, Adapters, ClientResult, Array, Array, Array], tuple[Adapters, Any, dict[str, Array]]]


def train_both(round_index: int, private: bool) -> Trained:
  """`trained` of strategies that train both factors every round, with or without DP."""
  del round_index, private
  return "both"


def no_state(adapters: Adapters, num_clients: int) -> tuple[()]:
  """`init` of strategies without server state."""
  del adapters, num_clients
  return ()


def shared_start(state: Any, global_adapters: Adapters, client_id: Array) -> tuple[Adapters, tuple[()]]:
  """`client_start` of strategies without per-client state: start from the global adapters, no context."""
  del state, client_id
  return global_adapters, ()


def weighted_mean(stacked: Any, weights: Array) -> Any:
  """sum_k w_k x_k for every leaf [K, ...] of `stacked`, in float32 or wider, cast back.

  weights [K] normalised (sum 1: the round's weights), so this is the weighted mean.
  """

  def mean(x):
    dtype = compute_dtype(x)
    return einsum("k,k...->...", weights.astype(dtype), x.astype(dtype)).astype(x.dtype)

  return jax.tree.map(mean, stacked)


def gather_clients(per_client: Any, client_ids: Array) -> Any:
  """Rows `client_ids` of per-client state whose leaves are [num_clients, ...]."""
  return jax.tree.map(lambda x: x[client_ids], per_client)


def scatter_clients(per_client: Any, client_ids: Array, values: Any) -> Any:
  """Per-client state with rows `client_ids` (distinct) replaced by `values` [K, ...]."""
  return jax.tree.map(lambda x, v: jnp.asarray(x).at[client_ids].set(v.astype(x.dtype)), per_client, values)


def replicate(tree: Any, num_clients: int) -> Any:
  """`tree` broadcast to a leading [num_clients] axis: the initial per-client state."""
  num_clients = check_int("num_clients", num_clients, 1, what="the number of clients")
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), tree)
