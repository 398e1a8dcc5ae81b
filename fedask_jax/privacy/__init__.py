"""Differential privacy for federated LoRA: per-example clipping, the B-space and W-space DP-SGD mechanisms,
Poisson sampling over fixed-capacity batches, and accounting through `dp_accounting` (docs/design.md,
sections 1.3 and 4).

Factor names (lora_a, lora_b) and the paper's notation: `fedask_jax.lora`.

Privacy-relevant defaults, stated once: clipping is per example by the global L2 norm over the trained
parameters (B-space, `dp_gradient`) or over dl/dW of all adapted layers (W-space, `wspace_dp_gradient`); noise
std sigma * C on the clipped sum; normalisation by the expected batch size q n; Poisson sampling with rate q per
local step, truncated to a fixed capacity (`batch_capacity`, overflow cost in `overflow_delta`); add/remove-one
neighbours; accountant "pld" unless "rdp" is asked for; participation "sampled" (each round includes the client
with probability K / N, uniform independent client sampling) when K < N clients take part per round, "worst_case"
(every round) when K = N or asked for, and the "expected" heuristic (not a guarantee) only when asked for. The
modules: `clipping`, `mechanisms`, `sampling`, `accounting`, and `planning` (a run's plan: `plan_privacy`).
"""

from fedask_jax.privacy.accounting import (
  ACCOUNTANTS,
  DEFAULT_ACCOUNTANT,
  PARTICIPATION,
  DPSchedule,
  calculate,
  calibrate_noise,
  epsilon_spent,
  overflow_delta,
  schedule_pld,
  schedule_rdp,
)
from fedask_jax.privacy.clipping import clip_per_example, clip_scale
from fedask_jax.privacy.mechanisms import (
  FROZEN_SIDES,
  DPStats,
  check_dp_arguments,
  check_noise_multiplier,
  dp_gradient,
  gaussian_noise,
  projected_noise,
  wspace_dp_gradient,
  wspace_sq_norms,
)
from fedask_jax.privacy.planning import PrivacyPlan, plan_privacy
from fedask_jax.privacy.sampling import DEFAULT_OVERFLOW_PROB, batch_capacity, overflow_probability, poisson_sample
