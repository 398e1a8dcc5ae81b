"""LoRA on a whole model (`fedask_jax.lora`): injection by PEFT's module-name rules, the adapted layers by
path, the split into trained and frozen state and its conversion to `fedask_jax.adapters.Adapters`, and
`merge_and_unload`."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedask_jax.adapters import Adapters, LoRAFactors
from fedask_jax.lora.layers import LoRAConfig, LoRALayer, LoRAWrapper, _unsupported

Array = jax.Array


def path_name(path: Iterable[Any]) -> str:
  """('model', 'layers', 0, 'q_proj') -> 'model.layers.0.q_proj' (Hugging Face / PEFT module names)."""
  return ".".join(str(p) for p in path)


def lora_layers(model: nnx.Module) -> dict[str, LoRALayer]:
  """Every adapted layer (`Linear` or `LoRAWrapper`) of `model`, by dotted path, in a deterministic (graph)
  order."""
  return {path_name(p): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRALayer) and m.lora_a is not None}


def _child(node: Any, key: Any) -> Any:
  return node[key] if isinstance(key, int) or isinstance(node, Mapping) else getattr(node, key)


def _replace(model: nnx.Module, path: tuple[Any, ...], new: LoRAWrapper) -> None:
  """Put `new` at `path` of `model` (a Module attribute, or an entry of an nnx.List / nnx.Dict)."""
  if not path:
    raise ValueError(
      f"the model itself is a {type(new.base_module).__name__}: wrap it, fedask_jax.lora.LoRAWrapper(layer), and "
      "call add_lora on the wrapper."
    )
  parent: Any = functools.reduce(_child, path[:-1], model)
  if isinstance(path[-1], int) or isinstance(parent, Mapping):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def inject_lora(model: nnx.Module, config: LoRAConfig, key: Array, dtype: Any = jnp.float32) -> list[str]:
  """Add adapters to every linear layer of `model` whose dotted path matches `config` (PEFT's rule).

  The library's `Linear` layers get the adapter in place; a user's `nnx.Linear`, `nnx.LinearGeneral` or
  `nnx.Einsum` is replaced, at every path it is reachable by, with a `LoRAWrapper` around it (its kernel and
  bias untouched), so its LoRA variables live at `path.lora_a` / `path.lora_b` and its own at
  `path.base_module.kernel`. Each layer's key is `fold_in(key, index)`, index over the model's adaptable layers
  in graph order, so the same seed gives the same adapters. Returns the adapted paths.

  Raises ValueError when nothing matches (naming the model's adaptable layers), or when a matched layer has a
  kernel that LoRA cannot adapt (naming it and why: nnx.Conv, nnx.LinearGeneral with batch_axis, an nnx.Einsum
  whose kernel is not one matrix).
  """
  modules = list(nnx.iter_modules(model))
  wrapped = {p for p, m in modules if isinstance(m, LoRAWrapper)}
  adaptable, refused = [], {}
  for p, m in modules:
    if p[:-1] in wrapped and p[-1:] == ("base_module",):
      continue
    name = path_name(p)
    if isinstance(m, LoRALayer) or (hasattr(m, "kernel") and _unsupported(m) is None):
      adaptable.append((p, name, m))
    elif hasattr(m, "kernel") and config.matches(name):
      refused[name] = _unsupported(m)
  if refused:
    raise ValueError(
      f"lora.target_modules={config.target_modules!r} selects layers that LoRA cannot adapt: "
      + "; ".join(f"{name} ({reason})" for name, reason in refused.items())
      + ". Leave them out of target_modules."
    )
  aliases = {tuple(p): [tuple(q) for q in group] for group in nnx.find_duplicates(model) for p in group}
  adapted = []
  for i, (p, name, m) in enumerate(adaptable):
    if not config.matches(name):
      continue
    layer = m if isinstance(m, LoRALayer) else LoRAWrapper(m)
    layer.add_lora(config, jax.random.fold_in(key, i), dtype)
    if isinstance(layer, LoRAWrapper) and layer is not m:
      for q in aliases.get(tuple(p), [tuple(p)]):
        _replace(model, q, layer)
    adapted.append(name)
  if not adapted:
    names = sorted({name.rsplit(".", 1)[-1] for _, name, _ in adaptable})
    others = sorted(
      {
        type(m).__name__
        for p, m in modules
        if p and not isinstance(m, LoRALayer) and not any(m is a for _, _, a in adaptable)
      }
    )
    raise ValueError(
      f"lora.target_modules={config.target_modules!r} matches no linear layer of this model; available module "
      f"names: {names} (the last components of the paths of its layers that LoRA can adapt: "
      "fedask_jax.lora.Linear, nnx.Linear, nnx.LinearGeneral, nnx.Einsum; its other modules are "
      f"{others}). A name matches a layer whose dotted path equals it or ends with '.' + name: choose among "
      "these, or pass a regular expression over the whole path."
    )
  return adapted


def set_wspace_probe(model: nnx.Module, enabled: bool = True) -> None:
  """Switch the W-space probes of every adapted layer on or off (before `split_lora`: it is static)."""
  for layer in lora_layers(model).values():
    layer.wspace_probe = enabled


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, lora_state, frozen_state): what trains (`nnx.LoRAParam`) and everything else."""
  # Why the ignore: flax types split's result as (GraphDef, State, *State) whatever the filters; two filters give
  # exactly three parts.
  graphdef, lora_state, frozen_state = nnx.split(model, nnx.LoRAParam, ...)  # type: ignore[misc]
  return graphdef, lora_state, frozen_state


def to_adapters(lora_state: nnx.State) -> Adapters:
  """LoRA state -> {dotted path: LoRAFactors(lora_a, lora_b)}; works with leading batch axes on the leaves."""
  flat = nnx.to_flat_state(lora_state)
  pieces: dict[str, dict[str, Array]] = {}
  for path, var in flat:
    *module, leaf = path
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    pieces.setdefault(path_name(module), {})[str(leaf)] = value
  return {name: LoRAFactors(p["lora_a"], p["lora_b"]) for name, p in pieces.items()}


def from_adapters(lora_state: nnx.State, adapters: Adapters) -> nnx.State:
  """Replace the values of `lora_state` (a template with the same layers) by those of `adapters`."""
  flat = nnx.to_flat_state(lora_state)
  leaves = []
  for path, var in flat:
    *module, leaf = path
    factors = adapters[path_name(module)]
    value = getattr(factors, str(leaf))
    leaves.append((path, var.replace(value) if isinstance(var, nnx.Variable) else value))
  return nnx.from_flat_state(leaves)


def merge_and_unload(model: nnx.Module) -> None:
  """Fold every adapter into its base kernel (`kernel += lora_a @ lora_b * scaling`, float32 math, in the
  kernel's layout for a `LoRAWrapper`) and drop it (PEFT's `merge_and_unload`; a wrapper stays, calling its base
  module alone)."""
  for layer in lora_layers(model).values():
    layer.merge_adapter()
