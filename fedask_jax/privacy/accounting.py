"""Privacy accounting for client-level DP-SGD through `dp_accounting` (design.md section 4).

Guarantee: example-level (epsilon, delta)-DP of each client's local dataset under add/remove-one neighbours
(`dp_accounting`'s default relation), against a server and clients that see every message; the sketches and
aggregates are post-processing (paper Theorem 1). One DP step is a Poisson-subsampled Gaussian mechanism with
rate q and noise multiplier sigma (noise std sigma * C on a sum of gradients clipped to C); a client's steps
compose, `dp_steps` of them over a run.

Accountants: "rdp" (Renyi DP, `dp_accounting.rdp.RdpAccountant` with its default orders) and "pld" (privacy
loss distributions, `dp_accounting.pld.PLDAccountant`, value discretisation 1e-4, pessimistic): PLD is
tighter (smaller epsilon for the same sigma), RDP faster.
"""

from __future__ import annotations

import math

import dp_accounting

from fedask_jax._checks import check_choice, check_int, check_real

ACCOUNTANTS = ("rdp", "pld")
PARTICIPATION = ("worst_case", "expected")

# The calibrated sigma is within this relative distance of the smallest sigma meeting the target (design:
# 0.5%; 0.1% leaves room for the accountants' own numerical noise).
_CALIBRATION_RTOL = 1e-3
# Outside [1/64, 2^20] the RDP/PLD computations lose accuracy or the target is degenerate (see calibrate_noise).
_SIGMA_RANGE = (2.0**-6, 2.0**20)


def _check_accountant(accountant: str) -> None:
  check_choice("accountant", accountant, ACCOUNTANTS, what="unknown accountant")


def _check_common(delta: float, sample_rate: float, steps: int) -> None:
  check_real("delta", delta, 0, 1, lo_open=True, hi_open=True, what="delta",
             hint=", and well below 1 / (examples per client), e.g. 1e-5")
  check_real("sample_rate", sample_rate, 0, 1, lo_open=True, what="the Poisson sampling rate q",
             hint=" (q = batch_size / examples per client)")
  check_int("steps", steps, 1, what="the number of DP steps", hint=" (see dp_steps)")


def dp_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
  """`steps` compositions of the Poisson-subsampled Gaussian mechanism (rate q, noise multiplier sigma)."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)


def make_accountant(accountant: str = "rdp") -> dp_accounting.PrivacyAccountant:
  """A fresh `dp_accounting` accountant by name ("rdp" or "pld"), add/remove-one neighbours."""
  _check_accountant(accountant)
  if accountant == "rdp":
    return dp_accounting.rdp.RdpAccountant()
  return dp_accounting.pld.PLDAccountant()


def epsilon_spent(
    noise_multiplier: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
  """Epsilon at `delta` after `steps` DP-SGD steps with Poisson rate q and noise multiplier sigma."""
  _check_accountant(accountant)
  _check_common(delta, sample_rate, steps)
  check_real("noise_multiplier", noise_multiplier, 0, what="sigma", hint=" (0 gives epsilon = inf)")
  return float(make_accountant(accountant).compose(dp_event(noise_multiplier, sample_rate, steps))
               .get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
  """The smallest noise multiplier sigma whose epsilon at `delta` is <= `target_epsilon` (within 0.1%).

  Uses `dp_accounting.calibrate_dp_mechanism` (Brent's method, guaranteed to return a sigma that meets the
  target). Its tolerance is absolute, so a doubling/halving search first brackets sigma in [lo, 2 lo] and the
  tolerance is set to 0.1% of lo, a relative guarantee whatever sigma's scale. Raises ValueError when the
  target is met even at sigma = 1/64 (a target so loose that accounting there is unreliable) or missed at
  sigma = 2^20.
  """
  _check_accountant(accountant)
  _check_common(delta, sample_rate, steps)
  check_real("target_epsilon", target_epsilon, 0, lo_open=True, what="the privacy target",
             hint=" (the paper uses 1, 3, 6)")

  def epsilon(sigma: float) -> float:
    return epsilon_spent(sigma, delta, sample_rate, steps, accountant)

  if epsilon(1.0) > target_epsilon:
    lo, hi = 1.0, 2.0
    while epsilon(hi) > target_epsilon:
      if hi >= _SIGMA_RANGE[1]:
        raise ValueError(
            f"target_epsilon={target_epsilon!r} is not met even at noise multiplier {hi:g} "
            f"(delta={delta}, q={sample_rate}, steps={steps}): raise the target or lower q or steps.")
      lo, hi = hi, 2 * hi
  else:
    lo, hi = 0.5, 1.0
    while epsilon(lo) <= target_epsilon:
      if lo <= _SIGMA_RANGE[0]:
        raise ValueError(
            f"target_epsilon={target_epsilon!r} is met even at noise multiplier {lo:g} "
            f"(delta={delta}, q={sample_rate}, steps={steps}): this target gives almost no privacy; lower it.")
      lo, hi = lo / 2, lo
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(accountant),
      lambda sigma: dp_event(sigma, sample_rate, steps),
      target_epsilon,
      delta,
      dp_accounting.ExplicitBracketInterval(lo, hi),
      tol=_CALIBRATION_RTOL * lo,
  ))


def dp_steps(
    rounds: int, local_steps: int, clients_per_round: int, num_clients: int, participation: str = "worst_case") -> int:
  """Number of DP steps a client's data go through over a run (design.md section 4).

  "worst_case" (default, rigorous): every round may include the client, steps = rounds x local_steps.
  "expected" (the official code's heuristic, NOT a guarantee: it under-states epsilon):
  steps = ceil(rounds x local_steps x clients_per_round / num_clients), the expected participation.
  """
  for name, value in [("rounds", rounds), ("local_steps", local_steps), ("clients_per_round", clients_per_round),
                      ("num_clients", num_clients)]:
    check_int(name, value, 1)
  if clients_per_round > num_clients:
    raise ValueError(
        f"clients_per_round={clients_per_round} exceeds num_clients={num_clients}: sample at most "
        f"{num_clients} clients per round.")
  check_choice("participation", participation, PARTICIPATION, what="unknown participation model")
  if participation == "worst_case":
    return rounds * local_steps
  return math.ceil(rounds * local_steps * clients_per_round / num_clients)


def overflow_delta(overflow_prob: float, steps: int, epsilon: float) -> float:
  """Extra delta for truncated Poisson batches: (1 + e^epsilon) x steps x overflow_prob.

  The fixed-capacity sampler (`fedask_jax.privacy.sampling`) equals Poisson sampling except when a step's batch
  overflows; over `steps` steps that happens with probability eta <= steps x overflow_prob, which bounds the
  total variation distance between the two mechanisms, and an (epsilon, delta)-DP mechanism within total
  variation eta of another makes that one (epsilon, delta + (1 + e^epsilon) eta)-DP.
  """
  check_real("overflow_prob", overflow_prob, 0, 1, what="a probability")
  check_int("steps", steps, 1, what="the number of DP steps")
  check_real("epsilon", epsilon, 0, what="epsilon")
  return (1.0 + math.exp(epsilon)) * steps * overflow_prob
