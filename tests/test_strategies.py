"""Tests of fedask_jax.strategies: the registry, each strategy's schedule of trained factors, local objective
and aggregation against small numpy (float64) references, and SCAFFOLD's option II against its definition.

Tolerances. The strategies compute in float32; weighted means of O(1) numbers agree with float64 to ~1e-7
relative, so rtol 1e-6. The sketch reconstruction goes through a QR and an SVD of well-conditioned float32
matrices (singular values of the random factors are O(1) and separated), which keeps the relative error of
the reconstructed product at ~1e-6; rtol 1e-4 leaves margin while a wrong aggregation errs by O(1).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized
from test_simulation import TinyMLP, make_batches, make_round, random_state

from fedask_jax import simulation, strategies
from fedask_jax.adapters import LoRAFactors, select
from fedask_jax.strategies import base, fedsa_lora, scaffold

K, N, M_IN, N_OUT, R = 3, 7, 6, 5, 2
MEAN = dict(rtol=1e-6, atol=1e-7)
SKETCH = dict(rtol=1e-4, atol=1e-6)


def random_adapters(rng, lead=()):
  return {
    name: LoRAFactors(
      rng.standard_normal((*lead, M_IN, R)).astype(np.float32),
      rng.standard_normal((*lead, R, N_OUT)).astype(np.float32),
    )
    for name in ("layer.0", "layer.1")
  }


def problem(seed=0, shared=None):
  """Global adapters, K clients' results (optionally one factor shared with the global), weights, ids."""
  rng = np.random.default_rng(seed)
  global_adapters = random_adapters(rng)
  clients = random_adapters(rng, (K,))
  if shared is not None:
    clients = {
      n: f._replace(**{shared: np.broadcast_to(getattr(global_adapters[n], shared), getattr(f, shared).shape)})
      for n, f in clients.items()
    }
  results = base.ClientResult(clients, random_adapters(rng, (K,)))
  weights = rng.uniform(0.5, 2.0, K)
  weights = (weights / weights.sum()).astype(np.float32)  # the round normalises them before the server update
  return global_adapters, results, weights, np.array([5, 0, 3], np.int32)


def wmean(stacked, weights):
  """sum_k w_k x_k in float64 (the weights are normalised)."""
  return np.einsum("k,k...->...", np.asarray(weights, np.float64), np.asarray(stacked, np.float64))


def test_registry_holds_every_strategy_by_name():
  assert set(strategies.STRATEGIES) == {
    "fedask",
    "fedask-alt",
    "fedavg",
    "ffa-lora",
    "fedsa-lora",
    "fedprox",
    "scaffold",
  }
  for name, factory in strategies.STRATEGIES.items():
    strategy = factory()
    assert isinstance(strategy, base.Strategy) and strategy.name == name
  assert strategies.get_strategy("fedprox", mu=0.5).name == "fedprox"


def test_bad_names_and_hyper_parameters_fail_with_value_errors():
  with pytest.raises(ValueError, match="unknown strategy"):
    strategies.get_strategy("fedadam")
  with pytest.raises(ValueError, match="does not take"):
    strategies.get_strategy("fedavg", mu=0.1)
  with pytest.raises(ValueError, match="mu"):
    strategies.get_strategy("fedprox", mu=-1.0)
  for oversample in (-1, 1.5):
    with pytest.raises(ValueError, match="oversample"):
      strategies.get_strategy("fedask", oversample=oversample)


ALTERNATE = ["lora_b", "lora_a"] * 2


@pytest.mark.parametrize(
  "name,private,schedule",
  [
    ("fedask", True, ["lora_b"] * 4),
    ("fedask", False, ["both"] * 4),
    ("fedask-alt", True, ALTERNATE),
    ("fedask-alt", False, ALTERNATE),
    ("ffa-lora", True, ["lora_b"] * 4),
    ("fedavg", True, ["both"] * 4),
    ("fedsa-lora", False, ["both"] * 4),
    ("fedprox", True, ["both"] * 4),
    ("scaffold", True, ["both"] * 4),
  ],
)
def test_trained_factor_schedule(name, private, schedule):
  """Rounds 1..4: FedASK trains lora_b (lora_a frozen) under DP and both without; fedask-alt alternates lora_b,
  lora_a, lora_b, lora_a."""
  strategy = strategies.get_strategy(name)
  assert [strategy.trained(t, private) for t in range(1, 5)] == list(schedule)


class AggregationTest(parameterized.TestCase):
  """Each strategy's server step against a float64 numpy reference, compiled and eager."""

  def _aggregate(self, name, shared=None, **hyper):
    strategy = strategies.get_strategy(name, **hyper)
    global_adapters, results, weights, ids = problem(shared=shared)
    # Non-trivial (random) state, so that a wrong row or a missed update shows; counters random integers.
    leaves, treedef = jax.tree.flatten(strategy.init(global_adapters, N))
    rng = np.random.default_rng(1)
    state = jax.tree.unflatten(
      treedef,
      [
        rng.integers(0, 100, x.shape).astype(x.dtype)
        if jnp.issubdtype(x.dtype, jnp.integer)
        else rng.standard_normal(x.shape).astype(np.float32)
        for x in leaves
      ],
    )
    server_update = self.variant(strategy.server_update)
    new, new_state, metrics = server_update(state, global_adapters, results, weights, ids, jax.random.key(0))
    return global_adapters, results, weights, ids, state, new, new_state, metrics

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("fedavg", "fedprox")
  def test_fedavg_and_fedprox_average_each_factor(self, name):
    _, results, weights, _, _, new, _, metrics = self._aggregate(name)
    for n, f in results.adapters.items():
      np.testing.assert_allclose(new[n].lora_a, wmean(f.lora_a, weights), **MEAN)
      np.testing.assert_allclose(new[n].lora_b, wmean(f.lora_b, weights), **MEAN)
    assert metrics == {}

  @chex.variants(with_jit=True, without_jit=True)
  def test_ffa_lora_averages_b_and_keeps_a_exactly(self):
    global_adapters, results, weights, _, _, new, _, _ = self._aggregate("ffa-lora", shared="lora_a")
    for n, f in results.adapters.items():
      np.testing.assert_array_equal(new[n].lora_a, global_adapters[n].lora_a)
      np.testing.assert_allclose(new[n].lora_b, wmean(f.lora_b, weights), **MEAN)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fedsa_lora_shares_a_and_keeps_each_clients_b(self):
    _, results, weights, ids, state, new, new_state, _ = self._aggregate("fedsa-lora")
    others = np.setdiff1d(np.arange(N), ids)
    for n, f in results.adapters.items():
      np.testing.assert_allclose(new[n].lora_a, wmean(f.lora_a, weights), **MEAN)
      np.testing.assert_allclose(new[n].lora_b, wmean(f.lora_b, weights), **MEAN)
      np.testing.assert_array_equal(new_state.client_b[n][ids], f.lora_b)
      np.testing.assert_array_equal(new_state.client_b[n][others], state.client_b[n][others])

  @chex.variants(with_jit=True, without_jit=True)
  def test_scaffold_updates_model_and_control_variates(self):
    _, results, weights, ids, state, new, new_state, _ = self._aggregate("scaffold")
    others = np.setdiff1d(np.arange(N), ids)
    for n, f in results.adapters.items():
      for factor in ("lora_a", "lora_b"):
        np.testing.assert_allclose(getattr(new[n], factor), wmean(getattr(f, factor), weights), **MEAN)
        new_c = np.asarray(getattr(results.mean_gradient[n], factor), np.float64)
        old_ci = np.asarray(getattr(state.client_controls[n], factor), np.float64)
        expected_c = getattr(state.server_control[n], factor) + (new_c - old_ci[ids]).sum(0) / N
        np.testing.assert_allclose(getattr(new_state.server_control[n], factor), expected_c, **MEAN)
        np.testing.assert_array_equal(getattr(new_state.client_controls[n], factor)[ids], new_c.astype(np.float32))
        np.testing.assert_array_equal(getattr(new_state.client_controls[n], factor)[others], old_ci[others])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("fedask", "lora_a"), ("fedask-alt", "lora_a"), ("fedask-alt", "lora_b"))
  def test_fedask_sketch_is_exact_with_a_shared_factor(self, name, shared):
    """DP rounds (one factor frozen at the global value): the new product is sum_k w_k lora_a_k lora_b_k exactly,
    its factors balanced (lora_a^T lora_a = lora_b lora_b^T, diagonal), and the certificate ~0."""
    _, results, weights, _, _, new, _, metrics = self._aggregate(name, shared=shared, oversample=1, certify_every=1)
    for n, f in results.adapters.items():
      target = wmean(np.einsum("kir,kro->kio", f.lora_a.astype(np.float64), f.lora_b.astype(np.float64)), weights)
      a, b = np.asarray(new[n].lora_a, np.float64), np.asarray(new[n].lora_b, np.float64)
      np.testing.assert_allclose(a @ b, target, **SKETCH)
      gram = a.T @ a
      np.testing.assert_allclose(gram, b @ b.T, rtol=1e-4, atol=1e-5 * np.abs(gram).max())
      np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4 * np.abs(gram).max())
    assert float(metrics["reconstruction_error"]) < 1e-5

  @chex.variants(with_jit=True, without_jit=True)
  def test_fedask_without_dp_is_the_best_rank_r_approximation(self):
    """Both factors trained: the aggregate of K = 3 rank-2 products has rank <= min(6, M_IN, N_OUT) = 5, which a
    sketch of width r + p = 5 covers, so the result is its Eckart-Young truncation to rank 2 (numpy SVD) and the
    certificate is the relative truncation error."""
    _, results, weights, _, _, new, _, metrics = self._aggregate("fedask", oversample=3, certify_every=1)
    errors = []
    for n, f in results.adapters.items():
      target = wmean(np.einsum("kir,kro->kio", f.lora_a.astype(np.float64), f.lora_b.astype(np.float64)), weights)
      u, s, vt = np.linalg.svd(target)
      best = (u[:, :R] * s[:R]) @ vt[:R]
      product = np.asarray(new[n].lora_a, np.float64) @ np.asarray(new[n].lora_b, np.float64)
      np.testing.assert_allclose(product, best, **SKETCH)
      errors.append(np.linalg.norm(best - target) / np.linalg.norm(target))
    np.testing.assert_allclose(metrics["reconstruction_error"], max(errors), rtol=1e-3)


@pytest.mark.parametrize("gauge", ["orthonormal", "norm"])
@pytest.mark.parametrize(
  "name,trained,fixed",
  [
    ("fedask", "lora_b", "lora_a"),
    ("fedask", "both", "lora_a"),
    ("fedask-alt", "lora_b", "lora_b"),
    ("fedask-alt", "lora_a", "lora_a"),
  ],
)
def test_gauges_hold_the_next_frozen_factor_at_the_frozen_factors_scale(gauge, name, trained, fixed):
  """The server reads the trained factor from the clients' mean gradients (None for the frozen one); the factor
  the next round freezes (FedASK: lora_a; fedask-alt: the one trained now) gets the Frobenius norm of the global
  factor frozen this round (lora_a when both were trained), so that norm is carried from round to round. The
  product is the exact aggregate as with the balanced split (one factor shared), or the same truncation."""
  shared = {"lora_b": "lora_a", "lora_a": "lora_b", "both": None}[trained]
  global_adapters, results, weights, ids = problem(shared=shared)
  results = results._replace(mean_gradient=select(results.mean_gradient, trained))
  frozen = shared or "lora_a"
  key = jax.random.key(0)
  strategy, paper_strategy = strategies.get_strategy(name, gauge=gauge), strategies.get_strategy(name)
  new, _, metrics = jax.jit(strategy.server_update)(
    strategy.init(global_adapters, N), global_adapters, results, weights, ids, key
  )
  paper, _, _ = paper_strategy.server_update(
    paper_strategy.init(global_adapters, N), global_adapters, results, weights, ids, key
  )
  for n in new:
    np.testing.assert_allclose(
      np.linalg.norm(getattr(new[n], fixed)), np.linalg.norm(getattr(global_adapters[n], frozen)), rtol=1e-5
    )
    np.testing.assert_allclose(
      np.asarray(new[n].lora_a, np.float64) @ np.asarray(new[n].lora_b, np.float64),
      np.asarray(paper[n].lora_a, np.float64) @ np.asarray(paper[n].lora_b, np.float64),
      **SKETCH,
    )
  if shared is not None:
    assert float(metrics["reconstruction_error"]) < 1e-5


def test_unknown_gauge_fails_with_the_choices():
  for name in ("fedask", "fedask-alt"):
    with pytest.raises(ValueError, match=r"gauge='paper'.*choose one of \('balanced', 'orthonormal', 'norm'\)"):
      strategies.get_strategy(name, gauge="paper")


def test_certificate_can_be_switched_off():
  global_adapters, results, weights, ids = problem(shared="lora_a")
  strategy = strategies.get_strategy("fedask", certify_every=0)
  _, _, metrics = strategy.server_update(
    strategy.init(global_adapters, N), global_adapters, results, weights, ids, jax.random.key(0)
  )
  assert metrics == {}


@pytest.mark.parametrize("name", ["fedask", "fedask-alt"])
def test_certificate_every_n_aggregations(name):
  # Period 3 over 7 aggregations: certified in the 1st, 4th and 7th (count 0, 3, 6), NaN in the others, the
  # same aggregate in every round, and the count advancing by one per aggregation.
  global_adapters, results, weights, ids = problem(shared="lora_a")
  strategy = strategies.get_strategy(name, certify_every=3)
  update = jax.jit(strategy.server_update)
  state = strategy.init(global_adapters, N)
  certified = strategies.get_strategy(name, certify_every=1)
  reference, _, always = jax.jit(certified.server_update)(
    certified.init(global_adapters, N), global_adapters, results, weights, ids, jax.random.key(0)
  )
  for count in range(7):
    new, state, metrics = update(state, global_adapters, results, weights, ids, jax.random.key(0))
    assert int(state) == count + 1
    chex.assert_trees_all_equal(new, reference)
    if count % 3 == 0:
      assert float(metrics["reconstruction_error"]) == float(always["reconstruction_error"]) < 1e-5
    else:
      assert np.isnan(metrics["reconstruction_error"])


def test_certify_every_is_checked():
  with pytest.raises(ValueError, match=r"certify_every=-1.*0: never"):
    strategies.get_strategy("fedask", certify_every=-1)


def test_local_objectives():
  """FedProx adds mu (theta - theta_start) to the trained factors' gradient; SCAFFOLD adds c - c_i (its
  client_start context); the other strategies train on the plain loss."""
  rng = np.random.default_rng(3)
  params = select(random_adapters(rng), "lora_b")
  start = select(random_adapters(rng), "lora_b")
  correction = strategies.get_strategy("fedprox", mu=0.3).gradient_correction((), params, start)
  for n in params:
    assert correction[n].lora_a is None
    np.testing.assert_allclose(correction[n].lora_b, 0.3 * (params[n].lora_b - start[n].lora_b), **MEAN)
  global_adapters = random_adapters(rng)
  state = scaffold.ScaffoldState(random_adapters(rng), random_adapters(rng, (N,)))
  start_adapters, context = scaffold.client_start(state, global_adapters, jnp.int32(4))
  chex.assert_trees_all_equal(start_adapters, global_adapters)
  both = select(global_adapters, "both")
  correction = scaffold.correction(context, both, both)
  for n in both:
    np.testing.assert_allclose(
      correction[n].lora_b, state.server_control[n].lora_b - state.client_controls[n].lora_b[4], **MEAN
    )
  for name in ("fedask", "fedask-alt", "fedavg", "ffa-lora", "fedsa-lora"):
    assert strategies.get_strategy(name).gradient_correction is None


def test_fedsa_lora_starts_clients_from_their_own_lora_b_and_evaluates_personalised_and_shared():
  global_adapters = random_adapters(np.random.default_rng(4))
  state = fedsa_lora.init(global_adapters, N)
  state = fedsa_lora.FedSAState({n: b + jnp.arange(N, dtype=b.dtype)[:, None, None] for n, b in state.client_b.items()})
  start, _ = fedsa_lora.client_start(state, global_adapters, jnp.int32(2))
  ids = jnp.array([6, 2])
  personal, shared = fedsa_lora.evaluation_adapters(state, global_adapters, ids)
  chex.assert_trees_all_equal(shared, global_adapters)
  for n, f in global_adapters.items():
    np.testing.assert_array_equal(start[n].lora_a, f.lora_a)
    np.testing.assert_allclose(start[n].lora_b, f.lora_b + 2, **MEAN)
    chex.assert_shape(personal[n].lora_a, (2, M_IN, R))
    np.testing.assert_array_equal(personal[n].lora_a[1], f.lora_a)
    np.testing.assert_allclose(personal[n].lora_b, np.stack([f.lora_b + 6, f.lora_b + 2]), **MEAN)


def test_weighted_mean_of_zero_weights_is_zero():
  out = base.weighted_mean({"x": jnp.ones((3, 2))}, jnp.zeros(3))
  np.testing.assert_array_equal(out["x"], np.zeros(2))


def test_scaffold_control_variate_is_option_ii_under_sgd():
  """With SGD at rate lr, SCAFFOLD's stored c_i+ (the mean raw gradient over the tau local steps) equals
  Karimireddy et al.'s option II, c_i - c + (x - y_i) / (tau lr), computed from the client's start x and end
  y_i. Tolerance: x - y_i is a difference of O(1) float32 numbers, divided by tau lr = 0.3, so ~1e-6."""
  lr, steps = 0.1, 3
  rnd = make_round("scaffold", None, optimizer=optax.sgd(lr), model=TinyMLP(seed=2))
  state = random_state(rnd, seed=5)
  batch = jax.tree.map(lambda x: x[0], make_batches(4, num_clients=1, steps=steps))
  client_id = 6
  update = jax.jit(functools.partial(simulation.client_update, rnd.training, "both"))
  result, _ = update(state, rnd.frozen_state, batch, jnp.int32(client_id), jax.random.key(0))
  x, c = state.adapters, state.strategy_state.server_control
  c_i = jax.tree.map(lambda v: v[client_id], state.strategy_state.client_controls)
  option_ii = jax.tree.map(lambda ci, cc, x0, y: ci - cc + (x0 - y) / (steps * lr), c_i, c, x, result.adapters)
  chex.assert_trees_all_close(result.mean_gradient, option_ii, rtol=1e-4, atol=2e-5)


if __name__ == "__main__":
  absltest.main()
