"""FedAvg on LoRA factors (McMahan et al. 2017): clients train both factors, the server averages each factor
separately with the client weights, `a = sum_k w_k a_k`, `b = sum_k w_k b_k`.

This is the aggregation that FedASK corrects: `mean(a_k) mean(b_k) != mean(a_k b_k)` (design.md section 1).
Layout: a = lora_a [in, r], b = lora_b [r, out].
"""

from __future__ import annotations

from typing import Any

import jax

from fedask_jax.lora import Adapters
from fedask_jax.strategies.base import ClientResult, Strategy, Trained, shared_start, weighted_mean

Array = jax.Array


def train_both(round_index: int, private: bool) -> Trained:
  """Both factors every round, with or without DP."""
  del round_index, private
  return "both"


def no_state(adapters: Adapters, num_clients: int) -> tuple[()]:
  """`init` of strategies without server state."""
  del adapters, num_clients
  return ()


def average(state: Any, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array,
            key: Array) -> tuple[Adapters, Any, dict[str, Array]]:
  """Weighted mean of each factor over the K clients' adapters [K, ...]."""
  del global_adapters, client_ids, key
  return weighted_mean(results.adapters, weights), state, {}


def fedavg() -> Strategy:
  """FedAvg: both factors trained locally and averaged separately (weighted by client size)."""
  return Strategy(name="fedavg", trained=train_both, init=no_state, client_start=shared_start,
                  gradient_correction=None, aggregate=average)
