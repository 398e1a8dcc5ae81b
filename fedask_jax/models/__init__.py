"""Flax NNX language models that load real Hugging Face checkpoints: the Llama family (Llama 2/3, Qwen2) and
GPT-2, with LoRA-capable linear layers at Hugging Face's module paths, and cached generation.

    model = load_pretrained("path/or/hub-id", dtype=jnp.bfloat16, lora=LoRAConfig(rank=16, alpha=32))
    logits = model(input_ids, attention_mask)          # [b, s] -> [b, s, V] float32
    tokens = generate(model, prompts, prompt_mask, max_new_tokens=32)

Nothing here imports torch (transformers is imported only by `load_tokenizer`).
"""

from fedask_jax.models.generation import generate
from fedask_jax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from fedask_jax.models.layers import KVCache
from fedask_jax.models.llama import LlamaConfig, LlamaForCausalLM, RopeConfig
from fedask_jax.models.loading import (
  FAMILIES,
  checkpoint_dir,
  config_from_hf,
  init_random,
  load_pretrained,
  load_tokenizer,
  read_hf_config,
)

__all__ = [
  "FAMILIES",
  "GPT2Config",
  "GPT2LMHeadModel",
  "KVCache",
  "LlamaConfig",
  "LlamaForCausalLM",
  "RopeConfig",
  "checkpoint_dir",
  "config_from_hf",
  "generate",
  "init_random",
  "load_pretrained",
  "load_tokenizer",
  "read_hf_config",
]
