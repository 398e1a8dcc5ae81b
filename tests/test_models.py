"""fedask_jax.models against transformers (PyTorch, CPU) and PEFT on tiny random checkpoints of each family."""

import json
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fedask_jax import lora
from fedask_jax.models import (
  GPT2Config,
  GPT2LMHeadModel,
  LlamaConfig,
  LlamaForCausalLM,
  RopeConfig,
  config_from_hf,
  init_random,
  load_pretrained,
  load_tokenizer,
  loading,
)

# Both sides compute the same float32 math and differ only in summation order: relative rounding ~1e-7 on
# logits of magnitude < 1, so 1e-4 leaves three orders of margin and still catches any real mistake
# (a wrong transpose, rope convention or mask changes logits by > 1e-2).
F32_ATOL = 1e-4
VOCAB = 128
LLAMA3_ROPE = dict(
  rope_type="llama3",
  rope_theta=500000.0,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=16,
)

# Tiny configs, one per family feature: GQA; MQA + llama3 rope scaling (head_dim 16, theta 5e5, original
# length 16: wavelengths span 6 .. 6e5, so all three llama3 bands are hit) + all biases; Qwen2 with q/k/v
# biases and tied embeddings; GPT-2 (learned positions, Conv1D, tied head).
HF_MODELS = {
  "llama_gqa": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
    )
  ),
  "llama3_rope": lambda: transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=1,
      max_position_embeddings=64,
      attention_bias=True,
      mlp_bias=True,
      rope_parameters=dict(LLAMA3_ROPE),
    )
  ),
  "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(
    transformers.Qwen2Config(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=True,
    )
  ),
  "gpt2": lambda: transformers.GPT2LMHeadModel(
    transformers.GPT2Config(
      vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
  ),
}
TARGETS = {
  "llama_gqa": ("q_proj", "v_proj"),
  "llama3_rope": ("q_proj", "v_proj"),
  "qwen2_tied": ("q_proj", "k_proj", "v_proj"),
  "gpt2": ("c_attn",),
}


def make_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  return HF_MODELS[family]().eval()  # eval: GPT-2's dropout is on by default


@pytest.fixture(scope="module", params=list(HF_MODELS))
def checkpoint(request, tmp_path_factory):
  """(family, checkpoint directory, the PyTorch model it was saved from)."""
  hf_model = make_hf_model(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(directory)
  return request.param, directory, hf_model


def batch(seq: int = 10, rows: int = 3, seed: int = 0):
  """Token ids [rows, seq] and a right-padding mask (row lengths seq, seq - 4, 3)."""
  ids = np.random.RandomState(seed).randint(0, VOCAB, (rows, seq))
  lengths = np.array([seq, seq - 4, 3][:rows])
  return ids, (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)


def hf_logits(hf_model, ids, mask=None) -> np.ndarray:
  with torch.no_grad():
    out = hf_model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
  return out.logits.float().numpy()


def max_diff_on(mask, a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask, bool)].max())


@pytest.mark.parametrize("padded, jit", [(False, False), (True, False), (True, True)])
def test_logits_match_transformers(checkpoint, padded, jit):
  family, directory, hf_model = checkpoint
  model = load_pretrained(directory)
  ids, mask = batch()
  mask = mask if padded else None
  forward = nnx.jit(lambda m, i, k: m(i, k)) if jit else (lambda m, i, k: m(i, k))
  ours = forward(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
  chex.assert_shape(ours, (3, 10, VOCAB))
  real = np.ones(ids.shape, bool) if mask is None else mask
  # Compare real positions only: padding positions are unspecified (HF semantics).
  assert max_diff_on(real, ours, hf_logits(hf_model, ids, mask)) <= F32_ATOL, family


def test_left_padding_gives_unpadded_logits(checkpoint):
  """Positions count real tokens, so a left-padded row computes what the unpadded row computes."""
  family, directory, hf_model = checkpoint
  model = load_pretrained(directory)
  ids, _ = batch(rows=1)
  pad = 4
  padded = np.concatenate([np.zeros((1, pad), ids.dtype), ids], axis=1)
  mask = (np.arange(ids.shape[1] + pad) >= pad)[None].astype(np.int64)
  ours = np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))[:, pad:]
  np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=F32_ATOL, err_msg=family)


def test_sharded_checkpoint(tmp_path):
  hf_model = make_hf_model("llama_gqa")
  # Each layer holds ~120 KB of float32 weights: 100KB shards split the model into several files.
  hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
  shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / loading.INDEX_FILE).is_file(), shards
  model = load_pretrained(tmp_path)
  ids, mask = batch()
  assert max_diff_on(mask, model(jnp.asarray(ids), jnp.asarray(mask)), hf_logits(hf_model, ids, mask)) <= F32_ATOL


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_bfloat16_checkpoint(family, tmp_path):
  hf_model = make_hf_model(family).to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path)
  model = load_pretrained(tmp_path, dtype=jnp.bfloat16)
  # Loading is exact: every parameter is bfloat16 and equals the checkpoint's tensor bit for bit.
  stored = load_file(tmp_path / "model.safetensors")
  embed = model.model.embed_tokens if family == "llama_gqa" else model.transformer.wte
  assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  name = "model.embed_tokens.weight" if family == "llama_gqa" else "transformer.wte.weight"
  np.testing.assert_array_equal(np.asarray(embed.embedding[...]), stored[name])

  ids, mask = batch()
  exact = np.asarray(load_pretrained(tmp_path, dtype=jnp.float32)(jnp.asarray(ids), jnp.asarray(mask)))
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  torch_bf16 = hf_logits(hf_model, ids, mask)
  # The reference is the float32 forward of the same (exactly upcast) bfloat16 weights; bfloat16 activations
  # (8 significant bits, unit roundoff u = 2^-8) perturb it: we measured ~1.3 u * max|logit| for both our
  # forward and transformers' bfloat16 forward (3e-3 on logits of 0.6). Ours must stay within twice
  # transformers' error or 2 u * max|logit|, whichever is larger, while a wrong weight, dtype cast or mask
  # gives errors of the order of the logits themselves.
  scale = np.abs(exact[mask.astype(bool)]).max()
  tolerance = max(2 * max_diff_on(mask, torch_bf16, exact), 2 * 2.0**-8 * scale)
  assert max_diff_on(mask, ours, exact) <= tolerance


def test_unknown_model_type_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
  with pytest.raises(ValueError, match=r"model_type='bert'.*\['gpt2', 'llama', 'qwen2'\]"):
    load_pretrained(tmp_path)


def test_missing_and_misshapen_tensors_are_named(checkpoint, tmp_path):
  family, directory, _ = checkpoint
  tensors = load_file(directory / "model.safetensors")
  name = "model.layers.1.mlp.up_proj.weight" if family != "gpt2" else "transformer.h.1.mlp.c_fc.weight"
  shutil.copy(directory / "config.json", tmp_path / "config.json")
  save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=rf"lacks 1 tensor.*{name}"):
    load_pretrained(tmp_path)
  save_file({**tensors, name: tensors[name][:, :-1]}, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=rf"tensor '{name}'.*has shape"):
    load_pretrained(tmp_path)


def test_backbone_only_checkpoint_loads(tmp_path):
  """Checkpoints saved from the bare backbone (GPT-2 on the hub: `h.0...`, no `transformer.`) load too."""
  hf_model = make_hf_model("gpt2")
  hf_model.transformer.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert "wte.weight" in load_file(tmp_path / "model.safetensors") and config["model_type"] == "gpt2"
  model = load_pretrained(tmp_path)
  ids, _ = batch()
  np.testing.assert_allclose(model(jnp.asarray(ids)), hf_logits(hf_model, ids), atol=F32_ATOL)


def test_lora_targets_match_peft(checkpoint):
  family, directory, hf_model = checkpoint
  config = lora.LoRAConfig(rank=4, alpha=8, target_modules=TARGETS[family])
  model = load_pretrained(directory, lora=config)
  peft_model = peft.get_peft_model(
    make_hf_model(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS[family]))
  )
  assert sorted(lora.lora_layers(model)) == sorted(peft_model.base_model.targeted_module_names)


def test_lora_unknown_target_lists_available_names(checkpoint):
  family, directory, _ = checkpoint
  expected = "'c_attn'" if family == "gpt2" else "'q_proj'"
  with pytest.raises(ValueError, match=rf"matches no linear layer.*{expected}"):
    load_pretrained(directory, lora=lora.LoRAConfig(rank=2, alpha=4, target_modules=("query",)))


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2"])
def test_lora_logits_and_gradients_match_peft(family, tmp_path):
  """With the same non-zero adapters, logits and d(mean cross-entropy)/d(lora_a, lora_b) equal PEFT's."""
  hf_model = make_hf_model(family)
  hf_model.save_pretrained(tmp_path)
  targets = TARGETS[family]
  model = load_pretrained(tmp_path, lora=lora.LoRAConfig(rank=4, alpha=8, target_modules=targets), seed=3)
  # lora_b starts at zero, which makes d/d lora_a zero: give it values so that both gradients are informative.
  for i, layer in enumerate(lora.lora_layers(model).values()):
    layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
  peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
  with torch.no_grad():
    for name, layer in lora.lora_layers(model).items():
      peft_layer = peft_model.base_model.model.get_submodule(name)
      peft_layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(layer.lora_a[...]).T))
      peft_layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(layer.lora_b[...]).T))

  ids, mask = batch()
  labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -100)
  labels[:, -1] = -100
  graphdef, lora_state, frozen = lora.split_lora(model)

  def loss_fn(lora_state):
    logits = nnx.merge(graphdef, lora_state, frozen)(jnp.asarray(ids), jnp.asarray(mask))
    valid = labels != -100
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, jnp.asarray(np.maximum(labels, 0))[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / valid.sum(), logits

  (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(lora_state)
  out = peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask))
  torch_loss = torch.nn.functional.cross_entropy(
    out.logits.reshape(-1, VOCAB), torch.tensor(labels).reshape(-1), ignore_index=-100
  )
  torch_loss.backward()
  assert max_diff_on(mask, logits, out.logits.detach().numpy()) <= F32_ATOL
  np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
  for name, factors in lora.to_adapters(grads).items():
    peft_layer = peft_model.base_model.model.get_submodule(name)
    for ours, theirs in (
      (factors.lora_a, peft_layer.lora_A["default"].weight.grad.numpy().T),
      (factors.lora_b, peft_layer.lora_B["default"].weight.grad.numpy().T),
    ):
      assert np.linalg.norm(ours) > 0, name
      # Gradients are sums over tokens of products of float32 activations; 1e-4 relative to the largest
      # entry covers the summation-order differences.
      np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), err_msg=name)


@pytest.mark.parametrize(
  "hf_config",
  [
    transformers.LlamaConfig(head_dim=16, num_attention_heads=4, hidden_size=64),
    transformers.LlamaConfig(
      head_dim=16,
      num_attention_heads=4,
      hidden_size=64,
      rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    ),
    transformers.LlamaConfig(
      head_dim=32, num_attention_heads=4, hidden_size=128, max_position_embeddings=64, rope_parameters=dict(LLAMA3_ROPE)
    ),
    transformers.Qwen2Config(
      hidden_size=64,
      num_attention_heads=4,
      num_key_value_heads=4,
      rope_parameters=dict(rope_type="default", rope_theta=1e6),
    ),
  ],
  ids=["default", "linear", "llama3", "qwen2_theta"],
)
def test_rope_frequencies_match_transformers(hf_config):
  ours = config_from_hf(hf_config.to_dict())
  rope_type = hf_config.rope_parameters["rope_type"]
  init = ROPE_INIT_FUNCTIONS.get(rope_type, _default_inv_freq)
  np.testing.assert_allclose(ours.rope.inverse_frequencies(ours.head_dim), init(hf_config)[0].numpy(), rtol=1e-6)


def _default_inv_freq(config):
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

  return LlamaRotaryEmbedding.compute_default_rope_parameters(config)


def test_legacy_rope_scaling_config_is_read():
  """Configs written before transformers 5 keep rope_theta at the top and call the dict rope_scaling."""
  legacy = {
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 64,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "rope_theta": 500000.0,
    "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
  }
  modern = transformers.LlamaConfig(
    vocab_size=8,
    hidden_size=64,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=64,
    rope_parameters=dict(LLAMA3_ROPE),
  ).to_dict()
  assert config_from_hf(legacy).rope == config_from_hf(modern).rope == RopeConfig(**LLAMA3_ROPE)


@pytest.mark.parametrize(
  "change, message",
  [
    ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 0}, "sliding-window"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn'"),
    ({"num_attention_heads": None}, r"lacks \['num_attention_heads'\]"),
  ],
)
def test_bad_llama_configs_are_rejected(change, message):
  hf = {
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 64,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    **change,
  }
  hf = {k: v for k, v in hf.items() if v is not None}
  with pytest.raises(ValueError, match=message):
    config_from_hf(hf)


def test_hub_id_downloads_config_weights_and_tokenizer_only(checkpoint, monkeypatch):
  family, directory, hf_model = checkpoint
  calls = []

  def fake_snapshot_download(repo_id, allow_patterns):
    calls.append((repo_id, allow_patterns))
    return str(directory)

  import huggingface_hub

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  model = load_pretrained("someorg/tiny-model")
  assert calls[0][0] == "someorg/tiny-model"
  assert {"config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*"} <= set(calls[0][1])
  assert not any(p.endswith((".bin", ".pt", ".h5", ".msgpack")) for p in calls[0][1])
  ids, _ = batch()
  assert max_diff_on(np.ones(ids.shape), model(jnp.asarray(ids)), hf_logits(hf_model, ids)) <= F32_ATOL
  with pytest.raises(ValueError, match="not a checkpoint directory"):
    load_pretrained(directory / "does-not-exist")


def test_load_tokenizer_from_directory(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat"])}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
    tmp_path
  )
  tokenizer = load_tokenizer(tmp_path)
  assert tokenizer("the cat sat on the dog")["input_ids"] == [2, 3, 4, 5, 2, 0]
  assert tokenizer.pad_token_id == 1


@pytest.mark.parametrize(
  "config",
  [
    LlamaConfig(
      "llama",
      vocab_size=64,
      hidden_size=64,
      intermediate_size=48,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
    ),
    GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=1, n_head=4, n_inner=48),
  ],
  ids=["llama", "gpt2"],
)
def test_init_random(config):
  cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else GPT2LMHeadModel
  model = init_random(cls(config), jax.random.key(0), std=0.1)
  again = init_random(cls(config), jax.random.key(0), std=0.1)
  chex.assert_trees_all_equal(nnx.state(model), nnx.state(again))
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = np.asarray(var.get_value())
    if path[-1] in ("kernel", "embedding"):
      # >= 2048 draws: the sample std's relative error has sd 1/sqrt(2n) <= 0.016, so 10% is > 6 sd
      # (false-failure probability < 1e-9 per tensor).
      assert abs(value.std() / 0.1 - 1) < 0.1, path
    else:
      np.testing.assert_array_equal(value, 1.0 if path[-1] == "scale" else 0.0)


def test_bad_forward_inputs_are_rejected(checkpoint):
  _, directory, _ = checkpoint
  model = load_pretrained(directory)
  with pytest.raises(ValueError, match=r"expected \[batch, seq\]"):
    model(jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4)))


def test_models_package_does_not_import_torch():
  code = "import sys, fedask_jax.models; assert 'torch' not in sys.modules, 'torch imported'"
  subprocess.run([sys.executable, "-c", code], check=True)
