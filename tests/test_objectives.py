"""Tests for fedask_jax.objectives: causal_lm_loss against a numpy reference, and the response-only head
(response_positions, the models' logit_positions, response_loss) against the full head."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedask_jax.data import Batch
from fedask_jax.models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, init_random
from fedask_jax.objectives import (
  CAPACITY_MULTIPLE,
  causal_lm_loss,
  max_targets,
  response_capacity,
  response_loss,
  response_positions,
)
from fedask_jax.simulation import causal_lm_example_loss, response_example_loss


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


def _masks(rng, shape, length):
  """Loss masks [*shape, L] of prompt/response shape (a run of targets after a prompt, then padding), plus one
  row without targets and one whose targets are scattered."""
  mask = np.zeros((*shape, length), bool)
  for index in np.ndindex(*shape):
    start = rng.integers(1, length - 1)
    mask[index][start : rng.integers(start + 1, length + 1)] = True
  flat = mask.reshape(-1, length)
  flat[0] = False
  flat[-1] = rng.random(length) < 0.5
  return mask


def test_response_loss_equals_the_full_loss():
  rng = np.random.default_rng(5)
  shape, length, vocab = (3, 4), 9, 13
  logits = rng.normal(size=(*shape, length, vocab)).astype(np.float32) * 3
  input_ids = rng.integers(0, vocab, size=(*shape, length))
  loss_mask = _masks(rng, shape, length)
  capacity = max_targets(loss_mask)
  assert capacity == loss_mask[..., 1:].sum(-1).max()
  positions, weights = response_positions(jnp.asarray(loss_mask), capacity)
  # Every target position once, in order, and nothing else with weight.
  for index in np.ndindex(*shape):
    expected = np.flatnonzero(loss_mask[index][1:])
    np.testing.assert_array_equal(np.asarray(positions[index])[: len(expected)], expected)
    assert np.asarray(weights[index]).sum() == len(expected)
  gathered = np.take_along_axis(logits, np.asarray(positions)[..., None], axis=-2)
  got = response_loss(gathered, input_ids, positions, weights)
  want = causal_lm_loss(logits, input_ids, loss_mask)
  # The same float32 terms summed in another order: ~1e-7 relative.
  np.testing.assert_allclose(got.per_example, want.per_example, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got.token_mean, want.token_mean, rtol=1e-6)


def test_response_capacity_rounds_up_within_the_sequence():
  # Targets sit at positions 1..L-1 (position 0 predicts nothing): 5 targets -> 8, 9 -> 16, a full 20-token row
  # (19 targets) -> 19, not 24, and a full 10-token one 9, not 16; no targets at all -> 1, the least capacity
  # response_positions takes.
  mask = np.zeros((3, 20), bool)
  mask[0, 2:7] = True
  assert response_capacity(mask) == 8 == CAPACITY_MULTIPLE
  mask[1, 3:12] = True
  assert response_capacity(mask) == 16 > max_targets(mask) == 9
  mask[2] = True
  assert (response_capacity(mask), response_capacity(mask[:, :10])) == (19, 9)
  assert response_capacity(np.zeros((2, 20), bool)) == 1


def test_response_capacity_is_checked():
  with pytest.raises(ValueError, match=r"capacity=0.*max_targets"):
    response_positions(jnp.ones((2, 5), bool), 0)
  with pytest.raises(ValueError, match=r"capacity=1.5"):
    response_example_loss(1.5)
  with pytest.raises(ValueError, match=r"need logits \[\.\.\., P, V\]"):
    response_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 6), int), jnp.zeros((2, 4), int), jnp.zeros((2, 4)))


MODELS = {
  "llama": lambda: LlamaForCausalLM(
    LlamaConfig(
      "llama",
      vocab_size=97,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
    )
  ),
  "gpt2": lambda: GPT2LMHeadModel(
    GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48)
  ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_response_head_matches_the_full_head(name):
  # Llama with its own lm_head, GPT-2 with the tied one: the gathered logits are the full logits' rows, and the
  # per-example loss and its gradient (what DP-SGD clips) equal the full head's.
  model = init_random(MODELS[name](), jax.random.key(0), std=0.2)
  rng = np.random.default_rng(6)
  length = 16
  loss_mask = _masks(rng, (4,), length)
  input_ids = jnp.asarray(rng.integers(0, 97, size=(4, length)))
  attention_mask = jnp.asarray(np.arange(length) < rng.integers(length // 2, length + 1, (4, 1)))
  loss_mask &= np.asarray(attention_mask)
  capacity = max_targets(loss_mask) + 2  # slack: the padded slots must not count
  positions, _ = response_positions(jnp.asarray(loss_mask), capacity)
  full = model(input_ids, attention_mask)
  # Same hidden states, the same head rows: equal up to XLA's different fusion of the gathered product.
  np.testing.assert_allclose(
    model(input_ids, attention_mask, logit_positions=positions),
    np.take_along_axis(np.asarray(full), np.asarray(positions)[..., None], axis=1),
    rtol=1e-5,
    atol=1e-5,
  )
  graphdef, params = nnx.split(model)
  full_loss, response = causal_lm_example_loss, response_example_loss(capacity)
  for i in range(4):
    example = Batch(
      input_ids=input_ids[i],
      attention_mask=attention_mask[i],
      loss_mask=jnp.asarray(loss_mask[i]),
      example_mask=jnp.asarray(True),
    )
    value = lambda loss, p, example=example: loss(nnx.merge(graphdef, p), example)
    want, want_grad = jax.value_and_grad(functools.partial(value, full_loss))(params)
    got, got_grad = jax.value_and_grad(functools.partial(value, response))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_response_head_flops_scale_with_the_capacity():
  # XLA's FLOP count of one example's loss: the head (2 d V per position, V = 4096 >> d = 32 here) dominates, so
  # a capacity of L / 4 must cut the forward's FLOPs to well under half.
  config = LlamaConfig(
    "llama",
    vocab_size=4096,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
  )
  model = init_random(LlamaForCausalLM(config), jax.random.key(0), std=0.2)
  length = 64
  example = Batch(
    input_ids=jnp.zeros(length, jnp.int32),
    attention_mask=jnp.ones(length, bool),
    loss_mask=jnp.arange(length) >= 3 * length // 4,
    example_mask=jnp.asarray(True),
  )
  flops = {}
  for name, loss in [("full", causal_lm_example_loss), ("response", response_example_loss(length // 4))]:
    analysis = jax.jit(loss).lower(model, example).compile().cost_analysis()
    flops[name] = (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]
  head = 2 * config.hidden_size * config.vocab_size
  assert flops["full"] - flops["response"] >= 0.9 * head * (length - length // 4)
