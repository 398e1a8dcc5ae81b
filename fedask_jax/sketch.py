"""FedASK's two-stage sketch: exact aggregation of low-rank adapters without forming an m x n matrix.

Notation (design.md section 3). Every function speaks of a product `delta = left @ right`, left [m, r],
right [r, n]. In the paper's notation (`W = W0 + B A`, `y = W x`) left = B and right = A; in Flax kernel
layout (`y = x @ kernel`, see `fedask_jax.lora`) left = lora_a [in, r] and right = lora_b [r, out], so
m = in and n = out. K clients hold factors (left_k, right_k) stacked on a leading axis, with weights w_k.

One round (design.md 1.2-1.4, paper Algorithm 1 and Theorem 2), `w = r + p` the sketch width:

1. stage 1: client k sends `Y_k = left_k (right_k Omega)` [m, w], Omega [n, w] Gaussian shared by seed;
   server `Y = sum_k w_k Y_k`, `Q = orth(Y)` [m, w] (thin QR).
2. stage 2: client k sends `P_k = right_k^T (left_k^T Q)` [n, w]; server `P = sum_k w_k P_k`.
3. reconstruction: `P^T = U S V^T`, `left = Q U_r S_r^{1/2}`, `right = S_r^{1/2} V_r^T`: the balanced factors of
   the rank-r truncation of `Q Q^T sum_k w_k left_k right_k`. When the sketch covers the range of the
   aggregate (its rank <= w, e.g. any p >= 0 when one factor is shared by all clients), `Q Q^T` is the
   identity on it and the result is the Eckart-Young best rank-r approximation of the aggregate, which is
   the aggregate itself when its rank is <= r.

Precision (design.md section 3): all linear algebra (products, QR, SVD) runs in float32 or wider whatever the
factors' dtype, with `Precision.HIGHEST` so GPUs and TPUs do not drop to TF32/bfloat16 passes. The stage
functions return that compute dtype (the messages feed QR and SVD); `aggregate` casts its result back to the
factors' dtype.

Sketch width. A width above min(m, n) adds nothing (the aggregate's rank is at most min(m, n)) and would make
the thin QR / SVD shapes ragged, so `aggregate` keeps the first min(m, n) columns of Omega and `make_omegas`
draws each layer's Omega with width min(width, m, n).
"""

from __future__ import annotations

import collections
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from fedask_jax.lora import Adapters, LoRAFactors

Array = jax.Array

_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _compute_dtype(*arrays: Any) -> jnp.dtype:
  """float32, or wider when an input is wider (float64 with x64 enabled)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_ndim(name: str, x: Any, ndim: int, layout: str) -> None:
  if jnp.ndim(x) != ndim:
    raise ValueError(f"{name} has shape {jnp.shape(x)}: expected {ndim} axes {layout}.")


def _check_rank(rank: Any, width: int, m: int, n: int, where: str = "") -> None:
  if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
    raise ValueError(
        f"{where}rank={rank!r}: the target rank must be a Python integer >= 1, static under jit "
        f"(jax.jit(..., static_argnames='rank')).")
  if rank > min(m, n):
    raise ValueError(
        f"{where}rank={rank} exceeds min(m, n) = {min(m, n)} of an {m} x {n} update: "
        f"choose rank <= {min(m, n)}.")
  if rank > width:
    raise ValueError(
        f"{where}rank={rank} exceeds the sketch width w = {width} (columns of omega): the sketch cannot hold "
        f"a rank-{rank} result; draw omega with width r + p >= {rank} (oversampling p >= 0).")


def _check_clients(lefts: Any, rights: Any, weights: Any, where: str = "") -> tuple[int, int, int, int]:
  """Shapes of a K-client problem: returns (K, m, r, n)."""
  _check_ndim(f"{where}lefts", lefts, 3, "[K, m, r] (clients, rows, rank)")
  _check_ndim(f"{where}rights", rights, 3, "[K, r, n] (clients, rank, columns)")
  k, m, r = jnp.shape(lefts)
  if jnp.shape(rights)[:2] != (k, r):
    raise ValueError(
        f"{where}lefts {jnp.shape(lefts)} and rights {jnp.shape(rights)} do not chain: expected lefts [K, m, r] "
        f"and rights [K, r, n] with the same K and r.")
  if jnp.shape(weights) != (k,):
    raise ValueError(f"{where}weights has shape {jnp.shape(weights)}: expected ({k},), one weight per client.")
  return k, m, r, jnp.shape(rights)[2]


def _normalised(weights: Array, dtype: jnp.dtype) -> Array:
  """weights / sum(weights); all-zero weights stay zero (zero aggregate) instead of giving NaN."""
  weights = jnp.asarray(weights, dtype)
  total = jnp.sum(weights)
  return weights / jnp.where(total != 0, total, 1)


def make_omega(key: Array, n: int, width: int, dtype: Any = jnp.float32) -> Array:
  """Stage-1 test matrix Omega [n, width], i.i.d. N(0, 1) from `key` (paper Algorithm 1).

  Clients and server derive the same Omega from the same key, so it is never sent.
  """
  if not isinstance(n, int) or n < 1 or not isinstance(width, int) or width < 1:
    raise ValueError(f"make_omega(n={n!r}, width={width!r}): n and width must be Python ints >= 1.")
  return jax.random.normal(key, (n, width), dtype)


def make_omegas(key: Array, adapters: Adapters, width: int) -> dict[str, Array]:
  """One Omega per adapted layer: {name: [n, min(width, m, n)]} (float32).

  The layer named `sorted(adapters)[i]` gets `make_omega(fold_in(key, i), n, min(width, m, n))`, with
  m = a.shape[-2] and n = b.shape[-1] (Flax layout: m = in, n = out); factors may carry leading batch axes.
  Sorted names make the draw independent of dict order; the width is clipped because a sketch wider than
  min(m, n) adds nothing (module docstring). Use a fresh key per round, e.g. `fold_in(round_key, ...)`.
  """
  if not isinstance(width, int) or width < 1:
    raise ValueError(f"make_omegas(width={width!r}): the sketch width r + p must be a Python int >= 1.")
  omegas = {}
  for i, name in enumerate(sorted(adapters)):
    m, n = jnp.shape(adapters[name].a)[-2], jnp.shape(adapters[name].b)[-1]
    omegas[name] = make_omega(jax.random.fold_in(key, i), n, min(width, m, n))
  return omegas


def stage1_sketch(left: Array, right: Array, omega: Array) -> Array:
  """Stage 1 message of one client: Y = left @ (right @ omega) [m, w], never forming left @ right.

  left [m, r], right [r, n] (paper B, A; Flax lora_a, lora_b); omega [n, w]. Returns the compute dtype
  (float32 or wider). Paper Algorithm 1, `Y_k = B_k A_k Omega`.
  """
  _check_ndim("left", left, 2, "[m, r]")
  _check_ndim("right", right, 2, "[r, n]")
  _check_ndim("omega", omega, 2, "[n, w]")
  if jnp.shape(left)[1] != jnp.shape(right)[0] or jnp.shape(right)[1] != jnp.shape(omega)[0]:
    raise ValueError(
        f"left {jnp.shape(left)}, right {jnp.shape(right)} and omega {jnp.shape(omega)} do not chain: expected "
        f"[m, r], [r, n] and [n, w].")
  dtype = _compute_dtype(left, right, omega)
  return _einsum("mr,rw->mw", left.astype(dtype), _einsum("rn,nw->rw", right.astype(dtype), omega.astype(dtype)))


def orthonormal_basis(y: Array) -> Array:
  """Q [m, w] with orthonormal columns spanning range(y), y [m, w] with w <= m (thin Householder QR).

  A rank-deficient y still gives orthonormal Q (the extra columns are orthogonal to range(y)), so a zero or
  low-rank aggregate is handled without NaN. Computed in float32 or wider.
  """
  _check_ndim("y", y, 2, "[m, w]")
  m, w = jnp.shape(y)
  if w > m:
    raise ValueError(
        f"y has shape {(m, w)}: a thin QR needs width w <= m; clip the sketch width to min(m, n) "
        f"(as make_omegas does).")
  q, _ = jnp.linalg.qr(y.astype(_compute_dtype(y)), mode="reduced")
  return q


def stage2_project(left: Array, right: Array, q: Array) -> Array:
  """Stage 2 message of one client: P = right^T (left^T q) [n, w], never forming left @ right.

  left [m, r], right [r, n] (paper B, A; Flax lora_a, lora_b); q [m, w] the server's basis. Returns the
  compute dtype (float32 or wider). Paper Algorithm 1, `P_k = A_k^T B_k^T Q`.
  """
  _check_ndim("left", left, 2, "[m, r]")
  _check_ndim("right", right, 2, "[r, n]")
  _check_ndim("q", q, 2, "[m, w]")
  if jnp.shape(left)[1] != jnp.shape(right)[0] or jnp.shape(left)[0] != jnp.shape(q)[0]:
    raise ValueError(
        f"left {jnp.shape(left)}, right {jnp.shape(right)} and q {jnp.shape(q)} do not chain: expected "
        f"[m, r], [r, n] and [m, w].")
  dtype = _compute_dtype(left, right, q)
  return _einsum("rn,rw->nw", right.astype(dtype), _einsum("mr,mw->rw", left.astype(dtype), q.astype(dtype)))


def reconstruct(p: Array, q: Array, rank: int) -> tuple[Array, Array]:
  """Balanced rank-`rank` factors from the stage-2 sum: (left [m, rank], right [rank, n]).

  p [n, w] = sum_k w_k P_k, q [m, w] the stage-1 basis. With P^T = U S V^T (thin SVD): left = Q U_r S_r^{1/2},
  right = S_r^{1/2} V_r^T, so left @ right is the rank-r truncation of Q P^T and left^T left = right right^T =
  diag(S_r) (paper Algorithm 1, server step). Exactly zero singular values (a zero or low-rank aggregate) give
  zero columns, never NaN; round-off-level ones give columns of size ~sqrt(eps ||P||). `rank` is static,
  1 <= rank <= min(w, n). Returns the compute dtype (float32 or wider).
  """
  _check_ndim("p", p, 2, "[n, w]")
  _check_ndim("q", q, 2, "[m, w]")
  (n, w), (m, wq) = jnp.shape(p), jnp.shape(q)
  if w != wq:
    raise ValueError(f"p {(n, w)} and q {(m, wq)} have different sketch widths: expected p [n, w] and q [m, w].")
  _check_rank(rank, w, m, n)
  dtype = _compute_dtype(p, q)
  # P = V S U^T is the same SVD; LAPACK's gesdd is several times faster on the tall P [n, w] than on P^T.
  v, s, ut = jnp.linalg.svd(p.astype(dtype), full_matrices=False)
  root = jnp.sqrt(s[:rank])
  left = _einsum("mw,rw->mr", q.astype(dtype), ut[:rank] * root[:, None])
  right = root[:, None] * v[:, :rank].T
  return left, right


def aggregate(lefts: Array, rights: Array, weights: Array, omega: Array, rank: int) -> tuple[Array, Array]:
  """FedASK server aggregation of K clients' factors: (left [m, rank], right [rank, n]).

  lefts [K, m, r], rights [K, r, n] (paper B_k, A_k; Flax lora_a, lora_b), weights [K] non-negative
  (normalised here to sum 1; all zero gives a zero result), omega [n, w] with rank <= w (w = r + p; columns
  beyond min(m, n) are ignored), rank a static Python int. Returns the balanced factors of the rank-`rank`
  truncation of `Q Q^T sum_k w_k left_k right_k` (stages 1-2 and reconstruction, module docstring), which is
  exactly the aggregate when its rank is <= min(rank, w) (design.md 1.4, paper Theorem 2). Cast to the
  factors' dtype.
  """
  k, m, r, n = _check_clients(lefts, rights, weights)
  _check_ndim("omega", omega, 2, "[n, w]")
  if jnp.shape(omega)[0] != n:
    raise ValueError(f"omega has shape {jnp.shape(omega)}: expected [n, w] with n = {n}, the columns of rights.")
  omega = omega[:, :min(m, n)]
  _check_rank(rank, jnp.shape(omega)[1], m, n)
  out_dtype = jnp.result_type(lefts, rights)
  dtype = _compute_dtype(lefts, rights, omega)
  lefts, rights = lefts.astype(dtype), rights.astype(dtype)
  w = _normalised(weights, dtype)
  # The weights scale the small [K, r, w] intermediates, so each sum over clients is a single contraction
  # ([m, K r] x [K r, w] for Y, [n, K r] x [K r, w] for P) and no per-client [m, w] or [n, w] is materialised.
  sketched = _einsum("k,krn,nw->krw", w, rights, omega.astype(dtype))
  q = orthonormal_basis(_einsum("kmr,krw->mw", lefts, sketched))
  projected = _einsum("k,kmr,mw->krw", w, lefts, q)
  left, right = reconstruct(_einsum("krn,krw->nw", rights, projected), q, rank)
  return left.astype(out_dtype), right.astype(out_dtype)


def reconstruction_error(lefts: Array, rights: Array, weights: Array, left: Array, right: Array) -> Array:
  """Exactness certificate: ||left right - T||_F / ||T||_F with T = sum_k w_k left_k right_k; ||left right||_F
  (absolute) when T = 0.

  lefts [K, m, r], rights [K, r, n], weights [K] (normalised as in `aggregate`), left [m, s], right [s, n].
  Never forms an m x n matrix: with L = [left, -w_1 left_1, ..., -w_K left_K] [m, s + K r] and
  R = [right; right_1; ...; right_K] [s + K r, n], the difference is L R; thin QRs L = Q_L R_L, R^T = Q_R R_R
  give ||L R||_F = ||R_L R_R^T||_F, a (s + K r)-square product. Gram matrices (L^T L, R R^T) would cost the
  same but square the condition number: ||L R||_F^2 = sum(L^T L * R R^T) cancels to an absolute error of
  ~eps ||T||^2, i.e. a floor of sqrt(eps) ~ 3e-4 on the relative error in float32, too coarse to certify
  exactness; the QR route has a floor of ~eps. Float32 or wider; returns a scalar of that dtype.
  """
  k, m, r, n = _check_clients(lefts, rights, weights)
  _check_ndim("left", left, 2, "[m, s]")
  _check_ndim("right", right, 2, "[s, n]")
  s = jnp.shape(left)[1]
  if jnp.shape(left)[0] != m or jnp.shape(right) != (s, n):
    raise ValueError(
        f"left {jnp.shape(left)} and right {jnp.shape(right)} do not match the clients' [m, n] = [{m}, {n}]: "
        f"expected left [{m}, s] and right [s, {n}].")
  dtype = _compute_dtype(lefts, rights, left, right)
  w = _normalised(weights, dtype)
  weighted = jnp.transpose(-w[:, None, None] * lefts.astype(dtype), (1, 0, 2)).reshape(m, k * r)
  stacked_left = jnp.concatenate([left.astype(dtype), weighted], axis=1)
  stacked_right = jnp.concatenate([right.astype(dtype), rights.astype(dtype).reshape(k * r, n)], axis=0)
  r_left = jnp.linalg.qr(stacked_left, mode="r")
  r_right = jnp.linalg.qr(stacked_right.T, mode="r")
  error = jnp.linalg.norm(_einsum("is,js->ij", r_left, r_right))
  target = jnp.linalg.norm(_einsum("is,js->ij", r_left[:, s:], r_right[:, s:]))
  return jnp.where(target > 0, error / jnp.where(target > 0, target, 1), error)


def _map_layers(fn, layers: dict[str, tuple[Array, ...]]) -> dict[str, Any]:
  """{name: fn(*arrays)} with layers of identical shapes and dtypes stacked and mapped by one `lax.map`.

  The grouping is graph construction at trace time: one loop per distinct layer shape instead of one traced
  copy per layer (e.g. all q_proj of a Llama share a shape), which keeps the compiled round small. `lax.map`
  rather than `vmap`: jaxlib 0.10's CPU kernel for *batched* QR/SVD splits the batch over XLA's worker threads
  and blocks the calling one, and two such calls running at once (two layer groups, or the certificate's two
  QRs) deadlocked a 2-core machine (seen in gdb in `ParallelBatchMap`); unbatched decompositions run inline.
  The layers' decompositions are small and few, so the loop costs nothing measurable.
  """
  groups = collections.defaultdict(list)
  for name in sorted(layers):
    groups[tuple((jnp.shape(x), jnp.result_type(x)) for x in layers[name])].append(name)
  out = {}
  for names in groups.values():
    stacked = [jnp.stack(xs) for xs in zip(*(layers[name] for name in names))]
    mapped = jax.lax.map(lambda xs: fn(*xs), stacked)
    out.update({name: jax.tree.map(lambda x, i=i: x[i], mapped) for i, name in enumerate(names)})
  return out


def _check_adapters(adapters: Adapters, weights: Any, label: str) -> None:
  for name, factors in adapters.items():
    _check_clients(factors.a, factors.b, weights, where=f"{label}[{name!r}]: ")


def aggregate_adapters(adapters: Adapters, weights: Array, omegas: dict[str, Array], rank: int) -> Adapters:
  """`aggregate` on every layer: {name: LoRAFactors(a [m, rank], b [rank, n])} from clients' adapters.

  adapters: {name: LoRAFactors(a [K, m, r], b [K, r, n])} (Flax layout: a = lora_a = left [in, r],
  b = lora_b = right [r, out]); weights [K]; omegas {name: [n, w]} (e.g. from `make_omegas`), one per layer;
  rank static. Layers of equal shapes are aggregated by one `lax.map` (see `_map_layers`).
  """
  if set(omegas) != set(adapters):
    raise ValueError(
        f"omegas has layers {sorted(omegas)} but adapters has {sorted(adapters)}: give one omega per adapted "
        f"layer (make_omegas(key, adapters, width) does).")
  _check_adapters(adapters, weights, "adapters")
  layers = {}
  for name, factors in adapters.items():
    m, n = jnp.shape(factors.a)[1], jnp.shape(factors.b)[2]
    omega = omegas[name]
    _check_ndim(f"omegas[{name!r}]", omega, 2, f"[n, w] with n = {n}")
    if jnp.shape(omega)[0] != n:
      raise ValueError(f"omegas[{name!r}] has shape {jnp.shape(omega)}: expected [n, w] with n = {n} (layer out).")
    omega = omega[:, :min(m, n)]
    _check_rank(rank, jnp.shape(omega)[1], m, n, where=f"layer {name!r}: ")
    layers[name] = (factors.a, factors.b, omega)
  weights = jnp.asarray(weights)
  merged = _map_layers(lambda a, b, omega: aggregate(a, b, weights, omega, rank), layers)
  return {name: LoRAFactors(*merged[name]) for name in adapters}


def adapters_reconstruction_error(
    adapters: Adapters, weights: Array, aggregated: Adapters) -> tuple[dict[str, Array], Array]:
  """`reconstruction_error` of every layer and their maximum: ({name: scalar}, scalar).

  adapters: clients' {name: LoRAFactors(a [K, m, r], b [K, r, n])}; weights [K]; aggregated:
  {name: LoRAFactors(a [m, s], b [s, n])} (e.g. from `aggregate_adapters`). Flax layout: a = left, b = right.
  """
  if set(aggregated) != set(adapters):
    raise ValueError(
        f"aggregated has layers {sorted(aggregated)} but adapters has {sorted(adapters)}: they must match.")
  _check_adapters(adapters, weights, "adapters")
  weights = jnp.asarray(weights)
  layers = {name: (f.a, f.b, aggregated[name].a, aggregated[name].b) for name, f in adapters.items()}
  errors = _map_layers(lambda *xs: reconstruction_error(xs[0], xs[1], weights, xs[2], xs[3]), layers)
  errors = {name: errors[name] for name in adapters}
  return errors, jnp.max(jnp.stack(list(errors.values())))
