"""Loading Hugging Face checkpoints: config.json -> model config, safetensors (one file, or shards listed in
model.safetensors.index.json) -> parameters, from a local directory or a hub id, optionally with fresh LoRA
adapters; tokenizers through transformers' AutoTokenizer.

Tensor names: each family maps its parameter paths to Hugging Face tensor names explicitly
(`llama.hf_tensor_name`, `gpt2.hf_tensor_name`): `nn.Linear` weights [out, in] are transposed to kernels
[in, out], GPT-2's Conv1D weights are already [in, out]. Checkpoints saved from the bare backbone (names
without `model.` / `transformer.`) load too.

The model is first built abstractly (`nnx.eval_shape`), so no parameter is allocated twice; each tensor is
read once, converted to the requested dtype (bfloat16 checkpoints load exactly into bfloat16 parameters) and
placed on the default device.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

from fedask_jax.lora import Linear, LoRAConfig, inject_lora
from fedask_jax.models import gpt2, llama
from fedask_jax.models.layers import Embedding

Array = jax.Array
Model = llama.LlamaForCausalLM | gpt2.GPT2LMHeadModel


class Family(NamedTuple):
  """How to build and fill one model family from a Hugging Face checkpoint."""

  config_from_hf: Callable[[dict[str, Any]], Any]
  model: type
  hf_tensor_name: Callable[[tuple[Any, ...]], tuple[str, bool]]
  base_prefix: str
  ignored_tensors: str


_LLAMA = Family(
  llama.LlamaConfig.from_hf, llama.LlamaForCausalLM, llama.hf_tensor_name, llama.BASE_PREFIX, llama.IGNORED_TENSORS
)
FAMILIES: dict[str, Family] = {
  "llama": _LLAMA,
  "qwen2": _LLAMA,
  "gpt2": Family(
    gpt2.GPT2Config.from_hf, gpt2.GPT2LMHeadModel, gpt2.hf_tensor_name, gpt2.BASE_PREFIX, gpt2.IGNORED_TENSORS
  ),
}

# What a hub download fetches: the config, the safetensors weights and the tokenizer files (fast tokenizer,
# BPE vocab/merges, SentencePiece models), not PyTorch/TF/Flax pickles.
HUB_PATTERNS = (
  "config.json",
  "generation_config.json",
  "*.safetensors",
  "model.safetensors.index.json",
  "tokenizer*",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "*.model",
  "*.tiktoken",
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_dir(path_or_hub_id: str | Path) -> Path:
  """A local checkpoint directory, or a hub id ("org/name") downloaded with `huggingface_hub.snapshot_download`
  (config, safetensors and tokenizer files only; cached by huggingface_hub)."""
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  text = str(path_or_hub_id)
  if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
    raise ValueError(
      f"{text!r} is not a checkpoint directory (nor a hub id of the form 'org/name'): pass a directory "
      "holding config.json and *.safetensors, or a Hugging Face hub id."
    )
  from huggingface_hub import snapshot_download  # only needed for hub ids

  return Path(snapshot_download(repo_id=text, allow_patterns=list(HUB_PATTERNS)))


def read_hf_config(directory: Path) -> dict[str, Any]:
  """The checkpoint's config.json as a dict."""
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise ValueError(f"{directory} has no config.json: it is not a Hugging Face model checkpoint.")
  return json.loads(config_file.read_text())


def family_of(hf_config: dict[str, Any]) -> Family:
  """The family that implements `hf_config["model_type"]`."""
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"model_type={model_type!r} is not supported: fedask_jax.models implements {sorted(FAMILIES)}.")
  return FAMILIES[model_type]


def config_from_hf(hf_config: dict[str, Any]) -> llama.LlamaConfig | gpt2.GPT2Config:
  """A Hugging Face config.json dict -> our model config (LlamaConfig for llama/qwen2, GPT2Config for gpt2)."""
  return family_of(hf_config).config_from_hf(hf_config)


def tensor_files(directory: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file holding it (sharded checkpoints: from the index's weight_map)."""
  index = directory / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / file for name, file in weight_map.items()}
  single = directory / SINGLE_FILE
  if not single.is_file():
    raise ValueError(
      f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: only safetensors checkpoints are read "
      "(convert PyTorch .bin weights with transformers' save_pretrained(..., safe_serialization=True))."
    )
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def load_weights(model: Model, directory: Path, family: Family, dtype: Any) -> None:
  """Fill every `nnx.Param` of `model` from the safetensors files in `directory`, cast to `dtype`.

  Raises ValueError naming missing tensors or shape mismatches; warns about unused tensors.
  """
  files = tensor_files(directory)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  sources: dict[str, tuple[tuple[Any, ...], bool]] = {}
  missing = []
  for path, _ in params:
    name, transpose = family.hf_tensor_name(path)
    bare = name.removeprefix(family.base_prefix)
    source = name if name in files else bare if bare in files else None
    if source is None:
      missing.append(name)
    else:
      sources[source] = (path, transpose)
  if missing:
    raise ValueError(
      f"checkpoint {directory} lacks {len(missing)} tensor(s) the model needs: {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''}. Is config.json the one these weights were saved with?"
    )
  unused = sorted(n for n in files if n not in sources and not re.fullmatch(family.ignored_tensors, n))
  if unused:
    warnings.warn(f"checkpoint {directory} has tensors the model does not use: {unused[:8]}", stacklevel=3)

  values: dict[tuple[Any, ...], Array] = {}
  expected = {path: var.get_value() for path, var in params}
  by_file: dict[Path, list[str]] = {}
  for name in sources:
    by_file.setdefault(files[name], []).append(name)
  for file, names in by_file.items():
    with safe_open(file, framework="numpy") as f:
      for name in names:
        path, transpose = sources[name]
        array = f.get_tensor(name)
        array = array.T if transpose else array
        if array.shape != expected[path].shape:
          raise ValueError(
            f"tensor {name!r} in {file.name} has shape {array.shape}{' after transposing' if transpose else ''}, "
            f"but the model built from config.json needs {expected[path].shape} at {'.'.join(map(str, path))}."
          )
        values[path] = jnp.asarray(array, dtype=dtype)
  nnx.update(model, nnx.from_flat_state([(path, var.replace(values[path])) for path, var in params]))


def load_pretrained(
  path_or_hub_id: str | Path, *, dtype: Any = jnp.float32, lora: LoRAConfig | None = None, seed: int = 0
) -> Model:
  """A model with a Hugging Face checkpoint's weights.

  Args:
    path_or_hub_id: a local directory (config.json + model.safetensors or a sharded index) or a hub id.
    dtype: the parameter (and compute) dtype, e.g. jnp.float32 or jnp.bfloat16.
    lora: when given, adapters are injected into the modules it targets (PEFT's name rules,
      `fedask_jax.lora.inject_lora`), in float32 (PEFT's `autocast_adapter_dtype` default), lora_a with
      PEFT's init from key `jax.random.key(seed)`, lora_b zero.
    seed: the adapter-init seed.

  Returns a `LlamaForCausalLM` (model_type llama, qwen2) or `GPT2LMHeadModel` (gpt2); call it as
  `model(input_ids [b, s], attention_mask [b, s] | None) -> logits [b, s, V]`.
  """
  directory = checkpoint_dir(path_or_hub_id)
  hf_config = read_hf_config(directory)
  family = family_of(hf_config)
  config = family.config_from_hf(hf_config)
  model = nnx.eval_shape(lambda: family.model(config, dtype=dtype))
  load_weights(model, directory, family, dtype)
  if lora is not None:
    inject_lora(model, lora, jax.random.key(seed), dtype=jnp.float32)
  return model


def init_random(model: Model, key: Array, std: float = 0.02) -> Model:
  """Fill a freshly constructed model with random weights, as transformers' `_init_weights` does.

  Every linear kernel and embedding table ~ N(0, std^2) (GPT-2 and Llama use std = initializer_range =
  0.02); biases stay zero and norm scales one, as the constructors leave them. Each tensor's key is
  `fold_in(key, index)` in graph order. Returns `model`, changed in place.
  """
  index = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (Linear, Embedding)):
      variable = module.kernel if isinstance(module, Linear) else module.embedding
      value = variable.get_value()
      variable.set_value(std * jax.random.normal(jax.random.fold_in(key, index), value.shape, value.dtype))
      index += 1
  return model


def load_tokenizer(path_or_hub_id: str | Path) -> Any:
  """The checkpoint's tokenizer through transformers' `AutoTokenizer` (a local directory or a hub id).

  transformers is imported here, not at module import: it imports torch whenever torch is installed, and the
  models themselves need neither.
  """
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(checkpoint_dir(path_or_hub_id)))
