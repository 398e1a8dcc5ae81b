"""Tests for fedask_jax.objectives.causal_lm_loss against a numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedask_jax.objectives import causal_lm_loss


def reference_loss(logits, input_ids, loss_mask):
  """Loops over examples and positions: -log softmax(logits[t])[ids[t+1]] wherever mask[t+1], in float64."""
  logits = np.asarray(logits, np.float64)
  flat_logits = logits.reshape(-1, *logits.shape[-2:])
  flat_ids = np.asarray(input_ids).reshape(-1, input_ids.shape[-1])
  flat_mask = np.asarray(loss_mask).reshape(flat_ids.shape)
  per_example, total, count = [], 0.0, 0
  for row_logits, ids, mask in zip(flat_logits, flat_ids, flat_mask):
    losses = []
    for t in range(len(ids) - 1):
      if mask[t + 1]:
        z = row_logits[t] - row_logits[t].max()
        losses.append(np.log(np.exp(z).sum()) - z[ids[t + 1]])
    per_example.append(np.mean(losses) if losses else 0.0)
    total += sum(losses)
    count += len(losses)
  return np.reshape(per_example, input_ids.shape[:-1]), total / count


class CausalLMLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    batch_shape = (2, 3, 2)  # [K, S, B] as in a round's batch; a plain [B] is the special case of one axis
    length, vocab = 7, 11
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(*batch_shape, length, vocab)).astype(np.float32) * 3
    input_ids = rng.integers(0, vocab, size=(*batch_shape, length))
    loss_mask = rng.random((*batch_shape, length)) < 0.5
    loss_mask.reshape(-1, length)[0] = False  # one example without targets: its loss is 0, not NaN
    got = self.variant(causal_lm_loss)(jnp.asarray(logits), jnp.asarray(input_ids), jnp.asarray(loss_mask))
    want_per_example, want_mean = reference_loss(logits, input_ids, loss_mask)
    chex.assert_shape(got.per_example, batch_shape)
    # float32 log-softmax of logits of scale ~10 against a float64 reference: relative error ~1e-6.
    chex.assert_trees_all_close(got.per_example, want_per_example, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got.token_mean, want_mean, rtol=1e-5)
    assert float(got.per_example.reshape(-1)[0]) == 0.0

  def test_bfloat16_logits_are_scored_in_float32(self):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.bfloat16)
    input_ids = jnp.asarray(rng.integers(0, 8, size=(2, 5)))
    loss_mask = jnp.ones((2, 5), bool)
    got = jax.jit(causal_lm_loss)(logits, input_ids, loss_mask)
    want, _ = reference_loss(np.asarray(logits.astype(jnp.float32)), np.asarray(input_ids), np.asarray(loss_mask))
    assert got.per_example.dtype == jnp.float32
    chex.assert_trees_all_close(got.per_example, want, rtol=1e-5)

  def test_gradient_ignores_masked_positions(self):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(1, 6, 5)), jnp.float32)
    input_ids = jnp.asarray(rng.integers(0, 5, size=(1, 6)))
    loss_mask = jnp.asarray([[False, False, False, True, True, False]])
    grad = jax.jit(jax.grad(lambda x: causal_lm_loss(x, input_ids, loss_mask).token_mean))(logits)
    # Targets at positions 3 and 4 are predicted from logits 2 and 3; nothing else may get a gradient.
    np.testing.assert_array_equal(np.abs(np.asarray(grad[0])).sum(-1) > 0, [False, False, True, True, False, False])

  def test_shape_mismatch_fails_early(self):
    with pytest.raises(ValueError, match="need logits"):
      causal_lm_loss(jnp.zeros((2, 5, 3)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4), bool))
