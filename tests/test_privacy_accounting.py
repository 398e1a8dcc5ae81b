"""Privacy accounting over a run's schedule (fedask_jax.privacy.accounting) against independent references:
dp_accounting's own accountants, closed forms and numerical integration of the mixture's Renyi divergence, a
Monte Carlo estimate of the mixture's delta(epsilon), and jax_privacy's calibration."""

import functools
import math

import dp_accounting
import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.stats
from jax_privacy.accounting import accountants as jp_accountants
from jax_privacy.accounting import analysis as jp_analysis
from jax_privacy.accounting import calibrate as jp_calibrate

from fedask_jax import privacy
from fedask_jax.privacy import DPSchedule

DELTA = 1e-5


def _reference_epsilon(sigma, q, steps, accountant, discretization=privacy.accounting.PLD_DISCRETIZATION):
  """dp_accounting's accountant on `steps` Poisson-subsampled Gaussian steps, built without fedask_jax."""
  ledger = (
    dp_accounting.rdp.RdpAccountant()
    if accountant == "rdp"
    else dp_accounting.pld.PLDAccountant(value_discretization_interval=discretization)
  )
  ledger.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  return ledger.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
@pytest.mark.parametrize("sigma, q, local_steps, rounds", [(1.0, 0.01, 10, 100), (0.8, 0.05, 5, 40), (2.5, 0.2, 5, 10)])
def test_worst_case_matches_dp_accounting(accountant, sigma, q, local_steps, rounds):
  """worst_case is R S steps of the subsampled Gaussian: dp_accounting's accountant on the same events."""
  got = privacy.epsilon_spent(DPSchedule(q, local_steps, rounds, 0.3, "worst_case"), sigma, DELTA, accountant)
  # RDP: the same sums, up to float rounding. PLD: S-fold then R-fold convolution against one (R S)-fold, both
  # by FFT powers with 1e-15 tail truncations: equal to ~1e-9 (measured 6e-10 at most).
  assert got == pytest.approx(_reference_epsilon(sigma, q, local_steps * rounds, accountant), rel=1e-7)
  if accountant == "pld":
    # Against dp_accounting's default grid (1e-4): the coarser 1e-3 is also pessimistic, above it by < 0.1%
    # (measured 4e-4 at most on these three).
    fine = _reference_epsilon(sigma, q, local_steps * rounds, accountant, 1e-4)
    assert fine <= got <= fine * 1.001


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
def test_sampled_with_full_participation_is_worst_case(accountant):
  schedule = DPSchedule(0.02, 4, 30, 1.0, "sampled")
  worst = DPSchedule(0.02, 4, 30, 0.25, "worst_case")  # worst_case ignores q_c
  assert privacy.epsilon_spent(schedule, 0.9, DELTA, accountant) == privacy.epsilon_spent(worst, 0.9, DELTA, accountant)
  # And from the federation: K = N defaults to worst_case, which "sampled" then equals.
  full = DPSchedule.from_federation(sample_rate=0.02, local_steps=4, rounds=30, clients_per_round=5, num_clients=5)
  assert full.participation == "worst_case" and full.participation_rate == 1.0


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
def test_epsilon_decreases_with_participation_rate(accountant):
  eps = [privacy.epsilon_spent(DPSchedule(0.02, 4, 30, q_c), 0.9, DELTA, accountant) for q_c in (1.0, 0.5, 0.2, 0.05)]
  assert all(a > b for a, b in zip(eps, eps[1:])), eps


def _mixture_rdp_closed_form(alpha, sigma, q_c):
  """D_alpha of q_c N(1, sigma^2) + (1 - q_c) null against q_c N(0, sigma^2) + (1 - q_c) null, in mpmath (no
  overflow at any order): log(q_c exp((alpha - 1) alpha / (2 sigma^2)) + 1 - q_c) / (alpha - 1)."""
  a, s, p = mpmath.mpf(alpha), mpmath.mpf(sigma), mpmath.mpf(q_c)
  return float(mpmath.log(p * mpmath.exp((a - 1) * a / (2 * s**2)) + 1 - p) / (a - 1))


def _mixture_rdp_integrated(alpha, sigma, q_c):
  """The same divergence by numerical integration of the Gaussians' densities (the null outcome adds 1 - q_c to
  the integral sum of P^alpha Q^(1 - alpha))."""
  upper, lower = scipy.stats.norm(1.0, sigma), scipy.stats.norm(0.0, sigma)
  integrand = lambda x: math.exp(alpha * upper.logpdf(x) + (1 - alpha) * lower.logpdf(x))
  inner, _ = scipy.integrate.quad(integrand, -np.inf, np.inf, epsabs=0, epsrel=1e-12, limit=200)
  return math.log(q_c * inner + 1 - q_c) / (alpha - 1)


@pytest.mark.parametrize("q_c", [0.1, 0.5, 1.0])
def test_rdp_of_one_gaussian_step_mixture_against_closed_form(q_c):
  """q = 1, S = 1: a round is a Gaussian step mixed with the null outcome; R = 3 rounds compose to 3 x that."""
  sigma, rounds = 2.0, 3
  orders = np.array([1.5, 2.0, 3.5, 8.0, 32.0, 256.0, 1024.0])  # (alpha - 1) alpha / 8 reaches 1.3e5: overflow
  got = privacy.schedule_rdp(DPSchedule(1.0, 1, rounds, q_c), sigma, orders)
  closed = np.array([_mixture_rdp_closed_form(a, sigma, q_c) for a in orders])
  np.testing.assert_allclose(got, rounds * closed, rtol=1e-12)
  # Integration (independent of the closed form) where the integrand stays representable.
  for alpha, value in zip(orders[:5], got[:5]):
    assert value == pytest.approx(rounds * _mixture_rdp_integrated(alpha, sigma, q_c), rel=1e-8)
  # And epsilon is dp_accounting's conversion of that curve at its default orders.
  default = np.asarray(dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
  curve = [rounds * _mixture_rdp_closed_form(a, sigma, q_c) for a in default]
  expected = dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon(default, curve, DELTA)[0]
  got = privacy.epsilon_spent(DPSchedule(1.0, 1, rounds, q_c), sigma, DELTA, "rdp")
  assert got == pytest.approx(expected, rel=1e-9)


def _monte_carlo_delta(epsilon, *, sigma, q, local_steps, rounds, q_c, samples, seed):
  """(estimate, standard error) of max over add/remove of E_P[(1 - e^(epsilon - L))_+], L the run's privacy loss
  sampled directly: per round, with probability q_c the sum of S step losses, else 0. Remove: P = (1 - q) N(0,
  s^2) + q N(1, s^2) against Q = N(0, s^2), step loss log(1 - q + q exp((2o - 1) / (2 s^2))), o ~ P; add: the
  roles swapped, step loss -log(1 - q + q exp((2o - 1) / (2 s^2))), o ~ N(0, s^2)."""
  rng = np.random.default_rng(seed)
  out = []
  for direction in ("remove", "add"):
    total = np.zeros(samples)
    for _ in range(rounds):
      present = rng.random(samples) < q_c
      for _ in range(local_steps):
        o = rng.normal(0.0, sigma, samples)
        if direction == "remove":
          o += rng.random(samples) < q
        step = np.logaddexp(math.log1p(-q), math.log(q) + (2 * o - 1) / (2 * sigma**2))
        total += np.where(present, step if direction == "remove" else -step, 0.0)
    values = -np.expm1(np.minimum(epsilon - total, 0.0))  # (1 - e^(eps - L))_+
    out.append((values.mean(), values.std(ddof=1) / math.sqrt(samples)))
  return max(out)


def test_pld_epsilon_against_monte_carlo_delta():
  """The PLD's epsilon at delta = 1e-3 for a small sampled schedule: delta(epsilon) estimated from sampled privacy
  losses has delta = 1e-3 inside its confidence interval (the PLD is pessimistic by ~1e-8 relative here, far
  inside it)."""
  sigma, q, local_steps, rounds, q_c, delta = 1.0, 0.2, 3, 4, 0.5, 1e-3
  epsilon = privacy.epsilon_spent(DPSchedule(q, local_steps, rounds, q_c), sigma, delta, "pld")
  estimate, se = _monte_carlo_delta(
    epsilon, sigma=sigma, q=q, local_steps=local_steps, rounds=rounds, q_c=q_c, samples=600_000, seed=0
  )
  # 99.9% two-sided normal interval (z = 3.29) on the mean of 6e5 bounded samples (standard error 2.7e-5, 2.7%
  # of delta); the seed is fixed, and another seed would fail it with probability ~1e-3. Eight seeds of 1e6
  # samples averaged 0.993e-3 +- 0.007e-3. One sided, the interval's lower end <= delta says the bound holds.
  assert estimate - 3.29 * se <= delta <= estimate + 3.29 * se, (epsilon, estimate, se)
  # Power: 0.1 lower in epsilon, delta is 25% larger, far outside the interval.
  lower, se_lower = _monte_carlo_delta(
    epsilon - 0.1, sigma=sigma, q=q, local_steps=local_steps, rounds=rounds, q_c=q_c, samples=600_000, seed=1
  )
  assert lower - 3.29 * se_lower > delta


def _exact_delta_of_gaussian_rounds(epsilon, *, sigma, local_steps, rounds, q_c):
  """delta(epsilon) of R rounds of S Gaussian steps (q = 1), each round taken w.p. q_c, in closed form: given k
  rounds taken the privacy loss is that of the Gaussian mechanism with mu_k = sqrt(k S) / sigma (in both
  directions), whose delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2)
  (Balle and Wang 2018, Theorem 8); k ~ Binomial(R, q_c) mixes them (k = 0 adds nothing)."""
  k = np.arange(1, rounds + 1)
  mu = np.sqrt(k * local_steps) / sigma
  per_k = scipy.stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * scipy.stats.norm.cdf(
    -epsilon / mu - mu / 2
  )
  return float(scipy.stats.binom(rounds, q_c).pmf(k) @ per_k)


@pytest.mark.parametrize(
  "sigma, local_steps, rounds, q_c, delta",
  [(4.0, 2, 10, 0.3, 1e-5), (2.0, 1, 30, 0.1, 1e-5), (6.0, 5, 20, 0.5, 1e-6), (1.5, 1, 3, 0.05, 1e-4)],
)
def test_pld_of_gaussian_rounds_against_the_exact_mixture(sigma, local_steps, rounds, q_c, delta):
  """Without example subsampling the mixed and composed PLD has an exact reference: its epsilon is at or above
  the exact one (pessimistic) and within 1e-4 of it (measured 4e-6 at most: the 1e-3 grid of a Gaussian's
  losses is tight)."""
  got = privacy.epsilon_spent(DPSchedule(1.0, local_steps, rounds, q_c), sigma, delta, "pld")
  exact = scipy.optimize.brentq(
    lambda e: _exact_delta_of_gaussian_rounds(e, sigma=sigma, local_steps=local_steps, rounds=rounds, q_c=q_c) - delta,
    0.0,
    50.0,
    xtol=1e-12,
  )
  assert exact * (1 - 1e-9) <= got <= exact * (1 + 1e-4)


@pytest.mark.parametrize(
  "q, sigma, q_c, local_steps, rounds",
  [
    (0.01, 1.0, 0.2, 10, 100),
    (0.01, 2.0, 1.0, 10, 100),
    (0.05, 0.8, 0.5, 5, 40),
    (0.2, 1.5, 0.1, 5, 50),
    (1.0, 4.0, 0.3, 1, 20),
    (0.004, 1.0, 0.2, 10, 800),
  ],
)
def test_pld_is_below_rdp(q, sigma, q_c, local_steps, rounds):
  schedule = DPSchedule(q, local_steps, rounds, q_c)
  assert privacy.epsilon_spent(schedule, sigma, DELTA, "pld") < privacy.epsilon_spent(schedule, sigma, DELTA, "rdp")


def test_design_example_expected_vs_worst_case():
  """docs/design.md, section 4.3: sigma=1, q=0.01, 100 rounds, 10 local steps, 2 of 10 clients, delta 1e-5, RDP:
  epsilon 1.34 with expected participation vs 2.10 in the worst case (figures given to 2 decimals); the
  rigorous sampled bound lies between."""
  make = lambda p: DPSchedule.from_federation(
    sample_rate=0.01, local_steps=10, rounds=100, clients_per_round=2, num_clients=10, participation=p
  )
  expected, worst, sampled = (
    privacy.epsilon_spent(make(p), 1.0, DELTA, "rdp") for p in ("expected", "worst_case", "sampled")
  )
  assert make("expected").expected_steps == 200
  assert expected == pytest.approx(1.34, abs=0.005) and worst == pytest.approx(2.10, abs=0.005)
  assert expected < sampled < worst


def test_expected_steps_round_up_and_ignore_float_noise():
  # 7 x 3 x 2 / 5 = 8.4 steps: the heuristic never rounds the privacy cost down.
  assert (
    DPSchedule.from_federation(
      sample_rate=0.1, local_steps=3, rounds=7, clients_per_round=2, num_clients=5, participation="expected"
    ).expected_steps
    == 9
  )
  # q_c = 0.1 x 3 is 0.30000000000000004 in floats and R S q_c = 900.0000000000001: 900 steps, not 901.
  assert DPSchedule(0.1, 3, 1000, 0.1 * 3, "expected").expected_steps == 900


def test_after_and_describe():
  schedule = DPSchedule.from_federation(
    sample_rate=0.004, local_steps=10, rounds=800, clients_per_round=2, num_clients=10
  )
  assert schedule.after(5) == DPSchedule(0.004, 10, 5, 0.2, "sampled")
  eps = [privacy.epsilon_spent(schedule.after(t), 1.0, DELTA) for t in (1, 10, 100)]
  assert eps[0] < eps[1] < eps[2]
  assert "w.p. 0.2 (sampled)" in schedule.describe()
  assert "NOT a guarantee" in DPSchedule(0.004, 10, 800, 0.2, "expected").describe()


_calibrate = functools.lru_cache(privacy.calibrate_noise)
CALIBRATION_SCHEDULE = dict(sample_rate=0.02, local_steps=5, rounds=40, clients_per_round=2, num_clients=10)


# Targets 0.5 (sigma > 1) and 3 (sigma < 1) exercise both bracketing directions.
@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
@pytest.mark.parametrize("participation", privacy.PARTICIPATION)
@pytest.mark.parametrize("target", [0.5, 3.0])
def test_calibrate_returns_the_smallest_sufficient_sigma(accountant, participation, target):
  schedule = DPSchedule.from_federation(**CALIBRATION_SCHEDULE, participation=participation)
  sigma = _calibrate(schedule, target, DELTA, accountant)
  assert privacy.epsilon_spent(schedule, sigma, DELTA, accountant) <= target
  assert privacy.epsilon_spent(schedule, sigma * (1 - 1e-3), DELTA, accountant) > target


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
def test_calibrate_agrees_with_jax_privacy(accountant):
  """jax_privacy's calibrate_noise_multiplier (its own bracketing and Brent search, the same dp_accounting
  accountant configured identically) finds the same worst-case sigma, to within both searches' tolerances."""
  target, batch_size, num_samples, steps = 3.0, 50, 1000, 1000
  config = (
    jp_accountants.RdpAccountantConfig(orders=dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    if accountant == "rdp"
    else jp_accountants.PldAccountantConfig(value_discretization_interval=privacy.accounting.PLD_DISCRETIZATION)
  )
  reference = jp_calibrate.calibrate_noise_multiplier(
    target_epsilon=target,
    accountant=jp_analysis.DpsgdTrainingAccountant(config),
    batch_sizes=batch_size,
    num_updates=steps,
    num_samples=num_samples,
    target_delta=DELTA,
    tol=1e-4,
  )
  sigma = privacy.calibrate_noise(DPSchedule(batch_size / num_samples, steps, 1), target, DELTA, accountant)
  assert sigma == pytest.approx(reference, rel=2e-3)


def test_overflow_delta_counts_the_steps_that_can_include_the_client():
  # Union bound over R S steps, each overflowing with the client's data w.p. q_c x overflow_prob under uniform
  # client sampling, overflow_prob under worst_case.
  worst = DPSchedule(0.01, 10, 800, 0.2, "worst_case")
  assert privacy.overflow_delta(1e-6, worst, 3.0) == pytest.approx((1 + math.exp(3.0)) * 8000e-6)
  assert privacy.overflow_delta(1e-6, DPSchedule(0.01, 10, 800, 0.2), 3.0) == pytest.approx(
    (1 + math.exp(3.0)) * 1600e-6
  )


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: DPSchedule(0.0, 10, 10), r"sample_rate=0.0: .* not multiplied by the client-sampling fraction"),
    (lambda: DPSchedule(1.5, 10, 10), "sample_rate=1.5"),
    (lambda: DPSchedule(0.1, 0, 10), "local_steps=0: must be an integer >= 1"),
    (lambda: DPSchedule(0.1, 10, 2.5), "rounds=2.5"),
    (lambda: DPSchedule(0.1, 10, 10, 0.0), r"participation_rate=0.0: .* \(0, 1\]"),
    (lambda: DPSchedule(0.1, 10, 10, 1.2), "participation_rate=1.2"),
    (lambda: DPSchedule(0.1, 10, 10, 0.2, "mean"), r"participation='mean'.*\('sampled', 'worst_case', 'expected'\)"),
    (
      lambda: DPSchedule.from_federation(
        sample_rate=0.1, local_steps=1, rounds=1, clients_per_round=11, num_clients=10
      ),
      "clients_per_round=11 exceeds num_clients=10",
    ),
    (lambda: privacy.epsilon_spent(DPSchedule(0.1, 1, 1), 1.0, 0.0), "delta=0.0"),
    (lambda: privacy.epsilon_spent(DPSchedule(0.1, 1, 1), 1.0, 1.0), "delta=1.0"),
    (lambda: privacy.epsilon_spent(DPSchedule(0.1, 1, 1), -1.0, DELTA), "noise_multiplier=-1.0"),
    (lambda: privacy.epsilon_spent(DPSchedule(0.1, 1, 1), 1.0, DELTA, "gdp"), r"accountant='gdp'.*\('rdp', 'pld'\)"),
    (lambda: privacy.calibrate_noise(DPSchedule(0.1, 1, 1), 0.0, DELTA), "target_epsilon=0.0"),
    (lambda: privacy.calibrate_noise(DPSchedule(1e-4, 1, 1), 1e4, DELTA, "rdp"), "target_epsilon=10000.0 is met even"),
    (lambda: privacy.calculate(DPSchedule(0.1, 1, 1), DELTA), "exactly one of target_epsilon"),
  ],
)
def test_bad_arguments_fail_early(call, match):
  with pytest.raises(ValueError, match=match):
    call()
