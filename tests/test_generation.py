"""fedask_jax.models.generate: cached decoding against uncached re-computation and transformers' generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from fedask_jax import lora
from fedask_jax.models import (
  GPT2Config,
  GPT2LMHeadModel,
  LlamaConfig,
  LlamaForCausalLM,
  generate,
  generation,
  init_random,
  load_pretrained,
)

VOCAB = 128
CONFIGS = {
  "llama_gqa": LlamaConfig(
    "llama",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
  ),
  "gpt2": GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=64, n_layer=2, n_head=4, n_inner=128),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
  config = CONFIGS[request.param]
  cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else GPT2LMHeadModel
  # std 0.3 rather than 0.02: with tiny random weights a model echoes its last token; larger weights give
  # varied continuations and clear argmax margins, so the comparisons below are informative.
  return init_random(cls(config), jax.random.key(1), std=0.3)


def prompts(padding: str):
  """Three prompts of 7, 4 and 2 real tokens, padded to 7 on the given side."""
  rng = np.random.RandomState(0)
  lengths = [7, 4, 2]
  rows = [rng.randint(1, VOCAB, n) for n in lengths]
  ids = np.zeros((3, 7), np.int32)
  mask = np.zeros((3, 7), np.int32)
  for i, row in enumerate(rows):
    start = 7 - len(row) if padding == "left" else 0
    ids[i, start : start + len(row)] = row
    mask[i, start : start + len(row)] = 1
  return rows, ids, mask


def uncached_greedy(model, row: np.ndarray, steps: int) -> list[int]:
  """Argmax decoding of one unpadded row, re-running the full forward on the whole sequence each step.

  The sequence lives at the start of a fixed-length buffer, without a mask: causal attention makes the
  unused tail irrelevant to the logits read at the last token, and the fixed shape compiles once.
  """
  forward = nnx.jit(lambda m, ids: m(ids))
  buffer = np.zeros((1, len(row) + steps), np.int32)
  buffer[0, : len(row)] = row
  for n in range(len(row), len(row) + steps):
    buffer[0, n] = int(jnp.argmax(forward(model, jnp.asarray(buffer))[0, n - 1]))
  return buffer[0, len(row) :].tolist()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_greedy_equals_uncached_argmax(model, padding):
  rows, ids, mask = prompts(padding)
  tokens = generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6)
  assert tokens.shape == (3, 6) and tokens.dtype == jnp.int32
  expected = [uncached_greedy(model, row, 6) for row in rows]
  np.testing.assert_array_equal(np.asarray(tokens), np.array(expected))


def test_greedy_matches_transformers_generate(tmp_path):
  torch.manual_seed(0)
  # initializer_range 0.3 for the same reason as the fixture: varied tokens with clear argmax margins.
  hf_model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      initializer_range=0.3,
      pad_token_id=0,
      bos_token_id=None,
      eos_token_id=None,
    )
  ).eval()
  hf_model.save_pretrained(tmp_path)
  _, ids, mask = prompts("left")  # transformers' generate expects left padding for decoder-only models
  with torch.no_grad():
    expected = hf_model.generate(
      torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      max_new_tokens=6,
      do_sample=False,
      pad_token_id=0,
    )[:, ids.shape[1] :]
  tokens = generate(load_pretrained(tmp_path), jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(tokens), expected.numpy())


def test_generation_uses_adapters():
  """A model with non-zero adapters generates what the model with the adapters folded in generates.

  The adapters have dropout 0.5: generation must switch it off, or the two would differ.
  """
  config = CONFIGS["llama_gqa"]
  adapted = init_random(LlamaForCausalLM(config), jax.random.key(1), std=0.3)
  lora.inject_lora(
    adapted, lora.LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"), dropout=0.5), jax.random.key(2)
  )
  for i, layer in enumerate(lora.lora_layers(adapted).values()):
    layer.lora_b[...] = jax.random.normal(jax.random.key(i), layer.lora_b.shape)
  _, ids, mask = prompts("left")
  # 6 new tokens from left-padded prompts, as in test_cached_greedy_equals_uncached_argmax: the base model
  # reuses that compilation.
  with_adapters = generate(adapted, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6)
  base = init_random(LlamaForCausalLM(config), jax.random.key(1), std=0.3)
  without = generate(base, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6)
  lora.merge_and_unload(adapted)
  merged = generate(adapted, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(merged))
  assert not np.array_equal(np.asarray(with_adapters), np.asarray(without))


def test_sampling_is_reproducible_under_a_key(model):
  _, ids, mask = prompts("left")
  args = (jnp.asarray(ids), jnp.asarray(mask))
  first = generate(model, *args, max_new_tokens=8, temperature=1.0, key=jax.random.key(5))
  again = generate(model, *args, max_new_tokens=8, temperature=1.0, key=jax.random.key(5))
  other = generate(model, *args, max_new_tokens=8, temperature=1.0, key=jax.random.key(6))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  # 24 draws over 128 tokens: two keys give the same 24 tokens with negligible probability.
  assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_sampling_follows_tempered_softmax(model):
  """First-token frequencies over n draws match softmax(logits / T) of the prompt's last position."""
  n, temperature = 4000, 0.7
  prompt = np.array([[5, 17, 99, 3]], np.int32)
  probs = np.asarray(jax.nn.softmax(model(jnp.asarray(prompt))[0, -1] / temperature))
  tokens = generate(
    model, jnp.asarray(np.repeat(prompt, n, axis=0)), max_new_tokens=1, temperature=temperature, key=jax.random.key(0)
  )
  freq = np.bincount(np.asarray(tokens)[:, 0], minlength=VOCAB) / n
  # Each frequency is a binomial mean: |freq - p| <= 5 sd (+ 1/n for tiny p) fails with probability < 6e-7
  # per token, < 1e-4 over the 128 tokens (union bound).
  sd = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(freq - probs) <= 5 * sd + 1 / n)
  # ... and the test discriminates: the untempered distribution is far from the observed one.
  assert np.abs(freq - np.asarray(jax.nn.softmax(model(jnp.asarray(prompt))[0, -1]))).max() > 0.02


def test_rows_stop_at_eos(model):
  _, ids, mask = prompts("left")
  args = (jnp.asarray(ids), jnp.asarray(mask))
  free = np.asarray(generate(model, *args, max_new_tokens=6))
  eos = int(free[0, 2])
  stopped = np.asarray(generate(model, *args, max_new_tokens=6, eos_token_id=eos))
  for free_row, row in zip(free, stopped):
    hits = np.flatnonzero(free_row == eos)
    end = hits[0] + 1 if hits.size else len(free_row)
    np.testing.assert_array_equal(row[:end], free_row[:end])
    assert np.all(row[end:] == eos)


def test_one_compilation_per_shape(model):
  _, ids, mask = prompts("right")
  generate(model, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=3)
  size = generation._generate._cache_size()
  generate(model, jnp.asarray(ids[::-1].copy()), jnp.asarray(mask[::-1].copy()), max_new_tokens=3)
  assert generation._generate._cache_size() == size


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=2, temperature=0.5), "pass a PRNG key"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature=-1.0"),
    (dict(max_new_tokens=2, prompt_mask=np.zeros((3, 7))), r"prompt rows \[0, 1, 2\] have no real token"),
    (dict(max_new_tokens=2, prompt_mask=np.ones((3, 6))), "prompt_mask has shape"),
  ],
)
def test_bad_generation_inputs_are_rejected(model, kwargs, message):
  _, ids, _ = prompts("left")
  with pytest.raises(ValueError, match=message):
    generate(model, jnp.asarray(ids), **kwargs)


def test_gpt2_position_limit_is_enforced():
  model = GPT2LMHeadModel(CONFIGS["gpt2"])
  with pytest.raises(ValueError, match="beyond the model's 24 learned positions"):
    generate(model, jnp.ones((1, 20), jnp.int32), max_new_tokens=5)
