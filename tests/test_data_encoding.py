"""Tests for fedask_jax.data.templates, fedask_jax.data.encoding and the GSM8K eval set."""

import functools

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fedask_jax.data import corpora, encoding, templates

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "what", "is", "two", "plus", "two?", "it", "four"]


def word_tokenizer(with_bos: bool) -> PreTrainedTokenizerFast:
  """A whitespace WordLevel tokenizer whose ids are the positions in WORDS, so encodings can be written by hand."""
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  if with_bos:
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
  )


@functools.cache
def gsm8k_tokenizer() -> PreTrainedTokenizerFast:
  """A Llama-style BPE (Metaspace pre-tokenizer, BOS post-processor) trained on 300 GSM8K examples."""
  texts = [t for r in corpora.load_gsm8k("train", max_records=300) for t in corpora.GSM8K_ALPACA(r)]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(
    texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
  )
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_alpaca_template_exact_text():
  # Typed out from tatsu-lab/stanford_alpaca train.py PROMPT_DICT, not from the module's constants.
  template = templates.AlpacaTemplate()
  prompt, response = template({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
  assert prompt == (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:"
  )
  assert response == "5"
  for record in ({"instruction": "Say hi.", "input": "", "output": "Hi"}, {"instruction": "Say hi.", "output": "Hi"}):
    assert template(record) == (
      "Below is an instruction that describes a task. "
      "Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nSay hi.\n\n### Response:",
      "Hi",
    )


def test_gsm8k_alpaca_and_plain_templates():
  record = {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}
  prompt, response = corpora.GSM8K_ALPACA(record)
  assert prompt.endswith("### Instruction:\nWhat is 2+2?\n\n### Response:") and "### Input" not in prompt
  assert response == "2+2=4\n#### 4"
  plain = templates.get_template("plain", prompt_field="question", response_field="answer")
  assert plain(record) == ("What is 2+2?\n", "2+2=4\n#### 4")


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: templates.AlpacaTemplate()({"question": "q", "answer": "a"}), "record has no field 'instruction'"),
    (lambda: templates.PlainTemplate()({"prompt": 1, "response": "a"}), "'prompt' is a int, not text"),
    (lambda: templates.get_template("chatml"), "template='chatml'"),
    (lambda: templates.get_template("plain", instruction_field="q"), "accepts"),
  ],
)
def test_template_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("with_bos", [True, False])
def test_loss_mask_covers_exactly_response_and_eos(with_bos):
  tokenizer = word_tokenizer(with_bos)
  template = templates.PlainTemplate(prompt_field="q", response_field="a")
  encoded = encoding.encode([{"q": "what is two plus two?", "a": "it is four"}], template, tokenizer, 12)
  # Hand-encoded: [<s>] what is two plus two? | it is four </s> | <pad>...
  bos = [1] if with_bos else []
  ids = bos + [4, 5, 6, 7, 8] + [9, 5, 10] + [2]
  expected_ids = ids + [3] * (12 - len(ids))
  np.testing.assert_array_equal(encoded.input_ids, [expected_ids])
  np.testing.assert_array_equal(encoded.attention_mask, [[True] * len(ids) + [False] * (12 - len(ids))])
  response = [False] * (len(bos) + 5) + [True] * 4
  np.testing.assert_array_equal(encoded.loss_mask, [response + [False] * (12 - len(ids))])
  np.testing.assert_array_equal(encoded.prompt_length, [len(bos) + 5])
  assert encoded.input_ids.dtype == np.int32 and encoded.loss_mask.dtype == bool
  assert encoded.num_truncated == 0 and encoded.num_without_targets == 0


def test_truncation_is_counted_and_cuts_the_response():
  tokenizer = word_tokenizer(with_bos=True)
  # Lengths with BOS and EOS: 1 + 1 + 1 + 1 = 4, 1 + 5 + 3 + 1 = 10, 1 + 5 + 1 + 1 = 8.
  prompts = ["what", "what is two plus two?", "what is two plus two?"]
  responses = ["four", "it is four", "four"]
  encoded = encoding.encode_pairs(prompts, responses, tokenizer, 8, pad_id=0)
  np.testing.assert_array_equal(encoded.full_length, [4, 10, 8])
  assert encoded.num_truncated == 1
  np.testing.assert_array_equal(encoded.input_ids[1], [1, 4, 5, 6, 7, 8, 9, 5])  # "four" and EOS cut
  np.testing.assert_array_equal(encoded.loss_mask[1], [False] * 6 + [True] * 2)
  np.testing.assert_array_equal(encoded.input_ids[0], [1, 4, 10, 2, 0, 0, 0, 0])  # explicit pad id
  short = encoding.encode_pairs(prompts, responses, tokenizer, 5)
  assert short.num_truncated == 2 and short.num_without_targets == 2
  assert not short.loss_mask[1:].any() and short.attention_mask[1:].all()
  np.testing.assert_array_equal(short.prompt_length, [2, 5, 5])


def test_encoding_errors():
  tokenizer = word_tokenizer(with_bos=True)
  with pytest.raises(ValueError, match="max_seq_len=1"):
    encoding.encode_pairs(["what"], ["four"], tokenizer, 1)
  with pytest.raises(ValueError, match="1 prompts but 2 responses"):
    encoding.encode_pairs(["what"], ["four", "it"], tokenizer, 8)
  tokenizer.eos_token = None
  with pytest.raises(ValueError, match="no eos_token"):
    encoding.encode_pairs(["what"], ["four"], tokenizer, 8)


def test_gsm8k_encoding_agrees_with_the_tokenizer():
  tokenizer = gsm8k_tokenizer()
  records = corpora.load_gsm8k("train", max_records=64)
  encoded = encoding.encode(records, corpora.GSM8K_ALPACA, tokenizer, 256)
  assert encoded.input_ids.shape == (64, 256)
  for i, record in enumerate(records):
    prompt, response = corpora.GSM8K_ALPACA(record)
    # Reference: transformers' own encoding, with its special tokens (BOS) for the prompt.
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert prompt_ids[0] == tokenizer.bos_token_id
    np.testing.assert_array_equal(encoded.input_ids[i, : encoded.prompt_length[i]], prompt_ids)
    np.testing.assert_array_equal(encoded.input_ids[i][encoded.loss_mask[i]], target_ids[: 256 - len(prompt_ids)])
    assert encoded.full_length[i] == len(prompt_ids) + len(target_ids)
  assert encoded.num_truncated == int(np.sum(encoded.full_length > 256))


def test_gsm8k_eval_set():
  tokenizer = gsm8k_tokenizer()
  encoded, answers = corpora.gsm8k_eval_set(tokenizer, 384, max_examples=20)
  records = corpora.load_gsm8k("test")[:20]
  reference = encoding.encode(records, corpora.GSM8K_ALPACA, tokenizer, 384)
  for got, want in zip(encoded, reference):
    np.testing.assert_array_equal(got, want)
  assert answers == [r["answer"].split("####")[-1].strip().replace(",", "") for r in records]
  subset = encoded.subset(np.arange(5))
  np.testing.assert_array_equal(subset.input_ids, encoded.input_ids[:5])
  assert subset.num_examples == 5
