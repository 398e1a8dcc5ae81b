"""Numerics shared by the sketch, the privacy mechanisms and the strategies (docs/design.md, section 5.1).

- Linear algebra runs in float32 or wider whatever the inputs' dtype (`compute_dtype`), and contractions use
  `Precision.HIGHEST` (`einsum`), so GPUs and TPUs do not drop to TF32 or bfloat16 passes.
- Client weights are normalised once, where the round receives them (`normalise_weights`, called by
  `fedask_jax.simulation.server_step`); the functions downstream take normalised weights as they are.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """float32, or wider when an input is wider (float64 with x64 enabled)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def normalise_weights(weights: Any) -> Array:
  """w / sum(w) [K] float32 for non-negative weights [K]; all-zero weights stay zero instead of giving NaN."""
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(weights)
  return weights / jnp.where(total > 0, total, 1.0)
