"""Tests of fedask_jax.lora against PEFT / torch references and hand-written LoRA algebra."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from fedask_jax import lora
from fedask_jax.adapters import LoRAFactors, stack_adapters
from fedask_jax.lora import Linear, LoRAConfig

D = 8  # hidden width of the tiny models


class _Attention(nnx.Module):
  def __init__(self):
    self.q_proj = Linear(D, D)
    self.k_proj = Linear(D, D // 2)
    self.v_proj = Linear(D, D // 2, use_bias=True)
    self.o_proj = Linear(D // 2, D)

  def __call__(self, x):
    return self.o_proj(jnp.tanh(self.q_proj(x)[..., : D // 2] + self.k_proj(x)) * self.v_proj(x))


class _MLP(nnx.Module):
  def __init__(self):
    self.up_proj = Linear(D, 2 * D)
    self.down_proj = Linear(2 * D, D)

  def __call__(self, x):
    return self.down_proj(jnp.tanh(self.up_proj(x)))


class _Block(nnx.Module):
  def __init__(self):
    self.self_attn = _Attention()
    self.mlp = _MLP()

  def __call__(self, x):
    x = x + self.self_attn(x)
    return x + self.mlp(x)


class _Decoder(nnx.Module):
  def __init__(self, num_layers):
    self.layers = nnx.List([_Block() for _ in range(num_layers)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class TinyLlama(nnx.Module):
  """A stand-in with Llama's module paths (`model.layers.0.self_attn.q_proj`, `lm_head`) and random weights."""

  def __init__(self, seed=0, num_layers=2, vocab=5):
    self.model = _Decoder(num_layers)
    self.lm_head = Linear(D, vocab)
    # numpy draws: cheaper than compiling a jax.random op per kernel shape.
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(self):
      if isinstance(m, Linear):
        m.kernel[...] = jnp.asarray(rng.normal(size=m.kernel.shape) / math.sqrt(m.in_features), jnp.float32)
        if m.bias is not None:
          m.bias[...] = jnp.asarray(0.1 * rng.normal(size=m.bias.shape), jnp.float32)

  def __call__(self, x):
    return self.lm_head(self.model(x))


class TwoLayer(nnx.Module):
  """l2(tanh(l1(x))): small enough to write its LoRA forward and backward by hand."""

  def __init__(self, d_in=6, d_hidden=7, d_out=5, seed=0):
    self.l1 = Linear(d_in, d_hidden, use_bias=True)
    self.l2 = Linear(d_hidden, d_out)
    key = jax.random.key(seed)
    self.l1.kernel[...] = jax.random.normal(jax.random.fold_in(key, 0), (d_in, d_hidden))
    self.l1.bias[...] = jax.random.normal(jax.random.fold_in(key, 1), (d_hidden,))
    self.l2.kernel[...] = jax.random.normal(jax.random.fold_in(key, 2), (d_hidden, d_out))

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def _randomize_adapters(model, seed, scale=0.3):
  """Non-zero lora_a and lora_b everywhere (a fresh adapter has lora_b = 0, which hides bugs)."""
  rng = np.random.default_rng(seed)
  for layer in lora.lora_layers(model).values():
    layer.lora_a[...] = jnp.asarray(scale * rng.normal(size=layer.lora_a.shape), jnp.float32)
    layer.lora_b[...] = jnp.asarray(scale * rng.normal(size=layer.lora_b.shape), jnp.float32)


def _inputs(seed=1, batch=4, d=D):
  return jax.random.normal(jax.random.key(seed), (batch, d))


def _adapted_llama(config=None, seed=0, random_adapters=True):
  config = config or LoRAConfig(rank=2, alpha=4.0)
  model = TinyLlama(seed)
  lora.inject_lora(model, config, jax.random.key(seed + 10))
  if random_adapters:
    _randomize_adapters(model, seed + 20)
  return model


# ---------------------------------------------------------------------------------------------------------------
# LoRAConfig


@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 8.0), (16, 32.0), (8, 3.0)])
def test_scaling_is_alpha_over_rank_and_scales_the_adapter_output(rank, alpha):
  assert LoRAConfig(rank=rank, alpha=alpha).scaling == alpha / rank
  layer = Linear(32, 24)
  layer.kernel[...] = jax.random.normal(jax.random.key(0), (32, 24))
  layer.add_lora(LoRAConfig(rank=rank, alpha=alpha), jax.random.key(1))
  layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b.shape)
  x = _inputs(d=32)
  expected = x @ layer.kernel[...] + (alpha / rank) * (x @ layer.lora_a[...]) @ layer.lora_b[...]
  # float32 matmuls of length <= 32 with O(1) entries: a few ulps of O(10) values.
  np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


_MODULE_NAMES = [
  "model.layers.0.self_attn.q_proj",
  "model.layers.0.self_attn.k_proj",
  "model.layers.0.self_attn.v_proj",
  "model.layers.0.self_attn.o_proj",
  "model.layers.11.mlp.down_proj",
  "model.layers.1.self_attn.xq_proj",
  "q_proj",
  "lm_head",
  "transformer.h.0.attn.c_attn",
  "transformer.h.0.attn.c_proj",
  "transformer.h.0.mlp.c_proj",
  "transformer.h.0.mlp.c_fc",
]


@pytest.mark.parametrize(
  "target_modules",
  [
    ["q_proj", "v_proj"],
    ["c_proj"],
    ["attn.c_proj"],
    ["self_attn.q_proj", "lm_head"],
    ["model.layers.0.self_attn.o_proj"],
    ["proj", "lm_head"],  # a partial component ("proj" of "q_proj") does not match
    "q_proj",
    r".*\.layers\.0\..*_proj",
    r".*(q|v)_proj",
    r"transformer\.h\.\d+\.(attn|mlp)\.c_.*",
  ],
)
def test_target_matching_agrees_with_peft(target_modules):
  ours = LoRAConfig(rank=1, alpha=1.0, target_modules=target_modules)
  theirs = PeftLoraConfig(r=1, target_modules=target_modules)
  expected = [bool(check_target_module_exists(theirs, name)) for name in _MODULE_NAMES]
  assert [ours.matches(name) for name in _MODULE_NAMES] == expected
  assert any(expected), "the case should adapt at least one of the names"


def test_lora_a_init_matches_torch_kaiming_uniform():
  fan_in, rank = 256, 64
  ours = np.asarray(lora.peft_lora_a_init(jax.random.key(0), (fan_in, rank))).ravel()
  torch.manual_seed(0)
  weight = torch.empty(rank, fan_in)  # PEFT's lora_A.weight is [r, in]
  torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
  theirs = weight.numpy().ravel()
  # torch's own bound: gain(leaky_relu, sqrt 5) * sqrt(3 / fan_in), fan_in from the [r, in] weight.
  torch_fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(weight)
  bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / torch_fan_in)
  assert bound == pytest.approx(1 / math.sqrt(fan_in), rel=1e-12)
  assert np.abs(theirs).max() <= bound
  assert np.abs(ours).max() <= bound
  # All 16384 draws below 0.99 * bound has probability 0.99**16384 < 1e-70.
  assert np.abs(ours).max() > 0.99 * bound
  # Same distribution: two-sample KS test at level 1e-3 (false-failure probability 1e-3 over seeds).
  assert scipy.stats.ks_2samp(ours, theirs).pvalue > 1e-3


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(rank=0, alpha=1.0), "lora.rank=0"),
    (dict(rank=-2, alpha=1.0), "lora.rank=-2"),
    (dict(rank=2.0, alpha=1.0), "lora.rank=2.0"),
    (dict(rank=2, alpha=0.0), "lora.alpha=0.0"),
    (dict(rank=2, alpha=1.0, dropout=1.0), "lora.dropout=1.0"),
    (dict(rank=2, alpha=1.0, target_modules=()), "target_modules is empty"),
  ],
)
def test_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoRAConfig(**kwargs)


def test_rank_above_layer_size_is_rejected():
  model = TinyLlama()
  # k_proj is 8 x 4: rank 5 fits q_proj (8 x 8) but not k_proj.
  with pytest.raises(ValueError, match=r"lora.rank=5 exceeds min\(in, out\) = 4 of a 8 x 4 layer"):
    lora.inject_lora(model, LoRAConfig(rank=5, alpha=1.0, target_modules=("k_proj",)), jax.random.key(0))


def test_inject_without_match_lists_available_names():
  model = TinyLlama()
  with pytest.raises(ValueError, match="matches no linear layer") as err:
    lora.inject_lora(model, LoRAConfig(rank=1, alpha=1.0, target_modules=("query",)), jax.random.key(0))
  for name in ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]:
    assert repr(name) in str(err.value)


def test_inject_adapts_exactly_the_matching_layers_with_fresh_factors():
  model = TinyLlama()
  adapted = lora.inject_lora(
    model, LoRAConfig(rank=3, alpha=6.0, target_modules=("q_proj", "down_proj")), jax.random.key(0)
  )
  expected = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
  assert sorted(adapted) == sorted(expected)
  assert list(lora.lora_layers(model)) == adapted
  for layer in lora.lora_layers(model).values():
    chex.assert_shape(layer.lora_a[...], (layer.in_features, 3))
    chex.assert_shape(layer.lora_b[...], (3, layer.out_features))
    assert layer.scaling == 2.0
    assert not np.any(layer.lora_b[...])
  # Per-layer keys are fold_in(key, index): the layers get different initial factors.
  a0, a1 = (layer.lora_a[...] for layer in list(lora.lora_layers(model).values())[::2])
  assert not np.array_equal(a0, a1)


# ---------------------------------------------------------------------------------------------------------------
# Forward semantics


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fresh_adapter_leaves_outputs_unchanged(dropout):
  model = TinyLlama()
  x = _inputs()
  before = model(x)
  lora.inject_lora(
    model, LoRAConfig(rank=2, alpha=4.0, target_modules=r".*_proj|lm_head", dropout=dropout), jax.random.key(3)
  )
  assert len(lora.lora_layers(model)) == 13
  # lora_b = 0 makes the adapter term exactly 0 (also under dropout, which is active by default).
  np.testing.assert_array_equal(model(x), before)


def test_merge_and_unload_gives_the_lora_logits():
  model = _adapted_llama(LoRAConfig(rank=2, alpha=4.0, target_modules=r".*_proj|lm_head"))
  x = _inputs()
  expected = model(x)
  layers = lora.lora_layers(model)
  layer_factors = {name: (layer.lora_a[...], layer.lora_b[...]) for name, layer in layers.items()}
  kernels = {name: layer.kernel[...] for name, layer in layers.items()}
  lora.merge_and_unload(model)
  assert lora.lora_layers(model) == {}
  for name, layer in layers.items():
    np.testing.assert_allclose(
      layer.kernel[...] - kernels[name], 2.0 * layer_factors[name][0] @ layer_factors[name][1], rtol=1e-5, atol=1e-6
    )
  # (x a) b vs x (a b) in float32 through 2 residual blocks: ~1e-6 relative error on O(1) logits.
  np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_train_mode_and_inactive_in_eval_mode():
  rate, d = 0.5, 64
  layer = Linear(d, d)
  layer.kernel[...] = jax.random.normal(jax.random.key(0), (d, d))
  layer.add_lora(LoRAConfig(rank=4, alpha=8.0, dropout=rate), jax.random.key(1))
  layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b.shape)
  layer.wspace_probe = True
  x = _inputs(batch=d, d=d)
  no_dropout = x @ layer.kernel[...] + 2.0 * (x @ layer.lora_a[...]) @ layer.lora_b[...]

  layer.eval()
  out_eval, sown = nnx.capture(layer, nnx.Intermediate)(x)
  np.testing.assert_array_equal(sown["lora_input"].get_value()[0], x)
  np.testing.assert_allclose(out_eval, no_dropout, rtol=1e-5, atol=1e-4)

  layer.train()
  out1, sown = nnx.capture(layer, nnx.Intermediate)(x)
  out2 = layer(x)
  assert not np.allclose(out1, out2) and not np.allclose(out1, out_eval)
  h = np.asarray(sown["lora_input"].get_value()[0])
  dropped = h == 0
  # Kept entries are rescaled by 1 / (1 - rate); dropout touches only the adapter's input, not the base path.
  np.testing.assert_allclose(h[~dropped], np.asarray(x)[~dropped] / (1 - rate), rtol=1e-6)
  np.testing.assert_allclose(
    out1, x @ layer.kernel[...] + 2.0 * (h @ layer.lora_a[...]) @ layer.lora_b[...], rtol=1e-5, atol=1e-4
  )
  # Binomial(4096, 0.5) dropped count: 5 standard deviations (32 each) gives false-failure probability < 1e-6.
  n = h.size
  assert abs(dropped.sum() - rate * n) < 5 * math.sqrt(n * rate * (1 - rate))


# ---------------------------------------------------------------------------------------------------------------
# State helpers


def test_split_merge_round_trip_is_exact():
  model = _adapted_llama()
  x = _inputs()
  expected_out, expected_state = model(x), nnx.state(model)
  graphdef, lora_state, frozen_state = lora.split_lora(model)
  assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(lora_state))
  assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen_state))
  assert len(nnx.to_flat_state(lora_state)) == 2 * len(lora.lora_layers(model))
  merged = nnx.merge(graphdef, lora_state, frozen_state)
  np.testing.assert_array_equal(merged(x), expected_out)
  chex.assert_trees_all_equal(nnx.state(merged), expected_state)


class AdapterStateTest(chex.TestCase):
  def test_to_from_adapters_round_trip(self):
    model = _adapted_llama()
    graphdef, lora_state, frozen_state = lora.split_lora(model)
    adapters = lora.to_adapters(lora_state)
    self.assertEqual(list(adapters), list(lora.lora_layers(model)))
    for name, layer in lora.lora_layers(model).items():
      self.assertIsInstance(adapters[name], LoRAFactors)
      np.testing.assert_array_equal(adapters[name].lora_a, layer.lora_a[...])
      np.testing.assert_array_equal(adapters[name].lora_b, layer.lora_b[...])
    chex.assert_trees_all_equal(lora.from_adapters(lora_state, adapters), lora_state)

    shifted = jax.tree.map(lambda v: v + 1.0, adapters)
    merged = nnx.merge(graphdef, lora.from_adapters(lora_state, shifted), frozen_state)
    for name, layer in lora.lora_layers(merged).items():
      np.testing.assert_array_equal(layer.lora_a[...], shifted[name].lora_a)
      np.testing.assert_array_equal(layer.lora_b[...], shifted[name].lora_b)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_over_stacked_adapters_equals_a_loop(self):
    """The federated round's pattern: frozen state once, a client axis on the adapters only."""
    model = _adapted_llama()
    x = _inputs()
    per_client, looped = [], []
    for seed in range(3):
      _randomize_adapters(model, seed)
      per_client.append(lora.to_adapters(lora.split_lora(model)[1]))
      looped.append(model(x))
    graphdef, lora_state, frozen_state = lora.split_lora(model)

    def forward(adapters):
      return nnx.merge(graphdef, lora.from_adapters(lora_state, adapters), frozen_state)(x)

    mapped = self.variant(jax.vmap(forward))(stack_adapters(per_client))
    # Batched and unbatched matmuls may be tiled differently by XLA: float32 rounding only.
    chex.assert_trees_all_close(mapped, jnp.stack(looped), rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_reach_only_the_lora_parameters(self):
    model = _adapted_llama(random_adapters=False)
    graphdef, lora_state, frozen_state = lora.split_lora(model)
    x = _inputs()

    def loss(lora_state, frozen_state):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, lora_state, frozen_state)(x)))

    grad = self.variant(jax.grad(loss))
    fresh = lora.to_adapters(grad(lora_state, frozen_state))
    self.assertEqual(jax.tree.structure(grad(lora_state, frozen_state)), jax.tree.structure(lora_state))
    for name, g in fresh.items():
      # lora_b = 0: dl/da = s x^T (dl/dy) b^T vanishes exactly, dl/db = s (x a)^T dl/dy does not.
      self.assertFalse(np.any(g.lora_a), name)
      self.assertTrue(np.all(np.any(g.lora_b != 0, axis=1)), name)

    _randomize_adapters(model, seed=5)
    _, lora_state, _ = lora.split_lora(model)
    for name, g in lora.to_adapters(grad(lora_state, frozen_state)).items():
      self.assertTrue(np.all(np.any(g.lora_a != 0, axis=0)), name)
      self.assertTrue(np.all(np.any(g.lora_b != 0, axis=1)), name)

  @chex.variants(with_jit=True, without_jit=True)
  def test_lora_gradients_match_the_hand_derivation(self):
    layer = Linear(6, 5, use_bias=True)
    layer.kernel[...] = jax.random.normal(jax.random.key(0), (6, 5))
    layer.bias[...] = jax.random.normal(jax.random.key(1), (5,))
    layer.add_lora(LoRAConfig(rank=2, alpha=3.0), jax.random.key(2))
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), (2, 5))
    graphdef, lora_state, frozen_state = lora.split_lora(layer)
    x = _inputs(d=6)

    def loss(lora_state):
      y = nnx.merge(graphdef, lora_state, frozen_state)(x)
      return 0.5 * jnp.sum(y**2)

    g = lora.to_adapters(self.variant(jax.grad(loss))(lora_state))[""]
    a, b, s = layer.lora_a[...], layer.lora_b[...], 1.5
    y = x @ layer.kernel[...] + layer.bias[...] + s * (x @ a) @ b  # dl/dy = y for l = |y|^2 / 2
    chex.assert_trees_all_close(g.lora_a, s * x.T @ (y @ b.T), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g.lora_b, s * (x @ a).T @ y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# W-space probe


@pytest.mark.parametrize("jit", [False, True])
def test_wspace_probe_records_inputs_and_output_gradients(jit):
  model = TwoLayer()
  lora.inject_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=("l1", "l2")), jax.random.key(0))
  _randomize_adapters(model, seed=1)
  lora.set_wspace_probe(model)
  x = _inputs(d=6)

  def forward(m, x):
    return m(x)

  def loss(m, perturbations, x):
    out, sown = nnx.capture(forward, nnx.Intermediate, init=perturbations)(m, x)
    return jnp.sum(jnp.sin(out)), sown

  _, perturbations = nnx.capture(forward, nnx.Perturbation)(model, x)
  grad = nnx.grad(loss, argnums=1, has_aux=True)
  probe_grads, sown = (nnx.jit(grad) if jit else grad)(model, perturbations, x)

  # Reference: the two layers written out, dl/dy by jax.vjp on each layer's full output.
  def layer(params, h):
    kernel, bias, a, b, s = params
    return h @ kernel + bias + s * (h @ a) @ b

  l1, l2 = model.l1, model.l2
  p1 = (l1.kernel[...], l1.bias[...], l1.lora_a[...], l1.lora_b[...], l1.scaling)
  p2 = (l2.kernel[...], 0.0, l2.lora_a[...], l2.lora_b[...], l2.scaling)
  y1 = layer(p1, x)
  y2, vjp2 = jax.vjp(lambda y: layer(p2, y), jnp.tanh(y1))
  dl_dy2 = jnp.cos(y2)
  _, vjp1 = jax.vjp(lambda y: layer(p2, jnp.tanh(y)), y1)
  (dl_dy1,) = vjp1(dl_dy2)

  # Same float32 ops in a different association: a few ulps.
  tol = dict(rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(sown["l1"]["lora_input"].get_value()[0], x, **tol)
  chex.assert_trees_all_close(sown["l2"]["lora_input"].get_value()[0], jnp.tanh(y1), **tol)
  chex.assert_trees_all_close(probe_grads["l2"]["lora_output"][...], dl_dy2, **tol)
  chex.assert_trees_all_close(probe_grads["l1"]["lora_output"][...], dl_dy1, **tol)
  assert np.all(np.any(np.asarray(dl_dy1) != 0, axis=1))


def test_wspace_probe_off_records_nothing():
  model = TwoLayer()
  lora.inject_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=("l1",)), jax.random.key(0))
  lora.set_wspace_probe(model, True)
  lora.set_wspace_probe(model, False)
  _, sown = nnx.capture(lambda m, x: m(x), nnx.Intermediate)(model, _inputs(d=6))
  assert len(nnx.to_flat_state(sown)) == 0


# ---------------------------------------------------------------------------------------------------------------
# A user's own layers: nnx.Linear, nnx.LinearGeneral, nnx.Einsum


def test_linear_with_rngs_initialises_its_kernel_like_nnx_linear():
  ours, theirs = nnx.Rngs(0), nnx.Rngs(0)
  for use_bias in (True, False):
    layer, reference = Linear(8, 16, use_bias=use_bias, rngs=ours), nnx.Linear(8, 16, use_bias=use_bias, rngs=theirs)
    # Same initializer and the same key stream (a bias key drawn too): the same values, exactly.
    np.testing.assert_array_equal(layer.kernel[...], reference.kernel[...])
    assert np.std(np.asarray(layer.kernel[...])) > 0.1
    if use_bias:
      np.testing.assert_array_equal(layer.bias[...], reference.bias[...])
  assert not np.any(Linear(8, 16).kernel[...]), "without rngs the kernel waits for a loader, at zero"


class UserMLP(nnx.Module):
  """A user's model built from nnx.Linear (the issue's example: fc1, fc2)."""

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 12, rngs=rngs)
    self.fc2 = nnx.Linear(12, 5, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(12, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.norm(self.fc1(x))))


def test_inject_wraps_nnx_linear_keeping_its_kernel_and_bias():
  model = UserMLP(nnx.Rngs(0))
  fc1, fc2 = model.fc1, model.fc2
  kernel, bias = np.asarray(fc1.kernel[...]), np.asarray(fc1.bias[...])
  x = _inputs(d=6)
  before = model(x)
  assert lora.inject_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=("fc1", "fc2")), jax.random.key(0)) == [
    "fc1",
    "fc2",
  ]
  assert isinstance(model.fc1, lora.LoRAWrapper) and model.fc1.base_module is fc1 and model.fc2.base_module is fc2
  np.testing.assert_array_equal(model.fc1.base_module.kernel[...], kernel)
  np.testing.assert_array_equal(model.fc1.base_module.bias[...], bias)
  chex.assert_shape([model.fc1.lora_a[...], model.fc1.lora_b[...]], [(6, 2), (2, 12)])
  np.testing.assert_array_equal(model(x), before)  # lora_b = 0
  _randomize_adapters(model, seed=3)
  # Reference: the layer written out in numpy, y = x W + b + s (x a) b, s = alpha / r = 2.
  a, b = np.asarray(model.fc1.lora_a[...]), np.asarray(model.fc1.lora_b[...])
  np.testing.assert_allclose(
    model.fc1(x), np.asarray(x) @ kernel + bias + 2.0 * (np.asarray(x) @ a) @ b, rtol=1e-5, atol=1e-5
  )
  # Only the factors are LoRA state; the user's kernel, bias and norm stay frozen.
  _, lora_state, frozen_state = lora.split_lora(model)
  assert sorted(lora.to_adapters(lora_state)) == ["fc1", "fc2"]
  frozen_paths = {path for path, _ in nnx.to_flat_state(frozen_state)}
  assert ("fc1", "base_module", "kernel") in frozen_paths and ("norm", "scale") in frozen_paths


def test_a_shared_layer_is_wrapped_once_at_every_path():
  model = UserMLP(nnx.Rngs(0))
  model.tied = model.fc1
  lora.inject_lora(model, LoRAConfig(rank=2, alpha=4.0, target_modules=("fc1",)), jax.random.key(0))
  assert model.tied is model.fc1 and isinstance(model.fc1, lora.LoRAWrapper)
  assert list(lora.lora_layers(model)) == ["fc1"]


class _Wrapped(nnx.Module):
  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


# (layer, input shape, numpy reference y(x, kernel, bias), kernel [in, out] of the update as the kernel's layout)
_GENERAL_LAYERS = {
  "linear_general": (
    lambda: nnx.LinearGeneral((2, 3), (4, 5), axis=(1, -1), rngs=nnx.Rngs(0)),
    (7, 2, 6, 3),
    lambda x, k, b: np.tensordot(x, k, axes=([1, 3], [0, 1])) + b,
    lambda update: update.reshape(2, 3, 4, 5),
  ),
  "einsum_heads": (
    lambda: nnx.Einsum("btd,dho->btho", (6, 2, 3), (2, 3), rngs=nnx.Rngs(0)),
    (3, 4, 6),
    lambda x, k, b: np.einsum("btd,dho->btho", x, k) + b,
    lambda update: update.reshape(6, 2, 3),
  ),
  "einsum_transposed": (
    lambda: nnx.Einsum("bti,oi->bot", (5, 6), rngs=nnx.Rngs(0)),
    (3, 4, 6),
    lambda x, k, b: np.einsum("bti,oi->bot", x, k),
    lambda update: update.T,
  ),
  "einsum_ellipsis": (
    lambda: nnx.Einsum("...ij,jik->...k", (3, 2, 5), (5,), rngs=nnx.Rngs(0)),
    (2, 4, 2, 3),
    lambda x, k, b: np.einsum("...ij,jik->...k", x, k) + b,
    lambda update: update.reshape(3, 2, 5),
  ),  # contracted axes in the kernel's order: j, i
}


@pytest.mark.parametrize("case", sorted(_GENERAL_LAYERS))
def test_wrapped_layers_apply_the_update_of_the_kernel_read_as_a_matrix(case):
  """A LinearGeneral or Einsum with a LoRA adapter computes the base layer with kernel + s a b, the update laid
  out on the kernel's axes (contracted axes flattened into `in`, produced ones into `out`, in kernel order)."""
  make, shape, reference, layout = _GENERAL_LAYERS[case]
  model = _Wrapped(make())
  kernel = np.asarray(model.layer.kernel[...])
  bias = 0.0 if model.layer.bias is None else np.asarray(model.layer.bias[...])
  lora.inject_lora(model, LoRAConfig(rank=2, alpha=2.0, target_modules=("layer",)), jax.random.key(0))
  _randomize_adapters(model, seed=4)
  layer = model.layer
  update = np.asarray(layer.lora_a[...]) @ np.asarray(layer.lora_b[...])  # s = 1
  x = np.asarray(jax.random.normal(jax.random.key(1), shape))
  # float32 contractions of length <= 6 with O(1) entries.
  np.testing.assert_allclose(model(jnp.asarray(x)), reference(x, kernel + layout(update), bias), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.kernel_update(), layout(update), rtol=1e-6, atol=1e-6)
  expected = model(jnp.asarray(x))
  lora.merge_and_unload(model)
  np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(_GENERAL_LAYERS))
def test_wspace_probe_of_a_wrapped_layer_gives_the_gradient_of_its_matrix(case):
  """dl/dW = h^T G from the probes (the W-space mechanism's input) equals the gradient w.r.t. the kernel, read in
  the adapter's [in, out] layout."""
  make, shape, _, layout = _GENERAL_LAYERS[case]
  model = _Wrapped(make())
  lora.inject_lora(model, LoRAConfig(rank=2, alpha=2.0, target_modules=("layer",)), jax.random.key(0))
  _randomize_adapters(model, seed=4)
  lora.set_wspace_probe(model)
  x = jax.random.normal(jax.random.key(1), shape)
  loss = lambda y: jnp.sum(jnp.sin(y))

  def probed(m, perturbations):
    out, sown = nnx.capture(lambda m: m(x), nnx.Intermediate, init=perturbations)(m)
    return loss(out), sown

  _, perturbations = nnx.capture(lambda m: m(x), nnx.Perturbation)(model)
  probe_grads, sown = nnx.grad(probed, argnums=1, has_aux=True)(model, perturbations)
  h = sown["layer"]["lora_input"].get_value()[0]
  g = probe_grads["layer"]["lora_output"][...]
  from_probes = h.reshape(-1, h.shape[-1]).T @ g.reshape(-1, g.shape[-1])
  lora.set_wspace_probe(model, False)
  graphdef, lora_state, frozen_state = lora.split_lora(model)
  grad_frozen = jax.grad(lambda frozen: loss(nnx.merge(graphdef, lora_state, frozen)(x)))(frozen_state)
  grad_kernel = grad_frozen["layer"]["base_module"]["kernel"][...]
  # The layout map is linear and a permutation of entries: apply it to the probe gradient and compare.
  np.testing.assert_allclose(layout(np.asarray(from_probes)), grad_kernel, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "layer, reason",
  [
    (lambda: nnx.Einsum("bhi,hio->bho", (2, 3, 4), rngs=nnx.Rngs(0)), "also in the input and the output"),
    (lambda: nnx.LinearGeneral(3, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0)), "batch_axis"),
    (lambda: nnx.Conv(3, 4, kernel_size=(3,), rngs=nnx.Rngs(0)), "Conv is not a linear map"),
    (lambda: nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0)), "Flax's own LoRA"),
  ],
)
def test_a_selected_layer_that_lora_cannot_adapt_is_named_with_the_reason(layer, reason):
  model = _Wrapped(layer())
  with pytest.raises(ValueError, match=f"selects layers that LoRA cannot adapt: layer \\(.*{re.escape(reason)}"):
    lora.inject_lora(model, LoRAConfig(rank=1, alpha=1.0, target_modules=("layer",)), jax.random.key(0))


def test_no_match_in_a_user_model_names_its_layers():
  model = UserMLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match="matches no linear layer") as err:
    lora.inject_lora(model, LoRAConfig(rank=1, alpha=1.0, target_modules=("q_proj",)), jax.random.key(0))
  assert "'fc1'" in str(err.value) and "'fc2'" in str(err.value) and "LayerNorm" in str(err.value)
