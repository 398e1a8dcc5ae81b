"""fedask-alt (ours, design.md section 1): FedASK whose frozen factor alternates between rounds.

Odd rounds t = 1, 3, ... train lora_b (the paper's B) with lora_a frozen; even rounds train lora_a (the paper's
A) with lora_b frozen; with or without DP. Round 1 must train b: PEFT initialises b = 0, so the gradient of a
vanishes until b moves. Each round noises one factor only (no quadratic noise term), the aggregate
`sum_k w_k a_k b_k` still has rank <= r with one factor shared (so the sketch is exact, as in FedASK), and,
unlike FedASK under DP, whose reconstructed a stays in the column space of the initial a, both subspaces move.
Whether that helps is an experiment, not a claim. Layout: a = lora_a [in, r], b = lora_b [r, out].
"""

from __future__ import annotations

from fedask_jax.strategies.base import Strategy, Trained, shared_start
from fedask_jax.strategies.fedask import check_oversample, sketch_aggregate
from fedask_jax.strategies.fedavg import no_state


def alternate(round_index: int, private: bool) -> Trained:
  """lora_b in odd rounds, lora_a in even rounds (1-based); `private` does not change the schedule."""
  del private
  if not isinstance(round_index, int) or round_index < 1:
    raise ValueError(f"round_index={round_index!r}: rounds are numbered from 1 (a Python int).")
  return "b" if round_index % 2 == 1 else "a"


def fedask_alt(oversample: int = 2, certify: bool = True) -> Strategy:
  """fedask-alt with sketch oversampling p = `oversample` (see `fedask.fedask`)."""
  aggregate = sketch_aggregate(check_oversample(oversample), certify)
  return Strategy(name="fedask-alt", trained=alternate, init=no_state, client_start=shared_start,
                  gradient_correction=None, aggregate=aggregate)
