"""Mixed precision (config `model.dtype`): a bfloat16 base model with float32 adapters, optimiser state, DP noise
and sketch gives the float32 round's result to within bfloat16's round-off.

Tolerance. bfloat16 keeps 8 significand bits (unit round-off u = 2^-9 = 2e-3): the base weights are rounded
once and every activation of the forward and backward pass again, so the clipped per-example gradients, and
with them the round's update (local SGD: linear in the gradients), differ from float32 by a few u per layer
and operation. Measured on this 2-layer model: at most 3.2e-2 relative error of a layer's aggregated update
without noise (the same computation at both precisions), 7e-3 with DP noise (the same float32 noise, same keys,
added to both), and 1.1e-4 on the mean training loss; a wrong computation errs by O(1). The bounds, 0.1 on
the update and 1e-2 on the loss, leave a margin of 3 or more.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedask_jax import simulation
from fedask_jax.data import ClientData, client_batches
from fedask_jax.lora import LoRAConfig, inject_lora
from fedask_jax.models import LlamaConfig, LlamaForCausalLM, init_random
from fedask_jax.strategies import get_strategy

K, EXAMPLES, L, VOCAB = 3, 8, 16, 64
TOLERANCE = 0.1


def _model(dtype):
  config = LlamaConfig(
    "llama",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
  )
  reference = init_random(LlamaForCausalLM(config), jax.random.key(0), std=0.2)
  model = LlamaForCausalLM(config, dtype=dtype)
  # The same weights, rounded to the base dtype (as a checkpoint loaded with model.dtype).
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(reference)))
  inject_lora(
    model, LoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), jax.random.key(1), dtype=jnp.float32
  )
  return model


def _batches():
  key = jax.random.key(2)
  shape = (K, EXAMPLES, L)
  data = ClientData(
    input_ids=jax.random.randint(key, shape, 0, VOCAB, jnp.int32),
    attention_mask=jnp.ones(shape, bool),
    loss_mask=jnp.broadcast_to(jnp.arange(L) >= L // 2, shape),
    client_sizes=jnp.full((K,), EXAMPLES, jnp.int32),
  )
  return client_batches(
    jax.random.key(3), data, jnp.arange(K), local_steps=2, batch_size=4, capacity=4, sampling="uniform"
  )


def _round(dtype, noise_multiplier):
  model = _model(dtype)
  dp = simulation.DPConfig(clip_norm=1.0, noise_multiplier=noise_multiplier, expected_batch_size=4.0)
  # SGD: the update is linear in the gradients, so it shows their precision (Adam's first steps take
  # sign(g), which flips for gradient entries near 0 and would measure that instead).
  rnd = simulation.FederatedRound(model, get_strategy("fedask", certify_every=1), optimizer=optax.sgd(0.5), dp=dp)
  state = rnd.init(K)
  start = {
    name: np.asarray(f.lora_a, np.float64) @ np.asarray(f.lora_b, np.float64) for name, f in state.adapters.items()
  }
  new, metrics = rnd(state, _batches(), jnp.arange(K, dtype=jnp.int32), jnp.full((K,), 1.0 / K), jax.random.key(4), 1)
  return model, new, start, metrics


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_bfloat16_round_matches_float32(noise_multiplier):
  _, full, start, full_metrics = _round(jnp.float32, noise_multiplier)
  model, half, _, half_metrics = _round(jnp.bfloat16, noise_multiplier)
  # The base model is bfloat16; the adapters and everything the server computes stay float32.
  kernels = [x for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "kernel"]
  assert kernels and all(x.get_value().dtype == jnp.bfloat16 for x in kernels)
  chex.assert_trees_all_equal_dtypes(half.adapters, full.adapters)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half.adapters))
  # The sketch in float32: exact to float32 round-off at either base precision.
  assert float(half_metrics["reconstruction_error"]) < 1e-5
  for name in half.adapters:
    update = {
      label: np.asarray(s.adapters[name].lora_a, np.float64) @ np.asarray(s.adapters[name].lora_b) - start[name]
      for label, s in (("half", half), ("full", full))
    }
    assert np.linalg.norm(update["full"]) > 0
    error = np.linalg.norm(update["half"] - update["full"]) / np.linalg.norm(update["full"])
    assert error < TOLERANCE, (name, error)
  np.testing.assert_allclose(half_metrics["train_loss"], full_metrics["train_loss"], rtol=1e-2)
