"""Privacy accounting of a federated run's schedule through `dp_accounting` (docs/design.md, section 4.3).

Guarantee: example-level (epsilon, delta)-DP of each client's local dataset under add/remove-one neighbours
(`dp_accounting`'s default relation), against a server and clients that see every message, who took part in
each round included; the sketches and aggregates are post-processing (paper Theorem 1).

The mechanism, for one example of one client: a local step is the Poisson-subsampled Gaussian mechanism (rate q,
noise std sigma C on a sum of gradients clipped to C: noise multiplier sigma); a round in which the client takes
part is S such steps, each starting from the previous one's output; a round includes the client with probability
q_c = K / N (K of N clients drawn uniformly), R rounds. A run's schedule is one value, `DPSchedule(q, S, R, q_c,
participation)`; `epsilon_spent` and `calibrate_noise` work on it with either accountant, "rdp" (Renyi DP) or
"pld" (privacy loss distributions; the default).

Participation models:

- "sampled" (rigorous and tight): each round includes the client with probability q_c, independently. A round is
  then the mixture of the S steps M (with probability q_c) and an outcome that does not depend on the example,
  so, exactly, with D_S(alpha) the S steps' Renyi divergence (bounded by S times a step's) and PLD_S their
  privacy loss distribution::

      eps_round(alpha) = log(q_c exp((alpha - 1) D_S(alpha)) + 1 - q_c) / (alpha - 1)
      PLD_round = (1 - q_c) delta_0 + q_c PLD_S

  and R rounds compose adaptively. It needs client sampling that is uniform, independent of the data and of the
  earlier rounds, with a fresh key each round (`fedask_jax.simulation.sample_clients` with the round's key); the
  derivation and these conditions: docs/design.md, section 4.3.
- "worst_case" (rigorous for any client selection, even adversarial): every round may include the client,
  R x S steps. Equal to "sampled" with q_c = 1 (the same computation).
- "expected" (the official code's heuristic, NOT a guarantee): ceil(R x S x q_c) steps, as if the client took
  part in exactly its expected number of rounds. It takes part in more rounds with substantial probability
  (Binomial(R, q_c) exceeds its mean about half of the time), so this under-states epsilon.

PLD losses are rounded pessimistically to multiples of `PLD_DISCRETIZATION` (1e-3).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from fedask_jax._checks import check_choice, check_int, check_real

ACCOUNTANTS = ("rdp", "pld")
PARTICIPATION = ("sampled", "worst_case", "expected")
# PLD is tighter than RDP (after one round RDP's conversion states an epsilon far above what was spent) and, at
# PLD_DISCRETIZATION, calibrates the quickstart's and the paper's schedules in seconds (README: privacy).
DEFAULT_ACCOUNTANT = "pld"
# Privacy losses are rounded (pessimistically) to multiples of this. In the paper's schedule (README: privacy)
# dp_accounting's default 1e-4 took ~1 s per epsilon and 30 to 45 s per calibration of "sampled"; 1e-3 takes
# 0.15 to 0.3 s and 1 to 3 s, for a calibrated sigma larger by 0.08% ("sampled", epsilon 1), 0.7% ("worst_case",
# epsilon 1; its 8000 steps have no mass at loss 0) and at most 0.01% at epsilon 6; in the quickstart's,
# epsilon moves by < 0.01%.
PLD_DISCRETIZATION = 1e-3
_PLD_MAX_STEP_POINTS = 2**17

# The calibrated sigma is within this relative distance above the smallest sigma meeting the target.
_CALIBRATION_RTOL = 1e-3
# Outside [1/64, 2^20] the RDP/PLD computations lose accuracy or the target is degenerate (see calibrate_noise).
_SIGMA_RANGE = (2.0**-6, 2.0**20)


def _not_convergence_noise(record: logging.LogRecord) -> bool:
  # dp_accounting's RDP logs "_compute_log_a_frac failed to converge ... Excluding this order" through absl for
  # orders whose series does not converge (large q with small sigma, which calibration's search visits). It is
  # harmless: that order's RDP counts as infinite and the minimum over the other orders stays a valid bound. Not
  # actionable either, so it is kept out of users' output; absl's other warnings pass.
  return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


logging.getLogger("absl").addFilter(_not_convergence_noise)


@dataclasses.dataclass(frozen=True)
class DPSchedule:
  """The DP schedule of one client over a run (module docstring), validated at construction.

  Client sampling is expressed by `participation_rate` and `participation`, never folded into `sample_rate`:
  q is the rate at which a local step Poisson-samples the client's own examples (batch_size / examples of the
  client), and q_c = K / N the probability that a round includes the client. `from_federation` builds one from
  K and N.

  Attributes:
    sample_rate: q in (0, 1], the per-local-step Poisson rate within the client.
    local_steps: S >= 1, DP steps per round the client takes part in.
    rounds: R >= 1.
    participation_rate: q_c in (0, 1], the probability that a round includes the client (K / N).
    participation: "sampled" (default), "worst_case" or "expected" (not a guarantee; module docstring).
  """

  sample_rate: float
  local_steps: int
  rounds: int
  participation_rate: float = 1.0
  participation: str = "sampled"

  def __post_init__(self):
    check_real(
      "sample_rate",
      self.sample_rate,
      0,
      1,
      lo_open=True,
      what="the per-step Poisson rate q",
      hint="; it is batch_size / the client's examples, not multiplied by the client-sampling fraction "
      "(pass that as participation_rate, or use DPSchedule.from_federation)",
    )
    check_int("local_steps", self.local_steps, 1)
    check_int("rounds", self.rounds, 1)
    check_real(
      "participation_rate",
      self.participation_rate,
      0,
      1,
      lo_open=True,
      what="the probability that a round includes the client",
      hint=" (clients_per_round / num_clients)",
    )
    check_choice("participation", self.participation, PARTICIPATION, what="unknown participation model")

  @classmethod
  def from_federation(
    cls,
    *,
    sample_rate: float,
    local_steps: int,
    rounds: int,
    clients_per_round: int,
    num_clients: int,
    participation: str | None = None,
  ) -> DPSchedule:
    """The schedule of a run that draws `clients_per_round` (K) of `num_clients` (N) clients uniformly each round.

    q_c = K / N. `participation` None: "sampled" when K < N, "worst_case" when K = N (the two agree there).
    """
    check_int("clients_per_round", clients_per_round, 1)
    check_int("num_clients", num_clients, 1)
    if clients_per_round > num_clients:
      raise ValueError(
        f"clients_per_round={clients_per_round} exceeds num_clients={num_clients}: sample at most "
        f"{num_clients} clients per round."
      )
    if participation is None:
      participation = "sampled" if clients_per_round < num_clients else "worst_case"
    return cls(sample_rate, local_steps, rounds, clients_per_round / num_clients, participation)

  def after(self, rounds: int) -> DPSchedule:
    """The same schedule stopped after `rounds` rounds (the epsilon spent so far)."""
    return dataclasses.replace(self, rounds=rounds)

  @property
  def guarantee(self) -> bool:
    """False for the "expected" heuristic, whose epsilon is not a bound."""
    return self.participation != "expected"

  @property
  def expected_steps(self) -> int:
    """ceil(R S q_c): the "expected" heuristic's step count. R S q_c is rounded to 1e-9 first, so that float
    noise in q_c = K / N cannot add a step."""
    return math.ceil(round(self.rounds * self.local_steps * self.participation_rate, 9))

  @property
  def composition(self) -> tuple[int, int, float]:
    """(steps per round, rounds, probability a round includes the client) that the accountants compose."""
    if self.participation == "expected":
      return self.expected_steps, 1, 1.0
    if self.participation == "worst_case":
      return self.local_steps, self.rounds, 1.0
    return self.local_steps, self.rounds, self.participation_rate

  def describe(self) -> str:
    """One line, e.g. 'q 0.004, 800 rounds x 10 local steps, in each round w.p. 0.2 (sampled)'."""
    steps, rounds, rate = self.composition
    if self.participation == "expected":
      return (
        f"q {self.sample_rate:.4g}, {steps} steps (expected participation of {self.rounds} rounds x "
        f"{self.local_steps} local steps at rate {self.participation_rate:.4g}; NOT a guarantee)"
      )
    return f"q {self.sample_rate:.4g}, {rounds} rounds x {steps} local steps, " + (
      f"in each round w.p. {rate:.4g} (sampled)" if rate < 1 else "in every round (worst_case)"
    )


def _check_schedule(schedule: Any) -> None:
  if not isinstance(schedule, DPSchedule):
    raise TypeError(f"schedule={schedule!r}: expected a DPSchedule (DPSchedule.from_federation builds one).")


def _check_common(schedule: Any, delta: float, accountant: str) -> None:
  _check_schedule(schedule)
  check_real(
    "delta",
    delta,
    0,
    1,
    lo_open=True,
    hi_open=True,
    what="delta",
    hint=", and well below 1 / (examples per client), e.g. 1e-5",
  )
  check_choice("accountant", accountant, ACCOUNTANTS, what="unknown accountant")


def schedule_rdp(schedule: DPSchedule, noise_multiplier: float, orders: Any = None) -> np.ndarray:
  """The run's Renyi DP at each order alpha > 1: R eps_round(alpha) (module docstring), float64 [len(orders)].

  `orders` default to dp_accounting's `DEFAULT_RDP_ORDERS` (1.1 to 1024). Infinite where dp_accounting's step
  RDP is (sigma = 0, or an order whose series did not converge).
  """
  steps, rounds, rate = schedule.composition
  orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS if orders is None else orders, dtype=np.float64)
  step_rdp = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(  # pylint: disable=protected-access
    schedule.sample_rate, noise_multiplier, orders
  )
  d_s = steps * np.asarray(step_rdp, dtype=np.float64)
  if rate == 1.0:
    return rounds * d_s
  # log(q_c e^((alpha - 1) D_S) + 1 - q_c) without forming e^((alpha - 1) D_S), which overflows past ~709.
  with np.errstate(over="ignore", invalid="ignore"):
    return rounds * np.logaddexp(math.log(rate) + (orders - 1) * d_s, math.log1p(-rate)) / (orders - 1)


def schedule_pld(schedule: DPSchedule, noise_multiplier: float) -> privacy_loss_distribution.PrivacyLossDistribution:
  """The run's pessimistic privacy loss distribution (both directions; module docstring), sigma > 0: one step's
  PLD, self-composed S times, mixed with the null outcome, self-composed R times."""
  sigma = noise_multiplier
  steps, rounds, rate = schedule.composition
  # One step's losses span about (1 + 20 sigma) / sigma^2 (the Gaussian truncated at +-10 sigma, dp_accounting's
  # log mass bound -50): at small sigma a coarser grid keeps it to ~2^17 points (at sigma = 1/64 the fixed grid
  # took 4 minutes and 6 GB). Coarser rounding is still pessimistic, and there epsilon is in the hundreds.
  discretization = max(PLD_DISCRETIZATION, (1 + 20 * sigma) / sigma**2 / _PLD_MAX_STEP_POINTS)
  step = privacy_loss_distribution.from_gaussian_mechanism(
    sigma, sampling_prob=schedule.sample_rate, value_discretization_interval=discretization, pessimistic_estimate=True
  )
  round_pld = step.self_compose(steps)
  if rate < 1.0:
    round_pld = round_pld.compute_mixture(privacy_loss_distribution.identity(discretization), rate)
  # self_compose raises the round's characteristic function to the R-th power in one FFT, as cheap as
  # repeated squaring and without its intermediate truncations.
  return round_pld.self_compose(rounds)


def epsilon_spent(
  schedule: DPSchedule, noise_multiplier: float, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
  """Epsilon at `delta` of the schedule's DP-SGD with noise multiplier sigma (inf at sigma = 0).

  Client sampling is the schedule's participation_rate q_c = K / N and participation model, never a factor in
  its sample_rate (a rate multiplied by q_c under-states epsilon); `DPSchedule.from_federation` or, from client
  sizes, `plan_privacy` build the schedule.

  Under participation "expected" this is the heuristic's number, NOT a bound (module docstring).
  """
  _check_common(schedule, delta, accountant)
  check_real("noise_multiplier", noise_multiplier, 0, what="sigma", hint=" (0 gives epsilon = inf)")
  if noise_multiplier == 0:
    return math.inf
  if accountant == "rdp":
    rdp = schedule_rdp(schedule, float(noise_multiplier))
    return float(rdp_privacy_accountant.compute_epsilon(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, rdp, delta)[0])
  return float(schedule_pld(schedule, float(noise_multiplier)).get_epsilon_for_delta(delta))


def calibrate_noise(
  schedule: DPSchedule, target_epsilon: float, delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
  """The smallest noise multiplier sigma whose `epsilon_spent` at `delta` is <= `target_epsilon`, within 0.1%.

  Client sampling is expressed as in `epsilon_spent`: the schedule's participation_rate q_c = K / N and
  participation model, never a factor of its sample_rate; `plan_privacy` calibrates a federated run from its
  client sizes and K of N, and takes the batch overflow out of delta.

  A doubling/halving search from sigma = 1 brackets sigma in [lo, 2 lo] with epsilon(lo) > target >= epsilon
  (2 lo); Brent's method (scipy's brentq, what `dp_accounting.calibrate_dp_mechanism` runs, which needs a
  DpEvent and none expresses the mixture with an absent client) then finds the crossing to within xtol =
  0.025% of lo, and the result is moved up by xtol until it meets the target (as dp_accounting does). The
  returned sigma meets the target and sigma (1 - 0.001) misses it. Raises ValueError when the target is met
  even at sigma = 1/64 (a target so loose that accounting there is unreliable) or missed at sigma = 2^20.
  """
  _check_common(schedule, delta, accountant)
  check_real(
    "target_epsilon", target_epsilon, 0, lo_open=True, what="the privacy target", hint=" (the paper uses 1, 3, 6)"
  )

  def gap(sigma: float) -> float:
    return epsilon_spent(schedule, sigma, delta, accountant) - target_epsilon

  where = f"(delta={delta:g}, {schedule.describe()}, {accountant})"
  if gap(1.0) > 0:
    lo, hi = 1.0, 2.0
    while gap(hi) > 0:
      if hi >= _SIGMA_RANGE[1]:
        raise ValueError(
          f"target_epsilon={target_epsilon!r} is not met even at noise multiplier {hi:g} {where}: raise the "
          "target or lower q, the local steps or the rounds."
        )
      lo, hi = hi, 2 * hi
  else:
    lo, hi = 0.5, 1.0
    while gap(lo) <= 0:
      if lo <= _SIGMA_RANGE[0]:
        raise ValueError(
          f"target_epsilon={target_epsilon!r} is met even at noise multiplier {lo:g} {where}: this target "
          "gives almost no privacy; lower it."
        )
      lo, hi = lo / 2, lo
  # A quarter of the 0.1%: brentq's root is within xtol of the crossing, the step up adds at most xtol more,
  # and half the budget is left for the accountants' own jitter in epsilon(sigma).
  xtol = _CALIBRATION_RTOL / 4 * lo
  sigma = min(optimize.brentq(gap, lo, hi, xtol=xtol), hi)
  while gap(sigma) > 0:
    sigma = min(sigma + xtol, hi)
  return float(sigma)


def overflow_delta(overflow_prob: float, schedule: DPSchedule, epsilon: float) -> float:
  """Extra delta for truncated Poisson batches: (1 + e^epsilon) x m x overflow_prob.

  The fixed-capacity sampler (`fedask_jax.privacy.sampling`) equals Poisson sampling except when a step's batch
  of the client overflows. Union bound over the R S local steps the client could take: step s of round t
  overflows with the client's data only if the round includes the client and the batch overflows, two
  independent draws (client sampling and batch sampling use separate keys), probability <= q_c overflow_prob
  under "sampled" and "expected" (uniform client sampling), overflow_prob under "worst_case" (any selection).
  So eta <= m overflow_prob, m = R S q_c or R S: a proven bound, not an expected count standing in for one. eta
  bounds the total variation distance between the two mechanisms' outputs, and an (epsilon, delta)-DP
  mechanism within total variation eta of another makes that one (epsilon, delta + (1 + e^epsilon) eta)-DP.
  """
  _check_schedule(schedule)
  check_real("overflow_prob", overflow_prob, 0, 1, what="a probability")
  check_real("epsilon", epsilon, 0, what="epsilon")
  rate = 1.0 if schedule.participation == "worst_case" else schedule.participation_rate
  return (1.0 + math.exp(epsilon)) * schedule.rounds * schedule.local_steps * rate * overflow_prob


def calculate(
  schedule: DPSchedule,
  delta: float,
  accountant: str = DEFAULT_ACCOUNTANT,
  *,
  target_epsilon: float | None = None,
  noise_multiplier: float | None = None,
) -> dict[str, Any]:
  """The privacy calculator (`fedask-jax privacy`): sigma for a target epsilon, or epsilon for a sigma.

  Exactly one of `target_epsilon` and `noise_multiplier`. Returns {noise_multiplier, epsilon, delta,
  participation, accountant, guarantee (False for "expected"), sample_rate, local_steps, rounds,
  participation_rate} (and target_epsilon when given).
  """
  if (target_epsilon is None) == (noise_multiplier is None):
    raise ValueError("give exactly one of target_epsilon (to find sigma) and noise_multiplier (to find epsilon).")
  if target_epsilon is not None:
    noise_multiplier = calibrate_noise(schedule, target_epsilon, delta, accountant)
  assert noise_multiplier is not None  # exactly one of the two was given (checked above)
  epsilon = epsilon_spent(schedule, noise_multiplier, delta, accountant)
  out = {
    "noise_multiplier": float(noise_multiplier),
    "epsilon": epsilon,
    "delta": delta,
    "participation": schedule.participation,
    "accountant": accountant,
    "guarantee": schedule.guarantee,
    **{k: v for k, v in dataclasses.asdict(schedule).items() if k != "participation"},
  }
  if target_epsilon is not None:
    out["target_epsilon"] = target_epsilon
  return out
