"""experiments/noise_law.py on the tiny runner setup (tests/run_fixtures.py: a 2-layer Llama, hidden 32, LoRA r 2
on q_proj / v_proj, 4 clients of 60 examples, 2 sampled, batch 4, 3 local SGD steps): the measured noise power of
ffa-lora matches the analytic value, fedavg's log-log slope goes from 2 to 4, and the fits and Adam's noise
gain agree with independent references."""

import math
import pathlib
import sys

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import noise_law as nl  # noqa: E402  (experiments/noise_law.py)
from run_fixtures import make_tiny_setup  # noqa: E402

from fedask_jax import runner  # noqa: E402
from fedask_jax.config import from_dict  # noqa: E402


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
  return make_tiny_setup(tmp_path_factory.mktemp("noise_law"))


def tiny_experiment(tiny_setup, strategy, lr):
  raw = dict(tiny_setup)
  raw.update(strategy=strategy, lr=lr, optimizer={"name": "sgd"})
  raw["privacy"] = {"enabled": True, "target_epsilon": 3.0, "clip_norm": 1.0}
  return runner.prepare(from_dict(raw))


def test_ffa_lora_noise_power_matches_the_analytic_value(tiny_setup):
  # Large sigmas: the gradients' dependence on the noisy b (which the analytic value leaves out) is bounded by
  # the clipping (D below) and is then < 1e-3 of the noise; the lr only scales both.
  # Rounds of this model take milliseconds (the compilation is the cost), so many seeds are cheap.
  sigmas, seeds = (300.0, 1000.0), 64
  experiment = tiny_experiment(tiny_setup, "ffa-lora", lr=0.01)
  sweep = nl.noise_power_sweep(experiment, sigmas, seeds)
  assert not sweep.invalid.any()
  config = experiment.config
  s, eta, steps = config.lora.alpha / config.lora.rank, config.lr, config.local_steps
  clip, batch = config.privacy.clip_norm, config.batch_size
  sizes = np.asarray(experiment.client_data.client_sizes, np.float64)[sweep.client_ids]
  w = sizes / sizes.sum()
  adapters = experiment.round_fn.initial_adapters
  # The gradients' part: each client step's clipped sum has norm <= C x (examples in the step) <= C x capacity,
  # so sigma moves eta sum_k w_k sum_s g_ks by at most D_b = 2 eta S C capacity / B_e (global L2 over b), and the
  # product by at most s max_l ||a_l||_2 D_b; by the triangle inequality over the seeds stacked, the root-mean
  # power sits within that of the pure noise's.
  spectral = max(np.linalg.norm(np.asarray(f.lora_a, np.float64), 2) for f in adapters.values())
  coupling = s * spectral * 2 * eta * steps * clip * experiment.capacity / batch
  for i, sigma in enumerate(sigmas):
    # Pure noise: b's aggregated noise -eta sum_k w_k sum_s xi_ks has i.i.d. N(0, v) entries, and layer l's
    # product noise s a_l N_l [in, out] has squared norm sum over out columns of N_col^T (s^2 a_l^T a_l) N_col: a
    # weighted chi-square with weights s^2 v eig(a_l^T a_l), each eigenvalue out_l times; its mean over the
    # seeds divides every weight by the number of seeds.
    v = eta**2 * steps * np.sum(w**2) * (sigma * clip / batch) ** 2
    lam = np.asarray(
      [
        s**2 * v * e / seeds
        for f in adapters.values()
        for e in np.linalg.eigvalsh(np.asarray(f.lora_a, np.float64).T @ np.asarray(f.lora_a, np.float64))
        for _ in range(f.lora_b.shape[-1] * seeds)
      ]
    )
    expected = lam.sum()
    # Laurent & Massart (2000), Lemma 1: P(X - EX >= 2 sqrt(x sum lam^2) + 2 x max lam) <= e^-x and
    # P(EX - X >= 2 sqrt(x sum lam^2)) <= e^-x; x = 14: false-failure probability <= 2 sigmas x 2 e^-14 = 3.3e-6.
    x = 14.0
    upper = expected + 2 * math.sqrt(x * np.sum(lam**2)) + 2 * x * lam.max()
    lower = expected - 2 * math.sqrt(x * np.sum(lam**2))
    measured = math.sqrt(np.mean(sweep.power[:, i]))
    assert math.sqrt(max(lower, 0.0)) - coupling <= measured <= math.sqrt(upper) + coupling, (
      sigma,
      measured**2 / expected,
      lower / expected,
      upper / expected,
      coupling**2 / expected,
    )
    # The tolerance is tight enough to catch a wrong factor (sum w^2 vs 1/K, S vs S^2, s vs s^2: all >= 1.5x).
    assert (math.sqrt(upper) + coupling) ** 2 < 1.2 * expected
    assert (math.sqrt(max(lower, 0.0)) - coupling) ** 2 > expected / 1.2


def test_log_log_slope_of_fedavg_goes_from_2_to_4(tiny_setup):
  # lr 0.5 puts the crossover sigma* near 1 (Lemma 1: sqrt(B_e^2 sum out ||a||^2 / (eta^2 S sum w^2 C^2
  # sum in r out)) ~ 0.94 here), so the sigmas below are >= 300 sigma* above and <= sigma* / 300 below it: the
  # two-term law's local slope is then within 2e-5 of 2 and 4, and the per-seed sigma^3 term (zero in
  # expectation) moves it by O(sigma* / sigma) ~ 3e-3. The same noise draw scales with sigma, so the slopes are
  # smooth in sigma and two seeds suffice; the margins below are 10x those corrections.
  sigmas = (1e-3, 3e-3, 300.0, 1000.0)
  experiment = tiny_experiment(tiny_setup, "fedavg", lr=0.5)
  sweep = nl.noise_power_sweep(experiment, sigmas, 2)
  assert not sweep.invalid.any()
  slope_small, _ = nl.loglog_slope(sweep.sigmas, sweep.power, sigmas[:2])
  slope_large, _ = nl.loglog_slope(sweep.sigmas, sweep.power, sigmas[2:])
  assert slope_small == pytest.approx(2.0, abs=0.03)
  assert slope_large == pytest.approx(4.0, abs=0.03)


def test_fits_recover_a_known_two_term_law():
  sigmas = np.asarray(nl.SIGMAS)
  c2, c4 = 3.0, 0.25
  power = c2 * sigmas**2 + c4 * sigmas**4
  fit = nl.two_term_fit(sigmas, power)
  # An exact two-term curve: NNLS recovers it to float64 rounding.
  np.testing.assert_allclose(fit, (c2, c4), rtol=1e-8)
  assert nl.crossover(*fit) == pytest.approx(math.sqrt(c2 / c4), rel=1e-8)
  assert nl.crossover(1.0, 0.0) == math.inf
  for k in (2.0, 4.0):
    slope, _ = nl.loglog_slope(sigmas, np.stack([sigmas**k, 2 * sigmas**k]), tuple(sigmas[:5]))
    assert slope == pytest.approx(k, abs=1e-10)


@pytest.mark.parametrize("steps", [1, 4])
def test_adam_noise_gain_matches_optax_adam_on_pure_noise(steps):
  # kappa_S = E (displacement / lr)^2 of optax's Adam fed N(0, 1) gradients; S = 1 is exactly 1 (a sign step).
  samples = 200_000
  opt = optax.adam(1.0, b1=nl.ADAM_BETAS[0], b2=nl.ADAM_BETAS[1], eps=0.0)
  params = jax.numpy.zeros(samples)
  state = opt.init(params)
  for s in range(steps):
    grad = jax.random.normal(jax.random.fold_in(jax.random.key(7), s), (samples,))
    update, state = opt.update(grad, state, params)
    params = optax.apply_updates(params, update)
  reference = float(np.mean(np.asarray(params, np.float64) ** 2))
  kappa = nl.adam_noise_gain(steps)
  if steps == 1:
    # optax's float32 bias correction 1 - b2 is off by 1.3e-5 relative.
    assert kappa == pytest.approx(1.0, rel=1e-6) and reference == pytest.approx(1.0, rel=1e-4)
    return
  # Two independent Monte Carlo means (1e6 and 2e5 samples) of a variable with sd <= 4.6 (measured at S = 4):
  # their difference has sd <= 4.6 sqrt(1e-6 + 5e-6) = 0.0113; 5 sd, false-failure probability ~6e-7.
  assert abs(kappa - reference) < 5 * 0.0113
