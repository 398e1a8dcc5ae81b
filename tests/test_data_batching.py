"""Tests for fedask_jax.data.batching: padded client arrays and the per-round batch sampler."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedask_jax.data import batching, encoding, partition

LENGTH = 4
# Client k holds the examples listed here; sizes 3, 9, 1, 20 (uneven, so padding matters).
CLIENT_INDICES = (np.array([0, 5, 7]), np.array([1, 2, 3, 4, 6, 8, 9, 10, 11]), np.array([12]), np.arange(13, 33))


def make_encoded(num_examples: int = 33) -> encoding.EncodedDataset:
  """Row i has input_ids [i, 100 + i, pad, pad] (so a batch row names its example), length 2, target at 1."""
  input_ids = np.zeros((num_examples, LENGTH), np.int32)
  input_ids[:, 0] = np.arange(num_examples)
  input_ids[:, 1] = 100 + np.arange(num_examples)
  attention_mask = np.zeros((num_examples, LENGTH), bool)
  attention_mask[:, :2] = True
  loss_mask = np.zeros((num_examples, LENGTH), bool)
  loss_mask[:, 1] = True
  return encoding.EncodedDataset(
    input_ids, attention_mask, loss_mask, np.ones(num_examples, np.int32), np.full(num_examples, 2, np.int32)
  )


def make_client_data() -> batching.ClientData:
  return jax.tree.map(jnp.asarray, batching.stack_clients(make_encoded(), partition.Partition(CLIENT_INDICES)))


def test_stack_clients_pads_to_the_largest_client():
  encoded = make_encoded()
  data = batching.stack_clients(encoded, partition.Partition(CLIENT_INDICES))
  chex.assert_shape([data.input_ids, data.attention_mask, data.loss_mask], (4, 20, LENGTH))
  np.testing.assert_array_equal(data.client_sizes, [3, 9, 1, 20])
  for k, idx in enumerate(CLIENT_INDICES):
    np.testing.assert_array_equal(data.input_ids[k, : len(idx)], encoded.input_ids[idx])
    np.testing.assert_array_equal(data.loss_mask[k, : len(idx)], encoded.loss_mask[idx])
    assert not data.attention_mask[k, len(idx) :].any() and not data.loss_mask[k, len(idx) :].any()


@pytest.mark.parametrize(
  "indices, match",
  [
    ((np.array([0, 1]), np.array([], np.int64)), "empty client"),
    ((np.array([0, 40]),), "holds index 40"),
  ],
)
def test_stack_clients_errors(indices, match):
  with pytest.raises(ValueError, match=match):
    batching.stack_clients(make_encoded(), partition.Partition(indices))


def check_batch_belongs_to_clients(batch: batching.Batch, client_ids) -> None:
  """Every sampled slot holds a distinct real example of its client; empty slots carry no loss target."""
  batch = jax.tree.map(np.asarray, batch)
  # Real rows have attention over 2 tokens; padding rows (index >= n_k) would have none.
  assert batch.attention_mask.sum(-1).min() == 2
  assert not (batch.loss_mask & ~batch.example_mask[..., None]).any()
  for position, client in enumerate(client_ids):
    owned = set(CLIENT_INDICES[client].tolist())
    for ids, mask in zip(batch.input_ids[position, :, :, 0], batch.example_mask[position]):
      examples = ids[mask].tolist()
      assert set(examples) <= owned and len(set(examples)) == len(examples)


class ClientBatchesTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_membership(self):
    sample = self.variant(functools.partial(batching.client_batches, local_steps=3, batch_size=2, capacity=6))
    client_ids = jnp.array([3, 0, 2])
    batch = sample(jax.random.key(0), make_client_data(), client_ids)
    chex.assert_shape([batch.input_ids, batch.attention_mask, batch.loss_mask], (3, 3, 6, LENGTH))
    chex.assert_shape(batch.example_mask, (3, 3, 6))
    assert batch.example_mask.dtype == jnp.bool_ and batch.input_ids.dtype == jnp.int32
    check_batch_belongs_to_clients(batch, [3, 0, 2])

  @chex.variants(with_jit=True, without_jit=True)
  def test_numpy_client_data_gives_the_same_batches(self):
    """`stack_clients` returns NumPy arrays, which `client_batches` takes as they are (eagerly, where indexing
    them with traced ids used to fail, and under jit)."""
    sample = self.variant(functools.partial(batching.client_batches, local_steps=2, batch_size=2, capacity=5))
    host = batching.stack_clients(make_encoded(), partition.Partition(CLIENT_INDICES))
    assert isinstance(host.input_ids, np.ndarray)
    client_ids = jnp.array([1, 3])
    chex.assert_trees_all_equal(
      sample(jax.random.key(5), host, client_ids), sample(jax.random.key(5), make_client_data(), client_ids)
    )

  def test_reproducible_and_per_client_keys(self):
    sample = jax.jit(functools.partial(batching.client_batches, local_steps=4, batch_size=3, capacity=9))
    data = make_client_data()
    first = sample(jax.random.key(1), data, jnp.array([1, 3]))
    chex.assert_trees_all_equal(first, sample(jax.random.key(1), data, jnp.array([1, 3])))
    other = sample(jax.random.key(2), data, jnp.array([1, 3]))
    assert not np.array_equal(first.example_mask, other.example_mask)
    # Client 3's batches depend on its id and the round key only, not on who else was sampled.
    alone = sample(jax.random.key(1), data, jnp.array([3, 0]))
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], first), jax.tree.map(lambda x: x[0], alone))

  def test_poisson_rate_is_batch_size_over_client_size(self):
    steps, batch_size = 400, 4
    sample = jax.jit(functools.partial(batching.client_batches, local_steps=steps, batch_size=batch_size, capacity=16))
    client_ids = [1, 3, 2]
    batch = sample(jax.random.key(3), make_client_data(), jnp.array(client_ids))
    check_batch_belongs_to_clients(batch, client_ids)
    sizes = np.asarray(batch.example_mask).sum(-1)  # [K, S]
    # Client 1: n = 9, q = 4/9, batch ~ Binomial(9, 4/9), sd 1.49, mean of 400 has sd 0.075; client 3: n = 20,
    # q = 0.2, sd 1.79 -> 0.089. A 0.5 tolerance is > 5.6 sd: false failure < 2e-8. Capacity 16 overflows with
    # probability P(Binomial(20, 0.2) > 16) < 1e-8 per step, negligible here.
    np.testing.assert_allclose(sizes[:2].mean(1), [batch_size, batch_size], atol=0.5)
    # Client 2 has one example, fewer than batch_size: q = 1, so it is in every step.
    np.testing.assert_array_equal(sizes[2], np.ones(steps))
    # Each example joins a step with probability q >= 0.2: it is missed by all 400 steps with probability
    # <= 0.8^400 < 1e-38, so every row, the last ones included, must appear.
    for position, client in enumerate(client_ids[:2]):
      seen = np.asarray(batch.input_ids[position, :, :, 0])[np.asarray(batch.example_mask[position])]
      assert set(seen.tolist()) == set(CLIENT_INDICES[client].tolist())

  def test_a_public_sample_rate_does_not_depend_on_the_client_size(self):
    steps = 400
    sample = jax.jit(
      functools.partial(batching.client_batches, local_steps=steps, batch_size=4, capacity=16, sample_rate=0.25)
    )
    batch = sample(jax.random.key(3), make_client_data(), jnp.array([1, 3]))
    sizes = np.asarray(batch.example_mask).sum(-1)
    # Binomial(9, 0.25) and Binomial(20, 0.25): means 2.25 and 5 whatever batch_size; sds 1.30 and 1.94, of the
    # mean of 400 steps 0.065 and 0.097: a 0.5 tolerance is > 5 sd.
    np.testing.assert_allclose(sizes.mean(1), [9 * 0.25, 20 * 0.25], atol=0.5)

  def test_uniform_minibatches_have_fixed_size(self):
    sample = jax.jit(
      functools.partial(batching.client_batches, local_steps=50, batch_size=5, capacity=7, sampling="uniform")
    )
    client_ids = [3, 0, 2]
    batch = sample(jax.random.key(4), make_client_data(), jnp.array(client_ids))
    check_batch_belongs_to_clients(batch, client_ids)
    sizes = np.asarray(batch.example_mask).sum(-1)
    # min(batch_size, n_k) examples at every step: clients of 20, 3 and 1 examples.
    np.testing.assert_array_equal(sizes, np.broadcast_to(np.array([[5], [3], [1]]), (3, 50)))
    assert not np.asarray(batch.example_mask[..., 5:]).any()


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(local_steps=1, batch_size=2, capacity=21), "capacity=21 exceeds the largest client's 20"),
    (dict(local_steps=1, batch_size=4, capacity=3, sampling="uniform"), "capacity=3 < batch_size=4"),
    (dict(local_steps=1, batch_size=2, capacity=4, sampling="shuffle"), "sampling='shuffle'"),
    (dict(local_steps=0, batch_size=2, capacity=4), "local_steps=0"),
    (dict(local_steps=1, batch_size=2, capacity=4, sampling="uniform", sample_rate=0.5), "sample_rate=0.5 with"),
    (dict(local_steps=1, batch_size=2, capacity=4, sample_rate=1.5), "sample_rate=1.5 with"),
  ],
)
def test_client_batches_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    batching.client_batches(jax.random.key(0), make_client_data(), jnp.array([0]), **kwargs)
