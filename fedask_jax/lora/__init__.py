"""LoRA for Flax NNX: a LoRA-capable linear layer, injection by PEFT's module-name rules into the library's
models and into a user's own, and the state helpers the federated round is built on.

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

Layers. The library's models are built from `Linear`, which carries the adapter itself. A user's model built from
`nnx.Linear`, `nnx.LinearGeneral` (without batch_axis) or `nnx.Einsum` (when its kernel is one in x out matrix)
gets the same adapter through `inject_lora`, which puts a `LoRAWrapper` around each selected layer: the layer
keeps its kernel, bias and call, and in, out are the kernel's contracted and produced axes, flattened. Both
kinds are `LoRALayer`s, and everything downstream (`lora_layers`, the round, the DP mechanisms, PEFT export)
treats them alike.

The package's modules: `fedask_jax.lora.layers` (`LoRAConfig`, the layers `LoRALayer`, `Linear` and
`LoRAWrapper`) and `fedask_jax.lora.injection` (`inject_lora`, `lora_layers`, `split_lora`, the conversion to and
from `fedask_jax.adapters.Adapters`, `merge_and_unload`). Every public name is importable from `fedask_jax.lora`.
"""

from fedask_jax.lora.injection import (
  from_adapters,
  inject_lora,
  lora_layers,
  merge_and_unload,
  path_name,
  set_wspace_probe,
  split_lora,
  to_adapters,
)
from fedask_jax.lora.layers import Linear, LoRAConfig, LoRALayer, LoRAWrapper, peft_lora_a_init
