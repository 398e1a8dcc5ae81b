"""Poisson sampling over a fixed-capacity batch (fedask_jax.privacy.sampling)."""

import fractions
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax_privacy import batch_selection

from fedask_jax import privacy

# Statistical tests fail falsely with probability at most this (two-sided, Bonferroni over their entries).
FALSE_FAILURE = 1e-6


def _exact_tail(n, q, c):
  """P(Binomial(n, q) > c) in exact rational arithmetic (q a Fraction): an independent reference."""
  return float(sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(c + 1, n + 1)))


@pytest.mark.parametrize(
  "n, rate, overflow_prob",
  [(150, 0.04, 1e-6), (150, 0.04, 1e-12), (1000, 0.5, 1e-3), (40, 1.0, 1e-6), (5000, 0.001, 1e-6)],
)
def test_capacity_is_the_smallest_meeting_the_bound(n, rate, overflow_prob):
  capacity = privacy.batch_capacity(n, rate, overflow_prob)
  assert scipy.stats.binom.sf(capacity, n, rate) <= overflow_prob
  assert capacity == 1 or scipy.stats.binom.sf(capacity - 1, n, rate) > overflow_prob
  assert privacy.overflow_probability(n, rate, capacity) == pytest.approx(scipy.stats.binom.sf(capacity, n, rate))


def test_capacity_against_exact_rational_tail():
  n, q = 150, fractions.Fraction(1, 25)
  capacity = privacy.batch_capacity(n, float(q), 1e-6)
  assert _exact_tail(n, q, capacity) <= 1e-6 < _exact_tail(n, q, capacity - 1)
  for c in (capacity - 3, capacity, capacity + 3):
    # scipy's tail in double precision vs exact rationals: agreement to ~1e-12 relative.
    assert privacy.overflow_probability(n, float(q), c) == pytest.approx(_exact_tail(n, q, c), rel=1e-9)


def _binomial_bounds(trials, p, tests):
  alpha = FALSE_FAILURE / (2 * tests)
  return scipy.stats.binom.ppf(alpha, trials, p), scipy.stats.binom.isf(alpha, trials, p)


def _draw(num_draws, num_examples, rate, capacity, max_examples=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), num_draws)
  sample = functools.partial(
    privacy.poisson_sample, num_examples=num_examples, rate=rate, capacity=capacity, max_examples=max_examples
  )
  indices, mask = jax.jit(jax.vmap(sample))(keys)
  return np.asarray(indices), np.asarray(mask)


def _check_structure(indices, mask, num_examples, max_examples):
  assert indices.dtype == np.int32 and mask.dtype == bool
  for row, row_mask in zip(indices, mask):
    assert len(set(row.tolist())) == row.size  # distinct slots
    assert np.all((0 <= row) & (row < max_examples))
    assert np.all(row[row_mask] < num_examples)
    # The selected examples fill a prefix of the slots.
    assert not np.any(row_mask[1:] & ~row_mask[:-1])


def test_rate_and_uniformity_without_truncation():
  """capacity = n: exact Poisson sampling. The total count is Binomial(draws n, q); each example's count is
  Binomial(draws, q)."""
  n, rate, draws = 200, 0.05, 2000
  indices, mask = _draw(draws, n, rate, capacity=n)
  _check_structure(indices, mask, n, n)
  low, high = _binomial_bounds(draws * n, rate, 1)
  assert low <= mask.sum() <= high
  counts = np.bincount(indices[mask], minlength=n)
  low, high = _binomial_bounds(draws, rate, n)
  assert np.all((low <= counts) & (counts <= high)), (counts.min(), counts.max(), low, high)


def test_traced_size_under_a_static_maximum():
  """Clients of different sizes share one compiled shape: n is traced, max_examples static."""
  max_examples, capacity, rate, draws = 64, 20, 0.2, 1000
  sizes = jnp.array([37, 64, 5])
  keys = jax.random.split(jax.random.key(1), (3, draws))
  sample = jax.jit(
    jax.vmap(
      jax.vmap(
        functools.partial(privacy.poisson_sample, capacity=capacity, max_examples=max_examples), in_axes=(0, None, None)
      ),
      in_axes=(0, 0, None),
    )
  )
  indices, mask = (np.asarray(x) for x in sample(keys, sizes, rate))
  for client, n in enumerate(sizes.tolist()):
    _check_structure(indices[client], mask[client], n, max_examples)
    # P(Binomial(64, 0.2) > 20) ~ 0.011 per draw: the mean count is compared with E[min(X, 20)], within z sd
    # (CLT over 1000 draws; Var(min(X, c)) <= Var(X) since min(., c) is 1-Lipschitz).
    truncated_mean = sum(min(k, capacity) * scipy.stats.binom.pmf(k, n, rate) for k in range(n + 1))
    sd = math.sqrt(n * rate * (1 - rate) / draws)
    z = scipy.stats.norm.isf(FALSE_FAILURE / (2 * len(sizes)))
    assert abs(mask[client].sum(axis=1).mean() - truncated_mean) <= z * sd


def _truncated_binomial_pmf(n, rate, capacity):
  pmf = scipy.stats.binom.pmf(np.arange(capacity + 1), n, rate)
  pmf[capacity] = scipy.stats.binom.sf(capacity - 1, n, rate)
  return pmf


def _assert_law(sizes, pmf):
  """Chi-square goodness of fit at FALSE_FAILURE, merging the low tail until each bin expects >= 5."""
  expected = pmf * sizes.size
  observed = np.bincount(sizes, minlength=pmf.size).astype(float)
  first = int(np.argmax(np.cumsum(expected) >= 5))
  expected = np.concatenate([[expected[: first + 1].sum()], expected[first + 1 :]])
  observed = np.concatenate([[observed[: first + 1].sum()], observed[first + 1 :]])
  assert np.all(expected >= 5)
  p_value = scipy.stats.chisquare(observed, expected).pvalue
  assert p_value >= FALSE_FAILURE, p_value


def test_overflow_keeps_a_uniform_subset_of_capacity():
  """Capacity below the mean batch: the size is min(Binomial(n, q), capacity), as for jax_privacy's host-side
  truncated Poisson sampler, and every example is kept with the same probability E[size] / n."""
  n, rate, capacity, draws = 100, 0.2, 15, 4000
  assert privacy.overflow_probability(n, rate, capacity) > 0.5
  indices, mask = _draw(draws, n, rate, capacity)
  _check_structure(indices, mask, n, n)
  pmf = _truncated_binomial_pmf(n, rate, capacity)
  _assert_law(mask.sum(axis=1), pmf)
  sampler = batch_selection.CyclicPoissonSampling(sampling_prob=rate, iterations=draws, truncated_batch_size=capacity)
  _assert_law(np.array([b.size for b in sampler.batch_iterator(n, rng=0)]), pmf)
  counts = np.bincount(indices[mask], minlength=n)
  low, high = _binomial_bounds(draws, pmf @ np.arange(capacity + 1) / n, n)
  assert np.all((low <= counts) & (counts <= high)), (counts.min(), counts.max(), low, high)


def test_same_key_same_sample_and_keys_differ():
  sample = jax.jit(privacy.poisson_sample, static_argnums=(1, 3))
  first = sample(jax.random.key(3), 50, 0.3, 30)
  chex.assert_trees_all_equal(first, sample(jax.random.key(3), 50, 0.3, 30))
  # Two keys give the same ordering of 30 of 50 examples with negligible probability.
  assert not np.array_equal(first[0], sample(jax.random.key(4), 50, 0.3, 30)[0])


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: privacy.poisson_sample(jax.random.key(0), 10, 0.0, 5), "rate=0.0"),
    (lambda: privacy.poisson_sample(jax.random.key(0), 10, 1.5, 5), "rate=1.5"),
    (lambda: privacy.poisson_sample(jax.random.key(0), 10, 0.5, 11), "capacity=11"),
    (lambda: privacy.poisson_sample(jax.random.key(0), 10, 0.5, 0), "capacity=0"),
    (lambda: privacy.poisson_sample(jax.random.key(0), 12, 0.5, 5, max_examples=10), "max_examples=10"),
    (lambda: jax.jit(lambda n: privacy.poisson_sample(jax.random.key(0), n, 0.5, 5))(3), "max_examples"),
    (lambda: privacy.batch_capacity(0, 0.5), "num_examples=0"),
    (lambda: privacy.batch_capacity(10, 0.5, overflow_prob=0.0), "overflow_prob=0.0"),
    (lambda: privacy.overflow_probability(10, -0.1, 3), "rate=-0.1"),
  ],
)
def test_bad_arguments_fail_early(call, match):
  with pytest.raises(ValueError, match=match):
    call()
