"""fedask-alt (ours, docs/design.md, section 1.5): FedASK whose frozen factor alternates between rounds.

Odd rounds t = 1, 3, ... train lora_b with lora_a frozen; even rounds train lora_a with lora_b frozen; with or
without DP. Round 1 must train lora_b: PEFT initialises lora_b = 0, so the gradient of lora_a vanishes until
lora_b moves. Each round noises one factor only (no quadratic noise term), the aggregate
`sum_k w_k lora_a_k lora_b_k` still has rank <= r with one factor shared (so the sketch is exact, as in
FedASK), and, unlike FedASK under DP, whose reconstructed lora_a stays in the column space of the initial
lora_a, both subspaces move. Whether that helps is an experiment, not a claim.
"""

from __future__ import annotations

from fedask_jax.adapters import Trained
from fedask_jax.strategies.base import Strategy
from fedask_jax.strategies.fedask import CERTIFY_EVERY, sketch_strategy


def alternate(round_index: int, private: bool) -> Trained:
  """lora_b in odd rounds, lora_a in even rounds (1-based); `private` does not change the schedule."""
  del private
  return "lora_b" if round_index % 2 == 1 else "lora_a"


def fedask_alt(oversample: int = 2, certify_every: int = CERTIFY_EVERY, gauge: str = "balanced") -> Strategy:
  """fedask-alt with sketch oversampling p = `oversample`, the certificate every `certify_every` rounds and
  reconstruction `gauge` (see `fedask.fedask`); a gauge other than balanced holds the factor the next round
  freezes, the one trained this round (lora_a if both were), at the scale of the one frozen this round."""
  return sketch_strategy(
    "fedask-alt",
    alternate,
    oversample,
    certify_every,
    gauge,
    lambda trained: "lora_b" if trained == "lora_b" else "lora_a",
  )
