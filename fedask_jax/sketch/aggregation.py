"""FedASK's server aggregation (`fedask_jax.sketch`): the shared Omegas, the clients' stage-1 and stage-2
messages, the reconstruction, `aggregate_layer` / `aggregate_adapters`, and the exactness certificate.

The public functions check their arguments (`_check_clients`, `_check_omega`, ...); the private ones behind them
trust them."""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedask_jax._checks import check_int, check_ndim
from fedask_jax.adapters import Adapters, LoRAFactors
from fedask_jax.numerics import compute_dtype, einsum
from fedask_jax.sketch.gauges import _check_gauge, _split_factors
from fedask_jax.sketch.linalg import _check_method, _orthonormal_basis, _svd_tall

Array = jax.Array


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
  (`fedask_jax.sketch`, "Sketch width"). Use a fresh key per round, e.g. `fold_in(round_key, ...)`.
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
  reconstruction, `fedask_jax.sketch`), which is exactly T when its rank is <= min(rank, w) (docs/design.md,
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
