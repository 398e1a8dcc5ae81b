"""Statistical checks of the DP mechanism inside the compiled round, over many rounds with the runner's keys.

`test_privacy_*.py` and `test_data_batching.py` check the primitives; these check what training does with
them: the round's key derivation for clients and steps, the normaliser q n, the masks of the runner's
fixed-capacity batches, the frozen factor that the W-space noise is projected by, and the metrics. Rounds run
as `fedask_jax.runner.train` runs them: round key fold_in(run_key, t), batches from the runner's own sampler
(`runner.round_sampler`, with `runner.plan_privacy`'s capacity and noise multiplier), then
`simulation.FederatedRound` (strategy FedASK: under DP clients train lora_b with lora_a frozen).

Setup: a one-layer Llama (d = 16, L = 6) with rank-2 adapters on q_proj and v_proj (lora_a [in, r],
lora_b [r, out], scaling s = alpha / r); 4 clients of 16 to 40 examples,
all sampled every round (so that a client's draws pair up across rounds by its id); 2 local steps; batch size
q n = 4. The strategy is wrapped by `reporting_clients`, which also returns every client's final lora_b and
mean privatised gradient from inside the compiled round, so per-client, per-step quantities can be observed.

False failures: every test fails with probability <= FALSE_FAILURE when the code is right (Bonferroni over its
assertions); where a bound uses a normal approximation the comment says so.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from fedask_jax import data as fdata
from fedask_jax import privacy, runner, simulation
from fedask_jax.adapters import Adapters
from fedask_jax.config import from_dict
from fedask_jax.lora import LoRAConfig, inject_lora, lora_layers, to_adapters
from fedask_jax.models import LlamaConfig, LlamaForCausalLM, init_random
from fedask_jax.strategies import Strategy

FALSE_FAILURE = 1e-6
SIZES = (16, 20, 28, 40)
OFFSETS = np.cumsum((0,) + SIZES)
LENGTH = 6
# Example e has input_ids[e, 0] = e, so a batch slot names its example. The pool holds one copy of the
# federation's data per clipping regime: per-example gradient norms below C, mixed, or above C.
REGIMES = ("tiny", "mixed", "huge")
POOL = len(REGIMES) * int(OFFSETS[-1])
LLAMA = LlamaConfig(
  model_type="llama",
  vocab_size=POOL,
  hidden_size=16,
  intermediate_size=32,
  num_hidden_layers=1,
  num_attention_heads=2,
  num_key_value_heads=2,
  head_dim=8,
)
CONFIG = from_dict(
  {
    "strategy": "fedask",
    "rounds": 100,
    "num_clients": len(SIZES),
    "clients_per_round": len(SIZES),
    "local_steps": 2,
    "batch_size": 4,
    "lora": {"rank": 2, "alpha": 4.0, "target_modules": ["q_proj", "v_proj"]},
    # C != 1 so that a noise std missing its factor C shows.
    "privacy": {"target_epsilon": 3.0, "clip_norm": 0.5},
  }
)
SCALING = CONFIG.lora.alpha / CONFIG.lora.rank


@functools.cache
def regime_gradients() -> dict[str, np.ndarray]:
  """Per-example gradients of the linear loss, {layer: [POOL, r, out]} float32: a random direction (unit norm
  over all layers together) times C times a log-uniform factor in [0.01, 0.5] ("tiny"), [2, 100] ("huge"),
  or either at random ("mixed"): no norm is within float32 round-off of C."""
  rng = np.random.default_rng(0)
  shapes = {name: layer.lora_b.shape for name, layer in lora_layers(tiny_llama()).items()}
  directions = {name: rng.normal(size=(POOL, *shape)) for name, shape in shapes.items()}
  norm = np.sqrt(sum(np.sum(d**2, axis=(1, 2)) for d in directions.values()))
  tiny = np.exp(rng.uniform(np.log(0.01), np.log(0.5), POOL))
  huge = np.exp(rng.uniform(np.log(2.0), np.log(100.0), POOL))
  regime = np.arange(POOL) // int(OFFSETS[-1])
  magnitude = CONFIG.privacy.clip_norm * np.where(
    (regime == 0) | ((regime == 1) & (rng.random(POOL) < 0.5)), tiny, huge
  )
  return {name: (d * (magnitude / norm)[:, None, None]).astype(np.float32) for name, d in directions.items()}


def tiny_llama() -> LlamaForCausalLM:
  model = init_random(LlamaForCausalLM(LLAMA), jax.random.key(0))
  lora = CONFIG.lora
  inject_lora(
    model, LoRAConfig(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules), jax.random.key(1)
  )
  return model


@functools.cache
def plan() -> privacy.PrivacyPlan:
  """The runner's privacy plan for these client sizes (sigma from the accountant, the batch capacity)."""
  return runner.plan_privacy(CONFIG, np.array(SIZES))[0]


@functools.cache
def sampler() -> Callable[..., Any]:
  return runner.round_sampler(CONFIG, plan().capacity)


@functools.cache
def client_data(regime: str) -> fdata.ClientData:
  """The federation's data [N, 40, L] from the regime's copy of the pool: client k holds a contiguous range of
  SIZES[k] examples; tokens 1.. are random, the loss is on tokens 2.."""
  rng = np.random.default_rng(1)
  input_ids = rng.integers(0, LLAMA.vocab_size, (POOL, LENGTH)).astype(np.int32)
  input_ids[:, 0] = np.arange(POOL)
  loss_mask = np.broadcast_to(np.arange(LENGTH) >= 2, (POOL, LENGTH))
  encoded = fdata.EncodedDataset(
    input_ids, np.ones((POOL, LENGTH), bool), loss_mask, np.full(POOL, 2, np.int32), np.full(POOL, LENGTH, np.int32)
  )
  start = REGIMES.index(regime) * int(OFFSETS[-1])
  parts = fdata.Partition(tuple(start + np.arange(OFFSETS[k], OFFSETS[k + 1]) for k in range(len(SIZES))))
  return jax.device_put(fdata.stack_clients(encoded, parts))


def dp_config(mechanism: str, noise_multiplier: float | None = None) -> simulation.DPConfig:
  """The DPConfig `runner.prepare` builds (sigma from the plan unless given)."""
  sigma = plan().noise_multiplier if noise_multiplier is None else noise_multiplier
  return simulation.DPConfig(
    clip_norm=CONFIG.privacy.clip_norm,
    noise_multiplier=sigma,
    expected_batch_size=float(CONFIG.batch_size),
    mechanism=mechanism,
  )


def reporting_clients(strategy: Strategy) -> Strategy:
  """`strategy` whose server update also returns, as metrics, every client's final lora_b and mean privatised
  lora_b gradient ({layer: [K, r, out]}); the round computes exactly what it computes without the wrapper."""

  def server_update(state, global_adapters, results, weights, client_ids, key):
    adapters, new_state, metrics = strategy.server_update(state, global_adapters, results, weights, client_ids, key)
    return (
      adapters,
      new_state,
      dict(
        metrics,
        client_b={n: f.lora_b for n, f in results.adapters.items()},
        mean_gradient={n: f.lora_b for n, f in results.mean_gradient.items()},
      ),
    )

  return strategy._replace(server_update=server_update)


def make_round(dp: simulation.DPConfig, per_example_loss, optimizer) -> simulation.FederatedRound:
  return simulation.FederatedRound(
    tiny_llama(),
    reporting_clients(runner.make_strategy(CONFIG)),
    dp=dp,
    optimizer=optimizer,
    per_example_loss=per_example_loss,
  )


class Rounds(NamedTuple):
  """Rounds 1..R, clients in id order. example_mask, example_ids [R, N, S, capacity] (ids: the pool index
  in each slot); start_a {layer: [R, in, r]}, start_b {layer: [R, r, out]}: the global adapters each round
  starts from; client_b, mean_gradient {layer: [R, N, r, out]}; clipped_fraction [R] (the round's metric)."""

  example_mask: np.ndarray
  example_ids: np.ndarray
  start_a: dict[str, np.ndarray]
  start_b: dict[str, np.ndarray]
  client_b: dict[str, np.ndarray]
  mean_gradient: dict[str, np.ndarray]
  clipped_fraction: np.ndarray


@functools.cache
def initial_adapters() -> Adapters:
  return jax.tree.map(np.asarray, to_adapters(nnx.state(tiny_llama(), nnx.LoRAParam)))


def run_rounds(rnd: simulation.FederatedRound, data: fdata.ClientData, rounds: int) -> Rounds:
  """Rounds 1..`rounds` from the model's initial adapters, as `runner.train` runs them."""
  run_key = runner.run_key(CONFIG)
  # Fresh buffers: rnd.init(n) alone hands out rnd.initial_adapters themselves, which the first round donates.
  state = rnd.init(CONFIG.num_clients, jax.tree.map(jnp.asarray, initial_adapters()))
  records = []
  for t in range(1, rounds + 1):
    round_key = jax.random.fold_in(run_key, t)
    ids, weights, batches = sampler()(round_key, data)
    start = jax.tree.map(lambda x: np.asarray(x, np.float64), state.adapters)  # before the round donates it
    state, metrics = rnd(state, batches, ids, weights, round_key, t)
    order = np.argsort(np.asarray(ids))

    def by_id(tree, order=order):
      return jax.tree.map(lambda x: np.asarray(x, np.float64)[order], tree)

    records.append(
      Rounds(
        np.asarray(batches.example_mask)[order],
        np.asarray(batches.input_ids[..., 0])[order],
        {n: f.lora_a for n, f in start.items()},
        {n: f.lora_b for n, f in start.items()},
        by_id(metrics["client_b"]),
        by_id(metrics["mean_gradient"]),
        np.asarray(metrics["clipped_fraction"]),
      )
    )
  return jax.tree.map(lambda *xs: np.stack(xs), *records)


def first_step_sgd(eta: float) -> optax.GradientTransformation:
  """SGD with learning rate eta at local step 0 and 0 at step 1, so that both steps' privatised gradients can
  be read off a round's output (`step_gradients`)."""
  return optax.sgd(lambda count: jnp.where(count == 0, eta, 0.0))


def step_gradients(out: Rounds, eta: float) -> dict[str, np.ndarray]:
  """{layer: [R, N, S = 2, r, out]}: each client's privatised lora_b gradient g_s at its two local steps under
  `first_step_sgd(eta)`: its final b is b_start - eta g_0 and its mean gradient (ClientResult.mean_gradient)
  is (g_0 + g_1) / 2."""
  grads = {}
  for name in sorted(out.client_b):
    step0 = (out.start_b[name][:, None] - out.client_b[name]) / eta
    grads[name] = np.stack([step0, 2 * out.mean_gradient[name] - step0], axis=2)
  return grads


def flat_layers(grads: dict[str, np.ndarray]) -> np.ndarray:
  """{layer: [..., r, out]} -> [..., D]: the layers flattened and concatenated in sorted-name order."""
  return np.concatenate([grads[n].reshape(*grads[n].shape[:-2], -1) for n in sorted(grads)], axis=-1)


def binomial_interval(trials, p, alpha):
  """[lo, hi] with P(X < lo) + P(X > hi) <= alpha for X ~ Binomial(trials, p)."""
  return scipy.stats.binom.ppf(alpha / 2, trials, p), scipy.stats.binom.isf(alpha / 2, trials, p)


# ----- 1. noise -----

NOISE_ROUNDS = 200


def zero_gradient_loss(model, example):
  """The causal-LM loss times 0: the forward pass runs, and every per-example gradient is exactly 0."""
  return 0.0 * simulation.causal_lm_example_loss(model, example)


@pytest.mark.parametrize("mechanism", ["b_space", "w_space"])
def test_noise_std_and_independence_inside_the_round(mechanism):
  """Zero gradients, so a client's privatised gradient at step s is its DP noise alone, g_s = N_s / (q n), read
  off per step with `first_step_sgd`. B-space: g_s entries i.i.d. N(0, (sigma C / q n)^2). W-space:
  g_s = s a^T N_s / (q n) with the round's frozen a, so its columns are N(0, (s sigma C / q n)^2 a^T a),
  whitened here by the Cholesky factor of a^T a (FedASK re-factorises a every round, so projecting by a stale
  a changes the variance). With z the standardised values over 200 rounds x 4 clients x 2 steps x 2 layers x
  r x out = 102400 entries: sum z^2 ~ chi-square(102400), mean z ~ N(0, 1 / 102400), and for each of round,
  client, step, layer and rank row, the values at even and odd indices along it are independent (Pearson's
  test, exact for Gaussian pairs). 7 assertions at FALSE_FAILURE / 7 each."""
  dp = dp_config(mechanism)
  # eta < 1: in W-space the noise a (s a^T N) added to the product a b scales with ||a||^2 ~ ||a b|| (FedASK's
  # balanced factors), so at eta = 1 pure noise grows the adapters geometrically (float32 overflow within ~80
  # rounds here). At 1e-2 they stay within 20% of their scale, and eta g_0 is 5% of b: reading g_0 off the
  # difference keeps ~1e-6 relative accuracy.
  eta = 1e-2
  out = run_rounds(make_round(dp, zero_gradient_loss, first_step_sgd(eta)), client_data("tiny"), NOISE_ROUNDS)
  std = dp.noise_multiplier * dp.clip_norm / dp.expected_batch_size
  z = []
  for name, noise in step_gradients(out, eta).items():
    if mechanism == "w_space":
      a = out.start_a[name]
      chol = np.linalg.cholesky(np.einsum("tir,tis->trs", a, a))
      noise = (
        np.linalg.solve(np.broadcast_to(chol[:, None, None], (*noise.shape[:3], *chol.shape[1:])), noise) / SCALING
      )
    z.append(noise / std)
  z = np.stack(z, axis=3)  # [R, N, S, layer, r, out]
  chex.assert_shape(z, (NOISE_ROUNDS, len(SIZES), CONFIG.local_steps, 2, CONFIG.lora.rank, LLAMA.hidden_size))
  alpha = FALSE_FAILURE / 7
  size = z.size
  chi2 = float(np.sum(z**2))
  low, high = scipy.stats.chi2.ppf(alpha / 2, size), scipy.stats.chi2.isf(alpha / 2, size)
  assert low <= chi2 <= high, f"empirical std / (sigma C / q n) = {np.sqrt(chi2 / size):.4f}"
  assert abs(np.mean(z)) <= scipy.stats.norm.isf(alpha / 2) / np.sqrt(size), np.mean(z)
  for axis, what in enumerate(["rounds", "clients", "steps", "layers", "rank rows"]):
    even, odd = np.take(z, np.arange(0, z.shape[axis] - 1, 2), axis), np.take(z, np.arange(1, z.shape[axis], 2), axis)
    result = scipy.stats.pearsonr(even.ravel(), odd.ravel())
    assert result.pvalue >= alpha, f"noise of different {what} correlates: r = {result.statistic:.4f}"


# ----- 2. clipping -----

CLIP_ROUNDS = 16


def test_clipping_inside_the_round_matches_numpy():
  """sigma = 0 and a loss linear in lora_b, l_e = <b, g_e> (all layers), so every per-example gradient g_e is
  known in closed form (`regime_gradients`). Each client's privatised gradient at each step must be
  sum_{e in batch} min(1, C / ||g_e||) g_e / (q n), computed here in float64 from the runner's batches (empty
  slots hold the client's first example: they must not count); so its norm is <= C x the step's number of
  examples. The clipped_fraction metric must be its definition (the fraction of the round's real examples,
  over all clients and steps, that were clipped; an empty step adds nothing): 0 for tiny gradients, 1 for huge
  ones, in between for mixed. Deterministic given
  the keys. Tolerance: b entries stay below 0.2 (FedASK's balanced factors), so g_s read off b carries float32
  round-off ~1e-8 (measured); 1e-6 absolute leaves room, and a wrong clip factor or a counted empty slot
  changes g_s by >= 1e-3."""
  table = {n: jnp.asarray(g) for n, g in regime_gradients().items()}

  def linear_loss(model, example):
    e = example.input_ids[0]
    return sum(jnp.vdot(layer.lora_b[...], table[n][e]) for n, layer in lora_layers(model).items())

  dp = dp_config("b_space", noise_multiplier=0.0)
  rnd = make_round(dp, linear_loss, first_step_sgd(1.0))
  clip = dp.clip_norm
  for regime in REGIMES:
    out = run_rounds(rnd, client_data(regime), CLIP_ROUNDS)
    mask = out.example_mask
    per_example = flat_layers({n: np.asarray(t, np.float64)[out.example_ids] for n, t in table.items()})
    norms = np.linalg.norm(per_example, axis=-1)
    scale = np.where(mask, np.minimum(1.0, clip / norms), 0.0)
    expected = np.einsum("tksb,tksbd->tksd", scale, per_example) / dp.expected_batch_size
    got = flat_layers(step_gradients(out, 1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=regime)
    count = mask.sum(-1)
    assert np.all(np.linalg.norm(got, axis=-1) * dp.expected_batch_size <= clip * count + 1e-6), regime
    pooled = (mask & (norms > clip)).sum(axis=(1, 2, 3)) / count.sum(axis=(1, 2))
    np.testing.assert_allclose(out.clipped_fraction, pooled, atol=1e-6, err_msg=regime)
    if regime == "tiny":
      np.testing.assert_array_equal(out.clipped_fraction, 0.0)
    elif regime == "huge":
      # Rounds with an empty Poisson step among them too (a mean of per-step fractions would count it 0).
      assert (count == 0).any(axis=(1, 2)).any()
      np.testing.assert_array_equal(out.clipped_fraction, 1.0)
    else:
      assert np.all((0 < out.clipped_fraction) & (out.clipped_fraction < 1)), out.clipped_fraction


def test_wspace_clipping_extremes_with_the_model_loss():
  """W-space (clip dl/dW, the norm over both layers), sigma = 0, the causal-LM loss of the Llama scaled by 1e-6
  (no example's dl/dW reaches C = 0.5) or 1e6 (every one exceeds it). clipped_fraction, over the round's real
  examples, is 0 or 1. A step's released b-gradient is s a^T (sum of clipped dl/dW) /
  (q n), so its norm is <= s max_layers ||a||_2 C count / (q n) (the B-space bound C count is checked in
  test_clipping_inside_the_round_matches_numpy); unclipped, gradients scaled by 1e6 would exceed it by orders
  of magnitude."""

  def scaled_loss(model, example):
    regime = example.input_ids[0] // int(OFFSETS[-1])
    return jnp.where(regime == 0, 1e-6, 1e6) * simulation.causal_lm_example_loss(model, example)

  dp = dp_config("w_space", noise_multiplier=0.0)
  rnd = make_round(dp, scaled_loss, first_step_sgd(1.0))
  out = run_rounds(rnd, client_data("tiny"), CLIP_ROUNDS)
  np.testing.assert_array_equal(out.clipped_fraction, 0.0)
  out = run_rounds(rnd, client_data("huge"), CLIP_ROUNDS)
  count = out.example_mask.sum(-1)
  np.testing.assert_array_equal(out.clipped_fraction, 1.0)
  spectral = np.max([np.linalg.norm(a, ord=2, axis=(1, 2)) for a in out.start_a.values()], axis=0)
  bound = SCALING * spectral[:, None, None] * dp.clip_norm * count
  norm = np.linalg.norm(flat_layers(step_gradients(out, 1.0)), axis=-1) * dp.expected_batch_size
  # + 1e-6: float32 round-off of reading g_s off b (a step without examples gives ~1e-8, not 0).
  assert np.all(norm <= bound + 1e-6), np.max(norm - bound)


# ----- 3. sampling -----

SAMPLING_ROUNDS = 4000


def test_poisson_sampling_of_the_runner_batches():
  """The runner's sampler over 4000 rounds (round keys fold_in(run_key, t)): client k's examples join each
  step independently with rate q_k = batch_size / n_k (no overflow: capacity from plan_privacy, overflow <=
  1e-12 per step, negligible). Exact binomial tests: each client's total count over its R S steps ~
  Binomial(R S n_k, q_k) (mean q n); each example's ~ Binomial(R S, q_k) (uniform over the client's data);
  pairs of membership indicators along rounds (t even / odd), steps (0 / 1), clients (0 / 1 and 2 / 3 on their
  common example positions) and examples (j even / odd) are both 1 ~ Binomial(pairs, q q') (independence; a
  fixed-size or key-sharing sampler fails this). The variance of the per-step count against n q (1 - q):
  normal approximation of the sample variance over 8000 steps. Bonferroni over all assertions."""
  run_key = runner.run_key(CONFIG)
  keys = jax.vmap(lambda t: jax.random.fold_in(run_key, t))(jnp.arange(1, SAMPLING_ROUNDS + 1))
  ids, _, batches = jax.jit(jax.vmap(sampler(), in_axes=(0, None)))(keys, client_data("tiny"))
  order = np.argsort(np.asarray(ids), axis=1)[:, :, None, None]
  mask = np.take_along_axis(np.asarray(batches.example_mask), order, axis=1)
  example = np.take_along_axis(np.asarray(batches.input_ids[..., 0]), order, axis=1)
  rounds, clients, steps, _ = mask.shape
  member = np.zeros((rounds, clients, steps, max(SIZES)), bool)
  t, k, s, _ = np.nonzero(mask)
  member[t, k, s, example[mask] - OFFSETS[k]] = True
  rates = CONFIG.batch_size / np.array(SIZES)

  tests = []  # (observed, trials, p, what)
  count = mask.sum(-1)
  for k, (n, q) in enumerate(zip(SIZES, rates)):
    tests.append((count[:, k].sum(), rounds * steps * n, q, f"client {k}: total count"))
    for j in range(n):
      tests.append((member[:, k, :, j].sum(), rounds * steps, q, f"client {k}: example {j}"))
    own = member[:, k, :, :n]
    for axis, what in ((0, "rounds"), (1, "steps"), (2, "examples")):
      length = own.shape[axis] // 2 * 2
      even = np.take(own, np.arange(0, length, 2), axis)
      odd = np.take(own, np.arange(1, length, 2), axis)
      tests.append(((even & odd).sum(), even.size, q * q, f"client {k}: {what}"))
  for k in (0, 2):
    n = SIZES[k]
    both = member[:, k, :, :n] & member[:, k + 1, :, :n]
    tests.append((both.sum(), both.size, rates[k] * rates[k + 1], f"clients {k}, {k + 1}"))

  alpha = FALSE_FAILURE / (len(tests) + clients)
  for observed, trials, p, what in tests:
    low, high = binomial_interval(trials, p, alpha)
    assert low <= observed <= high, (what, observed, trials * p)
  for k, (n, q) in enumerate(zip(SIZES, rates)):
    values = count[:, k].ravel()
    m = values.size
    variance = n * q * (1 - q)
    fourth = variance * (1 + 3 * (n - 2) * q * (1 - q))  # central fourth moment of Binomial(n, q)
    sd = np.sqrt((fourth - variance**2 * (m - 3) / (m - 1)) / m)
    assert abs(np.var(values, ddof=1) - variance) <= scipy.stats.norm.isf(alpha / 2) * sd, (k, np.var(values, ddof=1))
