"""The Llama family in Flax NNX: Llama 2/3 (RMSNorm, rotary position embeddings with Llama 3 scaling,
grouped-query attention, SwiGLU) and Qwen2 (the same with q/k/v biases and, in small checkpoints, tied
embeddings), configured from a Hugging Face config.json.

Module paths equal Hugging Face's (`model.layers.0.self_attn.q_proj`, `model.layers.0.mlp.down_proj`,
`lm_head`), so the dotted paths of `fedask_jax.lora.lora_layers(model)` are PEFT's module keys. Every linear
layer is a `fedask_jax.lora.Linear` with kernel [in, out] (the transpose of PyTorch's `nn.Linear.weight`).

Precision: matmuls run in the parameter dtype (float32 or bfloat16); RMSNorm statistics, RoPE angles,
attention scores and softmax run in float32, as in transformers' eager Llama; logits are returned in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding parameters (transformers' `rope_parameters`).

  Attributes:
    rope_type: "default" (Su et al. 2021), "linear" (position interpolation: frequencies / factor) or
      "llama3" (Llama 3.1's frequency-dependent scaling).
    rope_theta: the base of the inverse frequencies `theta^(-2i/hd)`.
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: the scaling parameters of
      "linear" (factor) and "llama3" (all four), as in transformers' `_compute_llama3_parameters`.
  """

  rope_type: str = "default"
  rope_theta: float = 10000.0
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(
        f"rope_type={self.rope_type!r} is not supported: use one of {ROPE_TYPES} (dynamic, yarn and longrope "
        "scalings are not implemented)."
      )

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> RopeConfig:
    """Reads transformers 5's `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str):
      raise ValueError(f"rope_type={rope_type!r}: expected a string such as 'default', 'linear' or 'llama3'.")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(
        f"partial_rotary_factor={params['partial_rotary_factor']} is not supported by the Llama family: "
        "only full rotary embeddings (1.0) are implemented."
      )
    rope = cls(rope_type=rope_type, rope_theta=float(params.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if rope_type == "linear":
      rope = dataclasses.replace(rope, factor=float(params["factor"]))
    elif rope_type == "llama3":
      rope = dataclasses.replace(
        rope,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
          params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
      )
    return rope

  def inverse_frequencies(self, head_dim: int) -> np.ndarray:
    """[hd / 2] float32 inverse frequencies, computed in float32 as transformers does."""
    exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / np.power(np.float32(self.rope_theta), exponents)
    if self.rope_type == "linear":
      return (inv_freq / np.float32(self.factor)).astype(np.float32)
    if self.rope_type == "default":
      return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    old_len = self.original_max_position_embeddings
    low_freq_wavelen = old_len / self.low_freq_factor
    high_freq_wavelen = old_len / self.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
    smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
    smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family model (names as in transformers' LlamaConfig / Qwen2Config).

  Attributes:
    model_type: "llama" or "qwen2".
    vocab_size, hidden_size, intermediate_size, num_hidden_layers: V, d, the SwiGLU width, the depth.
    num_attention_heads, num_key_value_heads, head_dim: h, kv (h % kv == 0: grouped-query attention), hd.
    rms_norm_eps: RMSNorm epsilon.
    rope: rotary embedding parameters.
    qkv_bias: biases on q/k/v_proj (Qwen2: True; Llama: `attention_bias`).
    o_bias: bias on o_proj (Llama: `attention_bias`; Qwen2: False).
    mlp_bias: biases on gate/up/down_proj (Llama's `mlp_bias`).
    tie_word_embeddings: the output head is embed_tokens^T (no lm_head parameter).
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False

  def __post_init__(self):
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs h % kv == 0."
      )

  @property
  def max_positions(self) -> int | None:
    """Rotary embeddings have no hard position limit."""
    return None

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
    """From a Hugging Face config.json dict with model_type "llama" or "qwen2"."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen2"):
      raise ValueError(f"model_type={model_type!r}: LlamaConfig.from_hf reads 'llama' or 'qwen2' configs.")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act={act!r}: the Llama family is implemented with SwiGLU ('silu') only.")
    missing = [
      k
      for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
      if k not in hf
    ]
    if missing:
      raise ValueError(f"config.json of model_type {model_type!r} lacks {missing}: is it a complete config?")
    heads = hf["num_attention_heads"]
    if model_type == "qwen2":
      _reject_qwen2_sliding_window(hf)
      biases = dict(qkv_bias=True, o_bias=False, mlp_bias=False)
    else:
      attention_bias = bool(hf.get("attention_bias", False))
      biases = dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)))
    return cls(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_hidden_layers=hf["num_hidden_layers"],
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope=RopeConfig.from_hf(hf),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **biases,
    )


def _reject_qwen2_sliding_window(hf: dict[str, Any]) -> None:
  layer_types = hf.get("layer_types")
  if layer_types is None:
    sliding = hf.get("use_sliding_window", False) and hf.get("max_window_layers", 0) < hf["num_hidden_layers"]
  else:
    sliding = "sliding_attention" in layer_types
  if sliding:
    raise ValueError(
      "this Qwen2 config uses sliding-window attention (use_sliding_window / layer_types), which is not "
      "implemented: use a checkpoint with full attention (all released Qwen2 checkpoints set "
      "use_sliding_window=false)."
    )


class RMSNorm(nnx.Module):
  """`scale * x / sqrt(mean(x^2) + eps)`, statistics in float32 (Zhang & Sennrich 2019; transformers' LlamaRMSNorm)."""

  def __init__(self, dim: int, eps: float, *, dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * normed.astype(x.dtype)


def rotary_angles(positions: Array, inv_freq: np.ndarray, dtype: Any) -> tuple[Array, Array]:
  """positions [b, s] -> (cos, sin) [b, s, hd], angles in float32, in transformers' half-split layout."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """x [b, s, heads, hd] rotated by the angles: x cos + rotate_half(x) sin (transformers' convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LlamaAttention(nnx.Module):
  """Causal self-attention with rotary embeddings and grouped key/value heads."""

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32):
    d, h, kv, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    self.q_proj = Linear(d, h * hd, use_bias=config.qkv_bias, dtype=dtype)
    self.k_proj = Linear(d, kv * hd, use_bias=config.qkv_bias, dtype=dtype)
    self.v_proj = Linear(d, kv * hd, use_bias=config.qkv_bias, dtype=dtype)
    self.o_proj = Linear(h * hd, d, use_bias=config.o_bias, dtype=dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

  def __call__(
    self, x: Array, rope: tuple[Array, Array], context: AttentionContext, cache: LayerCache | None
  ) -> tuple[Array, LayerCache | None]:
    """x [b, s, d] -> ([b, s, d], updated layer cache)."""
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    out, cache = attend(q, k, v, context, self.head_dim**-0.5, cache)
    return self.o_proj(out.reshape(b, s, -1)), cache


class LlamaMLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) (Shazeer 2020)."""

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32):
    d, f = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(d, f, use_bias=config.mlp_bias, dtype=dtype)
    self.up_proj = Linear(d, f, use_bias=config.mlp_bias, dtype=dtype)
    self.down_proj = Linear(f, d, use_bias=config.mlp_bias, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32):
    self.self_attn = LlamaAttention(config, dtype=dtype)
    self.mlp = LlamaMLP(config, dtype=dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

  def __call__(
    self, x: Array, rope: tuple[Array, Array], context: AttentionContext, cache: LayerCache | None
  ) -> tuple[Array, LayerCache | None]:
    attn, cache = self.self_attn(self.input_layernorm(x), rope, context, cache)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
  """Embeddings, decoder layers and the final norm (transformers' LlamaModel / Qwen2Model)."""

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32):
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
    self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype) for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.rope, self.head_dim = config.rope, config.head_dim

  def __call__(self, input_ids: Array, token_mask: Array, cache: KVCache | None) -> tuple[Array, KVCache | None]:
    """input_ids [b, s], token_mask [b, s] bool -> (hidden states [b, s, d], updated cache)."""
    context = attention_context(token_mask, cache)
    x = self.embed_tokens(input_ids)
    rope = rotary_angles(context.positions, self.rope.inverse_frequencies(self.head_dim), x.dtype)
    layer_caches = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, rope, context, None if cache is None else cache.layers[i])
      layer_caches.append(layer_cache)
    x = self.norm(x)
    if cache is None:
      return x, None
    return x, advance_cache(cache, layer_caches, context, input_ids.shape[1])


class LlamaForCausalLM(nnx.Module):
  """A Llama / Qwen2 language model: `model` (the backbone) and `lm_head` (None with tied embeddings).

  Build it with `fedask_jax.models.load_pretrained` (weights from a checkpoint) or construct it and fill
  it with `fedask_jax.models.init_random`; the constructor itself leaves kernels at zero.
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype)
    self.lm_head = nnx.data(
      None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, dtype=dtype)
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
    attention is causal, padding is never attended to, and positions count real tokens only
    (`fedask_jax.models.layers`). Returns float32 logits [b, s, V]; with a `cache` (see `init_cache`), the
    tokens are appended to it and the result is (logits, updated cache).
    logit_positions: [b, P] int (no cache): the logits at those positions only, [b, P, V]
    (`fedask_jax.objectives.response_positions`: the head and the loss where a loss is taken).
    """
    return causal_lm_logits(
      self.model, self.model.embed_tokens, self.lm_head, input_ids, attention_mask, cache, logit_positions
    )

  def init_cache(self, batch: int, max_length: int) -> KVCache:
    """An empty key/value cache for `batch` rows of up to `max_length` tokens, in the parameter dtype."""
    c = self.config
    dtype = self.model.embed_tokens.embedding.dtype
    return init_cache(c.num_hidden_layers, batch, max_length, c.num_key_value_heads, c.head_dim, dtype)


# Loading: our parameter paths mirror Hugging Face's module names, so each tensor name follows from the path.
BASE_PREFIX = "model."
# Tensors a checkpoint may hold that the model does not use: the tied head's copy of the embeddings, and
# the rotary buffers that old checkpoints saved.
IGNORED_TENSORS = r"lm_head\.weight|(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq"


def hf_tensor_name(path: tuple[Any, ...]) -> tuple[str, bool]:
  """Our parameter path -> (Hugging Face tensor name, whether to transpose it).

  `Linear.kernel` [in, out] is `nn.Linear.weight` [out, in] transposed; biases, RMSNorm scales
  (`*.weight`) and the embedding table (`embed_tokens.weight`) keep their layout.
  """
  *module, leaf = path
  name = path_name(module)
  return {
    "kernel": (f"{name}.weight", True),
    "bias": (f"{name}.bias", False),
    "scale": (f"{name}.weight", False),
    "embedding": (f"{name}.weight", False),
  }[leaf]
