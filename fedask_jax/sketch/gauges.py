"""How the sketch's rank-r reconstruction is split into two LoRA factors (`fedask_jax.sketch`).

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
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedask_jax._checks import check_choice, check_ndim, check_real
from fedask_jax.numerics import compute_dtype

Array = jax.Array


#: The reconstruction's gauges (`split_factors`; module docstring, "Gauge"); "balanced" is the paper's.
GAUGES = ("balanced", "orthonormal", "norm")
#: The factors whose scale a gauge other than balanced may hold (`split_factors`'s `fixed`).
FIXED = ("lora_a", "lora_b")
#: The routes of the sketch's linear algebra (`orthonormal_basis`, `reconstruct`): LAPACK / cuSolver QR and SVD,


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
