"""FFA-LoRA (Sun et al., ICLR 2024): lora_a stays frozen at its random initialisation forever; clients train
lora_b only and the server averages it, `lora_b = sum_k w_k lora_b_k`.

With a shared frozen lora_a, `sum_k w_k lora_a lora_b_k = lora_a (sum_k w_k lora_b_k)`, so averaging lora_b is
exact, and under DP the noise enters linearly (no quadratic term, docs/design.md, section 1.2); the price is that the
update never leaves the column space of the initial lora_a.
"""

from __future__ import annotations

from typing import Any

import jax

from fedask_jax.adapters import Adapters, LoRAFactors, Trained
from fedask_jax.strategies.base import ClientResult, Strategy, no_state, shared_start, weighted_mean

Array = jax.Array


def train_lora_b(round_index: int, private: bool) -> Trained:
  """lora_b only, every round."""
  del round_index, private
  return "lora_b"


def average_lora_b(
  state: Any, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array, key: Array
) -> tuple[Adapters, Any, dict[str, Array]]:
  """lora_b = weighted mean of the clients' lora_b; lora_a = the global lora_a, kept exactly (not re-averaged)."""
  del client_ids, key
  lora_b = weighted_mean({name: f.lora_b for name, f in results.adapters.items()}, weights)
  return {name: LoRAFactors(f.lora_a, lora_b[name]) for name, f in global_adapters.items()}, state, {}


def ffa_lora() -> Strategy:
  """FFA-LoRA: lora_a frozen at its initialisation, lora_b trained and averaged."""
  return Strategy(
    name="ffa-lora",
    trained=train_lora_b,
    init=no_state,
    client_start=shared_start,
    gradient_correction=None,
    server_update=average_lora_b,
  )
