"""GPT-2 in Flax NNX (Radford et al. 2019): learned absolute positions, pre-LayerNorm blocks, a fused
query/key/value projection and, by default, an output head tied to the token embeddings; configured from a
Hugging Face config.json.

Module paths equal Hugging Face's (`transformer.h.0.attn.c_attn`, `transformer.h.0.mlp.c_fc`, ...), so the
dotted paths of `fedask_jax.lora.lora_layers(model)` are PEFT's module keys. GPT-2's `Conv1D` layers already
store their weight as [in, out], which is our `Linear.kernel` layout, so they load without a transpose.
`c_attn` stays one fused [d, 3d] `Linear`, because PEFT adapts it as a whole.

Precision: matmuls run in the parameter dtype; LayerNorm statistics, attention scores and softmax in float32;
logits are returned in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedask_jax.lora import Linear, path_name
from fedask_jax.models.layers import (
  AttentionContext,
  Embedding,
  KVCache,
  LayerCache,
  advance_cache,
  attend,
  attention_context,
  causal_lm_logits,
  init_cache,
)

Array = jax.Array

# transformers' ACT2FN entries that GPT-2 checkpoints use.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Architecture of a GPT-2 model (names as in transformers' GPT2Config).

  Attributes:
    vocab_size, n_positions, n_embd, n_layer, n_head: V, the learned-position table size, d, depth, heads.
    n_inner: the MLP width (4 d when the config says None).
    activation_function: a key of `ACTIVATIONS` ("gelu_new" for released GPT-2).
    layer_norm_epsilon: LayerNorm epsilon.
    scale_attn_weights: divide scores by sqrt(head_dim).
    scale_attn_by_inverse_layer_idx: also divide layer i's scores by i + 1.
    tie_word_embeddings: the output head is wte^T (no lm_head parameter).
  """

  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  tie_word_embeddings: bool = True
  model_type: str = "gpt2"

  def __post_init__(self):
    if self.activation_function not in ACTIVATIONS:
      raise ValueError(
        f"activation_function={self.activation_function!r} is not supported: use one of {sorted(ACTIVATIONS)}."
      )
    if self.n_embd % self.n_head:
      raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}.")

  @property
  def max_positions(self) -> int:
    """Learned positions: a sequence may hold at most n_positions tokens."""
    return self.n_positions

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
    """From a Hugging Face config.json dict with model_type "gpt2"."""
    if hf.get("model_type") != "gpt2":
      raise ValueError(f"model_type={hf.get('model_type')!r}: GPT2Config.from_hf reads 'gpt2' configs.")
    if hf.get("add_cross_attention", False):
      raise ValueError("add_cross_attention=True: GPT-2 with cross-attention (an encoder-decoder) is not supported.")
    missing = [k for k in ("vocab_size", "n_embd", "n_layer", "n_head") if k not in hf]
    if missing:
      raise ValueError(f"config.json of model_type 'gpt2' lacks {missing}: is it a complete config?")
    return cls(
      vocab_size=hf["vocab_size"],
      n_positions=hf.get("n_positions", 1024),
      n_embd=hf["n_embd"],
      n_layer=hf["n_layer"],
      n_head=hf["n_head"],
      n_inner=hf.get("n_inner") or 4 * hf["n_embd"],
      activation_function=hf.get("activation_function", "gelu_new"),
      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
      scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
      scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


class LayerNorm(nnx.Module):
  """`(x - mean) / sqrt(var + eps) * scale + bias`, statistics in float32 (Ba et al. 2016)."""

  def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class GPT2Attention(nnx.Module):
  """Causal self-attention with a fused q/k/v projection `c_attn` [d, 3d] and output projection `c_proj`."""

  def __init__(self, config: GPT2Config, layer_idx: int, *, dtype: Any = jnp.float32):
    d = config.n_embd
    self.c_attn = Linear(d, 3 * d, use_bias=True, dtype=dtype)
    self.c_proj = Linear(d, d, use_bias=True, dtype=dtype)
    self.num_heads, self.head_dim = config.n_head, d // config.n_head
    scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
    self.scale = scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale

  def __call__(self, x: Array, context: AttentionContext, cache: LayerCache | None) -> tuple[Array, LayerCache | None]:
    """x [b, s, d] -> ([b, s, d], updated layer cache)."""
    b, s, _ = x.shape
    q, k, v = (t.reshape(b, s, self.num_heads, self.head_dim) for t in jnp.split(self.c_attn(x), 3, axis=-1))
    out, cache = attend(q, k, v, context, self.scale, cache)
    return self.c_proj(out.reshape(b, s, -1)), cache


class GPT2MLP(nnx.Module):
  """c_proj(act(c_fc(x)))."""

  def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32):
    self.c_fc = Linear(config.n_embd, config.n_inner, use_bias=True, dtype=dtype)
    self.c_proj = Linear(config.n_inner, config.n_embd, use_bias=True, dtype=dtype)
    self.activation_function = config.activation_function

  def __call__(self, x: Array) -> Array:
    return self.c_proj(ACTIVATIONS[self.activation_function](self.c_fc(x)))


class GPT2Block(nnx.Module):
  """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, config: GPT2Config, layer_idx: int, *, dtype: Any = jnp.float32):
    self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype=dtype)
    self.attn = GPT2Attention(config, layer_idx, dtype=dtype)
    self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype=dtype)
    self.mlp = GPT2MLP(config, dtype=dtype)

  def __call__(self, x: Array, context: AttentionContext, cache: LayerCache | None) -> tuple[Array, LayerCache | None]:
    attn, cache = self.attn(self.ln_1(x), context, cache)
    x = x + attn
    return x + self.mlp(self.ln_2(x)), cache


class GPT2Model(nnx.Module):
  """Token and position embeddings, blocks `h`, final LayerNorm `ln_f` (transformers' GPT2Model)."""

  def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32):
    self.wte = Embedding(config.vocab_size, config.n_embd, dtype=dtype)
    self.wpe = Embedding(config.n_positions, config.n_embd, dtype=dtype)
    self.h = nnx.List([GPT2Block(config, i, dtype=dtype) for i in range(config.n_layer)])
    self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, dtype=dtype)

  def __call__(self, input_ids: Array, token_mask: Array, cache: KVCache | None) -> tuple[Array, KVCache | None]:
    """input_ids [b, s], token_mask [b, s] bool -> (hidden states [b, s, d], updated cache)."""
    context = attention_context(token_mask, cache)
    x = self.wte(input_ids) + self.wpe(context.positions)
    layer_caches = []
    for i, block in enumerate(self.h):
      x, layer_cache = block(x, context, None if cache is None else cache.layers[i])
      layer_caches.append(layer_cache)
    x = self.ln_f(x)
    if cache is None:
      return x, None
    return x, advance_cache(cache, layer_caches, context, input_ids.shape[1])


class GPT2LMHeadModel(nnx.Module):
  """A GPT-2 language model: `transformer` (the backbone) and `lm_head` (None with tied embeddings).

  Build it with `fedask_jax.models.load_pretrained` or construct it and fill it with
  `fedask_jax.models.init_random`; the constructor itself leaves kernels at zero.
  """

  def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32):
    self.config = config
    self.transformer = GPT2Model(config, dtype=dtype)
    self.lm_head = nnx.data(
      None if config.tie_word_embeddings else Linear(config.n_embd, config.vocab_size, dtype=dtype)
    )

  def __call__(
    self,
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    cache: KVCache | None = None,
    logit_positions: Array | None = None,
  ) -> Array | tuple[Array, KVCache]:
    """Next-token logits.

    input_ids: [b, s] int; attention_mask: [b, s], 1 for real tokens and 0 for padding (None: all real);
    attention is causal, padding is never attended to, and positions count real tokens only, so a row must
    hold at most n_positions real tokens. Returns float32 logits [b, s, V]; with a `cache` (see
    `init_cache`), the tokens are appended to it and the result is (logits, updated cache).
    logit_positions: [b, P] int (no cache): the logits at those positions only, [b, P, V]
    (`fedask_jax.objectives.response_positions`: the head and the loss where a loss is taken).
    """
    return causal_lm_logits(
      self.transformer, self.transformer.wte, self.lm_head, input_ids, attention_mask, cache, logit_positions
    )

  def init_cache(self, batch: int, max_length: int) -> KVCache:
    """An empty key/value cache for `batch` rows of up to `max_length` tokens, in the parameter dtype."""
    c = self.config
    dtype = self.transformer.wte.embedding.dtype
    return init_cache(c.n_layer, batch, max_length, c.n_head, c.n_embd // c.n_head, dtype)


# Loading: our parameter paths mirror Hugging Face's module names, so each tensor name follows from the path.
BASE_PREFIX = "transformer."
# Tensors a checkpoint may hold that the model does not use: the tied head's copy of wte, and the causal-mask
# buffers (`attn.bias`, `attn.masked_bias`) that old checkpoints saved.
IGNORED_TENSORS = r"lm_head\.weight|(transformer\.)?h\.\d+\.attn\.(masked_)?bias"


def hf_tensor_name(path: tuple[Any, ...]) -> tuple[str, bool]:
  """Our parameter path -> (Hugging Face tensor name, whether to transpose it).

  Conv1D weights are [in, out] like `Linear.kernel`; only an untied `lm_head` is an `nn.Linear` [out, in].
  """
  *module, leaf = path
  name = path_name(module)
  if leaf == "kernel":
    return f"{name}.weight", name == "lm_head"
  return {"bias": (f"{name}.bias", False), "scale": (f"{name}.weight", False), "embedding": (f"{name}.weight", False)}[
    leaf
  ]
