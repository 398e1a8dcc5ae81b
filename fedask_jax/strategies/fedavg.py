"""FedAvg on LoRA factors (McMahan et al. 2017): clients train both factors, the server averages each factor
separately with the client weights, `lora_a = sum_k w_k lora_a_k`, `lora_b = sum_k w_k lora_b_k`.

This is the aggregation that FedASK corrects: `mean(lora_a_k) mean(lora_b_k) != mean(lora_a_k lora_b_k)`
(docs/design.md, section 1.2).
"""

from __future__ import annotations

from typing import Any

import jax

from fedask_jax.adapters import Adapters
from fedask_jax.strategies.base import ClientResult, Strategy, no_state, shared_start, train_both, weighted_mean

Array = jax.Array


def average_factors(
  state: Any, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array, key: Array
) -> tuple[Adapters, Any, dict[str, Array]]:
  """Weighted mean of each factor over the K clients' adapters [K, ...]."""
  del global_adapters, client_ids, key
  return weighted_mean(results.adapters, weights), state, {}


def fedavg() -> Strategy:
  """FedAvg: both factors trained locally and averaged separately (weighted by client size)."""
  return Strategy(
    name="fedavg",
    trained=train_both,
    init=no_state,
    client_start=shared_start,
    gradient_correction=None,
    server_update=average_factors,
  )
