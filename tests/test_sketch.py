"""Tests of fedask_jax.sketch against an independent float64 numpy implementation of FedASK's two stages and
against dense references (the weighted mean of the clients' products and its Eckart-Young truncation), for both
linear-algebra routes (`sketch.METHODS`: Householder QR + SVD, and shifted Cholesky-QR + SVD of the small factor).

Tolerances. Every float32 comparison with the float64 reference uses `_tolerance`: 10 * eps32 * (cond_k(Y) +
sigma_1(P) / (sigma_r(P) - sigma_{r+1}(P))). Householder QR and SVD are backward stable, so float32 rounding
perturbs Y and P by ~eps32 of their norm; by Wedin's theorem this turns the sketched range by eps32 * cond_k(Y)
(k = rank of the aggregate within the width) and the kept rank-r singular subspace of P by eps32 times the
relative gap. On 300 random problems like these the observed error was at most 1.5x that estimate, so the
factor 10 leaves margin without hiding a real error (a wrong algorithm errs by O(1)).
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fedask_jax import sketch
from fedask_jax.adapters import LoRAFactors
from fedask_jax.sketch import aggregation

EPS32 = float(np.finfo(np.float32).eps)


@dataclasses.dataclass(frozen=True)
class Case:
  """A K-client problem: lora_a_k [m, r], lora_b_k [r, n], normalised weights; `shared` names a factor common to
  all clients (DP mode freezes one: FedASK's lora_a); oversampling p gives width r + p."""

  m: int
  n: int
  r: int
  k: int
  p: int
  shared: str
  seed: int

  @property
  def name(self):
    return f"m{self.m}_n{self.n}_r{self.r}_k{self.k}_p{self.p}_{self.shared}"

  def arrays(self, dtype=np.float32):
    rng = np.random.default_rng(self.seed)
    lora_a = rng.standard_normal((self.k, self.m, self.r))
    lora_b = rng.standard_normal((self.k, self.r, self.n))
    if self.shared == "lora_b":
      lora_b[:] = lora_b[0]
    elif self.shared == "lora_a":
      lora_a[:] = lora_a[0]
    weights = rng.uniform(0.1, 1.0, self.k)
    omega = rng.standard_normal((self.n, self.r + self.p))
    return tuple(x.astype(dtype) for x in (lora_a, lora_b, weights / weights.sum(), omega))


CASES = [
  Case(12, 20, 3, 1, 0, "none", 0),  # K = 1, p = 0, m < n: covered (rank r = w)
  Case(20, 12, 4, 3, 2, "lora_b", 1),  # m > n, lora_b shared
  Case(16, 24, 2, 8, 8, "none", 2),  # K r = 16 > w = 10: randomized approximation
  Case(24, 16, 3, 5, 4, "lora_a", 3),  # DP mode (FedASK: lora_a frozen)
  Case(10, 30, 4, 2, 0, "none", 4),  # K r = 8 > w = 4, p = 0
  Case(30, 10, 2, 4, 8, "none", 5),  # covered, aggregate rank 8 > r = 2: Eckart-Young truncation
  Case(8, 6, 3, 6, 8, "none", 6),  # w = 11 > min(m, n) = 6: width clipped, covered
  Case(17, 23, 5, 7, 1, "lora_b", 7),
  Case(5, 40, 2, 2, 3, "none", 8),  # covered through min(m, n) = w
  Case(40, 5, 1, 3, 0, "lora_a", 9),  # r = 1, p = 0
]
# Compiled once per shape and shared by the tests below (compilation dominates this file's run time).
_AGGREGATE = {
  method: jax.jit(functools.partial(sketch.aggregate_layer, method=method), static_argnames="rank")
  for method in sketch.METHODS
}
_aggregate = _AGGREGATE["householder"]
_certificate = jax.jit(sketch.reconstruction_error)
methods = pytest.mark.parametrize("method", sketch.METHODS)


@dataclasses.dataclass
class Reference:
  new_a: np.ndarray
  new_b: np.ndarray
  y: np.ndarray
  q: np.ndarray
  p: np.ndarray
  s: np.ndarray
  dense: np.ndarray
  covered: bool


def numpy_fedask(lora_a, lora_b, weights, omega, rank):
  """FedASK's two stages in float64 numpy, written from the paper (Algorithm 1), client by client, on the
  clients' factors lora_a [K, m, r] (lora_a) and lora_b [K, r, n] (lora_b) with the weights as given."""
  lora_a, lora_b, weights, omega = (np.asarray(x, np.float64) for x in (lora_a, lora_b, weights, omega))
  m, n = lora_a.shape[1], lora_b.shape[2]
  omega = omega[:, : min(m, n)]
  y = sum(w * a @ (b @ omega) for w, a, b in zip(weights, lora_a, lora_b))
  q, _ = np.linalg.qr(y)
  p = sum(w * b.T @ (a.T @ q) for w, a, b in zip(weights, lora_a, lora_b))
  u, s, vt = np.linalg.svd(p.T, full_matrices=False)
  dense = sum(w * a @ b for w, a, b in zip(weights, lora_a, lora_b))
  return Reference(
    new_a=q @ u[:, :rank] * np.sqrt(s[:rank]),
    new_b=np.sqrt(s[:rank])[:, None] * vt[:rank],
    y=y,
    q=q,
    p=p,
    s=s,
    dense=dense,
    covered=np.linalg.matrix_rank(dense) <= omega.shape[1],
  )


def _tolerance(ref, rank):
  """Relative Frobenius tolerance for float32 results (module docstring)."""
  k = min(np.linalg.matrix_rank(ref.dense), ref.y.shape[1])
  sy = np.linalg.svd(ref.y, compute_uv=False)
  s = ref.s
  gap = s[0] / (s[rank - 1] - s[rank]) if len(s) > rank else 1.0
  return 10 * EPS32 * (sy[0] / sy[k - 1] + gap)


def _rel_error(new_a, new_b, target):
  product = np.asarray(new_a, np.float64) @ np.asarray(new_b, np.float64)
  return np.linalg.norm(product - target) / np.linalg.norm(target)


def _best_rank(matrix, rank):
  """Eckart-Young: the best rank-`rank` approximation in Frobenius norm (dense float64 SVD)."""
  u, s, vt = np.linalg.svd(matrix, full_matrices=False)
  return u[:, :rank] * s[:rank] @ vt[:rank]


def _check_against_reference(case, new_a, new_b):
  lora_a, lora_b, weights, omega = case.arrays()
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  chex.assert_shape((new_a, new_b), [(case.m, case.r), (case.r, case.n)])
  chex.assert_type((new_a, new_b), jnp.float32)
  tol = _tolerance(ref, case.r)
  assert _rel_error(new_a, new_b, ref.new_a @ ref.new_b) < tol
  # Balanced factors: lora_a^T lora_a = lora_b lora_b^T = diag(S_r), S_r from the float64 reference.
  scale = ref.s[0]
  diagonal = np.diag(ref.s[: case.r]) / scale
  np.testing.assert_allclose(np.asarray(new_a).T @ np.asarray(new_a) / scale, diagonal, atol=tol)
  np.testing.assert_allclose(np.asarray(new_b) @ np.asarray(new_b).T / scale, diagonal, atol=tol)


@methods
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_numpy_reference(case, method):
  lora_a, lora_b, weights, omega = case.arrays()
  _check_against_reference(case, *_AGGREGATE[method](lora_a, lora_b, weights, omega, rank=case.r))


class AggregateTest(chex.TestCase):
  # Eager and compiled on cases covering m < n, m > n, both DP layouts and a clipped width, both routes.
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
    *[(f"{CASES[i].name}_{method}", CASES[i], method) for i in (0, 1, 3, 6) for method in sketch.METHODS]
  )
  def test_jit_and_eager_match_numpy_reference(self, case, method):
    lora_a, lora_b, weights, omega = case.arrays()
    aggregate = self.variant(sketch.aggregate_layer, static_argnames=("rank", "method"))
    _check_against_reference(case, *aggregate(lora_a, lora_b, weights, omega, rank=case.r, method=method))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sketch.METHODS)
  def test_zero_aggregate(self, method):
    # First round (lora_b = 0, PEFT's init), all-zero lora_a, all-zero weights: zeros out, no NaN.
    rng = np.random.default_rng(10)
    k, m, n, r = 3, 12, 9, 4
    lora_a = rng.standard_normal((k, m, r)).astype(np.float32)
    omega = rng.standard_normal((n, r + 2)).astype(np.float32)
    aggregate = self.variant(sketch.aggregate_layer, static_argnames=("rank", "method"))
    for args in [
      (lora_a, np.zeros((k, r, n), np.float32), np.ones(k, np.float32)),
      (np.zeros_like(lora_a), rng.standard_normal((k, r, n)).astype(np.float32), np.ones(k, np.float32)),
      (lora_a, rng.standard_normal((k, r, n)).astype(np.float32), np.zeros(k, np.float32)),
    ]:
      new_a, new_b = aggregate(*args, omega, rank=r, method=method)
      chex.assert_trees_all_equal((new_a, new_b), (np.zeros((m, r), np.float32), np.zeros((r, n), np.float32)))
      self.assertEqual(float(_certificate(*args, new_a, new_b)), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sketch.METHODS)
  def test_rank_deficient_single_client(self, method):
    # K = 1, lora_a of rank 2 < r = 4: the product is still exact and the two extra columns carry only
    # sqrt of float32 round-off (singular values ~eps * ||P||, so columns ~sqrt(eps) ||P||^(1/2)).
    rng = np.random.default_rng(11)
    m, n, r = 14, 11, 4
    lora_a = (rng.standard_normal((1, m, 2)) @ rng.standard_normal((1, 2, r))).astype(np.float32)
    lora_b = rng.standard_normal((1, r, n)).astype(np.float32)
    omega = rng.standard_normal((n, r)).astype(np.float32)
    new_a, new_b = self.variant(sketch.aggregate_layer, static_argnames=("rank", "method"))(
      lora_a, lora_b, np.ones(1, np.float32), omega, rank=r, method=method
    )
    chex.assert_tree_all_finite((new_a, new_b))
    target = lora_a[0].astype(np.float64) @ lora_b[0]
    ref = numpy_fedask(lora_a, lora_b, np.ones(1), omega, r)
    self.assertLess(_rel_error(new_a, new_b, target), _tolerance(ref, r))
    column_norms = np.linalg.norm(np.asarray(new_a), axis=0)
    self.assertLess(column_norms[2:].max(), 10 * np.sqrt(EPS32 * ref.s[0]))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sketch.METHODS)
  def test_aggregate_adapters(self, method):
    # Two layers share a shape (one mapped group); the third differs and needs its width clipped
    # (min(m, n) = 4 < r + p = 7). DP mode: lora_a shared, so every layer is exact.
    rng = np.random.default_rng(12)
    k, r, p = 4, 3, 4
    shapes = {"model.layers.0.self_attn.q_proj": (12, 12), "model.layers.0.self_attn.v_proj": (12, 12), "tiny": (4, 5)}
    adapters = {
      name: LoRAFactors(
        np.repeat(rng.standard_normal((1, m, r)), k, 0).astype(np.float32),
        rng.standard_normal((k, r, n)).astype(np.float32),
      )
      for name, (m, n) in shapes.items()
    }
    weights = rng.uniform(0.1, 1.0, k).astype(np.float32)
    omegas = sketch.make_omegas(jax.random.key(0), adapters, r + p)
    merged = self.variant(sketch.aggregate_adapters, static_argnames=("rank", "method"))(
      adapters, weights, omegas, rank=r, method=method
    )
    self.assertEqual(set(merged), set(adapters))
    for name, factors in adapters.items():
      m, n = shapes[name]
      chex.assert_shape(merged[name], [(m, r), (r, n)])
      ref = numpy_fedask(factors.lora_a, factors.lora_b, weights, omegas[name], r)
      self.assertLess(_rel_error(*merged[name], ref.dense), _tolerance(ref, r), msg=name)
    errors, worst = self.variant(sketch.adapters_reconstruction_error)(adapters, weights, merged)
    self.assertEqual(set(errors), set(adapters))
    for name, factors in adapters.items():
      dense = _rel_error(*merged[name], numpy_fedask(factors.lora_a, factors.lora_b, weights, omegas[name], r).dense)
      # As in test_certificate_matches_dense_error.
      np.testing.assert_allclose(errors[name], dense, rtol=1e-5, atol=1e-5, err_msg=name)
    self.assertEqual(float(worst), max(float(e) for e in errors.values()))


@methods
@pytest.mark.parametrize("case", [c for c in CASES if numpy_fedask(*c.arrays(), c.r).covered], ids=lambda c: c.name)
def test_eckart_young_when_covered(case, method):
  lora_a, lora_b, weights, omega = case.arrays()
  new_a, new_b = _AGGREGATE[method](lora_a, lora_b, weights, omega, rank=case.r)
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  best = _best_rank(ref.dense, case.r)
  assert _rel_error(new_a, new_b, best) < _tolerance(ref, case.r)


@methods
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
def test_stage_functions_match_numpy(case, method):
  lora_a, lora_b, weights, omega = case.arrays()
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  omega = omega[:, : min(case.m, case.n)]
  w = weights
  # A float32 product of inner dimension d errs entrywise by <= d eps |A| |B| (Higham, Thm 3.5), with |.| the
  # entrywise absolute value; the chained products here have d <= r + n (stage 1) and r + m (stage 2).
  y = sum(wk * sketch.stage1_sketch(a_k, b_k, omega) for wk, a_k, b_k in zip(w, lora_a, lora_b))
  bound = sum(wk * np.abs(a_k) @ (np.abs(b_k) @ np.abs(omega)) for wk, a_k, b_k in zip(w, lora_a, lora_b))
  assert np.all(np.abs(y - ref.y) <= (case.r + case.n + case.k) * EPS32 * bound)
  q = sketch.orthonormal_basis(jnp.asarray(ref.y, jnp.float32), method)
  # Householder Q, and Cholesky-QR's after its last unshifted pass, are orthonormal to O(m eps).
  np.testing.assert_allclose(np.asarray(q, np.float64).T @ q, np.eye(q.shape[1]), atol=10 * case.m * EPS32)
  # Q is defined up to column signs (and, when Y is rank-deficient, up to its columns outside range(Y)); what
  # is defined is that range(Q) contains range(Y).
  tol = _tolerance(ref, case.r)
  assert np.linalg.norm(ref.y - q @ (q.T @ ref.y)) < tol * np.linalg.norm(ref.y)
  q32 = ref.q.astype(np.float32)
  p = sum(wk * sketch.stage2_project(a_k, b_k, q32) for wk, a_k, b_k in zip(w, lora_a, lora_b))
  bound = sum(wk * np.abs(b_k).T @ (np.abs(a_k).T @ np.abs(q32)) for wk, a_k, b_k in zip(w, lora_a, lora_b))
  assert np.all(np.abs(p - ref.p) <= (case.r + case.m + case.k) * EPS32 * bound)
  new_a, new_b = sketch.reconstruct(ref.p.astype(np.float32), q32, case.r, method=method)
  assert _rel_error(new_a, new_b, ref.new_a @ ref.new_b) < tol


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_certificate_matches_dense_error(case):
  lora_a, lora_b, weights, omega = case.arrays()
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  new_a, new_b = _aggregate(lora_a, lora_b, weights, omega, rank=case.r)
  # The sketch's own result (error ~0 when covered, O(1) otherwise) and a deliberately wrong rank-1 answer.
  for candidate in [(new_a, new_b), (new_a[:, :1], 0.5 * new_b[:1])]:
    dense = _rel_error(*candidate, ref.dense)
    got = float(_certificate(lora_a, lora_b, weights, *candidate))
    # Backward-stable QRs of the stacked factors L, R (docstring) leave an absolute error of ~eps ||L|| ||R||
    # relative to ||T||; rtol covers the float32 rounding of an O(1) error.
    stacked_norms = np.sqrt(
      np.sum(np.square(candidate[0])) + np.sum(weights[:, None, None] ** 2 * lora_a**2)
    ) * np.sqrt(np.sum(np.square(candidate[1])) + np.sum(lora_b**2))
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=10 * EPS32 * stacked_norms / np.linalg.norm(ref.dense))


@methods
@pytest.mark.parametrize("shared", ["lora_a", "lora_b"])
@pytest.mark.parametrize("p", [0, 1, 4, 8])
def test_dp_mode_exact_for_any_oversampling(shared, p, method):
  # With one factor shared the aggregate has rank <= r, so the sketch covers it for every p >= 0 (Theorem 2).
  case = Case(18, 13, 4, 5, p, shared, 20 + p)
  lora_a, lora_b, weights, omega = case.arrays()
  new_a, new_b = _AGGREGATE[method](lora_a, lora_b, weights, omega, rank=case.r)
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  tol = _tolerance(ref, case.r)
  assert _rel_error(new_a, new_b, ref.dense) < tol
  assert float(_certificate(lora_a, lora_b, weights, new_a, new_b)) < tol


GAUGE_CASES = [
  Case(18, 13, 4, 5, 2, "lora_a", 50),
  Case(13, 18, 3, 4, 0, "lora_b", 51),
  Case(24, 16, 1, 3, 1, "lora_a", 52),
]
_gauged = jax.jit(sketch.aggregate_layer, static_argnames=("rank", "gauge", "fixed"))


@pytest.mark.parametrize("case", GAUGE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("gauge", sketch.GAUGES)
@pytest.mark.parametrize("fixed", sketch.FIXED)
def test_every_gauge_is_exact_in_dp_mode(case, gauge, fixed):
  """One factor shared (DP mode): every gauge's product is the aggregate to float32 round-off (the certificate
  and the dense float64 mean agree, within the tolerance of the balanced split), and the fixed factor has the
  shape the gauge promises (module docstring): orthonormal columns (rows) of norm scale / sqrt(r) for
  "orthonormal"; Frobenius norm `scale` and a Gram matrix proportional to diag(S_r) for "norm"."""
  lora_a, lora_b, weights, omega = case.arrays()
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  scale = 0.37  # far from the aggregate's own scale, so a gauge that ignored it would fail the norm checks
  new_a, new_b = _gauged(lora_a, lora_b, weights, omega, case.r, gauge, scale, fixed)
  tol = _tolerance(ref, case.r)
  assert _rel_error(new_a, new_b, ref.dense) < tol
  assert float(_certificate(lora_a, lora_b, weights, new_a, new_b)) < tol
  if gauge == "balanced":
    _check_against_reference(case, new_a, new_b)
    return
  held = np.asarray(new_a if fixed == "lora_a" else np.asarray(new_b).T, np.float64)  # [m or n, r]
  gram = held.T @ held
  np.testing.assert_allclose(np.linalg.norm(held), scale, rtol=10 * EPS32 * case.r)
  s = ref.s[: case.r]
  expected = np.eye(case.r) / case.r if gauge == "orthonormal" else np.diag(s / s.sum())
  np.testing.assert_allclose(gram / scale**2, expected, atol=tol)


@pytest.mark.parametrize("gauge", sketch.GAUGES)
def test_gauge_changes_the_split_not_the_product(gauge):
  """split_factors on the same SVD factors: lora_a @ lora_b = left diag(s) right for every gauge, and each
  gauge is a diagonal G between the factors: lora_a = left diag(g), lora_b = diag(s / g) right."""
  rng = np.random.default_rng(60)
  left = np.linalg.qr(rng.standard_normal((9, 3)))[0].astype(np.float32)
  right = np.linalg.qr(rng.standard_normal((7, 3)))[0].T.astype(np.float32)
  s = np.array([4.0, 1.0, 0.01], np.float32)
  a, b = sketch.split_factors(left, s, right, gauge, scale=2.0)
  product = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  np.testing.assert_allclose(product, (left * s) @ right, atol=10 * EPS32 * s.max())
  g = np.linalg.norm(np.asarray(a), axis=0)
  np.testing.assert_allclose(np.asarray(a), left * g, atol=10 * EPS32 * g.max())
  np.testing.assert_allclose(np.asarray(b), (s / g)[:, None] * right, rtol=1e-5, atol=10 * EPS32 * s.max() / g.min())


@pytest.mark.parametrize("gauge", sketch.GAUGES)
def test_degenerate_splits_stay_finite_and_exact(gauge):
  """A zero aggregate (s = 0) and a traced zero scale (a zero reference factor) never give NaN: "norm" then
  holds the fixed factor orthonormal (the balanced shape would be 0 / 0), and a zero scale falls back to the
  balanced split, so the product is still left diag(s) right."""
  rng = np.random.default_rng(61)
  left = np.linalg.qr(rng.standard_normal((8, 2)))[0].astype(np.float32)
  right = np.linalg.qr(rng.standard_normal((5, 2)))[0].T.astype(np.float32)
  split = jax.jit(sketch.split_factors, static_argnames=("gauge", "fixed"))
  a, b = split(left, np.zeros(2, np.float32), right, gauge, 1.5)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  np.testing.assert_array_equal(np.asarray(a) @ np.asarray(b), 0.0)
  if gauge != "balanced":
    np.testing.assert_allclose(np.asarray(a).T @ np.asarray(a), 1.5**2 / 2 * np.eye(2), atol=1e-6)
  s = np.array([2.0, 0.5], np.float32)
  a, b = split(left, s, right, gauge, jnp.float32(0.0))
  balanced = sketch.split_factors(left, s, right)
  np.testing.assert_allclose(a, balanced[0], rtol=1e-6)
  np.testing.assert_allclose(b, balanced[1], rtol=1e-6)


def test_aggregate_adapters_holds_each_layer_at_its_scale():
  """Per-layer scales reach their layer (layers of equal shapes share one lax.map)."""
  case = Case(12, 10, 2, 3, 1, "lora_a", 62)
  lora_a, lora_b, weights, omega = case.arrays()
  adapters = {"x": LoRAFactors(lora_a, lora_b), "y": LoRAFactors(lora_a, 2 * lora_b)}
  new = sketch.aggregate_adapters(
    adapters, weights, {"x": omega, "y": omega}, case.r, "orthonormal", {"x": 0.5, "y": 3.0}
  )
  for name, scale in (("x", 0.5), ("y", 3.0)):
    np.testing.assert_allclose(np.linalg.norm(new[name].lora_a), scale, rtol=1e-5)
    assert _rel_error(*new[name], wmean_product(*adapters[name], weights)) < 1e-5


def wmean_product(lora_a, lora_b, weights):
  return np.einsum("k,kmr,krn->mn", weights.astype(np.float64), lora_a.astype(np.float64), lora_b.astype(np.float64))


def test_vmap_over_problems():
  case = Case(14, 9, 3, 4, 2, "none", 30)
  problems = [Case(**{**dataclasses.asdict(case), "seed": case.seed + i}).arrays() for i in range(3)]
  batched = [np.stack(xs) for xs in zip(*problems)]
  lora_a, lora_b = jax.jit(jax.vmap(functools.partial(sketch.aggregate_layer, rank=case.r)))(*batched)
  chex.assert_shape((lora_a, lora_b), [(3, case.m, case.r), (3, case.r, case.n)])
  for i, problem in enumerate(problems):
    ref = numpy_fedask(*problem, case.r)
    assert _rel_error(lora_a[i], lora_b[i], ref.new_a @ ref.new_b) < _tolerance(ref, case.r)


@pytest.mark.parametrize("dtype,unit_roundoff", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)])
def test_low_precision_inputs(dtype, unit_roundoff):
  # The linear algebra runs in float32 and only the two outputs are rounded to `dtype`, each entry with
  # relative error <= u. For balanced factors ||du lora_b||_F <= u ||lora_a||_F ||lora_b||_2 <= u sqrt(r) ||T||_F
  # (both norms are sums of singular values of T), so the product errs by <= 2 u sqrt(r) ||T||_F.
  case = Case(24, 16, 4, 5, 2, "lora_b", 40)
  lora_a, lora_b, weights, omega = (jnp.asarray(x, dtype) for x in case.arrays())
  new_a, new_b = _aggregate(lora_a, lora_b, weights, omega, rank=case.r)
  chex.assert_type((new_a, new_b), dtype)
  ref = numpy_fedask(*(np.asarray(x, np.float64) for x in (lora_a, lora_b, weights, omega)), case.r)
  bound = 2 * unit_roundoff * np.sqrt(case.r) + _tolerance(ref, case.r)
  assert _rel_error(new_a, new_b, ref.dense) < bound
  assert float(_certificate(lora_a, lora_b, weights, new_a, new_b)) < bound


def test_weights_are_used_as_given():
  """The aggregate is sum_k w_k lora_a_k lora_b_k with the weights as given (the round normalises them): scaled
  weights scale the product, and the relative certificate does not depend on the scale."""
  case = Case(15, 11, 3, 4, 2, "none", 50)
  lora_a, lora_b, weights, omega = case.arrays()
  unit = _aggregate(lora_a, lora_b, weights, omega, rank=case.r)
  scaled = _aggregate(lora_a, lora_b, 37.0 * weights, omega, rank=case.r)
  ref = numpy_fedask(lora_a, lora_b, weights, omega, case.r)
  tol = _tolerance(ref, case.r)
  assert _rel_error(*unit, ref.new_a @ ref.new_b) < tol
  assert _rel_error(*scaled, 37.0 * ref.new_a @ ref.new_b) < tol
  np.testing.assert_allclose(
    _certificate(lora_a, lora_b, 37.0 * weights, *scaled),
    _certificate(lora_a, lora_b, weights, *unit),
    rtol=1e-4,
    atol=1e-6,
  )
  # Integer sample counts are weights too (the aggregate is then their weighted sum, not a mean).
  counts = np.arange(1, case.k + 1)
  from_counts = _aggregate(lora_a, lora_b, counts, omega, rank=case.r)
  ref = numpy_fedask(lora_a, lora_b, counts, omega, case.r)
  assert _rel_error(*from_counts, ref.new_a @ ref.new_b) < _tolerance(ref, case.r)


def test_make_omegas_seeded_by_sorted_layer_index():
  adapters = {
    "z.v_proj": LoRAFactors(jnp.zeros((2, 8, 2)), jnp.zeros((2, 2, 10))),
    "a.q_proj": LoRAFactors(jnp.zeros((8, 2)), jnp.zeros((2, 3))),
  }
  key = jax.random.key(7)
  omegas = sketch.make_omegas(key, adapters, 6)
  # Sorted order: "a.q_proj" is index 0, "z.v_proj" index 1; widths clipped to min(width, m, n).
  chex.assert_trees_all_equal(omegas["a.q_proj"], sketch.make_omega(jax.random.fold_in(key, 0), 3, 3))
  chex.assert_trees_all_equal(omegas["z.v_proj"], sketch.make_omega(jax.random.fold_in(key, 1), 10, 6))
  chex.assert_trees_all_equal(omegas, sketch.make_omegas(key, dict(reversed(adapters.items())), 6))


def test_make_omega_is_standard_gaussian():
  n, width = 4096, 8
  omega = sketch.make_omega(jax.random.key(3), n, width)
  chex.assert_shape(omega, (n, width))
  chex.assert_type(omega, jnp.float32)
  assert not np.array_equal(omega, sketch.make_omega(jax.random.key(4), n, width))
  # N = 32768 i.i.d. N(0, 1) draws: the sample mean has sd 1/sqrt(N) and the sample variance sd sqrt(2/N);
  # 5-sd bounds fail with probability ~5.7e-7 each for a correct sampler.
  x = np.asarray(omega, np.float64).ravel()
  assert abs(x.mean()) < 5 / np.sqrt(x.size)
  assert abs(x.var() - 1) < 5 * np.sqrt(2 / x.size)


def _problem(k=3, m=8, r=2, n=6, w=4):
  return (
    np.ones((k, m, r), np.float32),
    np.ones((k, r, n), np.float32),
    np.ones(k, np.float32),
    np.ones((n, w), np.float32),
  )


def _with(**changes):
  names = ("lora_a", "lora_b", "weights", "omega")
  args = dict(zip(names, _problem()))
  args.update(changes)
  return tuple(args[name] for name in names)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  "args,rank,match",
  [
    (_with(lora_a=np.ones((8, 2), np.float32)), 2, r"lora_a has shape \(8, 2\): expected 3 axes"),
    (_with(lora_b=np.ones((2, 2, 6), np.float32)), 2, r"do not chain"),
    (_with(lora_b=np.ones((3, 3, 6), np.float32)), 2, r"do not chain"),
    (_with(weights=np.ones(2, np.float32)), 2, r"weights has shape \(2,\): expected \(3,\)"),
    (_with(omega=np.ones((5, 4), np.float32)), 2, r"omega has shape \(5, 4\): expected \[n, w\] with n = 6"),
    (_with(), 5, r"rank=5 exceeds the sketch width w = 4"),
    (_with(omega=np.ones((6, 8), np.float32)), 7, r"rank=7 exceeds min\(m, n\) = 6"),
    (_with(), 0, r"rank=0: the target rank must be an integer >= 1"),
  ],
)
def test_aggregate_validation(jit, args, rank, match):
  aggregate = jax.jit(sketch.aggregate_layer, static_argnames="rank") if jit else sketch.aggregate_layer
  with pytest.raises(ValueError, match=match):
    aggregate(*args, rank=rank)


def test_traced_rank_is_rejected():
  with pytest.raises(ValueError, match="static under jit"):
    jax.jit(sketch.aggregate_layer)(*_problem(), 2)


@pytest.mark.parametrize(
  "call,match",
  [
    (lambda: sketch.stage1_sketch(np.ones((8, 2)), np.ones((3, 6)), np.ones((6, 4))), r"do not chain"),
    (lambda: sketch.stage2_project(np.ones((8, 2)), np.ones((2, 6)), np.ones((7, 4))), r"do not chain"),
    (lambda: sketch.orthonormal_basis(np.ones((3, 4))), r"thin QR needs width w <= m"),
    (lambda: sketch.reconstruct(np.ones((6, 4)), np.ones((8, 3)), 2), r"different sketch widths"),
    (lambda: sketch.reconstruct(np.ones((6, 4)), np.ones((8, 4)), 5), r"rank=5 exceeds"),
    (lambda: sketch.make_omega(jax.random.key(0), 6, 0), r"width=0"),
    (lambda: sketch.make_omegas(jax.random.key(0), {}, 0), r"width=0"),
    (lambda: sketch.reconstruction_error(*_problem()[:3], np.ones((7, 2)), np.ones((2, 6))), r"do not match"),
    (lambda: sketch.reconstruct(np.ones((6, 4)), np.ones((8, 4)), 2, "balnced"), r"gauge='balnced'.*choose one of"),
    (lambda: sketch.reconstruct(np.ones((6, 4)), np.ones((8, 4)), 2, "norm"), r"gauge='norm' needs scale"),
    (lambda: sketch.reconstruct(np.ones((6, 4)), np.ones((8, 4)), 2, "norm", 0.0), r"scale=0.0: .*must be a finite"),
    (lambda: sketch.reconstruct(np.ones((6, 4)), np.ones((8, 4)), 2, "norm", 1.0, "a"), r"fixed='a'"),
    (lambda: sketch.split_factors(np.ones((6, 2)), np.ones(3), np.ones((2, 5))), r"do not chain"),
    (
      lambda: sketch.aggregate_adapters(
        {"q": LoRAFactors(*_problem()[:2])}, np.ones(3), {"q": np.ones((6, 4))}, 2, "orthonormal"
      ),
      r"needs scales with one entry per layer",
    ),
    (lambda: sketch.aggregate_adapters({"q": LoRAFactors(*_problem()[:2])}, np.ones(3), {}, 2), r"one omega per"),
    (
      lambda: sketch.aggregate_adapters({"q": LoRAFactors(*_problem()[:2])}, np.ones(3), {"q": np.ones((6, 1))}, 2),
      r"layer 'q': rank=2 exceeds the sketch width",
    ),
    (
      lambda: sketch.aggregate_adapters({"q": LoRAFactors(*_problem()[:2])}, np.ones(2), {"q": np.ones((6, 4))}, 2),
      r"adapters\['q'\]: weights has shape",
    ),
    (
      lambda: sketch.adapters_reconstruction_error(
        {"q": LoRAFactors(*_problem()[:2])}, np.ones(3), {"q": LoRAFactors(np.ones((7, 2)), np.ones((2, 6)))}
      ),
      r"aggregated\['q'\]: lora_a_hat \(7, 2\) and lora_b_hat \(2, 6\) do not match",
    ),
  ],
)
def test_validation_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def _dp_tolerance(dense, omega):
  """Relative Frobenius tolerance of a float32 aggregate in DP mode (the aggregate T has rank t <= w), on any
  spectrum of T.

  Both routes compute a Q spanning range(Y + dY) with ||dY||_2 <= c eps ||Y||_2 (backward stable QR). With
  T = U S V^T and G = V^T Omega [t, w] (full row rank), Y = U S G and T = Y G^+ V^T, so
  (I - Q Q^T) T = -(I - Q Q^T) dY G^+ V^T and ||(I - Q Q^T) T||_F / ||T||_F <= c eps ||G||_2 ||G^+||_F: the
  sketched range errs by the conditioning of the Gaussian G, not of T (which is why singular values of T down
  to 1e-6 cost nothing). Stage 2, the SVD of P and the products add ~eps each. On 90 random DP problems (m, n in
  {10..48}, r in {2, 4}, K in {1, 4}, p in {0, 3}; a third with spectra 1..1e-6, a third of rank r / 3) the error
  was at most 3.6 eps ||G||_2 ||G^+||_F (Householder) and 4.2 (Cholesky); 10 (..+ 1) leaves a margin of 2.4,
  while a wrong algorithm errs by O(1).
  """
  _, s, vt = np.linalg.svd(dense)
  t = int(np.sum(s > s[0] * 1e-9))
  g = vt[:t] @ np.asarray(omega, np.float64)[:, : min(dense.shape)]
  return 10 * EPS32 * (np.linalg.norm(g, 2) * np.linalg.norm(np.linalg.pinv(g), "fro") + 1)


def _dp_problem(m, n, r, k, p, spectrum, seed):
  """DP mode (lora_a shared, as FedASK's frozen factor): lora_a [K, m, r] with the given singular values
  (`spectrum` [r], zeros allowed), lora_b Gaussian; float32 arrays and the float64 aggregate."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, r)))
  v, _ = np.linalg.qr(rng.standard_normal((r, r)))
  lora_a = np.broadcast_to(u * np.asarray(spectrum) @ v.T, (k, m, r)).astype(np.float32)
  lora_b = rng.standard_normal((k, r, n)).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, k)
  weights = (weights / weights.sum()).astype(np.float32)
  omega = rng.standard_normal((n, r + p)).astype(np.float32)
  dense = np.einsum("k,kmr,krn->mn", *(np.asarray(x, np.float64) for x in (weights, lora_a, lora_b)))
  return (lora_a, lora_b, weights, omega), dense


HARD_DP = {
  # Singular values of the aggregate spanning 1e-6..1 (ill-conditioned Y, P and Gram matrices).
  "spectrum_1e-6": (160, 96, 8, 5, 2, np.logspace(0, -6, 8)),
  # Rank 2, far below w = 14: the Gram matrices of Y and P are singular (rank 2 of 14).
  "rank_2_of_14": (96, 160, 8, 4, 6, [1.0, 0.5] + [0.0] * 6),
  # Both at once, and a tall layer (the shift grows with sqrt(m)).
  "rank_4_spectrum_1e-6": (1024, 64, 8, 3, 4, [1.0, 1e-2, 1e-4, 1e-6] + [0.0] * 4),
}


@methods
@pytest.mark.parametrize("name", sorted(HARD_DP))
def test_hard_dp_sketches_exact_to_round_off(name, method):
  m, n, r, k, p, spectrum = HARD_DP[name]
  args, dense = _dp_problem(m, n, r, k, p, spectrum, seed=len(name))
  new_a, new_b = _AGGREGATE[method](*args, rank=r)
  chex.assert_tree_all_finite((new_a, new_b))
  tol = _dp_tolerance(dense, args[3])
  assert _rel_error(new_a, new_b, dense) < tol
  assert float(_certificate(*args[:3], new_a, new_b)) < tol


def _hard_bases():
  rng = np.random.default_rng(60)
  m, w = 300, 12
  u, _ = np.linalg.qr(rng.standard_normal((m, w)))
  v, _ = np.linalg.qr(rng.standard_normal((w, w)))
  badly_scaled = rng.standard_normal((m, w))
  badly_scaled[0] *= 1e4
  return {
    "gaussian": rng.standard_normal((m, w)),
    "spectrum_1e-6": u * np.logspace(0, -6, w) @ v.T,
    "rank_3": rng.standard_normal((m, 3)) @ rng.standard_normal((3, w)),
    "zero": np.zeros((m, w)),
    "tiny_rank_3": 1e-30 * rng.standard_normal((m, 3)) @ rng.standard_normal((3, w)),
    "huge": 1e30 * rng.standard_normal((m, w)),
    "one_large_row": badly_scaled,
    "square": rng.standard_normal((w, w)),
  }


_cholesky_qr = jax.jit(sketch.cholesky_qr)


@pytest.mark.parametrize("name", sorted(_hard_bases()))
def test_cholesky_qr_is_an_orthonormal_backward_stable_qr(name):
  y = _hard_bases()[name].astype(np.float32)
  q, r = _cholesky_qr(y)
  chex.assert_tree_all_finite((q, r))
  m, w = y.shape
  q64, r64, y64 = (np.asarray(x, np.float64) for x in (q, r, y))
  # Orthonormal to O(m eps) like Householder Q: the last, unshifted pass is CholeskyQR2's second pass on a
  # matrix of condition ~1, also for the zero and rank-deficient y (the fill completes the basis).
  np.testing.assert_allclose(q64.T @ q64, np.eye(w), atol=10 * m * EPS32)
  assert np.all(np.tril(r64, -1) == 0), "R is upper triangular"
  # Backward stable: Q R = y + dy with ||dy||_F <= (1 + 4 w) eps ||y||_F, the fill (eps ||y||_F) plus four
  # triangular solves (each w eps, Higham Thm 8.5); a zero y gives R = 0 exactly.
  assert np.linalg.norm(q64 @ r64 - y64) <= (1 + 4 * w) * EPS32 * np.linalg.norm(y64)


@methods
def test_orthonormal_basis_of_a_rank_deficient_sketch_is_orthonormal(method):
  y = _hard_bases()["rank_3"].astype(np.float32)
  q = np.asarray(sketch.orthonormal_basis(y, method), np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=10 * q.shape[0] * EPS32)
  # range(Q) contains range(y) to round-off (Q has 9 more columns, orthogonal to it).
  assert np.linalg.norm(y - q @ (q.T @ y)) < 10 * q.shape[1] * EPS32 * np.linalg.norm(y)


def test_batched_layers_match_the_mapped_ones(monkeypatch):
  # One layer group of 3 (one shape): the accelerators' batched path, vmap, against the CPU's lax.map.
  rng = np.random.default_rng(70)
  k, r, m, n = 3, 4, 20, 16
  adapters = {
    f"layer{i}": LoRAFactors(
      np.repeat(rng.standard_normal((1, m, r)), k, 0).astype(np.float32),
      rng.standard_normal((k, r, n)).astype(np.float32),
    )
    for i in range(3)
  }
  weights = rng.uniform(0.1, 1.0, k).astype(np.float32)
  omegas = sketch.make_omegas(jax.random.key(1), adapters, r + 2)
  run = lambda: jax.jit(functools.partial(sketch.aggregate_adapters, rank=r, method="cholesky"))(
    adapters, weights, omegas
  )
  assert not sketch.batch_layers("cholesky")  # on the CPU
  mapped = run()
  # aggregate_adapters looks the switch up in its own module, not in the package that re-exports it.
  monkeypatch.setattr(aggregation, "batch_layers", lambda method: True)
  batched = run()
  for name, factors in adapters.items():
    dense = numpy_fedask(factors.lora_a, factors.lora_b, weights, omegas[name], r).dense
    # The same float32 operations, batched or one layer at a time: equal up to XLA's fusion choices.
    np.testing.assert_allclose(_rel_error(*batched[name], dense), _rel_error(*mapped[name], dense), atol=1e-6)
    assert _rel_error(*batched[name], dense) < 1e-5


def test_default_method_by_backend():
  assert sketch.default_method() == ("householder" if jax.default_backend() == "cpu" else "cholesky")
  with pytest.raises(ValueError, match=r"method='qr': choose one of \('householder', 'cholesky'\)"):
    sketch.aggregate_layer(*_problem(), 2, method="qr")
