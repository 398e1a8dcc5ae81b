"""Held-out evaluation: language-model loss and perplexity, GSM8K-style exact match, MMLU-style multiple choice.

Prompts are tokenised as `fedask_jax.data.encode` tokenises them for training (the tokenizer's special prefix,
e.g. BOS, then the text without special tokens), so the model sees at evaluation the prefix it was trained on.
Batches have a static size: the last one is padded with copies of the first row whose results are dropped
(or whose loss mask is all False), so a whole set is evaluated by one compiled function.

The package's modules: `fedask_jax.evaluation.loss` (held-out loss and perplexity, `evaluate`, `text_windows`) and
`fedask_jax.evaluation.scoring` (generation-based GSM8K exact match, multiple-choice scoring). Every public name is
importable from `fedask_jax.evaluation`.
"""

from fedask_jax.evaluation.loss import EvalResult, evaluate, text_windows
from fedask_jax.evaluation.scoring import (
  MMLU_LETTERS,
  ExactMatchResult,
  MultipleChoiceResult,
  exact_match,
  multiple_choice,
  multiple_choice_prompt,
  parse_final_number,
)
