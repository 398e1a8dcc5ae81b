"""FedSA-LoRA (Guo et al., ICLR 2025): clients train both factors; the server averages and shares lora_a
(which the paper finds learns general knowledge) and every client keeps its own lora_b (client-specific),
never averaged into its local model.

State: each client's lora_b, [num_clients, r, out] per layer, initialised to the global lora_b (zero in PEFT's
init) and indexed by client id. A client starts its round from (global lora_a, its own lora_b). The global
adapters keep `lora_b = sum_k w_k lora_b_k` over the round's clients (the "mean B"), used for a single global
evaluation; `evaluation_adapters` gives both: each client's personalised adapters (global lora_a with its own
lora_b) and the shared ones.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedask_jax.adapters import Adapters, LoRAFactors
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


class FedSAState(NamedTuple):
  """client_b: {layer: [num_clients, r, out]}, every client's own lora_b."""

  client_b: dict[str, Array]


def init(adapters: Adapters, num_clients: int) -> FedSAState:
  """Every client's lora_b starts at the global lora_b."""
  return FedSAState(replicate({name: f.lora_b for name, f in adapters.items()}, num_clients))


def client_start(state: FedSAState, global_adapters: Adapters, client_id: Array) -> tuple[Adapters, tuple[()]]:
  """The shared lora_a and the client's own lora_b."""
  own_b = gather_clients(state.client_b, client_id)
  return {name: LoRAFactors(f.lora_a, own_b[name]) for name, f in global_adapters.items()}, ()


def server_update(
  state: FedSAState, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array, key: Array
) -> tuple[Adapters, FedSAState, dict[str, Array]]:
  """lora_a = weighted mean of the clients' lora_a; each sampled client's lora_b stored; global lora_b = their
  weighted mean."""
  del global_adapters, key
  mean = weighted_mean(results.adapters, weights)
  client_b = scatter_clients(state.client_b, client_ids, {name: f.lora_b for name, f in results.adapters.items()})
  return mean, FedSAState(client_b), {}


def evaluation_adapters(state: FedSAState, global_adapters: Adapters, client_ids: Array) -> tuple[Adapters, Adapters]:
  """The two models FedSA-LoRA is evaluated with: (personalised [K, ...], shared).

  personalised: for each of `client_ids` [K], the global lora_a (broadcast) with the client's own lora_b;
  shared: the global adapters, whose lora_b is the weighted mean of the last round's clients' lora_b.
  """
  own_b = gather_clients(state.client_b, client_ids)
  k = client_ids.shape[0]
  personalised = {
    name: LoRAFactors(jnp.broadcast_to(f.lora_a, (k, *f.lora_a.shape)), own_b[name])
    for name, f in global_adapters.items()
  }
  return personalised, global_adapters


def fedsa_lora() -> Strategy:
  """FedSA-LoRA: both factors trained, lora_a averaged and shared, lora_b kept per client."""
  return Strategy(
    name="fedsa-lora",
    trained=train_both,
    init=init,
    client_start=client_start,
    gradient_correction=None,
    server_update=server_update,
  )
