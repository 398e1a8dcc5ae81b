"""Per-example clipping by the global L2 norm (fedask_jax.privacy.clipping)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedask_jax import privacy

# Clipped norms are computed in float32: a scaled vector's norm exceeds C by at most a few ulps.
NORM_SLACK = 1e-6


def _per_example_grads(num=16, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  # Norms spread over two orders of magnitude so that C = 1 clips some examples and not others.
  spread = np.logspace(-1, 1, num)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=(num, *shape)) * spread.reshape(-1, *[1] * len(shape)) / 4, dtype)
  return {"w": leaf(3, 4), "bias": leaf(4), "nested": {"v": leaf(2)}}


def _numpy_norms(tree):
  return np.sqrt(
    sum(np.sum(np.asarray(x, np.float64).reshape(x.shape[0], -1) ** 2, axis=1) for x in jax.tree.leaves(tree))
  )


class ClipPerExampleTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_bound_and_identity_below_the_norm(self):
    grads = _per_example_grads()
    clip_norm = 1.0
    clipped, norms = self.variant(lambda g: privacy.clip_per_example(g, clip_norm))(grads)
    reference = _numpy_norms(grads)
    np.testing.assert_allclose(norms, reference, rtol=1e-6)
    below, above = reference <= clip_norm, reference > clip_norm
    assert below.any() and above.any()
    clipped_norms = _numpy_norms(clipped)
    assert np.all(clipped_norms <= clip_norm * (1 + NORM_SLACK))
    # Clipped examples land on the sphere; the others are returned exactly.
    np.testing.assert_allclose(clipped_norms[above], clip_norm, rtol=1e-6)
    for got, original in zip(jax.tree.leaves(clipped), jax.tree.leaves(grads)):
      np.testing.assert_array_equal(np.asarray(got)[below], np.asarray(original)[below])
      # Clipping only rescales: direction kept, scale min(1, C / norm).
      scale = np.minimum(1.0, clip_norm / reference).reshape(-1, *[1] * (original.ndim - 1))
      np.testing.assert_allclose(got, np.asarray(original, np.float64) * scale, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal_shapes_and_dtypes(clipped, grads)

  def test_mask_zeroes_padding_even_when_nan(self):
    grads = _per_example_grads(num=5)
    mask = jnp.array([True, False, True, False, True])
    grads = jax.tree.map(lambda x: jnp.where(mask.reshape(-1, *[1] * (x.ndim - 1)), x, jnp.nan), grads)
    clipped, _ = jax.jit(privacy.clip_per_example)(grads, 0.5, mask)
    for leaf in jax.tree.leaves(clipped):
      np.testing.assert_array_equal(np.asarray(leaf)[~np.asarray(mask)], 0.0)
      assert np.all(np.isfinite(leaf))
    assert np.all(_numpy_norms(clipped) <= 0.5 * (1 + NORM_SLACK))

  def test_bfloat16_keeps_dtype_and_bound(self):
    grads = _per_example_grads(dtype=jnp.bfloat16)
    clipped, _ = jax.jit(privacy.clip_per_example)(grads, 1.0)
    chex.assert_trees_all_equal_dtypes(clipped, grads)
    # bfloat16 has an 8-bit mantissa: each entry rounds by up to 2^-8 relative, so the norm by as much.
    assert np.all(_numpy_norms(clipped) <= 1.0 * (1 + 2**-8))


def test_clip_scale_edge_cases():
  norms = jnp.array([0.0, 0.5, 2.0, jnp.inf, jnp.nan])
  np.testing.assert_allclose(privacy.clip_scale(norms, 1.0), [1.0, 1.0, 0.5, 0.0, 0.0])


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_clip_norm(clip_norm):
  with pytest.raises(ValueError, match="clip_norm="):
    privacy.clip_per_example(_per_example_grads(num=2), clip_norm)
  with pytest.raises(ValueError, match="clip_norm="):
    privacy.clip_scale(jnp.ones(2), clip_norm)
