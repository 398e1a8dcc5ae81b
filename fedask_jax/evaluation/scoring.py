"""Scoring by generation and by likelihood (`fedask_jax.evaluation`): GSM8K-style exact match, MMLU-style
multiple choice.

**Exact match** (`exact_match`, GSM8K; Cobbe et al. 2021). For problem i, the model greedily generates a
completion c_i (up to N tokens or EOS) after the template's prompt; `parse_final_number` reads its final
number a_i (the first number after the last "####", else the last number in c_i: lm-eval-harness's strict and
flexible GSM8K extraction in one); accuracy = (1/n) sum_i [a_i == y_i] with y_i the reference's number after
"####". Numbers compare as decimals: "1,000" == "1000", "3.0" == "3", "$5" == "5"; no number is wrong.

**Multiple choice** (`multiple_choice`, MMLU; Hendrycks et al. 2021). Question i with K choices is shown as
`[header] question \\n A. choice_1 \\n ... \\n Answer:` (`multiple_choice_prompt`, lm-eval-harness's MMLU
format). Letter k is scored by the log-likelihood of its continuation tokens (separator + letter, e.g. " A")
after the prompt: s_ik = sum_j log p(u_kj | prompt, u_k<j); the prediction is argmax_k s_ik (ties: the first
letter) and accuracy = (1/n) sum_i [argmax_k s_ik == answer_i]. When every letter is one token (" A" in
BPE vocabularies), s_ik = log softmax(logits at the prompt's last token)[u_k], read from one forward pass of
the prompts; otherwise each (question, letter) pair is a row of the forward pass.
"""

from __future__ import annotations

import decimal
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedask_jax.data.corpora import GSM8K_ALPACA, gsm8k_final_answer
from fedask_jax.data.templates import Template
from fedask_jax.evaluation._inputs import _batches, _check_batch_size, _eval_split, _pad, _special_prefix, _tokenize
from fedask_jax.models.generation import generate

Array = jax.Array

MMLU_LETTERS = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------------------------
# GSM8K exact match.

# An optional minus that is not a binary operator (no word character or ')' before it), an optional dollar sign,
# then digits with thousands commas and an optional decimal part; a trailing period is punctuation.
_NUMBER = re.compile(r"((?<![\w)])-)?\$?(\d(?:[\d,]*\d)?(?:\.\d+)?)")
_FINAL_MARKER = "####"


class ExactMatchResult(NamedTuple):
  """accuracy: correct / count; count: problems; correct: [n] bool per problem; predictions: the parsed final
  number of each completion ('1234', '-2.5'; None where it has none); references: the reference numbers;
  completions: the generated texts (special tokens removed, cut at EOS)."""

  accuracy: float
  # Why the ignore below: the field shadows tuple.count on purpose; `count` is the public name of the result's size.
  count: int  # type: ignore[assignment]
  correct: np.ndarray
  predictions: list[str | None]
  references: list[str]
  completions: list[str]


def parse_final_number(text: str) -> str | None:
  """The final answer of a completion, normalised ('1234', '-5', '2.50'), or None (module docstring).

  With a '####' marker: the first number after the last one ("#### 1,234" -> '1234'); None if none follows.
  Without: the last number in the text ("The answer is $72." -> '72'). Commas and '$' are dropped.
  """
  _, marker, tail = text.rpartition(_FINAL_MARKER)
  if marker:
    found = _NUMBER.search(tail)
  else:
    found = None
    for match in _NUMBER.finditer(text):  # keeps the last match
      found = match
  if found is None:
    return None
  return (found.group(1) or "") + found.group(2).replace(",", "")


def exact_match(
  model: nnx.Module,
  tokenizer: Any,
  problems: Sequence[Mapping[str, Any]],
  *,
  template: Template = GSM8K_ALPACA,
  max_new_tokens: int = 256,
  batch_size: int = 16,
  max_prompt_tokens: int = 1024,
) -> ExactMatchResult:
  """GSM8K exact-match accuracy of greedy completions (module docstring).

  Args:
    model: a `LlamaForCausalLM` / `GPT2LMHeadModel` (anything `fedask_jax.models.generate` runs), evaluated as
      it is (adapters included, dropout off).
    tokenizer: a transformers tokenizer with `eos_token_id` (generation stops there) and `decode`.
    problems: n records, e.g. `fedask_jax.data.load_gsm8k("test")`; `template(record)` gives (prompt, reference
      answer), the reference ending in "#### <number>" (`gsm8k_final_answer`).
    template: the prompt template the model was trained with (default: Alpaca with GSM8K's fields).
    max_new_tokens: N, the longest completion (GSM8K worked answers: median ~100 tokens in BPE-2k, ~120 Llama).
    batch_size: prompts per `generate` call; prompts are left-padded to the longest prompt of the set, so all
      batches share one static shape [batch_size, P] and one compilation.
    max_prompt_tokens: a prompt longer than this (after the special prefix) is an error, not silently cut.

  Returns an `ExactMatchResult` with per-problem predictions, references and completions.
  """
  _check_batch_size(batch_size)
  if not problems:
    raise ValueError("exact_match got no problems: pass GSM8K-style records (fedask_jax.data.load_gsm8k).")
  pairs = [template(record) for record in problems]
  references = []
  for i, (_, answer) in enumerate(pairs):
    final = gsm8k_final_answer(answer)
    reference = parse_final_number(final)
    if reference is None:
      raise ValueError(f"problem {i}'s reference answer ends in '#### {final}', not a number: fix the record.")
    references.append(reference)
  prompts = _tokenize(tokenizer, [prompt for prompt, _ in pairs], _special_prefix(tokenizer))
  width = max(len(p) for p in prompts)
  if width > max_prompt_tokens:
    longest = int(np.argmax([len(p) for p in prompts]))
    raise ValueError(
      f"problem {longest}'s prompt has {width} tokens, more than max_prompt_tokens="
      f"{max_prompt_tokens}: raise max_prompt_tokens or drop the problem."
    )
  all_ids, all_mask = _pad(prompts, width, left=True)
  eos = tokenizer.eos_token_id
  tokens = np.zeros((len(prompts), max_new_tokens), np.int32)
  for rows, valid in _batches(len(prompts), batch_size):
    out = generate(
      model, jnp.asarray(all_ids[rows]), jnp.asarray(all_mask[rows]), max_new_tokens=max_new_tokens, eos_token_id=eos
    )
    tokens[rows[valid]] = np.asarray(out)[valid]
  # generate() writes EOS in every slot after a row's first EOS, and decoding drops special tokens: the text ends
  # where the model stopped.
  completions = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist()]
  predictions = [parse_final_number(c) for c in completions]
  # Decimal equality: '3.0' == '3', '2.50' == '2.5'; both strings are parser output, so they are valid decimals.
  correct = np.array(
    [p is not None and decimal.Decimal(p) == decimal.Decimal(r) for p, r in zip(predictions, references)]
  )
  return ExactMatchResult(
    accuracy=float(correct.mean()),
    count=len(problems),
    correct=correct,
    predictions=predictions,
    references=references,
    completions=completions,
  )


# ---------------------------------------------------------------------------------------------------------------
# MMLU-style multiple choice.


class MultipleChoiceResult(NamedTuple):
  """accuracy: fraction right; count: questions; correct: [n] bool; predictions: [n] int, the argmax letter's
  index; answers: [n] int, the right letter's index; log_probs: [n, K] float, s_ik = log p(letter k | prompt)."""

  accuracy: float
  # Why the ignore below: the field shadows tuple.count on purpose; `count` is the public name of the result's size.
  count: int  # type: ignore[assignment]
  correct: np.ndarray
  predictions: np.ndarray
  answers: np.ndarray
  log_probs: np.ndarray


def multiple_choice_prompt(
  question: str, choices: Sequence[str], letters: Sequence[str] = MMLU_LETTERS, subject: str | None = None
) -> str:
  """`[header\\n\\n]question\\nA. choice\\n...\\nAnswer:` (lm-eval-harness's MMLU prompt; Hendrycks et al. 2021).

  The header, when `subject` is given: "The following are multiple choice questions (with answers) about
  {subject with '_' as ' '}."
  """
  header = (
    ""
    if subject is None
    else (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n")
  )
  lines = [question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
  return header + "\n".join(lines) + "\nAnswer:"


def _answer_index(record: Mapping[str, Any], letters: Sequence[str], i: int) -> int:
  answer = record["answer"]
  if isinstance(answer, str) and answer in letters:
    return list(letters).index(answer)
  if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool) and 0 <= answer < len(letters):
    return int(answer)
  raise ValueError(
    f"question {i} has answer={answer!r}: it must be a choice index 0..{len(letters) - 1} or one "
    f"of the letters {tuple(letters)}."
  )


@functools.partial(jax.jit, static_argnums=0)
def _next_token_log_probs(
  graphdef: nnx.GraphDef, state: nnx.State, input_ids: Array, attention_mask: Array, candidates: Array
) -> Array:
  """log p(candidates [b, K] | each row's real tokens) [b, K], from the logits at each row's last real token."""
  model = nnx.merge(graphdef, state)
  logits = model(input_ids, attention_mask)
  last = jnp.max(jnp.where(attention_mask, jnp.arange(input_ids.shape[1]), -1), axis=1)
  log_probs = jax.nn.log_softmax(logits[jnp.arange(input_ids.shape[0]), last].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, candidates, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _target_log_probs(
  graphdef: nnx.GraphDef, state: nnx.State, input_ids: Array, attention_mask: Array, target_mask: Array
) -> Array:
  """sum_t target_mask[t] log p(ids[t] | ids[<t]) for each row [R] of input_ids [R, T]."""
  model = nnx.merge(graphdef, state)
  logits = model(input_ids, attention_mask)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), input_ids[:, 1:])
  return -jnp.sum(nll * target_mask[:, 1:], axis=1)


def multiple_choice(
  model: nnx.Module,
  tokenizer: Any,
  questions: Sequence[Mapping[str, Any]],
  *,
  letters: Sequence[str] = MMLU_LETTERS,
  separator: str = " ",
  batch_size: int = 16,
) -> MultipleChoiceResult:
  """MMLU-style accuracy: each letter scored by its log-likelihood after the prompt (module docstring).

  Args:
    model: `model(input_ids [b, T], attention_mask [b, T]) -> logits [b, T, V]`, evaluated as it is
      (adapters included, dropout off).
    tokenizer: a transformers tokenizer.
    questions: n records {"question": str, "choices": K strings, "answer": the right choice's index 0..K-1 or
      its letter, optional "subject": str (adds MMLU's header)}; Hugging Face's `cais/mmlu` rows have this form.
    letters: the K choice labels.
    separator: the text between "Answer:" and the letter; the continuation scored is separator + letter. It is
      tokenised with the prompt and split off at the prompt's tokens (lm-eval-harness's way), so a tokenizer
      that merges it into the prompt's last token is an error.
    batch_size: questions per forward pass (with multi-token letters, batch_size * K rows).

  Returns a `MultipleChoiceResult` with per-question predictions and the [n, K] letter log-likelihoods.
  """
  _check_batch_size(batch_size)
  letters = tuple(letters)
  k = len(letters)
  if k < 2 or len(set(letters)) != k:
    raise ValueError(f"letters={letters}: need at least two distinct choice labels.")
  if not questions:
    raise ValueError("multiple_choice got no questions: pass records {question, choices, answer}.")
  prompts, answers = [], []
  for i, record in enumerate(questions):
    missing = [key for key in ("question", "choices", "answer") if key not in record]
    if missing:
      raise ValueError(
        f"question {i} lacks {missing} (its keys: {sorted(record)}): records need "
        "'question', 'choices' and 'answer' (multiple_choice's docstring)."
      )
    if len(record["choices"]) != k:
      raise ValueError(
        f"question {i} has {len(record['choices'])} choices but letters={letters}: pass one letter per choice."
      )
    prompts.append(multiple_choice_prompt(record["question"], record["choices"], letters, record.get("subject")))
    answers.append(_answer_index(record, letters, i))
  prefix = _special_prefix(tokenizer)
  contexts = _tokenize(tokenizer, prompts, prefix)
  joints = _tokenize(tokenizer, [p + separator + letter for p in prompts for letter in letters], prefix)
  continuations = []
  for row, joint in enumerate(joints):
    context = contexts[row // k]
    if joint[: len(context)] != context or len(joint) == len(context):
      raise ValueError(
        f"question {row // k}: the tokenizer does not split {separator + letters[row % k]!r} off the prompt "
        f"(prompt ends {prompts[row // k][-20:]!r}): its tokens merge across the boundary; choose another "
        "separator."
      )
    continuations.append(joint[len(context) :])

  n = len(prompts)
  graphdef, state = _eval_split(model)
  log_probs = np.zeros((n, k), np.float32)
  if all(len(c) == 1 for c in continuations):
    ids, mask = _pad(contexts, max(map(len, contexts)), left=False)
    candidates = np.array(continuations, np.int32).reshape(n, k)
    for rows, valid in _batches(n, batch_size):
      out = _next_token_log_probs(
        graphdef, state, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]), jnp.asarray(candidates[rows])
      )
      log_probs[rows[valid]] = np.asarray(out)[valid]
  else:
    ids, mask = _pad(joints, max(map(len, joints)), left=False)
    targets = mask.copy()
    for row, joint in enumerate(joints):
      targets[row, : len(joint) - len(continuations[row])] = False
    ids, mask, targets = (a.reshape(n, k, -1) for a in (ids, mask, targets))
    for rows, valid in _batches(n, batch_size):
      out = _target_log_probs(
        graphdef, state, *(jnp.asarray(a[rows].reshape(len(rows) * k, -1)) for a in (ids, mask, targets))
      )
      log_probs[rows[valid]] = np.asarray(out).reshape(len(rows), k)[valid]
  predictions = np.argmax(log_probs, axis=1)
  answer_indices = np.array(answers)
  correct = predictions == answer_indices
  return MultipleChoiceResult(
    accuracy=float(correct.mean()),
    count=n,
    correct=correct,
    predictions=predictions,
    answers=answer_indices,
    log_probs=log_probs,
  )
