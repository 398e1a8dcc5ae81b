"""experiments/exact_aggregation.py: its measured quantities against independent numpy references on tiny
problems, and its captured client adapters against the library's compiled round (the tiny runner setup of
tests/run_fixtures.py: a 2-layer Llama, hidden 32, LoRA r 2 on q_proj and v_proj)."""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import exact_aggregation as ea  # noqa: E402  (experiments/exact_aggregation.py)
from run_fixtures import make_tiny_setup  # noqa: E402

from fedask_jax import runner, simulation  # noqa: E402
from fedask_jax.adapters import LoRAFactors  # noqa: E402
from fedask_jax.config import from_dict  # noqa: E402

K, M, N, R = 4, 12, 10, 2


def client_factors(seed, shared_left):
  """K clients' float32 factors a [K, M, R], b [K, R, N] (a shared when `shared_left`) and weights [K]."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(K, M, R)).astype(np.float32)
  if shared_left:
    a = np.broadcast_to(a[:1], a.shape).copy()
  b = rng.normal(size=(K, R, N)).astype(np.float32)
  return a, b, rng.uniform(1.0, 3.0, size=K)


def test_dense_mean_error_and_floor_match_explicit_numpy():
  a, b, w = client_factors(0, shared_left=False)
  target = ea.dense_mean(a, b, w)
  # A Python loop over clients in float64 is the definition; einsum only reorders the sums (1e-13 of ~1).
  loop = sum(wk / w.sum() * (ak.astype(np.float64) @ bk.astype(np.float64)) for wk, ak, bk in zip(w, a, b))
  np.testing.assert_allclose(target, loop, rtol=1e-12, atol=1e-12)
  u, s, vt = np.linalg.svd(loop)
  best = (u[:, :R] * s[:R]) @ vt[:R]
  floor = np.linalg.norm(loop - best) / np.linalg.norm(loop)
  assert ea.truncation_floor(target, R) == pytest.approx(floor, rel=1e-10)
  assert ea.relative_error(u[:, :R] * s[:R], vt[:R], target) == pytest.approx(floor, rel=1e-10)
  assert ea.numerical_rank(target) == min(K * R, M, N)


def measured(shared_left, oversamples=(0, 1, 2, 4), seeds=3):
  a, b, w = client_factors(1, shared_left)
  adapters = {"layer": LoRAFactors(jnp.asarray(a), jnp.asarray(b))}
  return ea.measure_round(adapters, w, R, oversamples, seeds, jax.random.key(0))["layers"]["layer"], (a, b, w)


def test_shared_left_factor_is_exact_for_every_oversampling():
  layer, (a, b, w) = measured(shared_left=True)
  # Theorem 2: rank(T) <= r <= r + p, so only float32 round-off remains (~10 eps at these sizes).
  assert np.max(layer["errors"]) < 1e-5, layer["errors"]
  assert layer["numerical_rank"] <= R
  assert layer["floor"] < 1e-12  # T has rank <= r: its best rank-r approximation is itself
  assert layer["fedavg_error"] < 1e-12  # with a shared a, averaging b is exact (float64)
  assert np.shape(layer["errors"]) == np.shape(layer["sketch_conditions"]) == (4, 3)
  assert np.min(layer["sketch_conditions"]) >= 1.0


def test_both_factors_give_errors_at_or_above_the_floor_and_the_floor_at_covering_width():
  covering = K * R - R  # width K r covers rank(T) <= K r
  layer, _ = measured(shared_left=False, oversamples=(0, 2, covering))
  errors = np.asarray(layer["errors"])
  assert layer["numerical_rank"] == K * R > R + 2
  assert layer["floor"] > 0.05  # a problem where the rank-r truncation loses something real
  # Eckart-Young: no rank-r result beats the truncated SVD (float32 factors: 1e-5 relative slack).
  assert np.all(errors >= layer["floor"] * (1 - 1e-5)), (errors, layer["floor"])
  # A covering sketch is exact, so the result is the truncated SVD itself.
  np.testing.assert_allclose(errors[2], layer["floor"], rtol=1e-4)
  assert np.min(errors[0]) > layer["floor"] * 1.01  # p = 0 loses more than the floor


def test_halko_bound():
  assert ea.halko_ratio_bound(8, 0) is None and ea.halko_ratio_bound(8, 1) is None
  assert ea.halko_ratio_bound(8, 2) == pytest.approx(np.sqrt(10.0))


def test_captured_clients_give_the_compiled_rounds_state(tmp_path):
  # DP, the case Theorem 2 is about; without DP the same code runs with trained = "both" (one compilation of
  # each kind already costs ~10 s of CPU, so one case only).
  raw = dict(
    make_tiny_setup(tmp_path),
    strategy="fedask",
    rounds=2,
    num_clients=4,
    clients_per_round=3,
    local_steps=2,
    batch_size=4,
    client_chunk=1,
    privacy={"enabled": True},
  )
  experiment = runner.prepare(from_dict(raw))
  config, round_fn = experiment.config, experiment.round_fn
  sample = runner.round_sampler(config, experiment.capacity)
  state = round_fn.init(config.num_clients)
  # A copy: the compiled round donates its state, whose arrays `init` shares with `state`.
  reference = jax.tree.map(jnp.copy, round_fn.init(config.num_clients))
  for t in (1, 2):
    round_key = jax.random.fold_in(runner.run_key(config), t)
    ids, weights, batches = sample(round_key, experiment.client_data)
    assert round_fn.trained(t) == "lora_b"
    results, _ = round_fn.client_results(state, batches, ids, round_key, t)
    for name, f in results.adapters.items():  # lora_a frozen: every client holds the global lora_a, bit for bit
      global_a = np.broadcast_to(np.asarray(state.adapters[name].lora_a), f.lora_a.shape)
      assert np.array_equal(np.asarray(f.lora_a), global_a)
    server_step = jax.jit(functools.partial(simulation.server_step, round_fn.strategy))
    state, _ = server_step(state, results, weights, ids, simulation.server_key(round_key))
    reference, _ = round_fn(reference, batches, ids, weights, round_key, t)
    # Same keys and the same ops, compiled in two programs: only float32 reordering differs (~1e-7 per op,
    # over 2 AdamW steps and the sketch's QR/SVD); 1e-4 relative on the products is far above it.
    for name, f in state.adapters.items():
      got = np.asarray(f.lora_a, np.float64) @ np.asarray(f.lora_b, np.float64)
      want = np.asarray(reference.adapters[name].lora_a, np.float64) @ np.asarray(
        reference.adapters[name].lora_b, np.float64
      )
      assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), name
      assert np.linalg.norm(want) > 0
