"""DP-SGD gradients for LoRA: the B-space mechanism (clip and noise the trained factor's gradient) and the
W-space mechanism (clip and noise the gradient of the effective weight, then project by the frozen factor).

Notation (docs/design.md, section 1.1; factor names: `fedask_jax.lora`). An adapted layer computes
`y = x @ (W0 + s lora_a lora_b)`, lora_a [in, r], lora_b [r, out], s = alpha / r. FedASK trains lora_b with
lora_a frozen (`frozen_side="lora_a"`); fedask-alt also trains lora_a with lora_b frozen
(`frozen_side="lora_b"`).

Both mechanisms release, for one local step with a Poisson-sampled batch S (a mask over `capacity` slots,
`fedask_jax.privacy.sampling`),

    g = (sum_{i in S} clip_C(g_i) + N(0, sigma^2 C^2 I)) / (q n),

normalised by the expected batch size q n, not by `|S|`: dividing by the realised count would make the
sensitivity data-dependent, which the Poisson accounting (`fedask_jax.privacy.accounting`) does not allow.
The clipped sum has L2 sensitivity C under add/remove-one, so each step is the subsampled Gaussian mechanism
with noise multiplier sigma.

- B-space (`dp_gradient`, default, as the official code with Opacus): g_i = dl/dtheta_i for the trained
  parameters theta (the lora_b factors), clipped by their own global norm.
- W-space (`wspace_dp_gradient`, the paper's formula): clip dl/dW_i (global norm over all adapted layers),
  add W-space noise N, project: the lora_b gradient is (sum_i c_i dl/dlora_b_i + s lora_a^T N) / (q n),
  c_i = min(1, C / ||dl/dW_i||), since dl/dlora_b = s lora_a^T dl/dW. This is the post-processing of a Gaussian
  mechanism on dl/dW, so it has the same guarantee, and its clipping does not depend on the scale of lora_a.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax_privacy import clipping as jp_clipping

from fedask_jax._checks import check_choice, check_real
from fedask_jax.numerics import compute_dtype, einsum
from fedask_jax.privacy.clipping import _clip_scale, check_clip_norm

Array = jax.Array

FROZEN_SIDES = ("lora_a", "lora_b")


class DPStats(NamedTuple):
  """Per-step statistics of a DP gradient (not privatised: report them only inside the client).

  loss: mean loss over the real (sampled) examples, 0 when there are none.
  clipped_fraction: fraction of the real examples whose gradient norm exceeded C (NaN norms count as clipped).
  num_examples: number of real examples (int32).
  num_clipped: number of real examples whose gradient norm exceeded C, or was not finite (int32).
  num_nonfinite: number of real examples whose loss or gradient norm is not finite (int32): the clipping zeroes
  their gradients, and they make `loss` NaN.
  """

  loss: Array
  clipped_fraction: Array
  num_examples: Array
  num_clipped: Array
  num_nonfinite: Array


def check_noise_multiplier(noise_multiplier: Any, name: str = "noise_multiplier") -> None:
  """Raise ValueError unless sigma is a finite number >= 0 (a JAX array, traced, is not checked)."""
  check_real(
    name,
    noise_multiplier,
    0,
    what="sigma",
    traced_ok=True,
    hint=" (calibrate it with fedask_jax.privacy.calibrate_noise)",
  )


def check_dp_arguments(clip_norm: Any, noise_multiplier: Any, expected_batch_size: Any, prefix: str = "") -> None:
  """Raise ValueError unless C is finite and > 0, sigma finite and >= 0 and q n finite and > 0; `prefix` names
  their section in the messages (e.g. "dp."). JAX arrays (traced) are not checked."""
  check_clip_norm(clip_norm, prefix + "clip_norm")
  check_noise_multiplier(noise_multiplier, prefix + "noise_multiplier")
  check_real(
    prefix + "expected_batch_size",
    expected_batch_size,
    0,
    lo_open=True,
    what="the normaliser q n",
    traced_ok=True,
    hint=" (the Poisson rate times the client's number of examples, i.e. the configured batch size)",
  )


def _check_step(
  batch: Any, example_mask: Array, clip_norm: Any, noise_multiplier: Any, expected_batch_size: Any
) -> int:
  """Validate the arguments shared by both mechanisms; returns the capacity."""
  check_dp_arguments(clip_norm, noise_multiplier, expected_batch_size)
  if jnp.ndim(example_mask) != 1:
    raise ValueError(f"example_mask has shape {jnp.shape(example_mask)}: expected [capacity], one flag per slot.")
  capacity = jnp.shape(example_mask)[0]
  leading = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if leading != {capacity}:
    raise ValueError(
      f"batch leaves have leading axes {sorted(leading, key=str)} but example_mask has {capacity} slots: "
      "every batch leaf must have the leading example axis [capacity, ...]."
    )
  return capacity


def _stats(losses: Array, norms: Array, example_mask: Array, clip_norm: Any) -> DPStats:
  mask = jnp.asarray(example_mask, bool)
  count = jnp.sum(mask, dtype=jnp.int32)
  denominator = jnp.maximum(count, 1).astype(jnp.float32)
  loss = jnp.sum(jnp.where(mask, losses.astype(jnp.float32), 0.0)) / denominator
  clipped = jnp.sum(mask & ~(norms <= clip_norm), dtype=jnp.int32)
  nonfinite = jnp.sum(mask & ~(jnp.isfinite(losses) & jnp.isfinite(norms)), dtype=jnp.int32)
  return DPStats(loss, clipped / denominator, count, clipped, nonfinite)


def gaussian_noise(key: Array, tree: Any, stddev: float | Array) -> Any:
  """i.i.d. N(0, stddev^2) float32 noise shaped like `tree` (one key split over the leaves by optax)."""
  noise = optax.tree.random_like(key, tree, jax.random.normal, dtype=jnp.float32)
  return jax.tree.map(lambda n: stddev * n, noise)


def dp_gradient(
  per_example_loss: Callable[[Any, Any], Array],
  params: Any,
  batch: Any,
  example_mask: Array,
  key: Array,
  *,
  clip_norm: float | Array,
  noise_multiplier: float | Array,
  expected_batch_size: float | Array,
) -> tuple[Any, DPStats]:
  """B-space DP-SGD gradient: (sum of clipped per-example gradients + N(0, sigma^2 C^2 I)) / (q n).

  Args:
    per_example_loss: `(params, example) -> scalar` loss of one example (no batch axis); randomness such as
      dropout travels in the example (e.g. a per-example key).
    params: pytree of the trained parameters (FedASK: the lora_b factors).
    batch: pytree whose leaves have a leading axis [capacity, ...].
    example_mask: bool [capacity]; False marks padding slots, which contribute nothing (not even NaNs).
    key: PRNG key for the noise.
    clip_norm: C > 0, the per-example L2 clipping norm (global over `params`).
    noise_multiplier: sigma >= 0; noise std is sigma * C.
    expected_batch_size: q n, the normaliser (not the realised count; module docstring).

  Returns:
    (grad, DPStats): grad has the structure and dtypes of `params` (summed and noised in float32).

  The per-example clipped sum is `jax_privacy.clipping.clipped_grad`, whose `is_padding_example` zeroes the
  padding slots; the normalisation is done here because `clipped_grad`'s `normalize_by` must be a Python number
  and q n may be traced (vmapped clients of different sizes).
  """
  _check_step(batch, example_mask, clip_norm, noise_multiplier, expected_batch_size)
  mask = jnp.asarray(example_mask, bool)
  clipped_sum_fn = jp_clipping.clipped_grad(
    per_example_loss,
    argnums=0,
    l2_clip_norm=clip_norm,
    batch_argnums=1,
    keep_batch_dim=False,
    return_values=True,
    return_grad_norms=True,
    dtype=jnp.float32,
  )
  clipped_sum, aux = clipped_sum_fn(params, batch, is_padding_example=~mask)
  noise = gaussian_noise(key, clipped_sum, noise_multiplier * clip_norm)
  grad = jax.tree.map(
    lambda s, n, p: ((s + n) / expected_batch_size).astype(jnp.result_type(p)), clipped_sum, noise, params
  )
  return grad, _stats(aux.values, aux.grad_norms, mask, clip_norm)


def wspace_sq_norms(inputs: Array, output_grads: Array) -> Array:
  """Per-example ||X_e^T G_e||_F^2 [E] = ||dl/dW_e||_F^2 without forming the [in, out] gradient.

  inputs X: [E, T, in] (the layer's input for each example, T positions); output_grads G: [E, T, out]
  (dl/dy). Gram trick: ||X^T G||_F^2 = sum((X X^T) * (G G^T)), O(T^2 (in + out)) per example instead of
  O(T in out). Computed in float32 with `Precision.HIGHEST`: the result decides the clipping factor, and a
  TF32/bfloat16 pass could under-estimate it and let a clipped gradient exceed C.
  """
  if jnp.ndim(inputs) != 3 or jnp.ndim(output_grads) != 3 or jnp.shape(inputs)[:2] != jnp.shape(output_grads)[:2]:
    raise ValueError(
      f"inputs {jnp.shape(inputs)} and output_grads {jnp.shape(output_grads)}: expected [E, T, in] and "
      "[E, T, out] with the same examples E and positions T."
    )
  dtype = compute_dtype(inputs, output_grads)
  x = inputs.astype(dtype)
  g = output_grads.astype(dtype)
  input_gram = einsum("eti,esi->ets", x, x)
  output_gram = einsum("eto,eso->ets", g, g)
  return jnp.sum(input_gram * output_gram, axis=(1, 2))


def _check_side(frozen_side: str) -> None:
  check_choice(
    "frozen_side",
    frozen_side,
    FROZEN_SIDES,
    what="the frozen factor: 'lora_a' (lora_b trained: FedASK) or 'lora_b' (lora_a trained: fedask-alt's even rounds)",
  )


def _layer_dims(frozen_factor: Any, trained_shape: tuple[int, ...], frozen_side: str, name: str) -> tuple[int, int]:
  """(in, out) of a layer from its frozen factor and the trained factor's shape; checks that they chain."""
  fshape = tuple(jnp.shape(frozen_factor))
  if len(fshape) != 2 or len(trained_shape) != 2:
    raise ValueError(f"layer {name!r}: factors {fshape} and {trained_shape} must be matrices (no batch axes).")
  a_shape, b_shape = (fshape, trained_shape) if frozen_side == "lora_a" else (trained_shape, fshape)
  if a_shape[1] != b_shape[0]:
    raise ValueError(
      f"layer {name!r}: lora_a {a_shape} and lora_b {b_shape} do not chain; expected lora_a [in, r] and "
      f"lora_b [r, out] with frozen_side={frozen_side!r} naming the frozen one."
    )
  return a_shape[0], b_shape[1]


def projected_noise(
  key: Array, frozen_factor: Array, weight_shape: tuple[int, int], stddev: float | Array, frozen_side: str = "lora_a"
) -> Array:
  """W-space Gaussian noise N [in, out], N_ij ~ N(0, stddev^2), projected by the frozen factor, drawn in r dims.

  frozen_side "lora_a" (frozen lora_a [in, r]): returns a sample of lora_a^T N [r, out]; its columns are
  independent N(0, stddev^2 lora_a^T lora_a). frozen_side "lora_b" (frozen lora_b [r, out]): returns a sample of
  N lora_b^T [in, r]; its rows are independent N(0, stddev^2 lora_b lora_b^T). The in x out matrix N is never
  formed: with the thin QR lora_a = Q R (lora_b^T = Q R), lora_a^T N = R^T (Q^T N) and Q^T N is i.i.d.
  Gaussian, so R^T Z (Z R) with Z standard normal has exactly the law of the projection. QR rather than
  Cholesky of the r x r Gram lora_a^T lora_a: it does not square the condition number and it works when the
  Gram is singular (lora_b = 0 at PEFT's initialisation, a rank-deficient factor), where Cholesky returns NaN.
  In float32 or wider (docs/design.md, section 5.2).
  """
  _check_side(frozen_side)
  rank = jnp.shape(frozen_factor)[1] if frozen_side == "lora_a" else jnp.shape(frozen_factor)[0]
  trained_shape = (rank, weight_shape[1]) if frozen_side == "lora_a" else (weight_shape[0], rank)
  if _layer_dims(frozen_factor, trained_shape, frozen_side, "projected_noise") != tuple(weight_shape):
    raise ValueError(
      f"weight_shape={tuple(weight_shape)} does not match the frozen {frozen_side} {jnp.shape(frozen_factor)}: "
      f"expected (in, out) with lora_a [in, r], lora_b [r, out]."
    )
  return _projected_noise(key, frozen_factor, weight_shape, stddev, frozen_side)


def _projected_noise(
  key: Array, frozen_factor: Array, weight_shape: tuple[int, int], stddev: float | Array, frozen_side: str
) -> Array:
  dtype = compute_dtype(frozen_factor)
  factor = frozen_factor.astype(dtype)
  if frozen_side == "lora_a":
    r_factor = jnp.linalg.qr(factor, mode="r")  # [k, r], k = min(in, r); lora_a^T lora_a = R^T R
    z = jax.random.normal(key, (r_factor.shape[0], weight_shape[1]), dtype)
    return stddev * einsum("kr,ko->ro", r_factor, z)
  r_factor = jnp.linalg.qr(factor.T, mode="r")  # [k, r], k = min(out, r); lora_b lora_b^T = R^T R
  z = jax.random.normal(key, (weight_shape[0], r_factor.shape[0]), dtype)
  return stddev * einsum("ik,kr->ir", z, r_factor)


def wspace_dp_gradient(
  per_example_fn: Callable[[Mapping[str, Array], Mapping[str, Array] | None, Any], tuple[Array, Mapping[str, Array]]],
  params: Mapping[str, Array],
  batch: Any,
  example_mask: Array,
  key: Array,
  *,
  frozen: Mapping[str, Array],
  scaling: float | Mapping[str, float],
  clip_norm: float | Array,
  noise_multiplier: float | Array,
  expected_batch_size: float | Array,
  frozen_side: str = "lora_a",
) -> tuple[dict[str, Array], DPStats]:
  """W-space DP-SGD gradient of the trained LoRA factors (paper Algorithm 1, line "B <- B - ...").

  Returns, per layer, (sum_i c_i dl/dtheta_i + s P(N)) / (q n) with c_i = min(1, C / ||dl/dW_i||) (global
  norm over all layers, ||dl/dW_i||^2 = sum_layers ||X_i^T G_i||_F^2 by `wspace_sq_norms`), P(N) = lora_a^T N
  (frozen_side "lora_a", theta = lora_b) or N lora_b^T (frozen_side "lora_b", theta = lora_a) with
  N ~ N(0, sigma^2 C^2 I_{in x out})
  (`projected_noise`, key `fold_in(key, index)` of the layer in sorted-name order). No per-example or noise
  matrix of size in x out is formed.

  Protocol with the model (plain functions; a `fedask_jax.lora.Linear` with `wspace_probe` on provides it under
  `nnx.capture(model, nnx.Intermediate, init=perturbations)`):

    per_example_fn(params, perturbations, example) -> (loss, inputs)

  - params: {layer name: trained factor} (frozen_side "lora_a": lora_b [r, out]; "lora_b": lora_a [in, r]); the
    function puts them into the model. Every trained parameter must belong to a layer in `frozen`.
  - example: one example (the leaves of `batch` without the leading [capacity] axis).
  - perturbations: {layer name: `[*T, out]` zeros} added to each adapter's output `s (h lora_a) lora_b` (T: the
    example's token axes, e.g. [seq] or [1, seq]); so d loss / d perturbations[name] = G = dl/dy `[*T, out]`. The
    mechanism calls the function once with perturbations=None under `jax.eval_shape`, to learn the token
    shape: with None it must run without perturbing.
  - inputs: {layer name: h `[*T, in]`}, the input of the adapter (after LoRA dropout, if any): dl/dW = h^T G.
  - loss: scalar loss of the example.

  Args:
    per_example_fn: as above.
    params: {name: trained factor}.
    batch: pytree with a leading axis [capacity, ...].
    example_mask: bool [capacity]; False marks padding slots (they contribute nothing).
    key: PRNG key for the noise.
    frozen: {name: frozen factor} (lora_a [in, r] for frozen_side "lora_a", lora_b [r, out] for "lora_b"), same
      names as params.
    scaling: s = alpha / r, one float for every layer or {name: s}.
    clip_norm: C > 0 on ||dl/dW||.
    noise_multiplier: sigma >= 0; W-space noise std sigma * C.
    expected_batch_size: q n.
    frozen_side: "lora_a" (default, FedASK) or "lora_b".

  Returns:
    (grad {name: same shape and dtype as params[name]}, DPStats with the W-space norms).
  """
  _check_side(frozen_side)
  capacity = _check_step(batch, example_mask, clip_norm, noise_multiplier, expected_batch_size)
  names = sorted(frozen)
  if sorted(params) != names:
    raise ValueError(
      f"params has layers {sorted(params)} but frozen has {names}: pass the trained and the frozen factor of "
      "the same adapted layers."
    )
  if not isinstance(scaling, Mapping):
    scaling = {name: scaling for name in names}
  elif sorted(scaling) != names:
    raise ValueError(f"scaling has layers {sorted(scaling)} but frozen has {names}: give one s = alpha / r per layer.")
  dims = {n: _layer_dims(frozen[n], tuple(jnp.shape(params[n])), frozen_side, n) for n in names}

  example_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)), batch)
  _, input_specs = jax.eval_shape(per_example_fn, params, None, example_spec)
  if sorted(input_specs) != names or any(input_specs[n].shape[-1:] != dims[n][:1] for n in names):
    got = {n: tuple(s.shape) for n, s in input_specs.items()}
    raise ValueError(
      f"per_example_fn returned inputs {got}; expected one [*T, in] input per layer of {dims} ((in, out) "
      "per layer): record each adapter's input h (see the protocol in the docstring)."
    )
  zeros = {n: jnp.zeros(input_specs[n].shape[:-1] + (dims[n][1],), input_specs[n].dtype) for n in names}

  def per_example(example):
    fn = lambda perturbations: per_example_fn(params, perturbations, example)
    (loss, inputs), output_grads = jax.value_and_grad(fn, has_aux=True)(zeros)
    return loss, inputs, output_grads

  losses, inputs, output_grads = jax.vmap(per_example)(batch)
  # One set of float32 (or wider) h and G serves both the norms and the sum: the sensitivity bound C holds for
  # sum_i c_i h_i^T G_i of the very h_i, G_i whose norms set c_i. An autodiff gradient of the factor would be
  # computed in the activations' dtype instead (about 2e-3 relative off with a bfloat16 base model).
  dtype = compute_dtype(*inputs.values(), *output_grads.values())
  x = {n: inputs[n].reshape(capacity, -1, dims[n][0]).astype(dtype) for n in names}
  g = {n: output_grads[n].reshape(capacity, -1, dims[n][1]).astype(dtype) for n in names}
  norms = jnp.sqrt(sum(wspace_sq_norms(x[n], g[n]) for n in names))
  mask = jnp.asarray(example_mask, bool)
  weights = jnp.where(mask, _clip_scale(norms, clip_norm), 0.0)
  # A select, not a multiplication by the weight 0: a padding slot or a non-finite example would still poison
  # the sum (0 * NaN is NaN).
  keep = (weights > 0)[:, None, None]
  grad = {}
  for i, n in enumerate(names):
    xn = jnp.where(keep, x[n], 0.0)
    gn = jnp.where(keep, g[n], 0.0) * weights[:, None, None].astype(dtype)
    factor = frozen[n].astype(dtype)
    # dl/dlora_b = s lora_a^T h^T G, dl/dlora_a = s h^T G lora_b^T (y += s (h lora_a) lora_b), summed over
    # examples and positions without forming an [in, out] matrix.
    if frozen_side == "lora_a":
      clipped_sum = einsum("etr,eto->ro", einsum("eti,ir->etr", xn, factor), gn)
    else:
      clipped_sum = einsum("eti,etr->ir", xn, einsum("eto,ro->etr", gn, factor))
    noise = _projected_noise(jax.random.fold_in(key, i), frozen[n], dims[n], noise_multiplier * clip_norm, frozen_side)
    grad[n] = (scaling[n] * (clipped_sum + noise) / expected_batch_size).astype(jnp.result_type(params[n]))
  return grad, _stats(losses, norms, mask, clip_norm)
