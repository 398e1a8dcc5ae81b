"""The adapters as a plain pytree, and the model-free helpers over it (jax only, no Flax).

`Adapters` is a flat dict from an adapted module's dotted path (Hugging Face's names, e.g.
`model.layers.0.self_attn.q_proj`) to its `LoRAFactors(lora_a [in, r], lora_b [r, out])`; either factor may
carry leading batch axes (clients, examples), the last two axes being the matrix. Factor names, layout and the
paper's notation: `fedask_jax.lora`. A trained subset of adapters (`select`) is the same dict with the frozen
factor set to None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, Literal, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

from fedask_jax._checks import check_choice

Array = jax.Array

Trained = Literal["lora_a", "lora_b", "both"]
"""Which factor(s) a client trains in a round; the other stays frozen."""
TRAINED: tuple[str, ...] = ("lora_a", "lora_b", "both")


_Factor = TypeVar("_Factor", covariant=True)


class LoRAFactors(NamedTuple, Generic[_Factor]):
  """The two factors of one adapted layer: lora_a [..., in, r], lora_b [..., r, out].

  Generic in the factor type: `LoRAFactors[Array]` in full adapters, `LoRAFactors[Array | None]` in a trained
  subset (`select`), where the frozen factor is None.
  """

  lora_a: _Factor
  lora_b: _Factor


Adapters = dict[str, LoRAFactors[Array]]
"""{dotted module path: LoRAFactors} for every adapted layer (module docstring)."""
AdapterSubset = dict[str, LoRAFactors[Array | None]]
"""Adapters with the frozen factor of every layer set to None (`select`)."""


def check_trained(trained: str) -> None:
  """Raise ValueError unless `trained` is one of "lora_a", "lora_b", "both"."""
  check_choice("trained", trained, TRAINED, what="a client trains lora_a, lora_b or both; the factor(s)")


def select(adapters: Adapters, trained: Trained) -> AdapterSubset:
  """The trained subset: the same adapters with the frozen factor replaced by None."""
  check_trained(trained)
  return {
    name: LoRAFactors(f.lora_a if trained != "lora_b" else None, f.lora_b if trained != "lora_a" else None)
    for name, f in adapters.items()
  }


def combine(subset: Mapping[str, LoRAFactors[Array | None]], adapters: Adapters) -> Adapters:
  """Full adapters from a trained subset, taking each None factor from `adapters`."""
  return {
    name: LoRAFactors(
      s.lora_a if s.lora_a is not None else adapters[name].lora_a,
      s.lora_b if s.lora_b is not None else adapters[name].lora_b,
    )
    for name, s in subset.items()
  }


def stack_adapters(adapters: Sequence[Adapters]) -> Adapters:
  """List of K adapters -> one with a leading client axis [K, ...] on every factor."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def unstack_adapters(adapters: Adapters) -> list[Adapters]:
  """Inverse of `stack_adapters`."""
  k = jax.tree.leaves(adapters)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], adapters) for i in range(k)]
