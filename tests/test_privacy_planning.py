"""A run's privacy plan without a config (fedask_jax.privacy.plan_privacy): the capacity against scipy's binomial
tail, the calibration against the accountant, the schedule against the rule (smallest client's rate, client
sampling as participation), the overflow's delta; one overflow default; dp_accounting's convergence warnings kept
out of the output."""

import inspect
import logging
import math

import numpy as np
import pytest
import scipy.stats
from dp_accounting.rdp import rdp_privacy_accountant

from fedask_jax import privacy
from fedask_jax.config.schema import PrivacyConfig
from fedask_jax.privacy import DPSchedule

SIZES = np.array([40, 64, 64, 100, 250, 37])
PLAN = dict(
  target_epsilon=2.0,
  delta=1e-5,
  rounds=6,
  local_steps=3,
  batch_size=5,
  client_sizes=SIZES,
  clients_per_round=2,
  overflow_prob=1e-9,
  accountant="rdp",
)


def test_plan_is_the_smallest_clients_schedule_calibrated_at_the_delta_left_after_overflow():
  plan = privacy.plan_privacy(**PLAN)
  # The smallest client's rate, client sampling as its own q_c = K / N (not folded into the rate), "sampled" since
  # K < N.
  assert plan.schedule == DPSchedule(5 / 37, 3, 6, 2 / 6, "sampled")
  np.testing.assert_array_equal(plan.sample_rates, 5 / SIZES)
  # (1 + e^epsilon) x R S q_c x overflow_prob, the union bound of `overflow_delta`.
  overflow = (1 + math.exp(2.0)) * 6 * 3 * (2 / 6) * 1e-9
  assert plan.overflow_delta == pytest.approx(overflow, rel=1e-12)
  assert (plan.delta, plan.accountant_delta) == (1e-5, pytest.approx(1e-5 - overflow, rel=1e-12))
  # Calibrated: the run meets the target at the reduced delta, and 0.2% less noise (twice calibrate_noise's
  # 0.1% tolerance) misses it.
  spent = privacy.epsilon_spent(plan.schedule, plan.noise_multiplier, plan.accountant_delta, "rdp")
  assert plan.epsilon() == spent <= 2.0
  assert privacy.epsilon_spent(plan.schedule, plan.noise_multiplier * 0.998, plan.accountant_delta, "rdp") > 2.0
  assert (
    plan.epsilon(2)
    == privacy.epsilon_spent(plan.schedule.after(2), plan.noise_multiplier, plan.accountant_delta, "rdp")
    < spent
  )


def test_capacity_is_the_smallest_that_bounds_every_clients_overflow_at_n_plus_one():
  plan = privacy.plan_privacy(**PLAN)
  # P(Binomial(n + 1, b / n) > c) for the add-one neighbour of each client.
  tail = lambda c: max(scipy.stats.binom.sf(c, n + 1, 5 / n) for n in SIZES)
  assert tail(plan.capacity) <= 1e-9 < tail(plan.capacity - 1)


def test_full_participation_defaults_to_worst_case_and_participation_can_be_chosen():
  full = privacy.plan_privacy(**dict(PLAN, clients_per_round=6))
  assert (full.schedule.participation, full.schedule.participation_rate) == ("worst_case", 1.0)
  worst = privacy.plan_privacy(**dict(PLAN, participation="worst_case"))
  sampled = privacy.plan_privacy(**PLAN)
  # Taking part in every round costs more noise than in a third of them, for the same target.
  assert worst.noise_multiplier > sampled.noise_multiplier


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(batch_size=38), r"batch_size=38 exceeds the smallest client's 37 examples.*lower batch_size"),
    (dict(overflow_prob=1e-3), r"overflow_prob=0.001 costs delta .* at least half of delta=1e-05"),
    (dict(client_sizes=SIZES.astype(float)), r"client_sizes float64\[6\].*one integer >= 1 per client"),
    (dict(client_sizes=SIZES[None]), r"client_sizes int64\[1, 6\]"),
    (dict(client_sizes=np.array([3, 0])), r"client_sizes .*\(min 0\)"),
    (dict(clients_per_round=7), r"clients_per_round=7 exceeds num_clients=6"),
    (dict(delta=1.5), r"delta=1.5"),
    (dict(target_epsilon=0.0), r"target_epsilon=0.0"),
    (dict(participation="often"), r"participation='often'"),
  ],
)
def test_bad_arguments_fail_naming_the_value(change, message):
  with pytest.raises(ValueError, match=message):
    privacy.plan_privacy(**dict(PLAN, **change))


def test_private_sizes_plan_at_the_public_rate_whatever_the_sizes():
  """sample_rate=q (client sizes private): every client's rate is q, the schedule accounts q, and adding an
  example to a client (D -> D') changes neither sigma nor the rate; the capacity bounds each add-one neighbour's
  overflow at q. Public sizes give sample_rate None and a sigma that moves with the smallest client."""
  private = dict(PLAN, sample_rate=0.1)
  plan = privacy.plan_privacy(**private)
  plan_d1 = privacy.plan_privacy(**dict(private, client_sizes=SIZES + np.eye(6, dtype=SIZES.dtype)[5]))
  assert plan.sample_rate == plan.schedule.sample_rate == 0.1
  np.testing.assert_array_equal(plan.sample_rates, np.full(6, 0.1))
  assert (plan.noise_multiplier, plan.schedule) == (plan_d1.noise_multiplier, plan_d1.schedule)
  tail = lambda c: max(scipy.stats.binom.sf(c, n + 1, 0.1) for n in SIZES)
  assert tail(plan.capacity) <= 1e-9 < tail(plan.capacity - 1)
  public = privacy.plan_privacy(**PLAN)
  public_d1 = privacy.plan_privacy(**dict(PLAN, client_sizes=SIZES + np.eye(6, dtype=SIZES.dtype)[5]))
  assert public.sample_rate is None and public.noise_multiplier != public_d1.noise_multiplier
  # Private sizes put no bound on batch_size against the smallest client (its rate is q, not b / n).
  assert privacy.plan_privacy(**dict(private, batch_size=38)).sample_rate == 0.1


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(sample_rate=1.5), r"sample_rate=1.5: .*in \(0, 1\].*client sampling is clients_per_round / num_clients"),
    (dict(sample_rate=0), r"sample_rate=0"),
    # The largest client (250 examples) at q = 0.9: its add-one neighbour fills all 250 slots with probability
    # 0.9^251 ~ 3e-12 > 1e-12 (the default overflow_prob); q <= 1e-12^(1/251) = 0.896 fits.
    (dict(sample_rate=0.9, overflow_prob=1e-12), r"q\^251 = 3.\d+e-12 per step.*lower sample_rate to at most 0.896"),
  ],
)
def test_bad_private_rates_fail_naming_the_value(change, message):
  with pytest.raises(ValueError, match=message):
    privacy.plan_privacy(**dict(PLAN, **change))


def test_client_sampling_is_participation_never_a_factor_of_the_rate():
  """The mistake the plan rules out: folding q_c = K / N into the rate gives a smaller epsilon than the
  schedule that samples clients (the sampled-participation bound), so it under-states the cost. The plan takes
  K and N and accounts q_c as participation; epsilon_spent and calibrate_noise say so in their docstrings."""
  plan = privacy.plan_privacy(**PLAN)
  q, qc = 5 / 37, 2 / 6
  folded = DPSchedule(q * qc, 3, 6)
  assert plan.schedule == DPSchedule(q, 3, 6, qc, "sampled")
  honest = privacy.epsilon_spent(plan.schedule, plan.noise_multiplier, plan.accountant_delta, "rdp")
  assert privacy.epsilon_spent(folded, plan.noise_multiplier, plan.accountant_delta, "rdp") < honest
  for fn in (privacy.epsilon_spent, privacy.calibrate_noise):
    assert "participation" in fn.__doc__ and "never a factor" in " ".join(fn.__doc__.split())


def test_one_overflow_default():
  """batch_capacity, plan_privacy and the config share the default (1e-12 per step)."""
  default = lambda fn: inspect.signature(fn).parameters["overflow_prob"].default
  assert default(privacy.batch_capacity) == default(privacy.plan_privacy) == PrivacyConfig().overflow_prob
  assert privacy.DEFAULT_OVERFLOW_PROB == 1e-12


def test_rdp_convergence_warnings_stay_out_of_the_output(caplog):
  """q = 0.9 at sigma = 1 makes dp_accounting's series fail to converge at small orders, which it logs through
  absl; the accounting filters exactly that message (harmless: the order is left out of the minimum). The absl
  logger's own level is set in each block: another test or library may have raised it (absl's set_verbosity),
  which would hide the message whether filtered or not."""
  schedule = DPSchedule(0.9, 1, 1)
  with caplog.at_level(logging.WARNING, logger="absl"):
    privacy.epsilon_spent(schedule, 1.0, 1e-5, "rdp")
  assert not [r for r in caplog.records if "converge" in r.getMessage()]
  # The control: dp_accounting does emit it here, and other absl warnings still pass.
  absl = logging.getLogger("absl")
  absl.removeFilter(privacy.accounting._not_convergence_noise)
  try:
    with caplog.at_level(logging.WARNING, logger="absl"):
      rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(0.9, 1.0, [1.1])
  finally:
    absl.addFilter(privacy.accounting._not_convergence_noise)
  assert [r for r in caplog.records if "failed to converge" in r.getMessage()]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="absl"):
    absl.warning("another warning")
  assert [r.getMessage() for r in caplog.records] == ["another warning"]
