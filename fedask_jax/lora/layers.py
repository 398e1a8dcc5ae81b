"""The LoRA layers (`fedask_jax.lora`: factor names and the paper's notation): `LoRAConfig`, PEFT's
initialisation, the adapter part `LoRALayer`, the library's `Linear` and `LoRAWrapper` around a user's
nnx.Linear, nnx.LinearGeneral or nnx.Einsum."""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedask_jax._checks import check_int, check_real

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """LoRA hyper-parameters, with PEFT's semantics.

  Attributes:
    rank: r, the adapter rank (>= 1).
    alpha: the scaling numerator; the adapter output is multiplied by `alpha / rank` (PEFT's default,
      not rsLoRA).
    target_modules: module names to adapt. A sequence matches a module whose dotted path equals a name or
      ends with `"." + name` (so `("q_proj", "v_proj")` adapts every attention layer); a single string is a
      regular expression that must match the whole path (`re.fullmatch`), as in PEFT.
    dropout: dropout rate on the adapter's input (PEFT's `lora_dropout`).
  """

  rank: int
  alpha: float
  target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.target_modules, list):
      object.__setattr__(self, "target_modules", tuple(self.target_modules))
    check_int("lora.rank", self.rank, 1)
    check_real("lora.alpha", self.alpha, 0, lo_open=True, hint=" (PEFT uses alpha = 2 * rank)")
    check_real("lora.dropout", self.dropout, 0, 1, hi_open=True)
    if not self.target_modules:
      raise ValueError("lora.target_modules is empty: name at least one module, e.g. [q_proj, v_proj].")
    if not isinstance(self.target_modules, str) and not all(self.target_modules):
      raise ValueError(f"lora.target_modules={list(self.target_modules)} holds an empty name: remove it.")

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def matches(self, path: str) -> bool:
    """Whether the module at dotted `path` is adapted (PEFT's `check_target_module_exists`)."""
    if isinstance(self.target_modules, str):
      return re.fullmatch(self.target_modules, path) is not None
    return any(path == name or path.endswith("." + name) for name in self.target_modules)


def peft_lora_a_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """PEFT's default lora_A initialisation, in Flax layout [in, r].

  PEFT calls `nn.init.kaiming_uniform_(lora_A.weight, a=sqrt(5))` on the [r, in] weight: fan_in = in, gain
  sqrt(2 / (1 + 5)), so the bound is gain * sqrt(3 / fan_in) = 1 / sqrt(in).
  """
  fan_in = shape[0]
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class LoRALayer(nnx.Module):
  """The adapter part that `Linear` and `LoRAWrapper` share: a linear map of in_features -> out_features
  (flattened) that can carry `y += dropout(h) @ lora_a @ lora_b * scaling`, h the input [..., in].

  lora_a: [in, r] and lora_b: [r, out] `nnx.LoRAParam`, or None when the layer is not adapted.

  `wspace_probe` (static, default False) makes the layer record what the W-space DP mechanism needs to clip
  per-example gradients of the full weight without forming them (see `fedask_jax.privacy`): its adapter input h
  is sown as `nnx.Intermediate` `lora_input` and its adapter output perturbed as `nnx.Perturbation`
  `lora_output`, so that inside `nnx.capture` the gradient w.r.t. the perturbation is dl/dy.
  """

  def _init_adapter(self, in_features: int, out_features: int) -> None:
    self.in_features = in_features
    self.out_features = out_features
    # nnx.data: these attributes hold variables or submodules once set, even when they start as None.
    self.lora_a: nnx.LoRAParam | None = nnx.data(None)
    self.lora_b: nnx.LoRAParam | None = nnx.data(None)
    self.scaling = 0.0
    self.lora_dropout: nnx.Dropout | None = nnx.data(None)
    self.wspace_probe = False

  def add_lora(self, config: LoRAConfig, key: Array, dtype: Any = jnp.float32) -> None:
    """Attach a fresh adapter: lora_a with PEFT's init, lora_b zeros (so the model is unchanged)."""
    r = config.rank
    if r > min(self.in_features, self.out_features):
      raise ValueError(
        f"lora.rank={r} exceeds min(in, out) = {min(self.in_features, self.out_features)} of a "
        f"{self.in_features} x {self.out_features} layer: choose rank <= {min(self.in_features, self.out_features)}."
      )
    self.lora_a = nnx.LoRAParam(peft_lora_a_init(key, (self.in_features, r), dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((r, self.out_features), dtype))
    self.scaling = config.scaling
    if config.dropout > 0:
      self.lora_dropout = nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=jax.random.fold_in(key, 1)))

  def lora_params(self) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """(lora_a, lora_b) of an adapted layer; ValueError when the layer has no adapter."""
    if self.lora_a is None or self.lora_b is None:
      raise ValueError(
        f"this {type(self).__name__} has no LoRA adapter: add one with inject_lora (or import_peft) first."
      )
    return self.lora_a, self.lora_b

  def adapter_output(self, h: Array) -> Array:
    """s (dropout(h) lora_a) lora_b [..., out] for the adapter input h [..., in], in h's dtype."""
    lora_a, lora_b = self.lora_params()
    if self.lora_dropout is not None:
      h = self.lora_dropout(h)
    if self.wspace_probe:
      self.sow(nnx.Intermediate, "lora_input", h)
    delta = (h @ lora_a[...].astype(h.dtype)) @ lora_b[...].astype(h.dtype) * self.scaling
    if self.wspace_probe:
      delta = self.perturb("lora_output", delta)
    return delta

  def merged_update(self) -> Array:
    """lora_a @ lora_b * scaling [in, out] in float32 (the update `merge_and_unload` folds into the weight)."""
    lora_a, lora_b = self.lora_params()
    return (lora_a[...].astype(jnp.float32) @ lora_b[...].astype(jnp.float32)) * self.scaling

  def merge_adapter(self) -> None:
    """Fold the adapter into the base weight and drop it (`merge_and_unload`); each layer kind implements it."""
    raise NotImplementedError(f"{type(self).__name__} does not implement merge_adapter.")

  def _drop_adapter(self) -> None:
    self.lora_a = None
    self.lora_b = None
    self.lora_dropout = None


class Linear(LoRALayer):
  """A linear layer `y = x @ kernel + bias` that can carry a LoRA adapter (`LoRALayer`), the layer of the
  library's own models (`fedask_jax.models`), whose loaders write the checkpoint's weights into it.

  kernel: [in, out] `nnx.Param` (frozen in LoRA training); bias: [out] `nnx.Param` or None. With `rngs` the
  kernel is drawn as `nnx.Linear` draws it (LeCun normal from `rngs.params()`, bias zeros: the same values as
  `nnx.Linear(in, out, rngs=rngs)`); without, it starts at zero for a loader to fill.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = False,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    if rngs is None:
      kernel = jnp.zeros((in_features, out_features), dtype)
    else:
      kernel = nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features), dtype)
      if use_bias:
        rngs.params()  # nnx.Linear draws a bias key too: keep the stream in step with it
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None)
    self._init_adapter(in_features, out_features)

  def __call__(self, x: Array) -> Array:
    y = jnp.matmul(x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.lora_a is not None:
      y = y + self.adapter_output(x)
    return y

  def merge_adapter(self) -> None:
    kernel = self.kernel[...]
    self.kernel = nnx.Param((kernel.astype(jnp.float32) + self.merged_update()).astype(kernel.dtype))
    self._drop_adapter()


class _Contraction(NamedTuple):
  """A kernel's einsum `inputs,kernel->outputs` read as a linear map of in = prod(contracted axes) features to
  out = prod(produced axes) features; `rest` is the input's spec without the contracted axes."""

  inputs: str
  kernel: str
  outputs: str
  contracted: str
  produced: str
  rest: str


def _contraction(spec: str) -> _Contraction:
  """Parse `spec` ("inputs,kernel->outputs", '...' allowed outside the kernel); ValueError naming why the
  kernel is not one in x out matrix."""
  operands, _, outputs = spec.partition("->")
  inputs, _, kernel = operands.partition(",")
  letters = lambda part: part.replace("...", "")
  if "." in kernel or not outputs or any(len(set(letters(p))) != len(letters(p)) for p in (inputs, kernel, outputs)):
    raise ValueError(f"einsum {spec!r} is not of the form 'inputs,kernel->outputs' with distinct axis letters")
  if ("..." in inputs) != ("..." in outputs):
    raise ValueError(f"einsum {spec!r} sums over the input's '...' axes")
  shared = [c for c in kernel if c in inputs and c in outputs]
  if shared:
    raise ValueError(
      f"kernel axes {shared} of einsum {spec!r} are also in the input and the output (a batch of "
      "weights, one matrix per entry): no single in x out matrix to adapt"
    )
  dropped = [c for c in letters(inputs) + kernel if c not in outputs and not (c in inputs and c in kernel)]
  if dropped:
    raise ValueError(f"einsum {spec!r} sums over axes {dropped} that are not contracted with the kernel")
  contracted = "".join(c for c in kernel if c in inputs)
  produced = "".join(c for c in kernel if c in outputs)
  if not contracted or not produced:
    raise ValueError(f"einsum {spec!r} has no {'input' if not contracted else 'output'} feature axis in the kernel")
  rest = "".join(c for c in inputs if c not in contracted)
  return _Contraction(inputs, kernel, outputs, contracted, produced, rest)


def _base_contraction(base: nnx.Module, ndim: int) -> _Contraction:
  """The einsum of `base` (nnx.Linear, nnx.LinearGeneral, nnx.Einsum) on an input of rank `ndim`."""
  if isinstance(base, nnx.LinearGeneral):
    axes = [a % ndim for a in base.axis]
    names = string.ascii_letters[:ndim]
    produced = string.ascii_letters[ndim : ndim + len(base.out_features)]
    kernel = "".join(names[a] for a in axes) + produced
    outputs = "".join(c for i, c in enumerate(names) if i not in axes) + produced
    return _contraction(f"{names},{kernel}->{outputs}")
  if isinstance(base, nnx.Einsum):
    return _contraction(base.einsum_str)
  return _contraction("...i,io->...o")


def _kernel_axes(base: nnx.Module) -> tuple[str, str, str]:
  """(kernel spec, contracted axes, produced axes) of `base`'s kernel, the axes in the kernel's order."""
  if isinstance(base, nnx.LinearGeneral):  # kernel [*in_features, *out_features]
    kernel = string.ascii_letters[: len(base.in_features) + len(base.out_features)]
    return kernel, kernel[: len(base.in_features)], kernel[len(base.in_features) :]
  c = _base_contraction(base, 1)
  return c.kernel, c.contracted, c.produced


def _unsupported(module: nnx.Module) -> str | None:
  """Why LoRA cannot wrap `module` (a layer with a kernel), or None when `LoRAWrapper` can."""
  kind = type(module).__name__
  if isinstance(module, nnx.LoRALinear):
    return "nnx.LoRALinear carries Flax's own LoRA: build the model with nnx.Linear and let inject_lora add the adapter"
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      return (
        f"nnx.LinearGeneral with batch_axis={dict(module.batch_axis)} holds one matrix per batch entry: no "
        "single in x out matrix to adapt"
      )
    return None
  if isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      return "nnx.Einsum without a constructor einsum_str: its contraction is only known at call time"
    try:
      _contraction(module.einsum_str)
    except ValueError as err:
      return f"nnx.Einsum: {err}"
    return None
  if isinstance(module, nnx.Linear):
    return None
  return (
    f"{kind} is not a linear map that LoRA here knows (fedask_jax.lora.Linear, nnx.Linear, "
    "nnx.LinearGeneral, nnx.Einsum)"
  )


class LoRAWrapper(LoRALayer):
  """A LoRA adapter around a user's linear layer, `inject_lora`'s replacement for `nnx.Linear`,
  `nnx.LinearGeneral` (without batch_axis) and `nnx.Einsum` (when its kernel is one matrix: every kernel axis
  either contracted with the input or produced in the output).

  `base_module` is the original layer, called unchanged (its kernel, bias, dtype and precision as the user built
  them; its variables stay `nnx.Param`, frozen). The kernel, read as a matrix [in, out] with in = the product of
  the contracted axes and out = the product of the produced axes (in the kernel's axis order), gets the
  adapter: `y = base_module(x) + s (h lora_a) lora_b`, h [..., in] the input with its contracted axes moved last
  and flattened, the adapter output [..., out] unflattened and moved to the output's layout. For nnx.Linear
  that is `x @ kernel + bias + s (x lora_a) lora_b`, lora_a [in, r], lora_b [r, out], as `Linear`.
  """

  def __init__(self, base_module: nnx.Module):
    reason = _unsupported(base_module)
    if reason is not None:
      raise ValueError(f"LoRAWrapper({type(base_module).__name__}): {reason}.")
    if not isinstance(base_module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
      raise ValueError(f"LoRAWrapper({type(base_module).__name__}): wraps nnx.Linear, nnx.LinearGeneral or nnx.Einsum.")
    self.base_module: nnx.Linear | nnx.LinearGeneral | nnx.Einsum = base_module
    kernel, contracted, produced = _kernel_axes(base_module)
    dims = dict(zip(kernel, base_module.kernel.shape))
    self._init_adapter(math.prod(dims[a] for a in contracted), math.prod(dims[a] for a in produced))

  def __call__(self, x: Array, **kwargs: Any) -> Array:
    if kwargs.get("einsum_str") is not None:
      raise ValueError("LoRAWrapper(nnx.Einsum) applies the einsum_str it was built with; do not pass one per call.")
    y = self.base_module(x, **kwargs)
    if self.lora_a is None:
      return y
    c = _base_contraction(self.base_module, x.ndim)
    h = jnp.einsum(f"{c.inputs}->{c.rest}{c.contracted}", x)
    h = h.reshape(*h.shape[: h.ndim - len(c.contracted)], self.in_features)
    delta = self.adapter_output(h)
    dims = dict(zip(c.kernel, self.base_module.kernel.shape))
    delta = delta.reshape(*delta.shape[:-1], *(dims[a] for a in c.produced))
    return y + jnp.einsum(f"{c.rest}{c.produced}->{c.outputs}", delta).astype(y.dtype)

  def kernel_update(self) -> Array:
    """The merged update `lora_a @ lora_b * scaling` in the base kernel's layout and shape (float32)."""
    kernel, contracted, produced = _kernel_axes(self.base_module)
    dims = dict(zip(kernel, self.base_module.kernel.shape))
    update = self.merged_update().reshape(*(dims[a] for a in contracted + produced))
    return jnp.einsum(f"{contracted}{produced}->{kernel}", update)

  def merge_adapter(self) -> None:
    kernel = self.base_module.kernel
    kernel[...] = (kernel[...].astype(jnp.float32) + self.kernel_update()).astype(kernel.dtype)
    self._drop_adapter()
