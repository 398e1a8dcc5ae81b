"""Tests of fedask_jax.adapters: the adapters' pytree helpers (exact: they only move and stack arrays)."""

import chex
import numpy as np
import pytest

from fedask_jax.adapters import TRAINED, LoRAFactors, combine, select, stack_adapters, unstack_adapters


def random_adapters(rng, lead=()):
  """Two layers of different shapes, lora_a [*lead, in, r] and lora_b [*lead, r, out]."""
  return {
    name: LoRAFactors(
      rng.standard_normal((*lead, m, 2)).astype(np.float32), rng.standard_normal((*lead, 2, n)).astype(np.float32)
    )
    for name, (m, n) in {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (6, 3)}.items()
  }


def test_stack_unstack_round_trip():
  rng = np.random.default_rng(0)
  per_client = [random_adapters(rng) for _ in range(3)]
  stacked = stack_adapters(per_client)
  for name, factors in stacked.items():
    chex.assert_shape(factors.lora_a, (3, *per_client[0][name].lora_a.shape))
    chex.assert_shape(factors.lora_b, (3, *per_client[0][name].lora_b.shape))
  chex.assert_trees_all_equal(unstack_adapters(stacked), per_client)
  chex.assert_trees_all_equal(stack_adapters(unstack_adapters(stacked)), stacked)


def test_select_and_combine_are_inverse():
  adapters = random_adapters(np.random.default_rng(1))
  for trained in TRAINED:
    subset = select(adapters, trained)
    assert all(
      (f.lora_a is None) == (trained == "lora_b") and (f.lora_b is None) == (trained == "lora_a")
      for f in subset.values()
    )
    chex.assert_trees_all_equal(combine(subset, adapters), adapters)


def test_select_rejects_an_unknown_factor():
  with pytest.raises(ValueError, match=r"trained='b': a client trains lora_a, lora_b or both"):
    select({}, "b")
