"""Tests for fedask_jax.data.partition on GSM8K's derived categories and Tiny Shakespeare's speakers."""

import functools

import numpy as np
import pytest

from fedask_jax.data import corpora, partition

NUM_CLIENTS = 10


@functools.cache
def gsm8k_categories() -> np.ndarray:
  return np.array([r["category"] for r in corpora.load_gsm8k("train")])


def make(scheme: str, seed: int, alpha: float = 0.5) -> partition.Partition:
  categories = gsm8k_categories()
  if scheme == "iid":
    return partition.iid_partition(categories, NUM_CLIENTS, seed=seed)
  return partition.dirichlet_partition(categories, NUM_CLIENTS, alpha=alpha, seed=seed)


def category_distributions(p: partition.Partition, categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """([clients, categories] per-client category frequencies, [categories] global frequencies)."""
  _, inverse = np.unique(categories, return_inverse=True)
  counts = np.stack([np.bincount(inverse[idx], minlength=inverse.max() + 1) for idx in p.client_indices])
  return counts / counts.sum(1, keepdims=True), np.bincount(inverse) / len(inverse)


@pytest.mark.parametrize("scheme, alpha", [("iid", None), ("dirichlet", 0.1), ("dirichlet", 1.0)])
def test_partition_covers_every_example_once(scheme, alpha):
  p = make(scheme, seed=0, alpha=alpha)
  all_indices = np.concatenate(p.client_indices)
  assert p.num_clients == NUM_CLIENTS and p.sizes.sum() == len(gsm8k_categories())
  np.testing.assert_array_equal(np.sort(all_indices), np.arange(len(gsm8k_categories())))
  assert p.sizes.min() >= 1
  assert all(np.all(np.diff(idx) > 0) for idx in p.client_indices)


def test_iid_keeps_category_proportions():
  categories = gsm8k_categories()
  p = partition.iid_partition(categories, NUM_CLIENTS, seed=3)
  labels, inverse = np.unique(categories, return_inverse=True)
  counts = np.stack([np.bincount(inverse[idx], minlength=len(labels)) for idx in p.client_indices])
  # The round-robin deal gives each client floor or ceil of n_c / K of every category c: a deterministic
  # tolerance of one example per category, and sizes within one of N / K.
  share = np.bincount(inverse) / NUM_CLIENTS
  assert np.all(np.abs(counts - share) < 1)
  assert p.sizes.max() - p.sizes.min() <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
  categories = gsm8k_categories()

  def mean_tv(alpha: float) -> float:
    tvs = []
    for seed in range(50):
      client, glob = category_distributions(make("dirichlet", seed, alpha), categories)
      tvs.append(np.mean(0.5 * np.abs(client - glob).sum(1)))
    return float(np.mean(tvs))

  # Over 200 seeds the per-seed mean TV is 0.63 +- 0.044 (alpha 0.1), 0.41 +- 0.039 (0.5), 0.033 +- 0.005
  # (100); averaged over 50 seeds the gaps are 0.22 and 0.37, about 27 and 66 standard deviations of the
  # difference, so a false failure is below 1e-50 under a normal approximation (Cantelli: below 2e-3).
  tv = [mean_tv(alpha) for alpha in (0.1, 0.5, 100.0)]
  assert tv[0] > tv[1] > tv[2]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_reproducible_under_a_seed_and_seeds_differ(scheme):
  first, again, other = make(scheme, seed=7), make(scheme, seed=7), make(scheme, seed=8)
  for a, b in zip(first.client_indices, again.client_indices):
    np.testing.assert_array_equal(a, b)
  assert any(a.shape != b.shape or np.any(a != b) for a, b in zip(first.client_indices, other.client_indices))


def test_dirichlet_redraws_until_no_client_is_too_small():
  # At alpha 0.1 over 5 categories, a single draw leaves one of 30 clients with < 5 examples 98% of the time
  # (measured over seeds 0..99, seed 0 among them); the redraws succeed.
  with pytest.raises(ValueError, match="raise alpha"):
    partition.dirichlet_partition(gsm8k_categories(), 30, alpha=0.1, seed=0, min_client_size=5, max_draws=1)
  p = partition.dirichlet_partition(gsm8k_categories(), 30, alpha=0.1, seed=0, min_client_size=5)
  assert p.sizes.min() >= 5


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: partition.iid_partition(["a", "b"], 3, seed=0), "exceeds the 2 examples"),
    (lambda: partition.dirichlet_partition(["a"] * 9, 3, alpha=0.0, seed=0), "alpha=0.0"),
    (lambda: partition.dirichlet_partition(["a"] * 9, 3, alpha=1.0, seed=0, min_client_size=4), "min_client_size=4"),
    (lambda: partition.partition_records([{"x": 1}], "iid", num_clients=1), "column='category'"),
    (lambda: partition.partition_records([{"category": 1}], "dirichlet", num_clients=1), "needs alpha"),
    (lambda: partition.partition_records([{"category": 1}], "random", num_clients=1), "scheme='random'"),
    (lambda: partition.partition_records([{"category": 1}], "natural", column=None), "needs a column"),
  ],
)
def test_partition_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_partition_records_matches_the_functions():
  records = corpora.load_gsm8k("test")
  categories = [r["category"] for r in records]
  by_name = partition.partition_records(records, "dirichlet", num_clients=5, alpha=0.3, seed=4, min_client_size=10)
  direct = partition.dirichlet_partition(categories, 5, alpha=0.3, seed=4, min_client_size=10)
  for a, b in zip(by_name.client_indices, direct.client_indices):
    np.testing.assert_array_equal(a, b)
  unstratified = partition.partition_records(records, "iid", num_clients=4, column=None, seed=0)
  constant = partition.iid_partition(np.zeros(len(records)), 4, seed=0)
  for a, b in zip(unstratified.client_indices, constant.client_indices):
    np.testing.assert_array_equal(a, b)


def test_natural_partition_by_shakespeare_speaker():
  records = corpora.load_tiny_shakespeare()
  speakers = [r["speaker"] for r in records]
  p = partition.partition_records(records, "natural", column="speaker")
  assert p.num_clients == len(set(speakers)) and p.sizes.sum() == len(records)
  for name, idx in zip(p.client_names, p.client_indices):
    assert {speakers[i] for i in idx} == {name}
  big = partition.natural_partition(speakers, min_client_size=50)
  assert big.sizes.min() >= 50
  assert set(big.client_names) == {s for s in set(speakers) if speakers.count(s) >= 50}


def test_summary_reports_sizes_and_categories():
  categories = np.array(["x", "y", "x", "x", "y", "x"])
  p = partition.Partition((np.array([0, 1]), np.array([2, 3, 4, 5])))
  lines = p.summary(categories).splitlines()
  assert lines[0] == "2 clients, 6 examples; size min 2, median 3, max 4"
  assert lines[2].split() == ["0", "2", "1", "1"] and lines[3].split() == ["1", "4", "3", "1"]
