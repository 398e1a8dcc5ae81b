"""FedSA-LoRA (Guo et al., ICLR 2025): clients train both factors; the server averages and shares lora_a
(the paper's A, which it finds learns general knowledge) and every client keeps its own lora_b (the paper's B,
client-specific), never averaged into its local model.

State: each client's b, [num_clients, r, out] per layer, initialised to the global b (zero in PEFT's init)
and indexed by client id. A client starts its round from (global a, its own b). The global adapters keep
`b = sum_k w_k b_k` over the round's clients (the "mean B"), used for a single global evaluation;
`evaluation_adapters` gives both: each client's personalised adapters (global a with its own b) and the shared
ones.
Layout: a = lora_a [in, r], b = lora_b [r, out].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedask_jax.lora import Adapters, LoRAFactors
from fedask_jax.strategies.base import (
    ClientResult, Strategy, gather_clients, replicate, scatter_clients, weighted_mean)
from fedask_jax.strategies.fedavg import train_both

Array = jax.Array


class FedSAState(NamedTuple):
  """client_b: {layer: [num_clients, r, out]}, every client's own lora_b."""

  client_b: dict[str, Array]


def init(adapters: Adapters, num_clients: int) -> FedSAState:
  """Every client's b starts at the global b."""
  return FedSAState(replicate({name: f.b for name, f in adapters.items()}, num_clients))


def client_start(state: FedSAState, global_adapters: Adapters, client_id: Array) -> tuple[Adapters, tuple[()]]:
  """The shared a and the client's own b."""
  own_b = gather_clients(state.client_b, client_id)
  return {name: LoRAFactors(f.a, own_b[name]) for name, f in global_adapters.items()}, ()


def aggregate(state: FedSAState, global_adapters: Adapters, results: ClientResult, weights: Array,
              client_ids: Array, key: Array) -> tuple[Adapters, FedSAState, dict[str, Array]]:
  """a = weighted mean of the clients' a; each sampled client's b stored; global b = their weighted mean."""
  del global_adapters, key
  mean = weighted_mean(results.adapters, weights)
  client_b = scatter_clients(state.client_b, client_ids, {name: f.b for name, f in results.adapters.items()})
  return mean, FedSAState(client_b), {}


def evaluation_adapters(state: FedSAState, global_adapters: Adapters,
                        client_ids: Array) -> tuple[Adapters, Adapters]:
  """The two models FedSA-LoRA is evaluated with: (personalised [K, ...], shared).

  personalised: for each of `client_ids` [K], the global a (broadcast) with the client's own b;
  shared: the global adapters, whose b is the weighted mean of the last round's clients' b.
  """
  own_b = gather_clients(state.client_b, client_ids)
  k = client_ids.shape[0]
  personalised = {name: LoRAFactors(jnp.broadcast_to(f.a, (k, *f.a.shape)), own_b[name])
                  for name, f in global_adapters.items()}
  return personalised, global_adapters


def fedsa_lora() -> Strategy:
  """FedSA-LoRA: both factors trained, lora_a averaged and shared, lora_b kept per client."""
  return Strategy(name="fedsa-lora", trained=train_both, init=init, client_start=client_start,
                  gradient_correction=None, aggregate=aggregate)
