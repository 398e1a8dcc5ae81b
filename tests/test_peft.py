"""Tests of fedask_jax.checkpoint.peft against Hugging Face PEFT on tiny Llama, Qwen2 and GPT-2 checkpoints.

Every reference number comes from transformers + peft in PyTorch (float32): adapters made or loaded by PEFT, on
the same saved base checkpoint that `fedask_jax.models.load_pretrained` reads.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from fedask_jax import lora
from fedask_jax.checkpoint import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, export_peft, import_peft
from fedask_jax.lora import LoRAConfig
from fedask_jax.models import load_pretrained

# float32 on both sides; the logits of these tiny models are O(1) and the two implementations differ only in
# the order of float32 operations (softmax, RMSNorm, fused matmuls): observed differences are ~1e-6.
LOGIT_TOL = 1e-4
RANK, ALPHA = 4, 8


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  hf_config: transformers.PretrainedConfig
  target_modules: tuple[str, ...]


_LLAMA_SIZES = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
)
FAMILIES = [
  Family(
    "llama",
    transformers.LlamaConfig(**_LLAMA_SIZES),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
  ),
  Family("qwen2", transformers.Qwen2Config(**_LLAMA_SIZES), ("q_proj", "v_proj", "down_proj")),
  # GPT-2's c_attn / c_proj / c_fc are transformers Conv1D layers (weight [in, out]); c_proj exists in both
  # the attention and the MLP.
  Family(
    "gpt2",
    transformers.GPT2Config(
      vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    ("c_attn", "c_proj", "c_fc"),
  ),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request, tmp_path_factory):
  """(Family, base checkpoint directory): a tiny random model saved with transformers' save_pretrained."""
  fam = request.param
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(fam.hf_config)
  # transformers' init (std 0.02) leaves the logits near 0; larger weights make the parity check meaningful.
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 2:
        p.normal_(0.0, 0.2)
  base = tmp_path_factory.mktemp(fam.name) / "base"
  model.save_pretrained(base)
  return fam, base


@pytest.fixture(scope="module")
def inputs():
  """input_ids [2, 7] and an attention mask with a right-padded second row."""
  ids = np.random.default_rng(0).integers(0, 64, size=(2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[1, 5:] = 0
  return ids, mask


def _hf_base(base):
  return transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _torch_logits(model, inputs):
  ids, mask = inputs
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _our_logits(model, inputs):
  ids, mask = inputs
  return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def _max_diff(ours, theirs, inputs):
  """Max |difference| over the real (unpadded) positions: padded positions' logits are arbitrary."""
  valid = inputs[1].astype(bool)
  return float(np.abs(ours[valid] - theirs[valid]).max())


def _peft_adapter(fam, base, out_dir):
  """PEFT's own adapter with random non-zero lora_A and lora_B, saved with save_pretrained."""
  peft_model = get_peft_model(
    _hf_base(base),
    PeftLoraConfig(
      r=RANK,
      lora_alpha=ALPHA,
      target_modules=list(fam.target_modules),
      task_type="CAUSAL_LM",
      fan_in_fan_out=fam.name == "gpt2",
    ),
  )
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in peft_model.modules():
      if hasattr(module, "lora_A") and "default" in module.lora_A:
        torch.nn.init.normal_(module.lora_A["default"].weight, std=0.2, generator=generator)
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.2, generator=generator)
  peft_model.save_pretrained(out_dir)
  return peft_model.eval()


def _our_adapted_model(fam, base, seed=0):
  model = load_pretrained(base, dtype=jnp.float32, lora=LoRAConfig(RANK, ALPHA, fam.target_modules), seed=seed)
  key = jax.random.key(seed + 100)
  for i, layer in enumerate(lora.lora_layers(model).values()):
    layer.lora_a[...] = 0.2 * jax.random.normal(jax.random.fold_in(key, 2 * i), layer.lora_a.shape)
    layer.lora_b[...] = 0.2 * jax.random.normal(jax.random.fold_in(key, 2 * i + 1), layer.lora_b.shape)
  return model


def _adapters(model):
  return lora.to_adapters(lora.split_lora(model)[1])


def test_import_of_a_peft_adapter_gives_peft_logits(family, inputs, tmp_path):
  fam, base = family
  peft_model = _peft_adapter(fam, base, tmp_path)
  expected = _torch_logits(peft_model, inputs)

  model = load_pretrained(base, dtype=jnp.float32)
  without_adapter = _our_logits(model, inputs)
  config = import_peft(model, tmp_path)
  assert config == LoRAConfig(RANK, ALPHA, tuple(sorted(fam.target_modules)))
  got = _our_logits(model, inputs)

  diff = _max_diff(got, expected, inputs)
  print(
    f"\n{fam.name}: PEFT adapter imported, max |logit diff| = {diff:.2e}, max |logit| = {np.abs(expected).max():.2f}"
  )
  assert diff <= LOGIT_TOL
  # The adapters move the logits by far more than the tolerance: the check above sees them.
  assert _max_diff(without_adapter, expected, inputs) > 100 * LOGIT_TOL
  for name, layer in lora.lora_layers(model).items():
    module = peft_model.get_submodule("base_model.model." + name)
    np.testing.assert_array_equal(layer.lora_a[...], module.lora_A["default"].weight.detach().numpy().T)
    np.testing.assert_array_equal(layer.lora_b[...], module.lora_B["default"].weight.detach().numpy().T)
    assert layer.scaling == ALPHA / RANK


def test_exported_adapters_load_in_peft_and_give_our_logits(family, inputs, tmp_path):
  fam, base = family
  model = _our_adapted_model(fam, base)
  config = export_peft(model, tmp_path / "ours", base_model_name_or_path=str(base))
  assert config["fan_in_fan_out"] == (fam.name == "gpt2")

  # Same file layout as PEFT's own save_pretrained: key names, shapes, dtypes; config read back by PEFT.
  _peft_adapter(fam, base, tmp_path / "theirs")
  ours, theirs = (load_numpy(tmp_path / d / ADAPTER_WEIGHTS_NAME) for d in ("ours", "theirs"))
  assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
  peft_config = PeftConfig.from_pretrained(tmp_path / "ours")
  assert (peft_config.r, peft_config.lora_alpha, peft_config.target_modules, peft_config.task_type) == (
    RANK,
    ALPHA,
    set(fam.target_modules),
    "CAUSAL_LM",
  )

  peft_model = PeftModel.from_pretrained(_hf_base(base), tmp_path / "ours").eval()
  loaded = get_peft_model_state_dict(peft_model)
  assert set(loaded) == set(ours)
  for name, factors in _adapters(model).items():
    np.testing.assert_array_equal(loaded[f"base_model.model.{name}.lora_A.weight"].numpy(), factors.lora_a.T)
    np.testing.assert_array_equal(loaded[f"base_model.model.{name}.lora_B.weight"].numpy(), factors.lora_b.T)
  diff = _max_diff(_our_logits(model, inputs), _torch_logits(peft_model, inputs), inputs)
  print(f"\n{fam.name}: exported adapter in PEFT, max |logit diff| = {diff:.2e}")
  assert diff <= LOGIT_TOL


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_export_import_round_trip_is_exact(family, tmp_path, dtype):
  fam, base = family
  model = _our_adapted_model(fam, base)
  for layer in lora.lora_layers(model).values():
    layer.lora_a = nnx.LoRAParam(layer.lora_a[...].astype(dtype))
    layer.lora_b = nnx.LoRAParam(layer.lora_b[...].astype(dtype))
  export_peft(model, tmp_path)
  restored = load_pretrained(base, dtype=jnp.float32)
  import_peft(restored, tmp_path, dtype=dtype)
  original, back = _adapters(model), _adapters(restored)
  assert list(back) == list(original)
  for name in original:
    assert original[name].lora_a.dtype == back[name].lora_a.dtype == back[name].lora_b.dtype == dtype
    np.testing.assert_array_equal(back[name].lora_a, original[name].lora_a)
    np.testing.assert_array_equal(back[name].lora_b, original[name].lora_b)
  assert {layer.scaling for layer in lora.lora_layers(restored).values()} == {ALPHA / RANK}

  # Into a model that already has adapters of the same layout: overwritten in place, dtype kept.
  again = _our_adapted_model(fam, base, seed=7)
  import_peft(again, tmp_path)
  for name, factors in _adapters(again).items():
    np.testing.assert_array_equal(factors.lora_a, original[name].lora_a.astype(jnp.float32))


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory):
  """A small exported Llama adapter (q_proj, v_proj) and its base checkpoint, for the error cases."""
  fam = FAMILIES[0]
  root = tmp_path_factory.mktemp("errors")
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(fam.hf_config).save_pretrained(root / "base")
  model = load_pretrained(root / "base", lora=LoRAConfig(RANK, ALPHA, ("q_proj", "v_proj")))
  export_peft(model, root / "adapter")
  return root / "base", root / "adapter"


def _copy_adapter(adapter, out, *, config_update=None, tensors_update=None, drop=()):
  out.mkdir()
  config = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
  config.update(config_update or {})
  (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
  tensors = load_numpy(adapter / ADAPTER_WEIGHTS_NAME)
  tensors.update(tensors_update or {})
  save_numpy({k: v for k, v in tensors.items() if k not in drop}, out / ADAPTER_WEIGHTS_NAME)
  return out


_Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
  "change, message",
  [
    (dict(config_update={"use_rslora": True}), r"'use_rslora': True"),
    (dict(config_update={"use_dora": True}), r"'use_dora': True"),
    (dict(config_update={"rank_pattern": {"q_proj": 8}}), r"'rank_pattern'"),
    (dict(config_update={"modules_to_save": ["lm_head"]}), r"'modules_to_save'"),
    (dict(config_update={"init_lora_weights": "pissa"}), r"'init_lora_weights': 'pissa'"),
    (dict(config_update={"peft_type": "IA3"}), r"peft_type='IA3'"),
    (dict(config_update={"target_modules": "all-linear"}), r"target_modules='all-linear'"),
    (dict(drop=(_Q0_A,)), rf"missing keys .*\['{_Q0_A}'\]"),
    (
      dict(tensors_update={"base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)}),
      r"missing keys .*\['base_model.model.lm_head.lora_B.weight'\]",
    ),
    (
      dict(tensors_update={"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 64), np.float32)}),
      r"unexpected keys .*\['base_model.model.model.embed_tokens.lora_embedding_A'\]",
    ),
    (
      dict(
        tensors_update={
          "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.zeros((4, 32), np.float32),
          "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.zeros((48, 4), np.float32),
        }
      ),
      r"unexpected keys \(factors without a matching layer\): \['base_model.model.model.layers.0.mlp.up_proj",
    ),
    (
      dict(config_update={"target_modules": ["q_proj", "v_proj", "o_proj"]}),
      r"Missing keys \(a layer to adapt without factors\): \['base_model.model.model.layers.0.self_attn.o_proj",
    ),
    (dict(tensors_update={_Q0_A: np.zeros((4, 31), np.float32)}), r"shapes \(4, 31\) / \(32, 4\).*\(4, 32\)"),
  ],
)
def test_import_rejects_what_it_cannot_load(llama_adapter, tmp_path, change, message):
  base, adapter = llama_adapter
  model = load_pretrained(base)
  broken = _copy_adapter(adapter, tmp_path / "broken", **change)
  with pytest.raises(ValueError, match=message):
    import_peft(model, broken)
  assert lora.lora_layers(model) == {}, "a rejected import must leave the model unchanged"


def test_import_names_the_legacy_bin_file(llama_adapter, tmp_path):
  base, adapter = llama_adapter
  (tmp_path / ADAPTER_CONFIG_NAME).write_text((adapter / ADAPTER_CONFIG_NAME).read_text())
  (tmp_path / "adapter_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
    import_peft(load_pretrained(base), tmp_path)


def test_export_rejects_mixed_ranks_and_models_without_adapters(llama_adapter, tmp_path):
  base, _ = llama_adapter
  model = load_pretrained(base)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    export_peft(model, tmp_path)
  lora.inject_lora(model, LoRAConfig(2, 4.0, ("q_proj",)), jax.random.key(0))
  lora.inject_lora(model, LoRAConfig(3, 6.0, ("v_proj",)), jax.random.key(1))
  with pytest.raises(ValueError, match=r"different rank values \{2: 'model.layers.0.self_attn.q_proj'"):
    export_peft(model, tmp_path)


def test_partial_adaptation_exports_the_exact_module_set(llama_adapter, tmp_path):
  """Only layer 0's q_proj adapted: a plain ["q_proj"] would make PEFT adapt layer 1 too."""
  base, _ = llama_adapter
  model = load_pretrained(base, lora=LoRAConfig(RANK, ALPHA, r"model\.layers\.0\.self_attn\.(q|v)_proj"))
  config = export_peft(model, tmp_path)
  assert isinstance(config["target_modules"], str)
  peft_model = PeftModel.from_pretrained(_hf_base(base), tmp_path)
  assert set(get_peft_model_state_dict(peft_model)) == {
    f"base_model.model.model.layers.0.self_attn.{m}_proj.lora_{f}.weight" for m in "qv" for f in "AB"
  }
  restored = load_pretrained(base)
  import_peft(restored, tmp_path)
  assert set(lora.lora_layers(restored)) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
