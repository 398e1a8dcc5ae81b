"""The sketch's linear algebra on tall matrices: an orthonormal basis of a range (Householder QR or shifted
Cholesky-QR) and the thin SVD of a tall matrix, each by one of two routes (`METHODS`, `default_method`).

Float32 or wider whatever the input's dtype (`fedask_jax.numerics`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedask_jax._checks import check_choice, check_ndim
from fedask_jax.numerics import compute_dtype, einsum

Array = jax.Array


#: The routes of the sketch's linear algebra (`orthonormal_basis`, `reconstruct`): LAPACK / cuSolver QR and SVD,
#: or shifted Cholesky-QR and the SVD of the small factor (`cholesky_qr`).
METHODS = ("householder", "cholesky")


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
