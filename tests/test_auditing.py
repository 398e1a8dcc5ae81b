"""Privacy audit (fedask_jax.auditing): the Clopper-Pearson epsilon lower bound against scipy's beta quantiles
and a hand computation, the canary harness against a NumPy client update, and the fast CI audit: the real
B-space and W-space mechanisms stay below their claimed epsilon, broken ones (noise off, clipping off) are
reported far above it.

Statistical assertions and their false-failure probabilities (for a correct implementation, over the choice of
the fixed seeds): an epsilon lower bound above the true epsilon has probability <= 1 - CONFIDENCE = 1e-3 (the
Clopper-Pearson guarantee); the other ones are stated where they are made.
"""

import functools
import math

import chex
import jax
import numpy as np
import pytest
import scipy.stats
from absl.testing import parameterized

from fedask_jax import auditing, privacy, simulation

DELTA = 1e-5
CONFIDENCE = 0.999
RUNS = 10_000  # per side; an audit costs ~3 s, mostly compilation
SPACES = ("b_space", "w_space")


def _problem():
  return auditing.linear_canary_problem(jax.random.key(0))


def _audit(space, *, clip_norm, noise_multiplier, steps=1, sample_rate=1.0, runs=RUNS, seed=1):
  problem = _problem()
  mechanism = problem.mechanism(
    space,
    clip_norm=clip_norm,
    noise_multiplier=noise_multiplier,
    expected_batch_size=sample_rate * problem.num_examples,
  )
  return auditing.audit_dp_gradient(
    mechanism,
    problem.params,
    problem.data,
    problem.direction,
    jax.random.key(seed),
    num_runs=runs,
    steps=steps,
    sample_rate=sample_rate,
    delta=DELTA,
    confidence=CONFIDENCE,
  )


@functools.cache
def _sigma(epsilon, sample_rate=1.0, steps=1, accountant="pld"):
  return privacy.calibrate_noise(
    privacy.DPSchedule(sample_rate, local_steps=steps, rounds=1), epsilon, DELTA, accountant
  )


# ---------------------------------------------------------------------------------------------------------------
# The bound


def _scipy_bound(scores_in, scores_out, threshold, delta, confidence):
  """Clopper-Pearson written from the lower tail of the beta law (jax_privacy bounds FNR from the upper tail)."""
  alpha = 1 - confidence
  n_in, n_out = len(scores_in), len(scores_out)
  tp = int(np.sum(scores_in >= threshold))
  fp = int(np.sum(scores_out >= threshold))
  tpr_lb = scipy.stats.beta.ppf(alpha / 2, tp, n_in - tp + 1) if tp > 0 else 0.0
  fpr_ub = scipy.stats.beta.ppf(1 - alpha / 2, fp + 1, n_out - fp) if fp < n_out else 1.0
  return max(0.0, math.log(tpr_lb - delta) - math.log(fpr_ub)) if tpr_lb > delta else 0.0


def test_bound_matches_a_hand_computation():
  # 10 in-scores all above the threshold, 10 out-scores all below, 95%: TPR_lb = 0.025^(1/10) = 0.691503,
  # FPR_ub = 1 - 0.691503 = 0.308497, eps = log(0.691503 / 0.308497) = 0.807155 (by hand, 6 digits).
  scores_in, scores_out = np.arange(10.0) + 10, np.arange(10.0)
  assert auditing.epsilon_lower_bound(scores_in, scores_out, 0.0, 0.95, threshold=9.5) == pytest.approx(
    0.807155, abs=2e-6
  )


@pytest.mark.parametrize("threshold", [-0.5, 0.3, 1.0, 2.2, 9.0])
@pytest.mark.parametrize("delta,confidence", [(0.0, 0.95), (1e-5, 0.95), (1e-3, 0.999)])
def test_explicit_threshold_matches_scipy_beta_quantiles(threshold, delta, confidence):
  rng = np.random.default_rng(0)
  scores_in, scores_out = rng.normal(1.0, 1.0, 700), rng.normal(0.0, 1.0, 900)
  got = auditing.epsilon_lower_bound(scores_in, scores_out, delta, confidence, threshold=threshold)
  # Two formulations of the same quantiles through scipy's incomplete-beta inverse: agree to ~1e-12.
  assert got == pytest.approx(_scipy_bound(scores_in, scores_out, threshold, delta, confidence), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("num_runs", [2, 11, 1000, 4001])
@pytest.mark.parametrize("confidence", [0.95, 0.999])
def test_perfectly_separated_scores_reach_the_ceiling(num_runs, confidence):
  # Atoms (a noise-free mechanism): every split has the same counts, so the held-out bound is the ceiling.
  scores_in, scores_out = np.ones(num_runs), np.zeros(num_runs)
  n = num_runs - num_runs // 2
  ceiling = auditing.max_certifiable_epsilon(num_runs, DELTA, confidence)
  assert auditing.epsilon_lower_bound(scores_in, scores_out, DELTA, confidence) == pytest.approx(ceiling, rel=1e-9)
  # The closed form against scipy on the evaluation half (n per side, threshold between the atoms).
  expected = _scipy_bound(np.ones(n), np.zeros(n), 0.5, DELTA, confidence)
  assert ceiling == pytest.approx(expected, rel=1e-9)


def test_ceiling_grows_like_log_runs():
  ceilings = [auditing.max_certifiable_epsilon(n, DELTA) for n in (10**3, 10**4, 10**5, 10**6)]
  np.testing.assert_allclose(np.diff(ceilings), math.log(10), rtol=0.02)  # log(n / log(2 / alpha)) steps


def test_bound_is_monotone():
  rng = np.random.default_rng(1)
  scores_in, scores_out = rng.normal(1.5, 1.0, 1000), rng.normal(0.0, 1.0, 1000)
  bound = functools.partial(auditing.epsilon_lower_bound, threshold=2.0)
  by_confidence = [bound(scores_in, scores_out, DELTA, c) for c in (0.6, 0.9, 0.95, 0.99, 0.999)]
  by_delta = [bound(scores_in, scores_out, d, 0.95) for d in (0.0, 1e-3, 1e-2, 0.1)]
  by_shift = [bound(scores_in + shift, scores_out, DELTA, 0.95) for shift in (0.0, 0.5, 1.0, 2.0)]
  assert np.all(np.diff(by_confidence) < 0) and by_confidence[-1] > 0
  assert np.all(np.diff(by_delta) < 0) and by_delta[-1] > 0
  assert np.all(np.diff(by_shift) > 0)


def test_identical_score_laws_give_no_evidence():
  # True epsilon 0: a positive bound has probability <= 1 - CONFIDENCE = 1e-3.
  rng = np.random.default_rng(2)
  assert auditing.epsilon_lower_bound(rng.normal(size=5000), rng.normal(size=5000), DELTA, CONFIDENCE) == 0.0


def test_bad_input_is_named():
  scores = np.zeros(10)
  with pytest.raises(ValueError, match="confidence=0.3"):
    auditing.epsilon_lower_bound(scores, scores, DELTA, 0.3)
  with pytest.raises(ValueError, match="delta=1.5"):
    auditing.epsilon_lower_bound(scores, scores, 1.5)
  with pytest.raises(ValueError, match="scores_in has shape"):
    auditing.epsilon_lower_bound(np.zeros((2, 5)), scores, DELTA)
  with pytest.raises(ValueError, match="non-finite"):
    auditing.epsilon_lower_bound(scores, np.full(10, np.nan), DELTA)
  with pytest.raises(ValueError, match="len.scores_out.=1"):
    auditing.epsilon_lower_bound(scores, np.zeros(1), DELTA)
  with pytest.raises(ValueError, match="num_runs=1"):
    auditing.max_certifiable_epsilon(1, DELTA)
  problem = _problem()
  mechanism = problem.mechanism("b_space", clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
  common = dict(num_runs=4, steps=1, sample_rate=1.0)
  with pytest.raises(ValueError, match="steps=0"):
    auditing.canary_scores(
      mechanism, problem.params, problem.data, problem.direction, jax.random.key(0), **dict(common, steps=0)
    )
  with pytest.raises(ValueError, match="sample_rate=1.5"):
    auditing.canary_scores(
      mechanism, problem.params, problem.data, problem.direction, jax.random.key(0), **dict(common, sample_rate=1.5)
    )
  with pytest.raises(ValueError, match="direction must have"):
    auditing.canary_scores(
      mechanism, problem.params, problem.data, {"other": problem.direction["linear"]}, jax.random.key(0), **common
    )
  with pytest.raises(ValueError, match="sampling.clients_per_round=3 exceeds sampling.num_clients=2"):
    auditing.canary_scores(
      mechanism,
      problem.params,
      problem.data,
      problem.direction,
      jax.random.key(0),
      sampling=auditing.ClientSampling(4, 3, 2, simulation.sample_clients),
      canary_step=1.0,
      **common,
    )
  with pytest.raises(ValueError, match="canary_step=None: the canary's movement"):
    auditing.canary_scores(
      mechanism,
      problem.params,
      problem.data,
      problem.direction,
      jax.random.key(0),
      sampling=auditing.ClientSampling(4, 1, 2, simulation.sample_clients),
      **common,
    )
  with pytest.raises(ValueError, match="canary_step is the sampled score's offset"):
    auditing.canary_scores(
      mechanism, problem.params, problem.data, problem.direction, jax.random.key(0), canary_step=1.0, **common
    )
  with pytest.raises(TypeError, match=r"sampling=\(4, 1, 2\): expected a ClientSampling"):
    auditing.sampled_client_release(
      mechanism, problem.params, problem.data, 4, jax.random.key(0), (4, 1, 2), steps=1, sample_rate=1.0
    )
  with pytest.raises(ValueError, match="client_sizes='shared'"):
    auditing.canary_scores(
      mechanism, problem.params, problem.data, problem.direction, jax.random.key(0), client_sizes="shared", **common
    )
  with pytest.raises(ValueError, match="10 scores in and 9 out"):
    auditing.audit_scores(scores, scores[:9], DELTA)
  with pytest.raises(ValueError, match="space='c_space'"):
    problem.mechanism("c_space", clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1.0)
  with pytest.raises(ValueError, match="rank=5"):
    auditing.linear_canary_problem(jax.random.key(0), rank=5)


# ---------------------------------------------------------------------------------------------------------------
# The harness


def _numpy_release(problem, space, key, *, steps, sample_rate, clip_norm, learning_rate):
  """The client update written out in NumPy (float64): per-example gradients of 0.5 ||x (W0 + s a b) - t||^2,
  clipped by the B-space or W-space norm, summed over the Poisson batch (masks from the documented keys)."""
  w0, a, s = (np.asarray(problem.kernel, np.float64), np.asarray(problem.frozen, np.float64), problem.scaling)
  x = np.asarray(problem.data["x"], np.float64)[:, 0]
  t = np.asarray(problem.data["target"], np.float64)[:, 0]
  b = np.asarray(problem.params["linear"], np.float64)
  rows = x.shape[0]
  for step in range(steps):
    step_key = jax.random.fold_in(key, step)
    indices, mask = privacy.poisson_sample(jax.random.fold_in(step_key, 0), rows, sample_rate, rows)
    chosen = np.asarray(indices)[np.asarray(mask)]
    residual = x @ (w0 + s * a @ b) - t  # dl/dy [rows, out]
    grads = s * np.einsum("er,eo->ero", x @ a, residual)  # dl/db
    norms = (
      np.linalg.norm(grads, axis=(1, 2))
      if space == "b_space"
      else np.linalg.norm(x, axis=1) * np.linalg.norm(residual, axis=1)
    )  # ||dl/dW|| = ||x|| ||dl/dy||
    clipped = grads * np.minimum(1.0, clip_norm / norms)[:, None, None]
    b = b - learning_rate * clipped[chosen].sum(0) / (sample_rate * problem.num_examples)
  return b


class ClientReleaseTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(space=SPACES, steps_rate=[(1, 1.0), (3, 0.5)])
  def test_release_matches_numpy_client_update(self, space, steps_rate):
    steps, rate = steps_rate
    problem = _problem()
    # Noise off, so the release is deterministic; C = 1 clips the canary (gradient norm 100 or 200) and some
    # of the ordinary examples.
    mechanism = problem.mechanism(
      space, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=rate * problem.num_examples
    )
    key = jax.random.key(3)
    release = self.variant(
      functools.partial(
        auditing.client_release,
        mechanism,
        num_examples=problem.num_examples + 1,
        steps=steps,
        sample_rate=rate,
        learning_rate=0.5,
      )
    )
    got = release(problem.params, problem.data, key=key)["linear"]
    expected = _numpy_release(problem, space, key, steps=steps, sample_rate=rate, clip_norm=1.0, learning_rate=0.5)
    # float32 against float64 over a few steps of O(1) values: ~1e-6 relative.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_scores_do_not_depend_on_the_chunk_size():
  problem = _problem()
  mechanism = problem.mechanism("b_space", clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=7.5)
  run = functools.partial(
    auditing.canary_scores,
    mechanism,
    problem.params,
    problem.data,
    problem.direction,
    jax.random.key(4),
    num_runs=21,
    steps=2,
    sample_rate=0.5,
  )
  small, large = run(chunk_size=4), run(chunk_size=64)
  # Same keys, same per-run computation; vmapping in other chunks may reorder float32 sums by an ulp.
  np.testing.assert_allclose(small[0], large[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(small[1], large[1], rtol=1e-6, atol=1e-7)
  assert np.std(small[0]) > 0 and not np.allclose(small[0][:10], small[1][:10])


# ---------------------------------------------------------------------------------------------------------------
# The audit, fast CI version: one local step with q = 1 (the Gaussian mechanism, the strongest white-box setting)
# and a few Poisson-sampled steps.


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("claim", [1.0, 4.0])
def test_real_mechanism_stays_below_its_claim(space, claim):
  sigma = _sigma(claim)
  result = _audit(space, clip_norm=1.0, noise_multiplier=sigma)
  # The released coordinate is exactly the Gaussian mechanism: shift s C / (q n) in, 0 out, std s sigma C / (q n)
  # (s = 1 in B-space, where u is a coordinate of b; W-space noise s a^T N with a^T a = I). KS test, each side
  # false-failure 1e-6.
  problem = _problem()
  scale = (1.0 if space == "b_space" else problem.scaling) / problem.num_examples
  for scores, shift in [(result.scores_in, scale), (result.scores_out, 0.0)]:
    assert scipy.stats.kstest(scores, scipy.stats.norm(shift, sigma * scale).cdf).pvalue > 1e-6
  assert result.epsilon_lower_bound <= claim  # false failure <= 1e-3 (module docstring)
  if claim == 4.0:
    # Not vacuous. 200 simulated audits of these Gaussian scores at this size and confidence: bound mean 1.42,
    # sd 0.19, min 0.63; 0 is a > 7 sd event.
    assert result.epsilon_lower_bound > 0


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("broken", ["noise_off", "clipping_off"])
def test_broken_mechanism_is_caught(space, broken):
  claim = 1.0
  sigma = _sigma(claim)
  if broken == "noise_off":
    kwargs = dict(clip_norm=1.0, noise_multiplier=0.0)
  else:
    # Clipping off, noise still calibrated for C = 1: clip at 1e4 (above the canary's 100 or 200) with noise
    # multiplier sigma / 1e4, i.e. noise std sigma C.
    kwargs = dict(clip_norm=1e4, noise_multiplier=sigma / 1e4)
  result = _audit(space, **kwargs)
  if broken == "noise_off":
    # Atoms in and out: deterministic, the bound is the ceiling itself.
    assert result.epsilon_lower_bound == pytest.approx(result.max_certifiable, rel=1e-9)
  else:
    # Scores N(13.3 or 26.7, 0.25) vs N(0, 0.25): separated, but the threshold picked on one half (the least
    # "in" score there) leaves ~1 "in" score of the other half below it, costing ~2e-4 in eps; losing 0.05
    # needs ~250 of them (probability < 1e-12).
    assert result.epsilon_lower_bound >= result.max_certifiable - 0.05
  assert result.epsilon_lower_bound >= 4 * claim
  assert result.auroc == 1.0


def test_multi_step_client_update():
  # T = 3 Poisson-sampled steps with q = 0.5, B-space, sigma calibrated with the RDP accountant.
  claim = 4.0
  sigma = _sigma(claim, 0.5, 3, "rdp")
  real = _audit("b_space", clip_norm=1.0, noise_multiplier=sigma, steps=3, sample_rate=0.5)
  # <= claim: false failure <= 1e-3. > 0: 200 simulated audits of the same score law (Binomial(3, 1/2) canary
  # hits plus Gaussian noise) gave mean 1.00, sd 0.19, min 0.19; 0 is a > 5 sd event.
  assert 0 < real.epsilon_lower_bound <= claim
  # Noise off: the canary is missed in all 3 steps with probability 1/8, so TPR ~ 7/8 and the bound is the
  # ceiling + log(7/8) ~ 6.35 (ceiling 6.49); 0.3 below the ceiling needs TPR_lb < 0.74 (a > 25 sd event).
  broken = _audit("b_space", clip_norm=1.0, noise_multiplier=0.0, steps=3, sample_rate=0.5)
  assert broken.max_certifiable - 0.3 <= broken.epsilon_lower_bound < broken.max_certifiable
  assert broken.epsilon_lower_bound >= 4 * 1.0  # far above a claim of 1


# ---------------------------------------------------------------------------------------------------------------
# The sampled mechanism: a canary client drawn K of N each round (q_c = K / N), audited over R rounds with
# participation seen by the adversary, against the `sampled` accounting.

ROUNDS, CLIENTS_PER_ROUND, NUM_CLIENTS = 20, 5, 10  # q_c = 0.5
SAMPLING = auditing.ClientSampling(ROUNDS, CLIENTS_PER_ROUND, NUM_CLIENTS, simulation.sample_clients)


def _sampled_problem():
  # A target 1e4 away: over 20 rounds of noise (lora_b's canary row moves by ~ sigma / n sqrt(10) ~ 1) the
  # canary's gradient stays along u to ~1e-8, so the score law below is exact to float32.
  return auditing.linear_canary_problem(jax.random.key(0), num_examples=3, canary_gradient_norm=1e4)


def _q1_audit(problem, noise_multiplier, runs, seed, **options):
  """One B-space step per round with q = 1 (normaliser n) on `problem`, C = 1."""
  mechanism = problem.mechanism(
    "b_space", clip_norm=1.0, noise_multiplier=noise_multiplier, expected_batch_size=problem.num_examples
  )
  return auditing.audit_dp_gradient(
    mechanism,
    problem.params,
    problem.data,
    problem.direction,
    jax.random.key(seed),
    num_runs=runs,
    steps=1,
    sample_rate=1.0,
    delta=DELTA,
    confidence=CONFIDENCE,
    **options,
  )


def _sampled_audit(noise_multiplier, runs=RUNS, seed=5):
  problem = _sampled_problem()
  step = problem.canary_step("b_space", clip_norm=1.0, expected_batch_size=problem.num_examples)
  return _q1_audit(problem, noise_multiplier, runs, seed, sampling=SAMPLING, canary_step=step), step


def _sampled_sigma(epsilon, participation_rate):
  return _sigma_of(privacy.DPSchedule(1.0, 1, ROUNDS, participation_rate), epsilon)


@functools.cache
def _sigma_of(schedule, epsilon):
  return privacy.calibrate_noise(schedule, epsilon, DELTA, "pld")


def test_sampled_release_is_client_release_in_the_rounds_the_client_takes_part():
  problem = _problem()
  # Noise off: deterministic; q = 0.5 Poisson batches and 2 local steps per round.
  mechanism = problem.mechanism(
    "b_space", clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=0.5 * problem.num_examples
  )
  common = dict(steps=2, sample_rate=0.5, learning_rate=0.5)
  key, rounds, k, n = jax.random.key(6), 6, 2, 5
  sampling = auditing.ClientSampling(rounds, k, n, simulation.sample_clients)
  theta, taken = jax.jit(
    functools.partial(
      auditing.sampled_client_release, mechanism, num_examples=problem.num_examples + 1, sampling=sampling, **common
    )
  )(problem.params, problem.data, key=key)
  # The same rounds written out: the runner's sampler, the runner's client key, the release carried over.
  client = jax.jit(
    functools.partial(auditing.client_release, mechanism, num_examples=problem.num_examples + 1, **common)
  )
  expected, expected_taken = problem.params, 0
  for t in range(rounds):
    round_key = jax.random.fold_in(key, t)
    if auditing.CANARY_CLIENT in np.asarray(simulation.sample_clients(round_key, n, k)):
      expected_taken += 1
      expected = client(expected, problem.data, key=jax.random.fold_in(round_key, auditing.CANARY_CLIENT))
  assert int(taken) == expected_taken and 0 < expected_taken < rounds  # this key mixes both kinds of round
  np.testing.assert_allclose(theta["linear"], expected["linear"], rtol=1e-6, atol=1e-7)


def test_sampled_participation_is_binomial():
  """The canary client takes part in Binomial(R, K / N) rounds: rate q_c and independence across rounds, the
  premise of the `sampled` accounting, checked on the harness itself (chi-square, false failure 1e-4)."""
  problem = _problem()
  mechanism = problem.mechanism(
    "b_space", clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=problem.num_examples
  )
  release = functools.partial(
    auditing.sampled_client_release,
    mechanism,
    problem.params,
    problem.data,
    problem.num_examples,
    sampling=SAMPLING,
    steps=1,
    sample_rate=1.0,
  )
  keys = jax.random.split(jax.random.key(7), 4000)
  taken = np.asarray(jax.jit(jax.vmap(lambda k: release(k)[1]))(keys))
  # Bins 5..15 and the two tails (expected counts >= 80 each).
  edges = np.arange(5, 16)
  observed = [np.sum(taken < 5), *(np.sum(taken == e) for e in edges), np.sum(taken > 15)]
  law = scipy.stats.binom(ROUNDS, CLIENTS_PER_ROUND / NUM_CLIENTS)
  expected = len(keys) * np.array([law.cdf(4), *law.pmf(edges), law.sf(15)])
  assert scipy.stats.chisquare(observed, expected).pvalue > 1e-4


def _mixture_cdf(x, sign, sigma, step):
  """The score's law: k ~ Binomial(R, q_c) rounds taken, then N(sign k m / 2, k sigma^2 m^2) (k = 0: the atom
  at 0, probability 2^-20)."""
  law = scipy.stats.binom(ROUNDS, CLIENTS_PER_ROUND / NUM_CLIENTS)
  k = np.arange(1, ROUNDS + 1)
  parts = scipy.stats.norm.cdf((x[:, None] - sign * k * step / 2) / (np.sqrt(k) * sigma * step))
  return parts @ law.pmf(k) + law.pmf(0) * (x >= 0)


def test_real_sampled_mechanism_stays_below_its_claim():
  claim = 4.0
  sigma = _sampled_sigma(claim, CLIENTS_PER_ROUND / NUM_CLIENTS)
  result, step = _sampled_audit(sigma)
  # The scores follow the law the accountant assumes (KS, each side false failure 1e-6).
  for scores, sign in [(result.scores_in, 1), (result.scores_out, -1)]:
    assert scipy.stats.kstest(scores, lambda x, s=sign: _mixture_cdf(x, s, sigma, step)).pvalue > 1e-6
  assert result.epsilon_lower_bound <= claim  # false failure <= 1e-3 (module docstring)
  # Not vacuous: 30 simulated audits of this score law at this size and confidence: bound mean 1.31, sd 0.15,
  # min 0.95; 0 is a > 8 sd event.
  assert result.epsilon_lower_bound > 0


def test_understated_participation_is_caught():
  """A mechanism that draws K = 5 of N = 10 clients but whose accountant is told q_c = 0.002 claims epsilon = 1
  for sigma = 3.04; its `sampled` epsilon at q_c = 0.5 is 5.0. The audit refutes the claim at 99.9% confidence:
  30 simulated audits of this score law gave bounds of mean 1.75, sd 0.17, min 1.29 (1 is 4.4 sd below the
  mean: false failure ~1e-5)."""
  claim = 1.0
  sigma = _sampled_sigma(claim, 0.002)
  true_epsilon = privacy.epsilon_spent(
    privacy.DPSchedule(1.0, 1, ROUNDS, CLIENTS_PER_ROUND / NUM_CLIENTS), sigma, DELTA
  )
  result, _ = _sampled_audit(sigma)
  assert claim < result.epsilon_lower_bound <= true_epsilon


# ---------------------------------------------------------------------------------------------------------------
# Client sizes (issue 13): add/remove-one neighbours differ in size. With the runner's privacy.client_sizes
# "public" each side samples at b / n_k (D at q, D' at q n / (n + 1)), with "private" both at the public rate q.
# The opposed canary problem (every ordinary example the canary's mirror image, clipped to +C u against the
# canary's -C u) turns the rates' difference into a shift along u. One local step with q = 1 and n = 15.

SIZES_CLAIM = 3.0


def _opposed_problem():
  # A target 1e4 away: one step moves lora_b by ~1, so every gradient stays along u to ~1e-8.
  return auditing.linear_canary_problem(jax.random.key(0), opposed=True, canary_gradient_norm=1e4)


def _sizes_audit(client_sizes, runs, seed=8):
  return _q1_audit(_opposed_problem(), _sigma(SIZES_CLAIM), runs, seed, client_sizes=client_sizes)


def _sizes_cdf(x, n, in_rate, sigma, canary):
  """The score's law (one step, b = n, lr = 1): -(K - J + sigma Z) / n, K ~ Bin(n, rate), J ~ Bern(rate) with
  the canary, J = 0 without."""
  k = np.arange(n + 1)
  atoms, weights = k.astype(float), scipy.stats.binom(n, in_rate).pmf(k)
  if canary:
    atoms = np.concatenate([atoms, atoms - 1])
    weights = np.concatenate([weights * (1 - in_rate), weights * in_rate])
  # P(-(A + sigma Z) / n <= x) = P(Z >= (-n x - A) / sigma).
  return scipy.stats.norm.sf((-n * x[:, None] - atoms) / sigma) @ weights


def _hockey_stick(n, rate, in_rate, steps, sigma, epsilon):
  """max over both directions of integral max(0, p - e^eps p') for the pair of `opposed_canary_epsilon`, by
  quadrature on a grid of sigma sqrt(T) / 400 (NumPy, not dp_accounting)."""
  scale, k = sigma * math.sqrt(steps), np.arange(n * steps + 1)
  z = np.arange(-steps - 15 * scale, n * steps + 15 * scale, scale / 400) / scale  # x in units of sigma'
  out_law = scipy.stats.binom(n * steps, rate).pmf(k)
  in_law = np.convolve(scipy.stats.binom(n * steps, in_rate).pmf(k), scipy.stats.binom(steps, in_rate).pmf(k)[::-1])
  in_law = in_law[n * steps - steps :]  # the values -T .. n T (the convolution above runs from -n T)

  def density(law, lowest):  # per unit of z
    return scipy.stats.norm.pdf(z[:, None] - np.arange(lowest, lowest + len(law)) / scale) @ law

  p_out, p_in = density(out_law, 0), density(in_law, -steps)
  hockey = lambda p, r: np.sum(np.maximum(0, p - math.exp(epsilon) * r)) / 400
  return max(hockey(p_in, p_out), hockey(p_out, p_in))


@pytest.mark.parametrize(
  "n,rate,steps,client_sizes",
  [(15, 1.0, 1, "public"), (15, 1.0, 1, "private"), (4, 0.5, 3, "public"), (15, 1.0, 4, "private")],
)
def test_opposed_canary_epsilon_against_quadrature(n, rate, steps, client_sizes):
  sigma = _sigma(SIZES_CLAIM)
  epsilon = auditing.opposed_canary_epsilon(n, rate, steps, sigma, DELTA, client_sizes=client_sizes)
  in_rate = rate * n / (n + 1) if client_sizes == "public" else rate
  # delta(eps) falls by a few % per 0.01 of epsilon here; the binned PLD sits within 1e-3 of the pair's epsilon.
  assert (
    _hockey_stick(n, rate, in_rate, steps, sigma, epsilon + 0.02)
    < DELTA
    < _hockey_stick(n, rate, in_rate, steps, sigma, epsilon - 0.02)
  )
  if client_sizes == "private" and rate == 1.0:
    # Without subsampling the private pair is the Gaussian mechanism composed T times: the accountant's figure.
    schedule = privacy.DPSchedule(1.0, local_steps=steps, rounds=1)
    assert epsilon == pytest.approx(privacy.epsilon_spent(schedule, sigma, DELTA), abs=2e-3)


def _check_score_law(result, client_sizes):
  """The scores follow the law of the runner's rates: D at q = 1, D' at 15/16 ("public") or 1 ("private"); KS,
  each side false failure 1e-6 (the two laws' in-means differ by 0.6 score sd: KS tells them apart)."""
  sigma, n = _sigma(SIZES_CLAIM), _opposed_problem().num_examples
  in_rate = n / (n + 1) if client_sizes == "public" else 1.0
  for scores, rate, canary in [(result.scores_in, in_rate, True), (result.scores_out, 1.0, False)]:
    cdf = functools.partial(_sizes_cdf, n=n, in_rate=rate, sigma=sigma, canary=canary)
    assert scipy.stats.kstest(scores, lambda x, f=cdf: f(np.atleast_1d(x))).pvalue > 1e-6


def test_public_client_sizes_exceed_their_add_remove_claim():
  """Public sizes: sigma calibrated for epsilon = 3 at q = 1 (the accountant's claim), but the add-one pair's
  exact epsilon is 15.2 (`opposed_canary_epsilon`). The audit refutes the claim at 99.9% confidence: 40
  simulated audits of this score law at 50,000 runs per side gave bounds of mean 3.98, sd 0.21, min 3.56 (3 is
  4.6 sd below the mean: false failure ~2e-6)."""
  sigma, n = _sigma(SIZES_CLAIM), _opposed_problem().num_examples
  true_epsilon = auditing.opposed_canary_epsilon(n, 1.0, 1, sigma, DELTA)
  result = _sizes_audit("public", 50_000)
  _check_score_law(result, "public")
  assert SIZES_CLAIM < result.epsilon_lower_bound <= true_epsilon


def test_private_client_sizes_stay_below_their_claim():
  """Private sizes, same setting: the pair is the Gaussian mechanism, exact epsilon = the claim."""
  sigma, n = _sigma(SIZES_CLAIM), _opposed_problem().num_examples
  assert auditing.opposed_canary_epsilon(n, 1.0, 1, sigma, DELTA, client_sizes="private") == pytest.approx(
    SIZES_CLAIM, abs=2e-3
  )
  result = _sizes_audit("private", RUNS)
  _check_score_law(result, "private")
  # <= claim: false failure <= 1e-3 (module docstring). > 0: 30 simulated audits of this score law gave bounds
  # of mean 1.04, sd 0.15, min 0.67; 0 is a ~7 sd event.
  assert 0 < result.epsilon_lower_bound <= SIZES_CLAIM
