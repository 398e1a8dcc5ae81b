"""LoRA for Flax NNX: a LoRA-capable linear layer, injection by PEFT's module-name rules, and the state helpers
the federated round is built on.

Factor names. The package names the factors as Flax and PEFT do, everywhere. A `Linear` computes
`y = x @ kernel + bias` with `kernel` [in, out] (Flax layout; the transpose of PyTorch's `nn.Linear.weight`);
with LoRA, `y += dropout(x) @ lora_a @ lora_b * scaling`, `scaling = alpha / r`:

| here | shape | PEFT | the paper (`W = W0 + B A`, `y = W x`) |
| --- | --- | --- | --- |
| `lora_a` | [in, r] | `lora_A.weight` transposed | A^T (A [r, in]) |
| `lora_b` | [r, out] | `lora_B.weight` transposed | B^T (B [out, r]) |
| `lora_a @ lora_b * scaling` | [in, out] | the merged update, transposed | (s B A)^T |

FedASK under DP trains lora_b (the paper's B) with lora_a (the paper's A) frozen; PEFT initialises lora_b to
zero, so the first update is lora_b's.

The factors are `nnx.LoRAParam` variables, so `split_lora` (`nnx.split(model, nnx.LoRAParam, ...)`) separates
what trains from what stays frozen, and `nnx.merge(graphdef, lora_state, frozen_state)` puts them back. The
federated round works on `fedask_jax.adapters.Adapters`, {dotted module path: LoRAFactors(lora_a, lora_b)};
`to_adapters` and `from_adapters` convert.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedask_jax._checks import check_int, check_real
from fedask_jax.adapters import Adapters, LoRAFactors

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


class Linear(nnx.Module):
  """A linear layer `y = x @ kernel + bias` that can carry a LoRA adapter.

  kernel: [in, out] `nnx.Param` (frozen in LoRA training); bias: [out] `nnx.Param` or None;
  lora_a: [in, r] and lora_b: [r, out] `nnx.LoRAParam`, or None when the layer is not adapted.

  `wspace_probe` (static, default False) makes the layer record what the W-space DP mechanism needs to clip
  per-example gradients of the full weight without forming them (see `fedask_jax.privacy`): its input is
  sown as `nnx.Intermediate` `lora_input` and its adapter output perturbed as `nnx.Perturbation`
  `lora_output`, so that inside `nnx.capture` the gradient w.r.t. the perturbation is dl/dy.
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
    self.in_features = in_features
    self.out_features = out_features
    # Weights are overwritten by the loader; zeros keep construction cheap and deterministic.
    self.kernel = nnx.Param(jnp.zeros((in_features, out_features), dtype))
    # nnx.data: these attributes hold variables or submodules once set, even when they start as None.
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None)
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
          f"{self.in_features} x {self.out_features} layer: choose rank <= {min(self.in_features, self.out_features)}.")
    self.lora_a = nnx.LoRAParam(peft_lora_a_init(key, (self.in_features, r), dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((r, self.out_features), dtype))
    self.scaling = config.scaling
    if config.dropout > 0:
      self.lora_dropout = nnx.Dropout(config.dropout, rngs=nnx.Rngs(dropout=jax.random.fold_in(key, 1)))

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel[...]
    y = jnp.matmul(x, kernel.astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.lora_a is not None:
      h = self.lora_dropout(x) if self.lora_dropout is not None else x
      if self.wspace_probe:
        self.sow(nnx.Intermediate, "lora_input", h)
      delta = (h @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype) * self.scaling
      if self.wspace_probe:
        delta = self.perturb("lora_output", delta)
      y = y + delta
    return y


def path_name(path: Iterable[Any]) -> str:
  """('model', 'layers', 0, 'q_proj') -> 'model.layers.0.q_proj' (Hugging Face / PEFT module names)."""
  return ".".join(str(p) for p in path)


def lora_layers(model: nnx.Module) -> dict[str, Linear]:
  """Every adapted `Linear` of `model`, by dotted path, in a deterministic (graph) order."""
  return {path_name(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None}


def inject_lora(model: nnx.Module, config: LoRAConfig, key: Array, dtype: Any = jnp.float32) -> list[str]:
  """Add adapters to every `Linear` of `model` whose dotted path matches `config` (PEFT's rule).

  Each layer's key is `fold_in(key, index)` in graph order, so the same seed gives the same adapters.
  Returns the adapted paths. Raises ValueError naming the available linear layers when nothing matches.
  """
  linears = [(path_name(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
  adapted = []
  for i, (name, layer) in enumerate(linears):
    if config.matches(name):
      layer.add_lora(config, jax.random.fold_in(key, i), dtype)
      adapted.append(name)
  if not adapted:
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    raise ValueError(
        f"lora.target_modules={config.target_modules!r} matches no linear layer of this model; "
        f"available module names: {names}.")
  return adapted


def set_wspace_probe(model: nnx.Module, enabled: bool = True) -> None:
  """Switch the W-space probes of every adapted layer on or off (before `split_lora`: it is static)."""
  for layer in lora_layers(model).values():
    layer.wspace_probe = enabled


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, lora_state, frozen_state): what trains (`nnx.LoRAParam`) and everything else."""
  graphdef, lora_state, frozen_state = nnx.split(model, nnx.LoRAParam, ...)
  return graphdef, lora_state, frozen_state


def to_adapters(lora_state: nnx.State) -> Adapters:
  """LoRA state -> {dotted path: LoRAFactors(lora_a, lora_b)}; works with leading batch axes on the leaves."""
  flat = nnx.to_flat_state(lora_state)
  pieces: dict[str, dict[str, Array]] = {}
  for path, var in flat:
    *module, leaf = path
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    pieces.setdefault(path_name(module), {})[leaf] = value
  return {name: LoRAFactors(p["lora_a"], p["lora_b"]) for name, p in pieces.items()}


def from_adapters(lora_state: nnx.State, adapters: Adapters) -> nnx.State:
  """Replace the values of `lora_state` (a template with the same layers) by those of `adapters`."""
  flat = nnx.to_flat_state(lora_state)
  leaves = []
  for path, var in flat:
    *module, leaf = path
    factors = adapters[path_name(module)]
    value = getattr(factors, leaf)
    leaves.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
  return nnx.from_flat_state(leaves)


def merge_and_unload(model: nnx.Module) -> None:
  """Fold every adapter into its base kernel (`kernel += lora_a @ lora_b * scaling`, float32 math) and drop it
  (PEFT's `merge_and_unload`)."""
  for layer in lora_layers(model).values():
    kernel = layer.kernel[...]
    delta = (layer.lora_a[...].astype(jnp.float32) @ layer.lora_b[...].astype(jnp.float32)) * layer.scaling
    layer.kernel = nnx.Param((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    layer.lora_a = None
    layer.lora_b = None
    layer.lora_dropout = None
