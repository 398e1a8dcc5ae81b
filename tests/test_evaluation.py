"""fedask_jax.evaluation: text perplexity against transformers, exact match and multiple choice on hand-made
models whose answers are known, and an end-to-end smoke run of the shipped base model."""

import dataclasses
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers import models as tok_models

from fedask_jax.data import GSM8K_ALPACA, gsm8k_final_answer, load_gsm8k, load_tiny_shakespeare
from fedask_jax.evaluation import (
  MMLU_LETTERS,
  evaluate,
  exact_match,
  multiple_choice,
  multiple_choice_prompt,
  parse_final_number,
  text_windows,
)
from fedask_jax.models import load_pretrained, load_tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "experiments" / "base_model"


@pytest.fixture(scope="module")
def tokenizer():
  """The shipped byte-level BPE tokenizer (2048 tokens, prepends <s>, EOS </s> = 2)."""
  return load_tokenizer(SHIPPED)


def char_tokenizer(text: str) -> transformers.PreTrainedTokenizerFast:
  """One token per character of `text` (plus <unk>, </s>), no special prefix: every letter continuation
  " A" is two tokens, " BB" three."""
  vocab = {c: i for i, c in enumerate(["<unk>", "</s>"] + sorted(set(text)))}
  backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


class BigramModel(nnx.Module):
  """logits[b, t] = table[ids[b, t]]: the next-token distribution depends on the current token only, so every
  log-probability has a closed form in `table`."""

  def __init__(self, table: np.ndarray):
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def __call__(self, input_ids, attention_mask=None):
    return self.table[...][input_ids]


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return (
    x
    - np.max(x, axis=-1, keepdims=True)
    - np.log(np.sum(np.exp(x - np.max(x, axis=-1, keepdims=True)), axis=-1, keepdims=True))
  )


# ---------------------------------------------------------------------------------------------------------------
# Perplexity on plain text.


def test_text_perplexity_matches_transformers(tokenizer):
  """The shipped model's token-mean loss on held-out Tiny Shakespeare windows equals transformers' loss on the
  same weights and the same windows, built here from the `<s> doc </s>` stream independently."""
  speeches = load_tiny_shakespeare()[-24:]
  texts = [f"{s['speaker']}:\n{s['text']}" for s in speeches]
  seq_len = 64
  data = text_windows(texts, tokenizer, seq_len)

  stream = [
    t
    for text in texts
    for t in [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
  ]
  n = -(-len(stream) // seq_len)
  assert len(stream) % seq_len, "the test needs a padded last window"
  expected_ids = np.zeros(n * seq_len, np.int64)
  expected_ids[: len(stream)] = stream
  expected_ids = expected_ids.reshape(n, seq_len)
  real = (np.arange(n * seq_len) < len(stream)).reshape(n, seq_len)
  np.testing.assert_array_equal(np.where(data.attention_mask, data.input_ids, 0), expected_ids)
  np.testing.assert_array_equal(data.attention_mask, real)
  np.testing.assert_array_equal(data.loss_mask, real & (np.arange(seq_len) > 0))

  # batch_size 4 does not divide n: the padded rows of the last batch must not count.
  assert n % 4
  result = evaluate(load_pretrained(SHIPPED), data, batch_size=4)
  labels = np.where(real, expected_ids, -100)  # transformers shifts labels itself: window starts are never targets
  with torch.no_grad():
    reference = (
      transformers.LlamaForCausalLM.from_pretrained(SHIPPED)
      .eval()(
        input_ids=torch.from_numpy(expected_ids),
        attention_mask=torch.from_numpy(real.astype(np.int64)),
        labels=torch.from_numpy(labels),
      )
      .loss.item()
    )
  assert result.tokens == len(stream) - n and result.examples == n
  # Both are float32 forwards (different op orders) of a loss ~4 nats averaged over ~1.5k tokens: the logits
  # agree to ~1e-5 (tests/test_base_model.py), so 1e-5 relative is ample and still far below any real error.
  assert result.eval_loss == pytest.approx(reference, rel=1e-5)
  assert result.perplexity == pytest.approx(np.exp(reference), rel=1e-5)


def test_text_perplexity_of_a_bigram_model_is_its_closed_form():
  """Every target of every window, and only those, counts: a numpy sum over the stream's bigrams that do not
  cross a window boundary."""
  text = "abcab\ncba"
  tokenizer = char_tokenizer(text)
  table = np.random.RandomState(0).normal(size=(len(tokenizer), len(tokenizer))) * 2
  data = text_windows([text, "ba"], tokenizer, seq_len=4)
  stream = tokenizer.encode(text) + [1] + tokenizer.encode("ba") + [1]  # no special prefix; </s> = 1
  nll = [-log_softmax(table[stream[t - 1]])[stream[t]] for t in range(len(stream)) if t % 4]
  result = evaluate(BigramModel(table), data, batch_size=2)
  # float32 logits vs float64 numpy: ~1e-6 relative.
  assert result.eval_loss == pytest.approx(np.mean(nll), rel=1e-5)
  assert result.tokens == len(nll)


# ---------------------------------------------------------------------------------------------------------------
# GSM8K exact match.


@pytest.mark.parametrize(
  "text, number",
  [
    ("#### 1,234", "1234"),
    ("The answer is 72.", "72"),
    ("She has 5 apples and gives away 3.\n#### 2", "2"),
    ("#### 2\nThen 7 more.", "2"),  # the first number after the last marker
    ("It dropped to -17 degrees", "-17"),
    ("#### -3", "-3"),
    ("10-3=7, so 7", "7"),  # a minus between numbers is subtraction
    ("each costs $5.50.", "5.50"),
    ("#### $1,000.00", "1000.00"),
    ("I do not know.", None),
    ("#### unknown, maybe 4", "4"),
    ("#### none", None),
  ],
)
def test_parse_final_number(text, number):
  assert parse_final_number(text) == number


@dataclasses.dataclass(frozen=True)
class _NoPositionLimit:
  max_positions: int | None = None


class ScriptedModel(nnx.Module):
  """A stand-in for a language model under `generate`: a prompt with l real tokens is answered with the fixed
  token sequence `scripts[l]` (one-hot logits), one token per cached step, so every completion is known.

  The cache is (script row [b], step []): the prefill (more than one token) picks each row's script by its
  real-token count, which padding on either side leaves unchanged.
  """

  def __init__(self, scripts: dict[int, list[int]], vocab_size: int, fill: int, width: int = 64):
    table = np.full((max(scripts) + 1, width), fill, np.int32)
    for length, script in scripts.items():
      table[length, : len(script)] = script
    self.table = nnx.Variable(jnp.asarray(table))
    self.vocab_size = vocab_size
    self.config = _NoPositionLimit()

  def init_cache(self, batch: int, max_length: int):
    return jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32)

  def __call__(self, input_ids, attention_mask=None, *, cache):
    script, step = cache
    if input_ids.shape[1] > 1:
      script = jnp.sum(attention_mask, axis=1, dtype=jnp.int32)
    token = self.table[...][script, step]
    logits = jnp.broadcast_to(jax.nn.one_hot(token, self.vocab_size)[:, None], (*input_ids.shape, self.vocab_size))
    return logits, (script, step + 1)


# (question, reference answer, scripted completion, right?): decimal, comma and dollar normalisation; a wrong
# sign; no number at all.
PROBLEMS = [
  ("How much?", "Ten boxes at 100 dollars.\n#### 1,000", "10 * 100 = $1,000.00\n#### $1,000.00", True),
  ("How much is it?", "#### 3", "The answer is 3.0.", True),
  ("How much is it in all?", "It rose by 4.\n#### -4", "It dropped by 4.\n#### 4", False),
  ("How much is it in all, in dollars?", "#### 72", "I cannot tell.", False),
]


@pytest.fixture(scope="module")
def scripted(tokenizer):
  """(problems, the scripted model): each completion is followed by EOS and then a decoy '#### 999', which a
  wrong EOS cut would read as the answer."""
  problems = [{"question": q, "answer": a} for q, a, _, _ in PROBLEMS]
  lengths = [1 + len(tokenizer.encode(GSM8K_ALPACA(p)[0], add_special_tokens=False)) for p in problems]
  assert len(set(lengths)) == len(lengths), "the scripted model tells prompts apart by length"
  decoy = tokenizer.encode("#### 999", add_special_tokens=False)
  scripts = {
    length: tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id] + decoy
    for length, (_, _, completion, _) in zip(lengths, PROBLEMS)
  }
  return problems, ScriptedModel(scripts, len(tokenizer), fill=tokenizer.eos_token_id)


@pytest.mark.parametrize("batch_size", [3, 4])
def test_exact_match_of_a_scripted_model(tokenizer, scripted, batch_size):
  problems, model = scripted
  result = exact_match(model, tokenizer, problems, max_new_tokens=40, batch_size=batch_size)
  assert result.count == 4 and result.accuracy == 0.5
  np.testing.assert_array_equal(result.correct, [right for *_, right in PROBLEMS])
  assert result.completions == [completion for _, _, completion, _ in PROBLEMS]
  assert result.predictions == ["1000.00", "3.0", "4", None]
  assert result.references == ["1000", "3", "-4", "72"]


def test_exact_match_rejects_bad_input(tokenizer, scripted):
  problems, model = scripted
  with pytest.raises(ValueError, match="max_prompt_tokens=10"):
    exact_match(model, tokenizer, problems, max_new_tokens=4, max_prompt_tokens=10)
  with pytest.raises(ValueError, match="batch_size=0"):
    exact_match(model, tokenizer, problems, max_new_tokens=4, batch_size=0)
  with pytest.raises(ValueError, match="no final '#### <number>' line"):
    exact_match(model, tokenizer, [{"question": "q", "answer": "42"}], max_new_tokens=4)
  with pytest.raises(ValueError, match="not a number"):
    exact_match(model, tokenizer, [{"question": "q", "answer": "#### many"}], max_new_tokens=4)


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice.

QUESTIONS = [
  {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"], "answer": 1},
  {
    "question": "Which word rhymes with cat?",
    "choices": ["dog", "hat", "cow", "sun"],
    "answer": "B",
    "subject": "high_school_english",
  },
  {"question": "Pick one.", "choices": ["w", "x", "y", "z"], "answer": 3},
]


def test_multiple_choice_prompt_is_mmlu_format():
  assert multiple_choice_prompt("  Is it? ", ["yes", "no"], ("A", "B"), subject="formal_logic") == (
    "The following are multiple choice questions (with answers) about formal logic.\n\nIs it?\nA. yes\nB. no\nAnswer:"
  )


def test_single_token_letters_are_read_from_the_prompts_last_logits(tokenizer):
  """A bigram model reads only the prompt's last token (':'), whose designed row puts C first, then D, B, A."""
  colon = tokenizer.encode(":", add_special_tokens=False)[0]
  letter_ids = [tokenizer.encode(" " + letter, add_special_tokens=False) for letter in MMLU_LETTERS]
  assert all(len(ids) == 1 for ids in letter_ids)
  table = np.zeros((len(tokenizer), len(tokenizer)))
  table[colon, [ids[0] for ids in letter_ids]] = [1.0, 2.0, 4.0, 3.0]
  result = multiple_choice(BigramModel(table), tokenizer, QUESTIONS, batch_size=2)
  expected = log_softmax(table[colon])[[ids[0] for ids in letter_ids]]
  # float32 log-softmax over 2048 logits vs float64: ~1e-6 absolute on values ~ -7.
  chex.assert_shape(result.log_probs, (3, 4))
  np.testing.assert_allclose(result.log_probs, np.tile(expected, (3, 1)), atol=1e-5)
  np.testing.assert_array_equal(result.predictions, [2, 2, 2])
  np.testing.assert_array_equal(result.answers, [1, 1, 3])
  assert result.accuracy == 0.0 and result.count == 3


def test_multi_token_letters_sum_their_token_log_probs():
  """Char tokens: ' A' is [' ', 'A'], ' BB' is [' ', 'B', 'B']. After ' ', B is likelier than A, but B -> B is
  unlikely, so the sum picks A while the first letter token alone would pick BB."""
  questions = [
    {"question": "abc", "choices": ["a", "b"], "answer": 0},
    {"question": "ab", "choices": ["b", "c"], "answer": 1},
  ]
  letters = ("A", "BB")
  tokenizer = char_tokenizer(
    "".join(multiple_choice_prompt(q["question"], q["choices"], letters) for q in questions) + " "
  )
  token = {c: tokenizer.convert_tokens_to_ids(c) for c in ": AB"}
  table = np.zeros((len(tokenizer), len(tokenizer)))
  table[token[":"], token[" "]] = 2.0
  table[token[" "], [token["A"], token["B"]]] = [1.0, 3.0]
  table[token["B"], token["B"]] = -4.0
  result = multiple_choice(BigramModel(table), tokenizer, questions, letters=letters)
  lp = {(a, b): log_softmax(table[token[a]])[token[b]] for a, b in [(":", " "), (" ", "A"), (" ", "B"), ("B", "B")]}
  expected = [lp[":", " "] + lp[" ", "A"], lp[":", " "] + lp[" ", "B"] + lp["B", "B"]]
  assert lp[" ", "B"] > lp[" ", "A"] and expected[0] > expected[1]
  np.testing.assert_allclose(result.log_probs, [expected, expected], atol=1e-5)  # float32 vs float64
  np.testing.assert_array_equal(result.predictions, [0, 0])
  assert result.accuracy == 0.5


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
  """(our model, the transformers model it was loaded from): a random 1-layer Llama on the shipped vocabulary,
  initializer_range 0.3 so that letters get clearly different scores."""
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=len(tokenizer),
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      max_position_embeddings=256,
      initializer_range=0.3,
    )
  ).eval()
  directory = tmp_path_factory.mktemp("tiny_llama")
  hf_model.save_pretrained(directory)
  return load_pretrained(directory), hf_model


@pytest.mark.parametrize("separator", [" ", " The answer is "])
def test_multiple_choice_agrees_with_transformers_log_probs(tokenizer, tiny_llama, separator):
  """Letter log-likelihoods of padded batches (single-token letters: one row per question; multi-token
  continuations: one row per letter) against transformers' logits of each unpadded prompt + continuation."""
  model, hf_model = tiny_llama
  result = multiple_choice(model, tokenizer, QUESTIONS, separator=separator, batch_size=2)
  expected = np.zeros((len(QUESTIONS), 4))
  for i, q in enumerate(QUESTIONS):
    prompt = multiple_choice_prompt(q["question"], q["choices"], subject=q.get("subject"))
    context = tokenizer(prompt)["input_ids"]
    for k, letter in enumerate(MMLU_LETTERS):
      ids = tokenizer(prompt + separator + letter)["input_ids"]
      with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].numpy()
      expected[i, k] = sum(log_softmax(logits[t - 1])[ids[t]] for t in range(len(context), len(ids)))
  # float32 forwards in different op orders: logits agree to ~1e-5 (tests/test_models.py uses 1e-4), summed
  # over at most 4 tokens.
  np.testing.assert_allclose(result.log_probs, expected, atol=5e-4)
  assert np.ptp(expected, axis=1).min() > 1e-2  # the letters are told apart, so the argmax is meaningful
  np.testing.assert_array_equal(result.predictions, np.argmax(expected, axis=1))
  assert result.accuracy == pytest.approx(np.mean(np.argmax(expected, axis=1) == [1, 1, 3]))


def test_multiple_choice_rejects_bad_input(tokenizer):
  model = BigramModel(np.zeros((len(tokenizer), len(tokenizer))))
  question = QUESTIONS[0]
  cases = [
    ([{"question": "q", "choices": ["a", "b", "c", "d"]}], {}, r"lacks \['answer'\]"),
    ([{**question, "choices": ["a", "b"]}], {}, "has 2 choices"),
    ([{**question, "answer": 4}], {}, "answer=4"),
    ([{**question, "answer": "E"}], {}, "answer='E'"),
    ([question], dict(letters=("A", "A")), "distinct"),
    ([], {}, "no questions"),
  ]
  for questions, kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      multiple_choice(model, tokenizer, questions, **kwargs)
  # A word-level tokenizer reads "Answer:A" as one (unknown) word: the letter is not split off the prompt.
  words = Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "Answer:": 2, "A": 3, "B": 4}, unk_token="<unk>"))
  words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  word_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>")
  with pytest.raises(ValueError, match="merge across the boundary"):
    multiple_choice(
      BigramModel(np.zeros((5, 5))),
      word_tokenizer,
      [{"question": "A", "choices": ["A", "B"], "answer": 0}],
      letters=("A", "B"),
      separator="",
    )


# ---------------------------------------------------------------------------------------------------------------
# The shipped base model, end to end.


def test_base_model_end_to_end_is_deterministic(tokenizer):
  """Shapes and repeatability only: the base model never saw a worked answer (its README), so no accuracy."""
  model = load_pretrained(SHIPPED)
  problems = load_gsm8k("test", max_records=3)
  first = exact_match(model, tokenizer, problems, max_new_tokens=8, batch_size=2)
  again = exact_match(model, tokenizer, problems, max_new_tokens=8, batch_size=2)
  assert first.completions == again.completions and len(first.completions) == 3
  assert all(0 < len(tokenizer.encode(c, add_special_tokens=False)) <= 8 for c in first.completions)
  assert first.references == [gsm8k_final_answer(p["answer"]) for p in problems]
  choice = multiple_choice(model, tokenizer, QUESTIONS)
  chex.assert_shape(choice.log_probs, (3, 4))
  assert np.all(np.isfinite(choice.log_probs)) and np.all(choice.log_probs < 0)
