"""Per-example clipping by the global L2 norm (DP-SGD, Abadi et al. 2016; docs/design.md, section 4.2).

A per-example gradient `g_i` is a pytree whose leaves carry a leading example axis [E, ...]; its norm is the
global L2 norm over all leaves, and clipping scales it by `c_i = min(1, C / ||g_i||)`, so every clipped
gradient has norm <= C and the clipped sum has L2 sensitivity C under add/remove-one neighbours.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax_privacy import clipping as jp_clipping

from fedask_jax._checks import check_real

Array = jax.Array


def check_clip_norm(clip_norm: Any, name: str = "clip_norm") -> None:
  """Raise ValueError unless `clip_norm` is a finite number > 0 (a JAX array, traced, is not checked)."""
  check_real(
    name,
    clip_norm,
    0,
    lo_open=True,
    what="the per-example clipping norm C",
    traced_ok=True,
    hint=" (it bounds each example's contribution; the paper uses C = 1.0)",
  )


def clip_scale(norms: Array, clip_norm: float | Array) -> Array:
  """Clipping factors `c_i = min(1, C / norm_i)` [E] for per-example norms [E].

  A zero or non-finite norm gives 1 for a zero norm (nothing to clip) and 0 for NaN/inf (the example is
  dropped rather than allowed to break the sensitivity bound), as `jax_privacy.clipping.clip_pytree` does.
  Written out here for mechanisms that clip by a norm other than that of the tree they scale (the W-space
  mechanism clips dl/db by ||dl/dW||), which `clip_pytree` cannot express.
  """
  check_clip_norm(clip_norm)
  return _clip_scale(norms, clip_norm)


def _clip_scale(norms: Array, clip_norm: float | Array) -> Array:
  norms = jnp.asarray(norms, jnp.float32)
  scale = jnp.minimum(1.0, clip_norm / jnp.where(norms > 0, norms, 1.0))
  return jnp.where(jnp.isfinite(norms), scale, 0.0)


def clip_per_example(
  per_example_grads: Any, clip_norm: float | Array, example_mask: Array | None = None
) -> tuple[Any, Array]:
  """Clip each example's gradient to global L2 norm <= C.

  Args:
    per_example_grads: pytree of arrays with a leading example axis [E, ...].
    clip_norm: C > 0.
    example_mask: optional bool [E]; masked-out (padding) examples come back as zeros.

  Returns:
    (clipped, norms): the clipped pytree [E, ...] (same structure and dtypes) and the pre-clipping global
    norms [E] float32. NaN/inf entries are zeroed before the norm (jax_privacy's `nan_safe`), so the bound
    holds whatever the input.
  """
  check_clip_norm(clip_norm)
  num = jax.tree.leaves(per_example_grads)[0].shape[0]
  padding = jnp.zeros((num,), bool) if example_mask is None else ~jnp.asarray(example_mask, bool)

  def one(grad, is_padding):
    return jp_clipping.clip_pytree(grad, clip_norm, nan_safe=True, return_zero=is_padding)

  return jax.vmap(one)(per_example_grads, padding)
