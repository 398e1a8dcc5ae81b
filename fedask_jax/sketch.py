"""FedASK's two-stage sketch: exact aggregation of low-rank adapters without forming an m x n matrix.

Notation (docs/design.md, section 1.1; factor names: `fedask_jax.lora`). One layer's update is `lora_a @ lora_b`,
lora_a [m, r], lora_b [r, n], with m = in and n = out. K clients hold factors (lora_a_k, lora_b_k) stacked on a
leading axis [K, ...], with weights w_k, and the aggregate is `T = sum_k w_k lora_a_k lora_b_k`. The weights
are used as given: pass normalised ones (sum 1) for the weighted mean, as the round does
(`fedask_jax.numerics.normalise_weights`).

One round (docs/design.md, sections 1.3 and 1.4; paper Algorithm 1 and Theorem 2, applied to the kernel-layout product
lora_a @ lora_b: the algorithm and the theorem hold for any product of two factors), `w = r + p` the sketch width:

1. stage 1: client k sends `Y_k = lora_a_k (lora_b_k Omega)` [m, w], Omega [n, w] Gaussian shared by seed;
   server `Y = sum_k w_k Y_k`, `Q = orth(Y)` [m, w] (thin QR).
2. stage 2: client k sends `P_k = lora_b_k^T (lora_a_k^T Q)` [n, w]; server `P = sum_k w_k P_k`.
3. reconstruction: `P^T = U S V^T` and the rank-r truncation `(Q U_r) S_r V_r^T` of `Q Q^T T`, split into two
   factors by a gauge (below); the paper's is the balanced split `lora_a = Q U_r S_r^{1/2}`,
   `lora_b = S_r^{1/2} V_r^T`. When the sketch covers the range of T (its rank <= w, e.g. any p >= 0 when one
   factor is shared by all clients), `Q Q^T` is the identity on it and the result is the Eckart-Young best
   rank-r approximation of T, which is T itself when its rank is <= r.

Gauge (`split_factors`, `GAUGES`). Any invertible G [r, r] gives the same product, (lora_a G, G^{-1} lora_b), so
the aggregate, Theorem 2 and the exactness certificate do not depend on how the truncation is split; the next
round's local training does. A client's gradient of the trained factor is proportional to the frozen one
(dL/dlora_b = (x lora_a)^T dL/dy), so the frozen factor's scale acts on the product's step like a learning rate
(AdamW's step of the trained factor has a size set by lr alone). Under DP it also sets the signal-to-noise ratio:
the clip norm C and the noise sigma C are fixed in absolute terms, so a frozen factor that shrinks shrinks the
per-example gradients, fewer of them reach C, and the same noise meets less signal. Without DP there is no clip
and no noise, and the gauge only moves the effective step size. The balanced split sets the frozen factor's
scale from the aggregate, ||lora_a||_F^2 = sum_i S_i: small after round 1 (lora_b starts at 0), growing later
(experiments/README.md section 3 measures both). The other gauges hold the scale of the factor that the next
round freezes (`fixed`) at a given Frobenius norm `scale` (the strategies pass the norm of the factor frozen in
the round just finished, so it stays at the initial adapter's norm), and give the aggregate's scale to the
trained factor:

- "balanced": lora_a = Q U_r S_r^{1/2}, lora_b = S_r^{1/2} V_r^T (paper Algorithm 1, the official code).
- "orthonormal": the fixed factor is (scale / sqrt(r)) Q U_r (or (scale / sqrt(r)) V_r^T for lora_b): orthonormal
  columns (rows), all of one norm, like the near-orthogonal random initial lora_a; the other takes S_r.
- "norm": the balanced factors with the fixed one rescaled to Frobenius norm `scale` and the other by the
  inverse: the balanced shape (column i of lora_a proportional to S_i^{1/2}), the scale held.

Precision (`fedask_jax.numerics`): all linear algebra (products, QR, SVD) runs in float32 or wider whatever the
factors' dtype, with `Precision.HIGHEST`. The stage functions return that compute dtype (the messages feed QR
and SVD); `aggregate_layer` casts its result back to the factors' dtype.

Sketch width. A width above min(m, n) adds nothing (T's rank is at most min(m, n)) and would make the thin QR /
SVD shapes ragged, so `aggregate_layer` keeps the first min(m, n) columns of Omega and `make_omegas` draws each
layer's Omega with width min(width, m, n).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedask_jax._checks import check_choice, check_int, check_ndim, check_real
from fedask_jax.adapters import Adapters, LoRAFactors
from fedask_jax.numerics import compute_dtype, einsum

Array = jax.Array

#: The reconstruction's gauges (`split_factors`; module docstring, "Gauge"); "balanced" is the paper's.
GAUGES = ("balanced", "orthonormal", "norm")
#: The factors whose scale a gauge other than balanced may hold (`split_factors`'s `fixed`).
FIXED = ("lora_a", "lora_b")
#: The routes of the sketch's linear algebra (`orthonormal_basis`, `reconstruct`): LAPACK / cuSolver QR and SVD,
#: or shifted Cholesky-QR and the SVD of the small factor (`cholesky_qr`).
METHODS = ("householder", "cholesky")


def _check_rank(rank: Any, width: int, m: int, n: int, where: str = "") -> None:
  check_int(
    f"{where}rank", rank, 1, what="the target rank", hint=", static under jit (jax.jit(..., static_argnames='rank'))"
  )
  if rank > min(m, n):
    raise ValueError(
      f"{where}rank={rank} exceeds min(m, n) = {min(m, n)} of an {m} x {n} update: choose rank <= {min(m, n)}."
    )
  if rank > width:
    raise ValueError(
      f"{where}rank={rank} exceeds the sketch width w = {width} (columns of omega): the sketch cannot hold "
      f"a rank-{rank} result; draw omega with width r + p >= {rank} (oversampling p >= 0)."
    )


def _check_clients(lora_a: Any, lora_b: Any, weights: Any, where: str = "") -> tuple[int, int, int, int]:
  """Shapes of a K-client problem: returns (K, m, r, n)."""
  check_ndim(f"{where}lora_a", lora_a, 3, "[K, m, r] (clients, in, rank)")
  check_ndim(f"{where}lora_b", lora_b, 3, "[K, r, n] (clients, rank, out)")
  k, m, r = jnp.shape(lora_a)
  if jnp.shape(lora_b)[:2] != (k, r):
    raise ValueError(
      f"{where}lora_a {jnp.shape(lora_a)} and lora_b {jnp.shape(lora_b)} do not chain: expected lora_a "
      f"[K, m, r] and lora_b [K, r, n] with the same K and r."
    )
  if jnp.shape(weights) != (k,):
    raise ValueError(f"{where}weights has shape {jnp.shape(weights)}: expected ({k},), one weight per client.")
  return k, m, r, jnp.shape(lora_b)[2]


def _check_omega(omega: Any, m: int, n: int, rank: Any, name: str = "omega", where: str = "") -> Array:
  """Omega's first min(m, n) columns, after checking it against the layer and the rank."""
  check_ndim(name, omega, 2, f"[n, w] with n = {n}")
  if jnp.shape(omega)[0] != n:
    raise ValueError(f"{name} has shape {jnp.shape(omega)}: expected [n, w] with n = {n} (the columns of lora_b).")
  omega = omega[:, : min(m, n)]
  _check_rank(rank, jnp.shape(omega)[1], m, n, where)
  return omega


def _check_estimate(lora_a_hat: Any, lora_b_hat: Any, m: int, n: int, where: str = "") -> None:
  check_ndim(f"{where}lora_a_hat", lora_a_hat, 2, "[m, s]")
  check_ndim(f"{where}lora_b_hat", lora_b_hat, 2, "[s, n]")
  s = jnp.shape(lora_a_hat)[1]
  if jnp.shape(lora_a_hat)[0] != m or jnp.shape(lora_b_hat) != (s, n):
    raise ValueError(
      f"{where}lora_a_hat {jnp.shape(lora_a_hat)} and lora_b_hat {jnp.shape(lora_b_hat)} do not match the "
      f"clients' [m, n] = [{m}, {n}]: expected lora_a_hat [{m}, s] and lora_b_hat [s, {n}]."
    )


def make_omega(key: Array, n: int, width: int, dtype: Any = jnp.float32) -> Array:
  """Stage-1 test matrix Omega [n, width], i.i.d. N(0, 1) from `key` (paper Algorithm 1).

  Clients and server derive the same Omega from the same key, so it is never sent.
  """
  n, width = check_int("n", n, 1), check_int("width", width, 1, what="the sketch width")
  return jax.random.normal(key, (n, width), dtype)


def make_omegas(key: Array, adapters: Adapters, width: int) -> dict[str, Array]:
  """One Omega per adapted layer: {name: [n, min(width, m, n)]} (float32).

  The layer named `sorted(adapters)[i]` gets `make_omega(fold_in(key, i), n, min(width, m, n))`, with
  m = lora_a.shape[-2] and n = lora_b.shape[-1]; factors may carry leading batch axes. Sorted names make the
  draw independent of dict order; the width is clipped because a sketch wider than min(m, n) adds nothing
  (module docstring). Use a fresh key per round, e.g. `fold_in(round_key, ...)`.
  """
  width = check_int("width", width, 1, what="the sketch width r + p")
  omegas = {}
  for i, name in enumerate(sorted(adapters)):
    m, n = jnp.shape(adapters[name].lora_a)[-2], jnp.shape(adapters[name].lora_b)[-1]
    omegas[name] = make_omega(jax.random.fold_in(key, i), n, min(width, m, n))
  return omegas


def stage1_sketch(lora_a: Array, lora_b: Array, omega: Array) -> Array:
  """Stage 1 message of one client: Y = lora_a @ (lora_b @ omega) [m, w], never forming lora_a @ lora_b.

  lora_a [m, r], lora_b [r, n], omega [n, w]. Returns the compute dtype (float32 or wider).
  """
  check_ndim("lora_a", lora_a, 2, "[m, r]")
  check_ndim("lora_b", lora_b, 2, "[r, n]")
  check_ndim("omega", omega, 2, "[n, w]")
  if jnp.shape(lora_a)[1] != jnp.shape(lora_b)[0] or jnp.shape(lora_b)[1] != jnp.shape(omega)[0]:
    raise ValueError(
      f"lora_a {jnp.shape(lora_a)}, lora_b {jnp.shape(lora_b)} and omega {jnp.shape(omega)} do not chain: "
      f"expected [m, r], [r, n] and [n, w]."
    )
  dtype = compute_dtype(lora_a, lora_b, omega)
  return einsum("mr,rw->mw", lora_a.astype(dtype), einsum("rn,nw->rw", lora_b.astype(dtype), omega.astype(dtype)))


def default_method() -> str:
  """The linear-algebra route of the sketch on the default backend: "householder" on a CPU, "cholesky" on a GPU or
  TPU (`METHODS`; the benchmark that chose them: benchmarks/README.md, "Aggregation routes")."""
  return "householder" if jax.default_backend() == "cpu" else "cholesky"


def _check_method(method: Any) -> str:
  return default_method() if method is None else check_choice("method", method, METHODS)


def orthonormal_basis(y: Array, method: str | None = None) -> Array:
  """Q [m, w] with orthonormal columns whose span contains range(y), y [m, w] with w <= m.

  method: "householder" (thin Householder QR) or "cholesky" (shifted Cholesky-QR, `cholesky_qr`); None:
  `default_method()`. Both are backward stable, Q R = y + dy with ||dy|| ~ eps ||y||, so range(Q) is range(y) to
  round-off whatever y's conditioning; a rank-deficient y (a zero or low-rank aggregate) still gives orthonormal
  columns, never NaN. Computed in float32 or wider.
  """
  check_ndim("y", y, 2, "[m, w]")
  m, w = jnp.shape(y)
  if w > m:
    raise ValueError(
      f"y has shape {(m, w)}: a thin QR needs width w <= m; clip the sketch width to min(m, n) (as make_omegas does)."
    )
  return _orthonormal_basis(y, _check_method(method))


def _orthonormal_basis(y: Array, method: str) -> Array:
  y = y.astype(compute_dtype(y))
  if method == "cholesky":
    return cholesky_qr(y)[0]
  return jnp.linalg.qr(y, mode="reduced")[0]


# Cholesky-QR passes of `cholesky_qr`: shifted ones, then one without a shift (why three: its docstring).
SHIFTED_PASSES = 3
# The fill's seed: a fixed matrix, so that the basis is a deterministic function of y.
FILL_SEED = 0x5EED


def _cholesky_pass(z: Array, shifted: bool) -> tuple[Array, Array]:
  """One Cholesky-QR pass: (z R^{-1}, R) with R^T R = z^T z + s I (R upper triangular [w, w])."""
  m, w = z.shape
  eps = jnp.finfo(z.dtype).eps
  gram = einsum("mi,mj->ij", z, z)
  eye = jnp.eye(w, dtype=z.dtype)
  # Entry (i, j) of the computed Gram matrix errs by <= m eps/2 ||z_i|| ||z_j|| (Higham, Thm 3.5), and in practice
  # by ~sqrt(m) eps ||z_i|| ||z_j||: the shift s = (sqrt(m) + w + 1) eps max_i ||z_i||^2 keeps the Cholesky
  # factorisation defined in practice (its own rounding adds ~w eps, Higham Thm 10.7). If it fails all the same (a
  # non-finite factor), the pass takes the worst-case bound, w (m + w + 1) eps tr(G), which cannot fail.
  small = (np.sqrt(m) + w + 1) * eps * jnp.max(jnp.diagonal(gram)) if shifted else 0.0
  lower = jax.lax.linalg.cholesky(gram + small * eye)
  safe = jax.lax.linalg.cholesky(gram + w * (m + w + 1) * eps * jnp.trace(gram) * eye)
  lower = jnp.where(jnp.all(jnp.isfinite(lower)), lower, safe)
  # z = Q L^T: a triangular solve from the right, backward stable row by row (Q R = z + dz, |dz| <= w eps |Q| |R|).
  q = jax.lax.linalg.triangular_solve(lower, z, left_side=False, lower=True, transpose_a=True)
  return q, lower.T


def cholesky_qr(y: Array) -> tuple[Array, Array]:
  """Thin QR of a tall y [m, w] (w <= m) by matrix products: (Q [m, w] orthonormal, R [w, w] upper triangular).

  Shifted Cholesky-QR (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020, "Shifted Cholesky QR for
  computing the QR factorization of ill-conditioned matrices"): each pass forms the Gram matrix G = Z^T Z (one
  GEMM), factors G + s I = R^T R (a w x w Cholesky) and replaces Z by Z R^{-1} (a triangular solve, GEMM-shaped).
  Cost 3 m w^2 flops a pass and no Householder reflections, so on an accelerator it is a few batched kernels
  instead of w sequential panel steps.

  Where it is exact. Every pass is backward stable row by row (Z_{i-1} = Z_i R_i + E_i, ||E_i|| ~ w eps ||Z_i||
  ||R_i||), so Q R = y + dy with ||dy|| ~ eps ||y||, as for Householder QR, and range(Q) equals range(y) to
  round-off. The shift only sets how far a pass equalises singular values: a direction with singular value
  sigma (relative to ||y||_F) comes out as sigma / sqrt(sigma^2 + s), s = (sqrt(m) + w + 1) eps (~1e-5), so
  three shifted passes lift any sigma >= eps to ~1, and a last pass without a shift (CholeskyQR2's second
  pass) makes Q orthonormal to ~eps.

  Singular Gram matrix (a rank-deficient y: FedASK's sketch under DP has rank r < w = r + p every round, and
  round 1's aggregate is zero because lora_b starts at 0). Before the passes y is scaled to unit Frobenius norm
  and a fixed matrix eps E is added (E [m, w] Gaussian with unit-norm columns, the same every call): its part
  outside range(y) makes every singular value >= ~eps, so the passes above complete the basis with
  orthonormal columns outside range(y) instead of dividing by zero (the randomised completion of Stathopoulos
  and Wu 2002, "A block orthogonalization procedure with constant synchronization requirements"). The fill is
  a backward error of size eps ||y||, at the level of the product's own round-off. A zero y gives the
  orthonormal basis of E and R = 0. Should the shifted Cholesky factorisation still fail (a non-finite
  factor), the pass uses the worst-case shift w (m + w + 1) eps tr(G) instead, which cannot fail: never NaN for
  a finite y.

  Float32 or wider; R carries y's scale (Q R ~ y).
  """
  y = y.astype(compute_dtype(y))
  m, w = y.shape
  # Scale first (by the largest entry, then the Frobenius norm) so that the Gram matrix neither overflows nor
  # underflows whatever y's magnitude.
  peak = jnp.max(jnp.abs(y))
  z = y / jnp.where(peak > 0, peak, 1)
  norm = jnp.sqrt(jnp.sum(z * z))
  fill = jax.random.normal(jax.random.key(FILL_SEED), (m, w), y.dtype) / np.sqrt(m * w)
  z = z / jnp.where(norm > 0, norm, 1) + jnp.finfo(y.dtype).eps * fill
  r = jnp.eye(w, dtype=y.dtype)
  for shifted in [True] * SHIFTED_PASSES + [False]:
    z, r_pass = _cholesky_pass(z, shifted)
    r = einsum("ij,jk->ik", r_pass, r)
  return z, (peak * norm) * r


def stage2_project(lora_a: Array, lora_b: Array, q: Array) -> Array:
  """Stage 2 message of one client: P = lora_b^T (lora_a^T q) [n, w], never forming lora_a @ lora_b.

  lora_a [m, r], lora_b [r, n], q [m, w] the server's basis. Returns the compute dtype (float32 or wider).
  """
  check_ndim("lora_a", lora_a, 2, "[m, r]")
  check_ndim("lora_b", lora_b, 2, "[r, n]")
  check_ndim("q", q, 2, "[m, w]")
  if jnp.shape(lora_a)[1] != jnp.shape(lora_b)[0] or jnp.shape(lora_a)[0] != jnp.shape(q)[0]:
    raise ValueError(
      f"lora_a {jnp.shape(lora_a)}, lora_b {jnp.shape(lora_b)} and q {jnp.shape(q)} do not chain: expected "
      f"[m, r], [r, n] and [m, w]."
    )
  dtype = compute_dtype(lora_a, lora_b, q)
  return einsum("rn,rw->nw", lora_b.astype(dtype), einsum("mr,mw->rw", lora_a.astype(dtype), q.astype(dtype)))


def _check_gauge(gauge: Any, fixed: Any, scale: Any) -> None:
  check_choice("gauge", gauge, GAUGES, what="the split of the reconstruction into factors")
  check_choice("fixed", fixed, FIXED, what="the factor whose scale the gauge holds")
  if gauge != "balanced":
    if scale is None:
      raise ValueError(
        f"gauge={gauge!r} needs scale, the Frobenius norm to hold the {fixed} factor at (e.g. the "
        "norm of the factor frozen in the round just finished)."
      )
    check_real("scale", scale, 0, lo_open=True, what="the fixed factor's Frobenius norm", traced_ok=True)


def split_factors(
  left: Array,
  s: Array,
  right: Array,
  gauge: str = "balanced",
  scale: Array | float | None = None,
  fixed: str = "lora_a",
) -> tuple[Array, Array]:
  """The rank-r matrix `left diag(s) right` as LoRA factors in the chosen gauge: (lora_a [m, r], lora_b [r, n]).

  left [m, r] with orthonormal columns, s [r] >= 0, right [r, n] with orthonormal rows (a thin SVD's factors,
  e.g. Q U_r, S_r, V_r^T of the reconstruction). The product lora_a @ lora_b is `left diag(s) right` for every
  gauge, up to float32 round-off; the gauge only chooses how its scale is shared (module docstring, "Gauge"):
  "balanced" (S^{1/2} on each side; `scale` and `fixed` unused), "orthonormal" or "norm" (the `fixed` factor,
  "lora_a" or "lora_b", has Frobenius norm `scale`, a scalar > 0, traced or not). Degenerate inputs stay exact:
  with s = 0 "norm" gives the orthonormal fixed factor (the balanced shape is 0 / 0), and a traced scale of 0
  gives the balanced factors. Computed in float32 or wider.
  """
  check_ndim("left", left, 2, "[m, r]")
  check_ndim("s", s, 1, "[r]")
  check_ndim("right", right, 2, "[r, n]")
  if jnp.shape(left)[1] != jnp.shape(s)[0] or jnp.shape(right)[0] != jnp.shape(s)[0]:
    raise ValueError(
      f"left {jnp.shape(left)}, s {jnp.shape(s)} and right {jnp.shape(right)} do not chain: "
      "expected [m, r], [r] and [r, n]."
    )
  _check_gauge(gauge, fixed, scale)
  return _split_factors(left, s, right, gauge, scale, fixed)


def _split_factors(
  left: Array, s: Array, right: Array, gauge: str, scale: Array | float | None, fixed: str
) -> tuple[Array, Array]:
  dtype = compute_dtype(left, s, right)
  left, s, right = left.astype(dtype), s.astype(dtype), right.astype(dtype)
  # Column weights of lora_a and row weights of lora_b with w_a * w_b = s, so the product is left diag(s) right.
  root = jnp.sqrt(s)
  if gauge == "balanced":
    w_fixed, w_other = root, root
  else:
    scale = jnp.asarray(scale, dtype)
    positive = scale > 0
    scale = jnp.where(positive, scale, 1)
    column = scale / jnp.sqrt(jnp.asarray(jnp.shape(s)[0], dtype))  # norm of each orthonormal column times c
    w_fixed, w_other = jnp.full_like(s, column), s / column
    if gauge == "norm":
      total = jnp.sqrt(jnp.sum(s))
      safe = jnp.where(total > 0, total, 1)
      w_fixed = jnp.where(total > 0, root * (scale / safe), w_fixed)
      w_other = jnp.where(total > 0, root * (safe / scale), w_other)
    w_fixed, w_other = jnp.where(positive, w_fixed, root), jnp.where(positive, w_other, root)
  w_a, w_b = (w_fixed, w_other) if fixed == "lora_a" else (w_other, w_fixed)
  return left * w_a[None, :], w_b[:, None] * right


def reconstruct(
  p: Array,
  q: Array,
  rank: int,
  gauge: str = "balanced",
  scale: Array | float | None = None,
  fixed: str = "lora_a",
  method: str | None = None,
) -> tuple[Array, Array]:
  """Rank-`rank` factors from the stage-2 sum: (lora_a [m, rank], lora_b [rank, n]).

  p [n, w] = sum_k w_k P_k, q [m, w] the stage-1 basis. With P^T = U S V^T (thin SVD), lora_a @ lora_b is the
  rank-r truncation Q U_r S_r V_r^T of Q P^T, split by `split_factors(Q U_r, S_r, V_r^T, gauge, scale, fixed)`;
  the default, balanced, gives lora_a = Q U_r S_r^{1/2}, lora_b = S_r^{1/2} V_r^T with
  lora_a^T lora_a = lora_b lora_b^T = diag(S_r) (paper Algorithm 1, server step). Exactly zero singular values
  (a zero or low-rank aggregate) give zero columns (balanced), never NaN; round-off-level ones give columns of
  size ~sqrt(eps ||P||). `rank` is static, 1 <= rank <= min(w, n); `method` as in `orthonormal_basis` (the SVD
  of P: LAPACK's / cuSolver's on P itself, or through the small factor of `cholesky_qr(P)`, `_svd_tall`).
  Returns the compute dtype (float32 or wider).
  """
  check_ndim("p", p, 2, "[n, w]")
  check_ndim("q", q, 2, "[m, w]")
  (n, w), (m, wq) = jnp.shape(p), jnp.shape(q)
  if w != wq:
    raise ValueError(f"p {(n, w)} and q {(m, wq)} have different sketch widths: expected p [n, w] and q [m, w].")
  _check_rank(rank, w, m, n)
  _check_gauge(gauge, fixed, scale)
  return _split_factors(*_decompose(p, q, rank, _check_method(method)), gauge, scale, fixed)


def _svd_tall(p: Array, method: str) -> tuple[Array, Array, Array]:
  """Thin SVD of a tall p [n, w] (w <= n): (V [n, w], S [w], U^T [w, w]) with p = V diag(S) U^T.

  "cholesky": p = Q_p R_p (`cholesky_qr`), then the SVD of the small R_p = U_R S U^T, so V = Q_p U_R; the
  backward error of the QR (~eps ||p||) is all this adds to the small SVD's. "householder": LAPACK's gesdd (or
  cuSolver's gesvd) on p.
  """
  if method == "cholesky":
    q_p, r_p = cholesky_qr(p)
    u_r, s, ut = jnp.linalg.svd(r_p, full_matrices=False)
    return einsum("nw,wv->nv", q_p, u_r), s, ut
  # P = V S U^T is the SVD of P^T; LAPACK's gesdd is several times faster on the tall P [n, w] than on P^T.
  u, s, vt = jnp.linalg.svd(p, full_matrices=False)
  return u, s, vt


def _decompose(p: Array, q: Array, rank: int, method: str) -> tuple[Array, Array, Array]:
  """The rank-`rank` truncation of Q P^T as (Q U_r [m, r], S_r [r], V_r^T [r, n])."""
  dtype = compute_dtype(p, q)
  v, s, ut = _svd_tall(p.astype(dtype), method)
  return einsum("mw,rw->mr", q.astype(dtype), ut[:rank]), s[:rank], v[:, :rank].T


def aggregate_layer(
  lora_a: Array,
  lora_b: Array,
  weights: Array,
  omega: Array,
  rank: int,
  gauge: str = "balanced",
  scale: Array | float | None = None,
  fixed: str = "lora_a",
  method: str | None = None,
) -> tuple[Array, Array]:
  """FedASK's server aggregation of one layer's K client factors: (lora_a [m, rank], lora_b [rank, n]).

  lora_a [K, m, r], lora_b [K, r, n], weights [K] (used as given: normalised for the weighted mean; all zero
  gives a zero result), omega [n, w] with rank <= w (w = r + p; columns beyond min(m, n) are ignored), rank a
  static Python int. Returns the factors of the rank-`rank` truncation of `Q Q^T T` (stages 1-2 and
  reconstruction, module docstring), which is exactly T when its rank is <= min(rank, w) (docs/design.md,
  section 1.4; paper Theorem 2), split by `gauge` (`split_factors`; default balanced, the paper's). `method`:
  the linear-algebra route (`orthonormal_basis`; None: `default_method()`), static. Cast to the factors' dtype.
  """
  _, m, _, n = _check_clients(lora_a, lora_b, weights)
  omega = _check_omega(omega, m, n, rank)
  _check_gauge(gauge, fixed, scale)
  return _aggregate_layer(lora_a, lora_b, weights, omega, rank, gauge, scale, fixed, _check_method(method))


def _aggregate_layer(
  lora_a: Array,
  lora_b: Array,
  weights: Array,
  omega: Array,
  rank: int,
  gauge: str,
  scale: Array | float | None,
  fixed: str,
  method: str,
) -> tuple[Array, Array]:
  """`aggregate_layer` on checked arguments, omega already clipped to min(m, n) columns."""
  out_dtype = jnp.result_type(lora_a, lora_b)
  dtype = compute_dtype(lora_a, lora_b, omega)
  lora_a, lora_b, w = lora_a.astype(dtype), lora_b.astype(dtype), jnp.asarray(weights, dtype)
  # The weights scale the small [K, r, w] intermediates, so each sum over clients is a single contraction
  # ([m, K r] x [K r, w] for Y, [n, K r] x [K r, w] for P) and no per-client [m, w] or [n, w] is materialised.
  sketched = einsum("k,krn,nw->krw", w, lora_b, omega.astype(dtype))
  q = _orthonormal_basis(einsum("kmr,krw->mw", lora_a, sketched), method)
  projected = einsum("k,kmr,mw->krw", w, lora_a, q)
  truncation = _decompose(einsum("krn,krw->nw", lora_b, projected), q, rank, method)
  new_a, new_b = _split_factors(*truncation, gauge, scale, fixed)
  return new_a.astype(out_dtype), new_b.astype(out_dtype)


def reconstruction_error(lora_a: Array, lora_b: Array, weights: Array, lora_a_hat: Array, lora_b_hat: Array) -> Array:
  """Exactness certificate: ||lora_a_hat lora_b_hat - T||_F / ||T||_F with T = sum_k w_k lora_a_k lora_b_k;
  ||lora_a_hat lora_b_hat||_F (absolute) when T = 0.

  lora_a [K, m, r], lora_b [K, r, n], weights [K] (as in `aggregate_layer`), lora_a_hat [m, s],
  lora_b_hat [s, n]. Never forms an m x n matrix: with L = [lora_a_hat, -w_1 lora_a_1, ..., -w_K lora_a_K]
  [m, s + K r] and R = [lora_b_hat; lora_b_1; ...; lora_b_K] [s + K r, n], the difference is L R; thin QRs
  L = Q_L R_L, R^T = Q_R R_R give ||L R||_F = ||R_L R_R^T||_F, a (s + K r)-square product. Gram matrices
  (L^T L, R R^T) would cost the same but square the condition number: ||L R||_F^2 = sum(L^T L * R R^T) cancels
  to an absolute error of ~eps ||T||^2, i.e. a floor of sqrt(eps) ~ 3e-4 on the relative error in float32, too
  coarse to certify exactness; the QR route has a floor of ~eps. Float32 or wider; returns a scalar of that
  dtype.
  """
  _, m, _, n = _check_clients(lora_a, lora_b, weights)
  _check_estimate(lora_a_hat, lora_b_hat, m, n)
  return _reconstruction_error(lora_a, lora_b, weights, lora_a_hat, lora_b_hat)


def _reconstruction_error(lora_a: Array, lora_b: Array, weights: Array, lora_a_hat: Array, lora_b_hat: Array) -> Array:
  (k, m, r), n, s = jnp.shape(lora_a), jnp.shape(lora_b)[2], jnp.shape(lora_a_hat)[1]
  dtype = compute_dtype(lora_a, lora_b, lora_a_hat, lora_b_hat)
  w = jnp.asarray(weights, dtype)
  weighted = jnp.transpose(-w[:, None, None] * lora_a.astype(dtype), (1, 0, 2)).reshape(m, k * r)
  stacked_left = jnp.concatenate([lora_a_hat.astype(dtype), weighted], axis=1)
  stacked_right = jnp.concatenate([lora_b_hat.astype(dtype), lora_b.astype(dtype).reshape(k * r, n)], axis=0)
  r_left = jnp.linalg.qr(stacked_left, mode="r")
  r_right = jnp.linalg.qr(stacked_right.T, mode="r")
  error = jnp.linalg.norm(einsum("is,js->ij", r_left, r_right))
  target = jnp.linalg.norm(einsum("is,js->ij", r_left[:, s:], r_right[:, s:]))
  return jnp.where(target > 0, error / jnp.where(target > 0, target, 1), error)


def _map_layers(
  fn: Callable[..., Any], layers: Mapping[str, tuple[Array, ...]], batched: bool = False
) -> dict[str, Any]:
  """{name: fn(*arrays)} with layers of identical shapes and dtypes stacked and mapped by one `lax.map`, or,
  with `batched`, by one `vmap` (every decomposition one batched call).

  The grouping is graph construction at trace time: one loop per distinct layer shape instead of one traced
  copy per layer (e.g. all q_proj of a Llama share a shape), which keeps the compiled round small.
  """
  groups = collections.defaultdict(list)
  for name in sorted(layers):
    groups[tuple((jnp.shape(x), jnp.result_type(x)) for x in layers[name])].append(name)
  out = {}
  for names in groups.values():
    stacked = [jnp.stack(xs) for xs in zip(*(layers[name] for name in names))]
    # lax.map on a CPU: jaxlib's CPU kernels for batched QR/SVD split the batch over XLA's worker threads and
    # block the caller, and two such calls at once (two layer groups, the certificate's two QRs) deadlocked a
    # 2-core machine; unbatched decompositions run inline, and these are small and few. On an accelerator a
    # loop of small kernels is latency: one batched call per decomposition instead (`batch_layers`).
    mapped = jax.vmap(fn)(*stacked) if batched else jax.lax.map(lambda xs: fn(*xs), stacked)
    out.update({name: jax.tree.map(lambda x, i=i: x[i], mapped) for i, name in enumerate(names)})
  return out


def _check_adapters(adapters: Adapters, weights: Any, label: str) -> None:
  for name, factors in adapters.items():
    _check_clients(factors.lora_a, factors.lora_b, weights, where=f"{label}[{name!r}]: ")


def batch_layers(method: str) -> bool:
  """Whether `aggregate_adapters` aggregates the layers of one shape in one batched call (`vmap`) rather than a
  `lax.map` loop: for the Cholesky route off the CPU (`_map_layers` says why not on a CPU)."""
  return method == "cholesky" and jax.default_backend() != "cpu"


def aggregate_adapters(
  adapters: Adapters,
  weights: Array,
  omegas: dict[str, Array],
  rank: int,
  gauge: str = "balanced",
  scales: dict[str, Array] | None = None,
  fixed: str = "lora_a",
  method: str | None = None,
) -> Adapters:
  """`aggregate_layer` on every layer: {name: LoRAFactors(lora_a [m, rank], lora_b [rank, n])}.

  adapters: the clients' {name: LoRAFactors(lora_a [K, m, r], lora_b [K, r, n])}; weights [K] (as in
  `aggregate_layer`); omegas {name: [n, w]} (e.g. from `make_omegas`), one per layer; rank static; gauge and
  fixed as in `split_factors`, with scales {name: scalar} the per-layer `scale` (gauges other than balanced).
  method: the linear-algebra route (`orthonormal_basis`; None: `default_method()`), static. Every layer is
  checked here, once; layers of equal shapes are aggregated together, by one batched call or one `lax.map`
  (`batch_layers`).
  """
  if set(omegas) != set(adapters):
    raise ValueError(
      f"omegas has layers {sorted(omegas)} but adapters has {sorted(adapters)}: give one omega per adapted "
      f"layer (make_omegas(key, adapters, width) does)."
    )
  if gauge != "balanced" and (scales is None or set(scales) != set(adapters)):
    raise ValueError(
      f"gauge={gauge!r} needs scales with one entry per layer {sorted(adapters)}; got "
      f"{None if scales is None else sorted(scales)}."
    )
  _check_adapters(adapters, weights, "adapters")
  layers = {}
  for name, factors in adapters.items():
    m, n = jnp.shape(factors.lora_a)[1], jnp.shape(factors.lora_b)[2]
    omega = _check_omega(omegas[name], m, n, rank, name=f"omegas[{name!r}]", where=f"layer {name!r}: ")
    scale = jnp.ones(()) if gauge == "balanced" or scales is None else scales[name]
    _check_gauge(gauge, fixed, scale)
    layers[name] = (factors.lora_a, factors.lora_b, omega, jnp.asarray(scale, jnp.float32))
  weights, method = jnp.asarray(weights), _check_method(method)
  merged = _map_layers(
    lambda a, b, omega, scale: _aggregate_layer(a, b, weights, omega, rank, gauge, scale, fixed, method),
    layers,
    batched=batch_layers(method),
  )
  return {name: LoRAFactors(*merged[name]) for name in adapters}


def adapters_reconstruction_error(
  adapters: Adapters, weights: Array, aggregated: Adapters
) -> tuple[dict[str, Array], Array]:
  """`reconstruction_error` of every layer and their maximum: ({name: scalar}, scalar).

  adapters: the clients' {name: LoRAFactors(lora_a [K, m, r], lora_b [K, r, n])}; weights [K] (as in
  `aggregate_layer`); aggregated: {name: LoRAFactors(lora_a [m, s], lora_b [s, n])} (e.g. from
  `aggregate_adapters`).
  """
  if set(aggregated) != set(adapters):
    raise ValueError(
      f"aggregated has layers {sorted(aggregated)} but adapters has {sorted(adapters)}: they must match."
    )
  _check_adapters(adapters, weights, "adapters")
  for name, f in adapters.items():
    _check_estimate(
      aggregated[name].lora_a,
      aggregated[name].lora_b,
      jnp.shape(f.lora_a)[1],
      jnp.shape(f.lora_b)[2],
      where=f"aggregated[{name!r}]: ",
    )
  weights = jnp.asarray(weights)
  layers = {
    name: (f.lora_a, f.lora_b, aggregated[name].lora_a, aggregated[name].lora_b) for name, f in adapters.items()
  }
  errors = _map_layers(lambda a, b, a_hat, b_hat: _reconstruction_error(a, b, weights, a_hat, b_hat), layers)
  errors = {name: errors[name] for name in adapters}
  return errors, jnp.max(jnp.stack(list(errors.values())))
