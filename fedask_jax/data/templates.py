"""Prompt templates: a template maps a record to (prompt text, response text).

The loss covers the response only (`fedask_jax.data.encoding`), so the split between the two matters: the
prompt is what the model is given at evaluation time, the response what it must produce.

- `AlpacaTemplate`: the Stanford Alpaca prompt (tatsu-lab/stanford_alpaca, train.py `PROMPT_DICT`), word for
  word, with and without an input; the FedASK paper instruction-tunes with it. The prompt ends with
  "### Response:" and the response follows with no separator, as in Alpaca's `source + target`;
  `encode` tokenises prompt and response separately, so the response starts on a token boundary (a
  SentencePiece tokenizer such as Llama's reads that boundary as a space).
- `PlainTemplate`: the prompt field followed by a separator (default "\\n"), then the response field.

Field names are configurable; for GSM8K use `AlpacaTemplate(instruction_field="question",
input_field=None, response_field="answer")` (`fedask_jax.data.corpora.GSM8K_ALPACA`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

Template = Callable[[Mapping[str, Any]], tuple[str, str]]

ALPACA_PROMPT_INPUT = (
  "Below is an instruction that describes a task, paired with an input that provides further context. "
  "Write a response that appropriately completes the request.\n\n"
  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
  "Below is an instruction that describes a task. "
  "Write a response that appropriately completes the request.\n\n"
  "### Instruction:\n{instruction}\n\n### Response:"
)


def _field(record: Mapping[str, Any], name: str) -> str:
  if name not in record:
    raise ValueError(
      f"record has no field {name!r} (its fields: {sorted(record)}): set the template's field names to the "
      "dataset's columns, e.g. AlpacaTemplate(instruction_field='question', response_field='answer')."
    )
  value = record[name]
  if not isinstance(value, str):
    raise ValueError(f"record field {name!r} is a {type(value).__name__}, not text: templates format strings.")
  return value


@dataclasses.dataclass(frozen=True)
class AlpacaTemplate:
  """Stanford Alpaca's prompt; the input section appears only when the input field is present and non-empty.

  Attributes:
    instruction_field: the record's instruction column.
    input_field: the record's optional input column (None: the dataset has none).
    response_field: the record's response column.
  """

  instruction_field: str = "instruction"
  input_field: str | None = "input"
  response_field: str = "output"

  def __call__(self, record: Mapping[str, Any]) -> tuple[str, str]:
    instruction = _field(record, self.instruction_field)
    extra = _field(record, self.input_field) if self.input_field and record.get(self.input_field) else ""
    if extra:
      prompt = ALPACA_PROMPT_INPUT.format(instruction=instruction, input=extra)
    else:
      prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt, _field(record, self.response_field)


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
  """prompt = record[prompt_field] + separator; response = record[response_field]."""

  prompt_field: str = "prompt"
  response_field: str = "response"
  separator: str = "\n"

  def __call__(self, record: Mapping[str, Any]) -> tuple[str, str]:
    return _field(record, self.prompt_field) + self.separator, _field(record, self.response_field)


_TEMPLATES: dict[str, type[AlpacaTemplate] | type[PlainTemplate]] = {"alpaca": AlpacaTemplate, "plain": PlainTemplate}


def get_template(name: str, **fields: Any) -> AlpacaTemplate | PlainTemplate:
  """A template by name ("alpaca" or "plain"), with field names as keyword arguments (config-friendly)."""
  if name not in _TEMPLATES:
    raise ValueError(f"template={name!r}: choose one of {sorted(_TEMPLATES)}.")
  try:
    return _TEMPLATES[name](**fields)
  except TypeError as e:
    names = [f.name for f in dataclasses.fields(_TEMPLATES[name])]
    raise ValueError(f"template {name!r} got fields {sorted(fields)}; it accepts {names}.") from e
