"""Privacy accounting (fedask_jax.privacy.accounting) against dp_accounting and jax_privacy's calibration."""

import functools
import math

import dp_accounting
import pytest
from jax_privacy.accounting import accountants as jp_accountants
from jax_privacy.accounting import analysis as jp_analysis
from jax_privacy.accounting import calibrate as jp_calibrate

from fedask_jax import privacy


def _reference_epsilon(sigma, delta, q, steps, accountant):
  """Built by hand from dp_accounting's primitives, without fedask_jax."""
  ledger = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
  ledger.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  return ledger.get_epsilon(delta)


# PLD calibration costs seconds: tests that need the same sigma share it.
_calibrate = functools.lru_cache(privacy.calibrate_noise)


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (0.8, 0.05, 200), (2.5, 0.2, 50)])
def test_epsilon_spent_matches_dp_accounting(accountant, sigma, q, steps):
  got = privacy.epsilon_spent(sigma, 1e-5, q, steps, accountant)
  # The same accountant on the same events: equal up to float rounding in the composition.
  assert got == pytest.approx(_reference_epsilon(sigma, 1e-5, q, steps, accountant), rel=1e-9)


def test_design_example_expected_vs_worst_case():
  """design.md section 4: sigma=1, q=0.01, 100 rounds, 10 local steps, 2 of 10 clients, delta 1e-5, RDP:
  epsilon 1.34 with expected participation vs 2.10 in the worst case (figures given to 2 decimals)."""
  expected = privacy.dp_steps(100, 10, 2, 10, participation="expected")
  worst = privacy.dp_steps(100, 10, 2, 10)
  assert (expected, worst) == (200, 1000)
  assert privacy.epsilon_spent(1.0, 1e-5, 0.01, expected, "rdp") == pytest.approx(1.34, abs=0.005)
  assert privacy.epsilon_spent(1.0, 1e-5, 0.01, worst, "rdp") == pytest.approx(2.10, abs=0.005)


def test_expected_participation_rounds_up():
  # 7 x 3 x 2 / 5 = 8.4 steps: the heuristic never rounds the privacy cost down.
  assert privacy.dp_steps(7, 3, 2, 5, participation="expected") == 9
  assert privacy.dp_steps(7, 3, 2, 5, participation="worst_case") == 21


# (accountant, target epsilon, q, steps): sigma > 1 and sigma < 1 for RDP; PLD costs seconds per
# calibration, so one case.
@pytest.mark.parametrize("accountant, target, q, steps", [
    ("rdp", 3.0, 0.05, 1000), ("rdp", 1.0, 0.01, 500), ("rdp", 8.0, 0.02, 100), ("pld", 3.0, 0.05, 1000)])
def test_calibrate_returns_the_smallest_sufficient_sigma(accountant, target, q, steps):
  sigma = _calibrate(target, 1e-5, q, steps, accountant)
  assert _reference_epsilon(sigma, 1e-5, q, steps, accountant) <= target
  assert _reference_epsilon(0.995 * sigma, 1e-5, q, steps, accountant) > target


@pytest.mark.parametrize("accountant", privacy.ACCOUNTANTS)
def test_calibrate_agrees_with_jax_privacy(accountant):
  """jax_privacy's calibrate_noise_multiplier (its own bracketing and Brent search, the same dp_accounting
  accountant configured identically) finds the same sigma to within the 0.5% requirement."""
  target, delta, batch_size, num_samples, steps = 3.0, 1e-5, 50, 1000, 1000
  config = (jp_accountants.RdpAccountantConfig(orders=dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
            if accountant == "rdp" else jp_accountants.PldAccountantConfig())
  reference = jp_calibrate.calibrate_noise_multiplier(
      target_epsilon=target, accountant=jp_analysis.DpsgdTrainingAccountant(config), batch_sizes=batch_size,
      num_updates=steps, num_samples=num_samples, target_delta=delta, tol=1e-4)
  sigma = _calibrate(target, delta, batch_size / num_samples, steps, accountant)
  assert sigma == pytest.approx(reference, rel=5e-3)


def test_pld_is_tighter_than_rdp():
  rdp = _calibrate(3.0, 1e-5, 0.05, 1000, "rdp")
  pld = _calibrate(3.0, 1e-5, 0.05, 1000, "pld")
  assert pld < rdp


def test_overflow_delta():
  assert privacy.overflow_delta(1e-6, 8000, 3.0) == pytest.approx((1 + math.exp(3.0)) * 8000e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: privacy.epsilon_spent(1.0, 0.0, 0.1, 10), "delta=0.0"),
        (lambda: privacy.epsilon_spent(1.0, 1.0, 0.1, 10), "delta=1.0"),
        (lambda: privacy.epsilon_spent(1.0, 1e-5, 0.0, 10), "sample_rate=0.0"),
        (lambda: privacy.epsilon_spent(1.0, 1e-5, 1.5, 10), "sample_rate=1.5"),
        (lambda: privacy.epsilon_spent(1.0, 1e-5, 0.1, 0), "steps=0"),
        (lambda: privacy.epsilon_spent(-1.0, 1e-5, 0.1, 10), "noise_multiplier=-1.0"),
        (lambda: privacy.epsilon_spent(1.0, 1e-5, 0.1, 10, "gdp"), r"accountant='gdp'.*\('rdp', 'pld'\)"),
        (lambda: privacy.calibrate_noise(0.0, 1e-5, 0.1, 10), "target_epsilon=0.0"),
        (lambda: privacy.calibrate_noise(1e4, 1e-5, 1e-4, 1), "target_epsilon=10000.0 is met even"),
        (lambda: privacy.dp_steps(10, 10, 2, 10, participation="mean"),
         r"participation='mean'.*\('worst_case', 'expected'\)"),
        (lambda: privacy.dp_steps(10, 10, 11, 10), "clients_per_round=11"),
        (lambda: privacy.dp_steps(0, 10, 2, 10), "rounds=0"),
    ],
)
def test_bad_arguments_fail_early(call, match):
  with pytest.raises(ValueError, match=match):
    call()
