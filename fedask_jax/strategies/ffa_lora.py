"""FFA-LoRA (Sun et al., ICLR 2024): lora_a stays frozen at its random initialisation forever; clients train
lora_b only and the server averages it, `b = sum_k w_k b_k`.

With a shared frozen a, `sum_k w_k a b_k = a (sum_k w_k b_k)`, so averaging b is exact, and under DP the noise
enters linearly (no quadratic term, design.md section 1); the price is that the update never leaves the column
space of the initial a. Layout: a = lora_a [in, r] (paper's A^T), b = lora_b [r, out] (paper's B^T).
"""

from __future__ import annotations

from typing import Any

import jax

from fedask_jax.lora import Adapters, LoRAFactors
from fedask_jax.strategies.base import ClientResult, Strategy, Trained, shared_start, weighted_mean
from fedask_jax.strategies.fedavg import no_state

Array = jax.Array


def train_b(round_index: int, private: bool) -> Trained:
  """lora_b only (the paper's B), every round."""
  del round_index, private
  return "b"


def average_b(state: Any, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array,
              key: Array) -> tuple[Adapters, Any, dict[str, Array]]:
  """b = weighted mean of the clients' b; a = the global a, kept exactly (not re-averaged)."""
  del client_ids, key
  b = weighted_mean({name: f.b for name, f in results.adapters.items()}, weights)
  return {name: LoRAFactors(f.a, b[name]) for name, f in global_adapters.items()}, state, {}


def ffa_lora() -> Strategy:
  """FFA-LoRA: lora_a frozen at its initialisation, lora_b trained and averaged."""
  return Strategy(name="ffa-lora", trained=train_b, init=no_state, client_start=shared_start,
                  gradient_correction=None, aggregate=average_b)
