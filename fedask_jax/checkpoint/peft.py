"""Hugging Face PEFT adapter interop: write and read LoRA adapters in PEFT's `save_pretrained` format.

A PEFT LoRA adapter directory holds `adapter_config.json` and `adapter_model.safetensors`. PEFT 0.21 saves one
pair of tensors per adapted module, without the adapter name (`get_peft_model_state_dict` strips it):

  base_model.model.<module path>.lora_A.weight   [r, in]   (torch `nn.Linear(in, r).weight`)
  base_model.model.<module path>.lora_B.weight   [out, r]  (torch `nn.Linear(r, out).weight`)

`<module path>` is the module's name in the Hugging Face model (e.g. `model.layers.0.self_attn.q_proj`), which
is our dotted path (`fedask_jax.lora.lora_layers`). PEFT adds `scaling * lora_B(lora_A(dropout(x)))` to the
base layer's output, with `scaling = lora_alpha / r`; our lora_a and lora_b are lora_A.weight and
lora_B.weight transposed (`fedask_jax.lora`). GPT-2's Conv1D layers store their weight as [in, out] (PEFT's
`fan_in_fan_out=True`), but PEFT still builds lora_A / lora_B as `nn.Linear` layers
(`peft/tuners/lora/layer.py`, `update_layer`), so their saved shapes are the same [r, in] / [out, r] and the
same transposes apply; `fan_in_fan_out` only changes how PEFT merges the product into the base weight.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.flax import load_file, save_file

from fedask_jax.lora import Linear, LoRAConfig, inject_lora, lora_layers, path_name

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps LoraModel (attribute `base_model`), which wraps the Hugging Face model (attribute `model`).
_KEY_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight"}

# adapter_config.json fields whose non-default values change what the adapter computes in ways our `Linear`
# does not implement (rsLoRA / DoRA scaling, per-layer ranks, extra trainable tensors, base weights modified at
# init). Each maps to the values that are safe to ignore.
_UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {
  "use_rslora": (False, None),
  "use_dora": (False, None),
  "rank_pattern": ({}, None),
  "alpha_pattern": ({}, None),
  "layers_to_transform": (None, []),
  "exclude_modules": (None, []),
  "modules_to_save": (None, []),
  "bias": ("none", None),
  "lora_bias": (False, None),
  "target_parameters": (None, []),
  "trainable_token_indices": (None,),
  "layer_replication": (None,),
  "use_qalora": (False, None),
  "use_bdlora": (None, False),
  "alora_invocation_tokens": (None,),
  "megatron_config": (None,),
  # PiSSA, OLoRA, CorDA and LoftQ rewrite the base weights at initialisation: their adapters only make sense on
  # the rewritten base model, not on the original checkpoint.
  "init_lora_weights": (True, False, "gaussian"),
}


def export_peft(
  model: nnx.Module,
  out_dir: str | os.PathLike,
  *,
  base_model_name_or_path: str | None = None,
  fan_in_fan_out: bool | None = None,
) -> dict[str, Any]:
  """Write the adapters of `model` as a PEFT LoRA adapter (`PeftModel.from_pretrained(hf_model, out_dir)`).

  Writes `adapter_config.json` and `adapter_model.safetensors` (keys as in the module docstring; lora_A.weight =
  lora_a^T [r, in], lora_B.weight = lora_b^T [out, r], in the factors' own dtype). Our `LoRAConfig` is not stored
  on the model, so the config is read back from the layers: r from the factor shapes, `lora_alpha = scaling * r`,
  `lora_dropout` from the adapter dropout; all adapted layers must agree (PEFT's file has one r and one alpha).

  `target_modules` is the sorted set of the adapted modules' last name components (e.g. `["q_proj",
  "v_proj"]`). PEFT adapts a module whose name equals a listed name or ends with `"." + name`; every adapted
  path ends with its own last component, so PEFT adapts all of them, and it adapts nothing else as long as no
  un-adapted `Linear` of the model shares a last component with an adapted one. When one does (e.g. only layer 0
  was adapted), the exact set is written instead as a regular expression over the full paths, which PEFT
  matches with `re.fullmatch`.

  Args:
    model: an NNX model built from `fedask_jax.lora.Linear` with Hugging Face module names, with adapters.
    out_dir: the directory to write (created if needed).
    base_model_name_or_path: recorded in the config (PEFT uses it when no base model is given).
    fan_in_fan_out: PEFT's flag for layers whose torch weight is [in, out] (GPT-2's Conv1D). None infers it
      from the model's `config.model_type` (True for "gpt2").

  Returns:
    The adapter config written, as a dict.
  """
  layers = lora_layers(model)
  if not layers:
    raise ValueError(
      "export_peft: the model has no LoRA adapters; add them with fedask_jax.lora.inject_lora or import_peft first."
    )
  params = {name: layer.lora_params() for name, layer in layers.items()}
  ranks = {name: lora_a.shape[-1] for name, (lora_a, _) in params.items()}
  for name, (lora_a, lora_b) in params.items():
    if lora_a.ndim != 2 or lora_b.ndim != 2:
      raise ValueError(
        f"export_peft: {name}.lora_a has shape {lora_a.shape} and lora_b {lora_b.shape}; PEFT "
        "stores one unbatched adapter: select one client's adapters (e.g. fedask_jax.adapters.unstack_adapters) "
        "before exporting."
      )
  rank = _single_value("rank", ranks)
  scaling = _single_value("scaling (alpha / r)", {name: float(layer.scaling) for name, layer in layers.items()})
  dropout = _single_value(
    "dropout",
    {name: float(layer.lora_dropout.rate) if layer.lora_dropout is not None else 0.0 for name, layer in layers.items()},
  )
  alpha = scaling * rank
  if abs(alpha - round(alpha)) <= 1e-9 * alpha:
    # PEFT configs carry integer alphas; scaling * r can be off by an ulp.
    alpha = int(round(alpha))
  if fan_in_fan_out is None:
    fan_in_fan_out = getattr(getattr(model, "config", None), "model_type", None) == "gpt2"

  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": rank,
    "lora_alpha": alpha,
    "lora_dropout": dropout,
    "target_modules": _target_modules(model, set(layers)),
    "bias": "none",
    "fan_in_fan_out": bool(fan_in_fan_out),
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "modules_to_save": None,
    "inference_mode": True,
  }
  tensors = {}
  for name, (lora_a, lora_b) in params.items():
    tensors[_KEY_PREFIX + name + _FACTOR_SUFFIXES["lora_A"]] = jnp.transpose(lora_a[...])
    tensors[_KEY_PREFIX + name + _FACTOR_SUFFIXES["lora_B"]] = jnp.transpose(lora_b[...])
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, ADAPTER_CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  # PEFT writes the same metadata; transformers' loaders check "format".
  save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
  return config


def import_peft(model: nnx.Module, adapter_dir: str | os.PathLike, *, dtype: Any = jnp.float32) -> LoRAConfig:
  """Load a PEFT LoRA adapter directory into `model` (in place); the inverse of `export_peft`.

  Reads `adapter_config.json` and `adapter_model.safetensors` (PEFT's default `safe_serialization=True`; the
  legacy pickled `adapter_model.bin` is not read). If `model` has no adapters, adds them with `inject_lora` and
  a `LoRAConfig(rank=r, alpha=lora_alpha, target_modules, dropout=lora_dropout)` built from the config, in
  `dtype`; otherwise its existing adapters (same rank; their dtype and dropout are kept) are overwritten. Then
  sets lora_a = lora_A.weight^T [in, r], lora_b = lora_B.weight^T [r, out] and scaling = lora_alpha / r.
  `fan_in_fan_out` is accepted either way: it does not change the saved factor layout (module docstring).

  Everything is checked before the model is changed. Raises ValueError for options our layer does not
  implement (rsLoRA, DoRA, rank/alpha patterns, extra trainable modules, ...), for adapter keys without a
  matching adapted layer (unexpected) and adapted layers without keys (missing), and for shape mismatches.

  Returns:
    The LoRAConfig read from `adapter_config.json`.
  """
  config = _read_config(adapter_dir)
  factors = _read_factors(adapter_dir)

  existing = lora_layers(model)
  if existing:
    targets = existing
  else:
    linears = {path_name(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}
    targets = {name: layer for name, layer in linears.items() if config.matches(name)}
  missing = sorted(set(targets) - set(factors))
  unexpected = sorted(set(factors) - set(targets))
  if missing or unexpected:
    raise ValueError(
      f"import_peft: the adapter in {adapter_dir} does not fit the model's "
      f"{'adapted' if existing else 'target_modules=' + repr(config.target_modules)} layers. "
      f"Missing keys (a layer to adapt without factors): {_key_names(missing)}; unexpected keys (factors "
      f"without a matching layer): {_key_names(unexpected)}. Load it onto the base model it was trained on."
    )
  for name, layer in targets.items():
    a, b = factors[name]
    expected_a = (config.rank, layer.in_features)
    expected_b = (layer.out_features, config.rank)
    if a.shape != expected_a or b.shape != expected_b:
      raise ValueError(
        f"import_peft: {_KEY_PREFIX}{name}.lora_A.weight / lora_B.weight have shapes {a.shape} / {b.shape}; "
        f"a rank-{config.rank} adapter of this {layer.in_features} x {layer.out_features} layer needs "
        f"{expected_a} / {expected_b}. Check that the adapter belongs to this model (and rank r in "
        "adapter_config.json)."
      )
    if existing and (rank := layer.lora_params()[0].shape[-1]) != config.rank:
      raise ValueError(
        f"import_peft: the model's adapter at {name} has rank {rank} but the file's r is "
        f"{config.rank}: import into a model without adapters (they are then added with r={config.rank})."
      )

  if not existing:
    # The initial values are overwritten below; the key only has to be valid.
    inject_lora(model, config, jax.random.key(0), dtype)
  for name, layer in lora_layers(model).items():
    a, b = factors[name]
    lora_a, lora_b = layer.lora_params()
    lora_a[...] = jnp.transpose(a).astype(lora_a.dtype)
    lora_b[...] = jnp.transpose(b).astype(lora_b.dtype)
    layer.scaling = config.scaling
  return config


def _single_value(what: str, values: dict[str, Any]) -> Any:
  distinct = sorted(set(values.values()))
  if len(distinct) != 1:
    examples = {v: next(n for n, x in values.items() if x == v) for v in distinct}
    raise ValueError(
      f"export_peft: the adapters have different {what} values {examples} (value: an example layer); a PEFT "
      "adapter file has one value for all layers: export models whose adapters share it."
    )
  return distinct[0]


def _target_modules(model: nnx.Module, adapted: set[str]) -> list[str] | str:
  linears = [path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
  names = sorted({p.rsplit(".", 1)[-1] for p in adapted})
  suffix_rule = LoRAConfig(rank=1, alpha=1.0, target_modules=tuple(names))
  if {p for p in linears if suffix_rule.matches(p)} == adapted:
    return names
  return "(?:" + "|".join(re.escape(p) for p in sorted(adapted)) + ")"


def _read_config(adapter_dir: str | os.PathLike) -> LoRAConfig:
  path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"import_peft: {path} does not exist; pass a directory written by PEFT's save_pretrained or by export_peft."
    )
  with open(path) as f:
    raw = json.load(f)
  if raw.get("peft_type") != "LORA":
    raise ValueError(
      f"import_peft: {path} has peft_type={raw.get('peft_type')!r}; only LoRA adapters "
      "(peft_type 'LORA') can be imported."
    )
  bad = {k: raw[k] for k, ok in _UNSUPPORTED_OPTIONS.items() if k in raw and raw[k] not in ok}
  if bad:
    defaults = {k: _UNSUPPORTED_OPTIONS[k][0] for k in bad}
    raise ValueError(
      f"import_peft: {path} uses options that fedask_jax.lora.Linear does not implement: {bad}. Supported is "
      "plain LoRA (scaling alpha / r, one rank for all layers, no bias or extra trained modules, default or "
      "Gaussian init); convert or retrain the adapter with these options at their defaults: "
      f"{defaults}."
    )
  target_modules = raw.get("target_modules")
  if target_modules is None or target_modules == "all-linear":
    raise ValueError(
      f"import_peft: {path} has target_modules={target_modules!r}; name the modules explicitly (a list such "
      "as ['q_proj', 'v_proj'] or a regular expression) and save the adapter again."
    )
  if not isinstance(target_modules, str):
    target_modules = tuple(sorted(target_modules))
  return LoRAConfig(
    rank=raw["r"], alpha=raw["lora_alpha"], target_modules=target_modules, dropout=float(raw.get("lora_dropout", 0.0))
  )


def _read_factors(adapter_dir: str | os.PathLike) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{module path: (lora_A.weight [r, in], lora_B.weight [out, r])}; ValueError naming malformed keys."""
  path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
  if not os.path.isfile(path):
    legacy = os.path.join(adapter_dir, "adapter_model.bin")
    hint = (
      f" ({legacy} exists: re-save it with PEFT's save_pretrained(..., safe_serialization=True))"
      if os.path.isfile(legacy)
      else ""
    )
    raise FileNotFoundError(f"import_peft: {path} does not exist{hint}.")
  pieces: dict[str, dict[str, jax.Array]] = {}
  unexpected = []
  for key, value in load_file(path).items():
    factor = next((f for f, s in _FACTOR_SUFFIXES.items() if key.endswith(s)), None)
    if factor is None or not key.startswith(_KEY_PREFIX):
      unexpected.append(key)
      continue
    module = key[len(_KEY_PREFIX) : -len(_FACTOR_SUFFIXES[factor])]
    pieces.setdefault(module, {})[factor] = value
  if unexpected:
    raise ValueError(
      f"import_peft: unexpected keys in {path}: {sorted(unexpected)}; only "
      f"'{_KEY_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' (plain LoRA) can be imported."
    )
  incomplete = sorted(
    _KEY_PREFIX + m + _FACTOR_SUFFIXES["lora_B" if "lora_A" in p else "lora_A"]
    for m, p in pieces.items()
    if len(p) != 2
  )
  if incomplete:
    raise ValueError(
      f"import_peft: missing keys in {path}: {incomplete}; every adapted module needs both "
      "lora_A.weight and lora_B.weight."
    )
  return {m: (p["lora_A"], p["lora_B"]) for m, p in pieces.items()}


def _key_names(modules: list[str]) -> list[str]:
  return [f"{_KEY_PREFIX}{m}.lora_A.weight / lora_B.weight" for m in modules]
