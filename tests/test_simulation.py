"""Tests of the compiled federated round (fedask_jax.simulation).

Most tests use a two-layer MLP of `fedask_jax.lora.Linear` layers (both adapted, rank 2) with a squared-error
loss, so that a round compiles in seconds; one test runs a tiny Llama from `fedask_jax.models` through both DP
mechanisms against a reference written with plain `jax.grad`.

Tolerances. Float32 throughout. "Same program, different batching" comparisons (vmapped vs looped, chunked,
sharded) allow rtol 1e-5 / atol 1e-6: XLA may order a float32 reduction differently for a batched and an
unbatched operand (a few ulps, ~1e-7 relative), and a few optimiser steps and a QR/SVD reconstruction amplify
that by at most ~10x; a wrong key, client or chunk changes results at O(1). Comparisons with independently
written references (centralised training, per-example gradients) allow rtol 1e-4: the references compute the
batch loss in one batched call instead of one example at a time and accumulate in another order.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx

from fedask_jax import simulation
from fedask_jax.data.batching import Batch, ClientData, client_batches
from fedask_jax.lora import Linear, LoRAConfig, from_adapters, inject_lora, split_lora, to_adapters
from fedask_jax.models import LlamaConfig, LlamaForCausalLM, init_random
from fedask_jax.objectives import causal_lm_loss
from fedask_jax.strategies import get_strategy

D_IN, D_HIDDEN, D_OUT, RANK = 6, 8, 5, 2
NUM_CLIENTS = 10
CLIENT_IDS = jnp.array([7, 0, 4, 9], jnp.int32)
WEIGHTS = jnp.array([3.0, 1.0, 2.0, 4.0])
B_SPACE = simulation.DPConfig(clip_norm=1.0, noise_multiplier=0.8, expected_batch_size=3.0)
W_SPACE = simulation.DPConfig(clip_norm=1.0, noise_multiplier=0.8, expected_batch_size=3.0, mechanism="w_space")
SAME_PROGRAM = dict(rtol=1e-5, atol=1e-6)
REFERENCE = dict(rtol=1e-4, atol=1e-6)


class TinyMLP(nnx.Module):
  """x [.., D_IN] -> fc2(tanh(fc1(x))) [.., D_OUT], both layers LoRA-adapted (rank 2)."""

  def __init__(self, seed: int = 0, dropout: float = 0.0):
    key = jax.random.key(seed)
    self.fc1 = Linear(D_IN, D_HIDDEN)
    self.fc2 = Linear(D_HIDDEN, D_OUT)
    self.fc1.kernel.set_value(jax.random.normal(jax.random.fold_in(key, 1), (D_IN, D_HIDDEN)) / np.sqrt(D_IN))
    self.fc2.kernel.set_value(jax.random.normal(jax.random.fold_in(key, 2), (D_HIDDEN, D_OUT)) / np.sqrt(D_HIDDEN))
    inject_lora(
      self,
      LoRAConfig(rank=RANK, alpha=2.0 * RANK, target_modules=("fc1", "fc2"), dropout=dropout),
      jax.random.fold_in(key, 3),
    )

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


class Examples(NamedTuple):
  """Regression examples: x [..., D_IN], y [..., D_OUT], example_mask [...] (the Poisson mask)."""

  x: jax.Array
  y: jax.Array
  example_mask: jax.Array


def squared_error(model, example):
  """Per-example loss: 0.5 ||model(x) - y||^2 (the model sees a batch of one)."""
  return 0.5 * jnp.sum((model(example.x[None])[0] - example.y) ** 2)


def make_batches(seed: int, num_clients: int = 4, steps: int = 3, capacity: int = 5) -> Examples:
  """[K, S, capacity, ...] batches, about 70% of the slots real."""
  key = jax.random.key(seed)
  return Examples(
    jax.random.normal(jax.random.fold_in(key, 0), (num_clients, steps, capacity, D_IN)),
    jax.random.normal(jax.random.fold_in(key, 1), (num_clients, steps, capacity, D_OUT)),
    jax.random.bernoulli(jax.random.fold_in(key, 2), 0.7, (num_clients, steps, capacity)),
  )


def make_round(strategy, dp=None, optimizer=None, model=None, **kwargs) -> simulation.FederatedRound:
  strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
  return simulation.FederatedRound(
    model if model is not None else TinyMLP(),
    strategy,
    dp=dp,
    per_example_loss=squared_error,
    optimizer=optimizer if optimizer is not None else optax.adam(0.05),
    **kwargs,
  )


def random_state(rnd: simulation.FederatedRound, seed: int = 1, num_clients: int = NUM_CLIENTS):
  """A server state with every float leaf (adapters and strategy state) random, so that both factors get
  gradients and per-client state (FedSA-LoRA's b, SCAFFOLD's controls) is non-trivial."""
  state = rnd.init(num_clients)
  leaves, treedef = jax.tree.flatten(state)
  key = jax.random.key(seed)
  # Counters (the sketch strategies' count of aggregations) stay as initialised.
  return jax.tree.unflatten(
    treedef,
    [
      x
      if jnp.issubdtype(x.dtype, jnp.integer)
      else 0.5 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      for i, x in enumerate(leaves)
    ],
  )


def copy(tree):
  """A fresh copy: the round donates its state argument."""
  return jax.tree.map(jnp.array, tree)


def as_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def looped_clients(rnd, state, batches, client_ids, round_key, round_index):
  """The reference of the mapped clients: a Python loop over clients, each a jitted one-client update with key
  fold_in(round_key, id); (ClientResult [K], ClientMetrics [K])."""
  trained = rnd.trained(round_index)
  update = jax.jit(functools.partial(simulation.client_update, rnd.training, trained))
  results, metrics = [], []
  for k, client_id in enumerate(np.asarray(client_ids)):
    batch = jax.tree.map(operator.itemgetter(k), batches)
    result, client_metrics = update(
      state, rnd.frozen_state, batch, jnp.int32(client_id), jax.random.fold_in(round_key, int(client_id))
    )
    results.append(result)
    metrics.append(client_metrics)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *results), jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)


def looped_round(rnd, state, batches, client_ids, weights, round_key, round_index):
  """The reference of the mapped round: `looped_clients`, then the server step."""
  stacked, client = looped_clients(rnd, state, batches, client_ids, round_key, round_index)
  server_step = jax.jit(functools.partial(simulation.server_step, rnd.strategy))
  new_state, round_metrics = server_step(state, stacked, weights, client_ids, simulation.server_key(round_key))
  return new_state, dict(
    round_metrics,
    client_loss=client.loss,
    update_norm=client.update_norm,
    nonfinite_examples=client.nonfinite_examples,
    train_loss=jnp.mean(client.loss),
    clipped_fraction=jnp.sum(client.clipped_examples) / jnp.sum(client.examples),
  )


@pytest.mark.parametrize(
  "strategy,dp,round_index,client_chunk",
  [
    ("fedask", B_SPACE, 1, None),
    ("fedask-alt", W_SPACE, 2, None),
    ("scaffold", B_SPACE, 1, 3),
    ("fedsa-lora", None, 1, 1),
  ],
)
def test_mapped_round_equals_loop_over_clients(strategy, dp, round_index, client_chunk):
  rnd = make_round(strategy, dp, client_chunk=client_chunk)
  state = random_state(rnd)
  batches, round_key = make_batches(0), jax.random.key(11)
  expected_state, expected_metrics = looped_round(rnd, state, batches, CLIENT_IDS, WEIGHTS, round_key, round_index)
  # The public per-client view of the same round, before the server step.
  chex.assert_trees_all_close(
    as_numpy(rnd.client_results(state, batches, CLIENT_IDS, round_key, round_index)),
    as_numpy(looped_clients(rnd, state, batches, CLIENT_IDS, round_key, round_index)),
    **SAME_PROGRAM,
  )
  new_state, metrics = rnd(copy(state), batches, CLIENT_IDS, WEIGHTS, round_key, round_index)
  chex.assert_trees_all_close(as_numpy(new_state), as_numpy(expected_state), **SAME_PROGRAM)
  assert set(metrics) == set(expected_metrics)
  chex.assert_shape([metrics["client_loss"], metrics["update_norm"]], (4,))
  chex.assert_shape([metrics["train_loss"], metrics["clipped_fraction"]], ())
  chex.assert_trees_all_close(as_numpy(metrics), as_numpy(expected_metrics), **SAME_PROGRAM)
  # The round did something: every client moved, and the state changed.
  assert np.all(np.asarray(metrics["update_norm"]) > 1e-3)
  assert not np.allclose(np.asarray(new_state.adapters["fc1"].lora_b), np.asarray(state.adapters["fc1"].lora_b))


def test_chunked_round_equals_unchunked():
  batches, round_key = make_batches(1), jax.random.key(5)
  outputs = {}
  for chunk in (None, 1, 3):  # 3 does not divide K = 4: the remainder runs as its own vmap
    rnd = make_round("fedask", B_SPACE, client_chunk=chunk)
    outputs[chunk] = as_numpy(rnd(random_state(rnd), batches, CLIENT_IDS, WEIGHTS, round_key, 1))
  chex.assert_trees_all_close(outputs[1], outputs[None], **SAME_PROGRAM)
  chex.assert_trees_all_close(outputs[3], outputs[None], **SAME_PROGRAM)


def max_principal_angle(x, y):
  return float(np.max(scipy.linalg.subspace_angles(np.asarray(x, np.float64), np.asarray(y, np.float64))))


def test_fedask_dp_keeps_the_column_space_of_lora_a_and_fedask_alt_moves_it():
  """docs/design.md, section 1.5: with lora_a frozen during local DP training, sum_k w_k lora_a lora_b_k lies in
  col(lora_a), so FedASK's reconstructed lora_a spans the initial col(lora_a) forever (principal angles ~0);
  fedask-alt trains lora_a in even rounds and leaves it. Bounds: float32 QR/SVD turn the subspace by ~1e-6 rad
  per round (the singular values of lora_a are well separated here); fedask-alt's noisy Adam steps of size 0.05
  on entries of size ~0.5 turn a rank-2 subspace of R^6 / R^8 by tenths of a radian."""
  angles = {}
  for strategy in ("fedask", "fedask-alt"):
    rnd = make_round(get_strategy(strategy, certify_every=1), B_SPACE)
    state = random_state(rnd, seed=2)
    initial = as_numpy(state.adapters)
    for t in range(1, 5):
      state, metrics = rnd(state, make_batches(t), CLIENT_IDS, WEIGHTS, jax.random.key(100 + t), t)
      # Exactness certificate: with a shared frozen factor the sketch reconstructs the aggregate exactly
      # (float32 round-off of a QR and an SVD, relative ~1e-6).
      assert float(metrics["reconstruction_error"]) < 1e-4
    angles[strategy] = max(max_principal_angle(state.adapters[n].lora_a, initial[n].lora_a) for n in initial)
  assert angles["fedask"] < 1e-3, angles
  assert angles["fedask-alt"] > 0.1, angles


def test_nonprivate_fedask_with_one_client_equals_centralised_lora_training():
  """One client, no DP: FedASK's round is local AdamW on both factors followed by an exact (rank <= r)
  re-factorisation, so the product lora_a lora_b equals that of centralised LoRA training on the same batches. The
  reference trains the adapters with plain optax on the batch loss, the model called once per batch."""
  steps = 4
  optimizer = optax.adamw(0.05, weight_decay=0.01)
  batches = make_batches(3, num_clients=1, steps=steps)
  rnd = make_round("fedask", None, optimizer=optimizer)
  state, _ = rnd(rnd.init(1), batches, jnp.array([0]), jnp.array([1.0]), jax.random.key(0), 1)

  graphdef, lora_state, frozen_state = split_lora(TinyMLP())
  adapters = to_adapters(lora_state)
  opt_state = optimizer.init(adapters)

  def batch_loss(adapters, x, y, mask):
    model = nnx.merge(graphdef, from_adapters(lora_state, adapters), frozen_state)
    per_example = 0.5 * jnp.sum((model(x) - y) ** 2, axis=-1)
    return jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

  for s in range(steps):
    grad = jax.grad(batch_loss)(adapters, batches.x[0, s], batches.y[0, s], batches.example_mask[0, s])
    updates, opt_state = optimizer.update(grad, opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  for name, factors in adapters.items():
    got = state.adapters[name].lora_a @ state.adapters[name].lora_b
    np.testing.assert_allclose(got, factors.lora_a @ factors.lora_b, **REFERENCE)
    assert np.linalg.norm(factors.lora_a @ factors.lora_b) > 0.1  # training moved away from lora_b = 0


@pytest.mark.parametrize(
  "strategy,dp,round_index,frozen",
  [
    ("fedask", B_SPACE, 1, "lora_a"),
    ("fedask-alt", B_SPACE, 2, "lora_b"),
    ("fedask-alt", W_SPACE, 2, "lora_b"),
    ("ffa-lora", W_SPACE, 1, "lora_a"),
  ],
)
def test_dp_noise_reaches_only_the_trained_factor(strategy, dp, round_index, frozen):
  """No real example in any slot, so the update is DP noise alone: it must move the trained factor and leave
  the frozen one bit-identical."""
  rnd = make_round(strategy, dp)
  state = random_state(rnd)
  batch = make_batches(0, num_clients=1)
  batch = jax.tree.map(lambda x: x[0], batch._replace(example_mask=jnp.zeros_like(batch.example_mask)))
  trained = rnd.trained(round_index)
  assert trained == {"lora_a": "lora_b", "lora_b": "lora_a"}[frozen]
  update = jax.jit(functools.partial(simulation.client_update, rnd.training, trained))
  result, metrics = update(state, rnd.frozen_state, batch, jnp.int32(3), jax.random.key(4))
  for name, start in state.adapters.items():
    final = result.adapters[name]
    np.testing.assert_array_equal(np.asarray(getattr(final, frozen)), np.asarray(getattr(start, frozen)))
    assert not np.allclose(np.asarray(getattr(final, trained)), np.asarray(getattr(start, trained)))
  assert float(metrics.loss) == 0.0 and int(metrics.examples) == int(metrics.clipped_examples) == 0


def test_lora_dropout_masks_follow_the_client_key():
  """LoRA dropout is reseeded from the client's key (per example and step): two keys give different local
  models, one key always the same; without reseeding every example would reuse the model's stored stream."""
  rnd = make_round("fedavg", None, model=TinyMLP(dropout=0.5))
  state = random_state(rnd)
  batch = jax.tree.map(lambda x: x[0], make_batches(0, num_clients=1))
  update = jax.jit(functools.partial(simulation.client_update, rnd.training, "both"))
  run = lambda key: as_numpy(update(state, rnd.frozen_state, batch, jnp.int32(0), key)[0].adapters)
  first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  chex.assert_trees_all_equal(first, again)
  assert not np.allclose(first["fc1"].lora_a, other["fc1"].lora_a)


# ----- a real model: tiny Llama, both DP mechanisms against jax.grad references -----

LLAMA = LlamaConfig(
  model_type="llama",
  vocab_size=64,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)
LLAMA_LENGTH, LLAMA_CAPACITY = 12, 3


def tiny_llama() -> LlamaForCausalLM:
  model = init_random(LlamaForCausalLM(LLAMA), jax.random.key(0))
  inject_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), jax.random.key(1))
  # Non-zero lora_b, so that the q/v adapters change the loss and both factors' gradients are informative.
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, Linear) and layer.lora_b is not None:
      layer.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(layer.out_features), layer.lora_b.shape))
  return model


def llama_batches() -> Batch:
  """Two clients, one local step, three slots of which 2 and 3 are real; loss on tokens 5..11."""
  key = jax.random.key(3)
  shape = (2, 1, LLAMA_CAPACITY, LLAMA_LENGTH)
  example_mask = jnp.array([[[True, False, True]], [[True, True, True]]])
  loss_mask = jnp.broadcast_to(jnp.arange(LLAMA_LENGTH) >= 5, shape) & example_mask[..., None]
  return Batch(jax.random.randint(key, shape, 0, LLAMA.vocab_size), jnp.ones(shape, bool), loss_mask, example_mask)


def llama_reference(batches: Batch):
  """Per example of each client: loss, dl/d(lora_b) and dl/dW of the adapted layers (W-space: the gradient
  of the frozen kernel, since y = x (W0 + s lora_a lora_b) gives dl/dW0 = dl/dW), by jax.grad on a batch of one."""
  graphdef, lora_state, rest = nnx.split(tiny_llama(), nnx.LoRAParam, ...)
  names = list(to_adapters(lora_state))

  def loss(lora_state, rest, ids, mask, loss_mask):
    logits = nnx.merge(graphdef, lora_state, rest)(ids[None], mask[None])
    return causal_lm_loss(logits, ids[None], loss_mask[None]).per_example[0]

  def per_example(ids, mask, loss_mask):
    value, (lora_grad, rest_grad) = jax.value_and_grad(loss, argnums=(0, 1))(lora_state, rest, ids, mask, loss_mask)
    kernels = {".".join(map(str, p[:-1])): v for p, v in nnx.to_flat_state(rest_grad) if p[-1] == "kernel"}
    w_sq = sum(jnp.sum(jnp.square(kernels[n].get_value())) for n in names)
    b_grads = {n: f.lora_b for n, f in to_adapters(lora_grad).items()}
    return value, b_grads, jnp.sqrt(w_sq)

  flat = lambda x: x.reshape(-1, *x.shape[3:])
  values, b_grads, w_norms = jax.vmap(per_example)(
    flat(batches.input_ids), flat(batches.attention_mask), flat(batches.loss_mask)
  )
  b_norms = jnp.sqrt(sum(jnp.sum(jnp.square(g), axis=(1, 2)) for g in b_grads.values()))
  return values, b_grads, {"b_space": b_norms, "w_space": w_norms}, to_adapters(lora_state)


@pytest.mark.parametrize("mechanism", ["b_space", "w_space"])
def test_llama_round_with_both_dp_mechanisms_matches_per_example_reference(mechanism):
  """FedASK round on a tiny Llama (2 clients, one SGD step, sigma = 0 so that the result is deterministic, C
  between the per-example norms so that some examples are clipped): the new global product equals
  lora_a0 (lora_b0 - lr sum_k w_k g_k) with g_k = sum_i min(1, C / ||g_i||) dl/dlora_b_i / (q n), per-example
  gradients and norms from `llama_reference` (||dl/dlora_b|| in B-space, ||dl/dW|| in W-space); the loss and
  clipped fraction metrics match too."""
  lr, expected_batch_size = 0.5, 2.0
  batches = llama_batches()
  values, b_grads, norms, start = llama_reference(batches)
  real = np.asarray(batches.example_mask).reshape(-1)
  norms = np.asarray(norms[mechanism])
  # Midway between two real examples' norms: some clipped, and no norm within float32 round-off of C.
  clip_norm = float(np.mean(np.sort(norms[real])[1:3]))
  weights = jnp.array([1.0, 3.0])
  dp = simulation.DPConfig(clip_norm, 0.0, expected_batch_size, mechanism)
  rnd = simulation.FederatedRound(tiny_llama(), get_strategy("fedask"), dp=dp, optimizer=optax.sgd(lr))
  state, metrics = rnd(rnd.init(4), batches, jnp.array([2, 0]), weights, jax.random.key(9), 1)

  scale = np.where(real, np.minimum(1.0, clip_norm / np.maximum(norms, 1e-30)), 0.0).reshape(2, LLAMA_CAPACITY)
  w = np.asarray(weights) / np.sum(weights)
  for name, factors in start.items():
    g = np.asarray(b_grads[name]).reshape(2, LLAMA_CAPACITY, *factors.lora_b.shape)
    client_grads = np.einsum("ke,ke...->k...", scale, g) / expected_batch_size
    step = lr * np.einsum("k,k...->...", w, client_grads)
    expected = np.asarray(factors.lora_a) @ (np.asarray(factors.lora_b) - step)
    np.testing.assert_allclose(state.adapters[name].lora_a @ state.adapters[name].lora_b, expected, **REFERENCE)
  losses = np.where(real, np.asarray(values), 0.0).reshape(2, LLAMA_CAPACITY)
  counts = np.asarray(batches.example_mask).reshape(2, LLAMA_CAPACITY).sum(1)
  np.testing.assert_allclose(metrics["client_loss"], losses.sum(1) / counts, **REFERENCE)
  clipped = (norms > clip_norm).reshape(2, LLAMA_CAPACITY) & np.asarray(batches.example_mask).reshape(2, -1)
  # Over the round's real examples (not a mean of per-client or per-step fractions).
  np.testing.assert_allclose(metrics["clipped_fraction"], clipped.sum() / counts.sum(), atol=1e-6)
  assert 0 < float(metrics["clipped_fraction"]) < 1


# ----- sampling, weights, keys, errors -----


def test_sample_clients_is_uniform_without_replacement():
  """2000 draws of 3 of 12 clients: distinct ids in range, reproducible from the key, and each client's count
  ~ Binomial(2000, 1/4) (mean 500, sd 19.4). The bound 500 +- 6 sd fails with probability < 12 * 2e-9."""
  draw = jax.jit(jax.vmap(lambda key: simulation.sample_clients(key, 12, 3)))
  ids = np.asarray(draw(jax.random.split(jax.random.key(0), 2000)))
  assert ids.shape == (2000, 3) and ids.min() >= 0 and ids.max() < 12
  assert all(len(set(row)) == 3 for row in ids)
  np.testing.assert_array_equal(
    simulation.sample_clients(jax.random.key(5), 12, 3), simulation.sample_clients(jax.random.key(5), 12, 3)
  )
  counts = np.bincount(ids.reshape(-1), minlength=12)
  assert np.all(np.abs(counts - 500) < 6 * np.sqrt(2000 * 0.25 * 0.75)), counts


def test_client_weights_are_normalised_client_sizes():
  sizes = np.array([10, 40, 25, 5, 20])
  ids = np.array([3, 1, 4])
  np.testing.assert_allclose(simulation.client_weights(sizes, ids), sizes[ids] / sizes[ids].sum(), rtol=1e-6)


def test_client_keys_do_not_depend_on_the_other_sampled_clients():
  """A client's key is fold_in(round_key, id): the same client with the same data trains the same whatever
  else is sampled (docs/design.md, section 3.2)."""
  rnd = make_round("fedavg", B_SPACE)
  state = random_state(rnd)
  batches = make_batches(0, num_clients=2)
  first = rnd(copy(state), batches, jnp.array([4, 1]), jnp.ones(2), jax.random.key(3), 1)[1]
  second = rnd(copy(state), batches, jnp.array([4, 6]), jnp.ones(2), jax.random.key(3), 1)[1]
  np.testing.assert_allclose(first["update_norm"][0], second["update_norm"][0], **SAME_PROGRAM)
  assert not np.isclose(first["update_norm"][1], second["update_norm"][1], **SAME_PROGRAM)


@pytest.mark.parametrize("dp", [B_SPACE, W_SPACE], ids=["b_space", "w_space"])
def test_traced_noise_multiplier_equals_the_compiled_constant_and_compiles_once(dp):
  """A sigma passed to the round is an argument of one compiled program: each sigma gives what a round built
  with that sigma as its DPConfig constant gives (same keys, so the same noise draws scaled), and a sweep over
  sigma does not recompile."""
  batches, round_key = make_batches(2), jax.random.key(8)
  swept = make_round("fedask", dp)
  state = random_state(swept)
  for sigma in (0.0, 0.3, 2.5):
    fixed = make_round(
      "fedask",
      simulation.DPConfig(
        clip_norm=dp.clip_norm,
        noise_multiplier=sigma,
        expected_batch_size=dp.expected_batch_size,
        mechanism=dp.mechanism,
      ),
    )
    expected = fixed(copy(state), batches, CLIENT_IDS, WEIGHTS, round_key, 1)
    got = swept(copy(state), batches, CLIENT_IDS, WEIGHTS, round_key, 1, noise_multiplier=sigma)
    # A constant sigma lets XLA fold sigma * C; as an argument it is a multiply: a few ulps apart.
    chex.assert_trees_all_close(as_numpy(got), as_numpy(expected), **SAME_PROGRAM)
  assert swept.compiled("lora_b")._cache_size() == 1
  with pytest.raises(ValueError, match="without DP"):
    make_round("fedask")(state, batches, CLIENT_IDS, WEIGHTS, round_key, 1, noise_multiplier=1.0)
  with pytest.raises(ValueError, match=r"noise_multiplier=-1.0: sigma must be a finite number >= 0"):
    swept(state, batches, CLIENT_IDS, WEIGHTS, round_key, 1, noise_multiplier=-1.0)


def test_init_survives_the_donation_of_the_first_round():
  """The round donates its state: `init` must hand out copies, so the initial adapters (and a second run from
  them) are still alive after a round."""
  rnd = make_round("fedask", B_SPACE)
  batches, round_key = make_batches(0), jax.random.key(1)
  first = as_numpy(rnd(rnd.init(NUM_CLIENTS), batches, CLIENT_IDS, WEIGHTS, round_key, 1))
  second = as_numpy(rnd(rnd.init(NUM_CLIENTS), batches, CLIENT_IDS, WEIGHTS, round_key, 1))
  chex.assert_trees_all_equal(first, second)
  jax.block_until_ready(rnd.initial_adapters)


def test_invalid_configurations_fail_early_with_value_errors():
  with pytest.raises(ValueError, match="w_space.*trains both"):
    make_round("fedavg", W_SPACE).trained(1)
  rnd = make_round("fedask", B_SPACE)
  state = rnd.init(NUM_CLIENTS)
  with pytest.raises(ValueError, match="same K"):
    rnd(state, make_batches(0, num_clients=3), CLIENT_IDS, WEIGHTS, jax.random.key(0), 1)
  with pytest.raises(ValueError, match="numbered from 1"):
    rnd(state, make_batches(0), CLIENT_IDS, WEIGHTS, jax.random.key(0), 0)
  with pytest.raises(ValueError, match="clip_norm"):
    simulation.DPConfig(clip_norm=0.0, noise_multiplier=1.0, expected_batch_size=4.0)
  with pytest.raises(ValueError, match="mechanism"):
    simulation.DPConfig(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0, mechanism="x_space")
  with pytest.raises(ValueError, match="client_chunk"):
    make_round("fedask", client_chunk=0)
  with pytest.raises(ValueError, match="clients_per_round"):
    simulation.sample_clients(jax.random.key(0), 3, 4)
  with pytest.raises(ValueError, match="Auto"):
    make_round("fedask", mesh=jax.make_mesh((1,), ("clients",)))
  with pytest.raises(ValueError, match="no LoRA adapters"):
    simulation.FederatedRound(Linear(3, 3), get_strategy("fedask"))


# ---------------------------------------------------------------------------------------------------------------
# The round inside the caller's own program: step, lax.scan, lower / compile, the sampler


R = 3


def per_round_batches():
  """Round t's batches for t = 1..R, stacked [R, K, S, capacity, ...] for a scan."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[make_batches(t) for t in range(1, R + 1)])


@pytest.mark.parametrize("strategy", ["fedask", "scaffold"])
def test_scan_of_pure_steps_equals_the_compiled_rounds(strategy):
  """R rounds as one jitted lax.scan of `step` (round index traced) give what R calls of the compiled round give:
  the same program, traced once into a loop."""
  rnd = make_round(strategy, B_SPACE)
  state, run_key, stacked = random_state(rnd), jax.random.key(4), per_round_batches()
  expected = copy(state)
  for t in range(1, R + 1):
    expected, _ = rnd(
      expected, jax.tree.map(lambda x, t=t: x[t - 1], stacked), CLIENT_IDS, WEIGHTS, jax.random.fold_in(run_key, t), t
    )

  @jax.jit
  def rounds(state, frozen, batches):
    def one(state, xs):
      t, round_batches = xs
      new, metrics = rnd.step(
        state, round_batches, CLIENT_IDS, WEIGHTS, jax.random.fold_in(run_key, t), t, frozen_state=frozen
      )
      return new, metrics["train_loss"]

    return jax.lax.scan(one, state, (jnp.arange(1, R + 1), batches))

  got, losses = rounds(state, rnd.frozen_state, stacked)
  chex.assert_shape(losses, (R,))
  chex.assert_trees_all_close(as_numpy(got), as_numpy(expected), **SAME_PROGRAM)
  assert not np.allclose(np.asarray(got.adapters["fc1"].lora_b), np.asarray(state.adapters["fc1"].lora_b))


def test_fedask_alt_scans_two_rounds_per_step_and_refuses_a_traced_index():
  rnd = make_round("fedask-alt", B_SPACE)
  state, run_key = random_state(rnd), jax.random.key(6)
  batches = [make_batches(t) for t in range(1, 5)]
  expected = copy(state)
  for t in range(1, 5):
    expected, _ = rnd(expected, batches[t - 1], CLIENT_IDS, WEIGHTS, jax.random.fold_in(run_key, t), t)

  @jax.jit
  def rounds(state, odd, even):
    def two(state, xs):  # rounds t = 2i + 1 (lora_b) and 2i + 2 (lora_a): the index picks the factor, statically
      i, odd_batches, even_batches = xs
      for parity, round_batches in ((1, odd_batches), (2, even_batches)):
        state, _ = rnd.step(
          state, round_batches, CLIENT_IDS, WEIGHTS, jax.random.fold_in(run_key, 2 * i + parity), parity
        )
      return state, None

    return jax.lax.scan(two, state, (jnp.arange(2), odd, even))[0]

  stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)
  got = rounds(state, stack(batches[0::2]), stack(batches[1::2]))
  chex.assert_trees_all_close(as_numpy(got), as_numpy(expected), **SAME_PROGRAM)

  traced = jax.jit(lambda state, t: rnd.step(state, batches[0], CLIENT_IDS, WEIGHTS, run_key, t))
  with pytest.raises(ValueError, match="'fedask-alt' chooses its trained factor from the round index.*two rounds"):
    traced(state, jnp.int32(1))
  with pytest.raises(ValueError, match=r"round_index: float32\[\] array; expected an int scalar"):
    rnd.step(state, batches[0], CLIENT_IDS, WEIGHTS, run_key, jnp.float32(1))


def test_lower_and_compile_give_the_round_that_call_runs():
  rnd = make_round("fedask", B_SPACE)
  state, batches, round_key = random_state(rnd), make_batches(3), jax.random.key(2)
  lowered = rnd.lower(state, batches, CLIENT_IDS, WEIGHTS, round_key, 1)
  assert "while" in lowered.as_text()  # the local steps' scan is in the program
  compiled = rnd.compile(state, batches, CLIENT_IDS, WEIGHTS, round_key, 1)
  got = compiled(copy(state), rnd.frozen_state, batches, CLIENT_IDS, WEIGHTS, round_key)
  expected = rnd(copy(state), batches, CLIENT_IDS, WEIGHTS, round_key, 1)
  chex.assert_trees_all_equal(as_numpy(got), as_numpy(expected))


def small_client_data(num_clients=6, max_size=9, length=3, seed=0):
  """Client c's example i has input_ids [c, i, 7]; sizes 3..max_size."""
  sizes = np.random.default_rng(seed).integers(3, max_size + 1, num_clients).astype(np.int32)
  ids = np.zeros((num_clients, max_size, length), np.int32)
  ids[..., 0] = np.arange(num_clients)[:, None]
  ids[..., 1] = np.arange(max_size)[None, :]
  ids[..., 2] = 7
  valid = np.broadcast_to(np.arange(max_size)[None, :, None] < sizes[:, None, None], ids.shape)
  return ClientData(ids, valid.copy(), valid.copy(), sizes)


@pytest.mark.parametrize("sampling,sample_rate", [("poisson", None), ("uniform", None), ("poisson", 0.5)])
def test_round_sampler_draws_what_its_parts_draw_and_takes_numpy(sampling, sample_rate):
  """The jitted sampler equals its parts run eagerly (sample_clients, client_batches from data_key,
  client_weights), from device or NumPy client data, and runs inside a scan. With a public sample_rate (private
  client sizes) every client samples at it and the sampled clients weigh the same."""
  data = small_client_data()
  sample = simulation.round_sampler(
    6, 4, local_steps=2, batch_size=3, capacity=5, sampling=sampling, sample_rate=sample_rate
  )
  round_key = jax.random.key(9)
  ids = simulation.sample_clients(round_key, 6, 4)
  expected = (
    ids,
    simulation.client_weights(data.client_sizes, ids) if sample_rate is None else jnp.ones(4, jnp.float32),
    client_batches(
      simulation.data_key(round_key),
      data,
      ids,
      local_steps=2,
      batch_size=3,
      capacity=5,
      sampling=sampling,
      sample_rate=sample_rate,
    ),
  )
  chex.assert_trees_all_equal(as_numpy(sample(round_key, data)), as_numpy(expected))
  chex.assert_trees_all_equal(as_numpy(sample(round_key, jax.device_put(data))), as_numpy(expected))
  keys = jax.vmap(lambda t: jax.random.fold_in(round_key, t))(jnp.arange(3))
  scanned = jax.jit(lambda keys, data: jax.lax.scan(lambda c, k: (c, sample(k, data)), 0, keys)[1])(keys, data)
  chex.assert_trees_all_equal(as_numpy(jax.tree.map(lambda x: x[1], scanned)), as_numpy(sample(keys[1], data)))
  with pytest.raises(ValueError, match=r"client_sizes has shape \(6,\): expected \(5,\)"):
    simulation.round_sampler(5, 4, local_steps=2, batch_size=3, capacity=5)(round_key, data)
