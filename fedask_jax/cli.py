"""The `fedask-jax` command.

    fedask-jax train --config experiments/configs/quickstart.yaml [key=value ...]
    fedask-jax eval --run_dir runs/quickstart

`train` runs (or resumes, in the same run_dir) a federated fine-tuning run (`fedask_jax.runner`); `eval`
reports the held-out loss of a run's latest checkpoint as one JSON line. Any problem with the arguments, the
config or the inputs it names (`fedask_jax.config.validation`: what is checked, and where) is reported as one line
`error: ...` on stderr with exit code 2, without a traceback, before anything is compiled.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

# What `train` and `eval` raise before the first round on bad input: ValueErrors (the config, or the files and
# columns it names), OSErrors and EOFErrors (a file that cannot be read, a corrupt or truncated gzip). Errors after
# that are bugs and keep their traceback.
_INPUT_ERRORS = (ValueError, OSError, EOFError)


class _UsageError(Exception):
  """A bad command line, reported like any other input error."""


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line (argparse prints the usage block before it) and exit code 2."""

  def error(self, message: str):
    raise _UsageError(f"{message} (see {self.prog} --help)")


def _round_number(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a round number >= 1, got {text!r}")
  return value


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="fedask-jax", description="Differentially private federated LoRA fine-tuning (FedASK) in JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser(
      "train", help="run or resume a federated fine-tuning run",
      description="Run the rounds of a config; the same command on the same run_dir resumes from its latest "
                  "checkpoint.")
  train.add_argument("--config", required=True, help="YAML config file (see fedask_jax.config)")
  train.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides parsed as YAML values, e.g. rounds=20 privacy.target_epsilon=6")
  train.add_argument("--quiet", action="store_true", help="no progress bar or notes; only the summary")
  train.add_argument("--stop_after", type=_round_number, metavar="ROUND",
                     help="stop after this round, checkpointed, as an interruption would (resume later)")
  evaluate = commands.add_parser("eval", help="held-out loss of a run's latest checkpoint")
  evaluate.add_argument("--run_dir", required=True, help="the run directory of a (finished or interrupted) run")
  return parser


def _fail(error: Exception) -> int:
  message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the console script; returns the exit code (0, or 2 on a config or input error)."""
  try:
    args = _parser().parse_args(argv)
  except _UsageError as error:
    return _fail(error)
  # Deferred: importing JAX and the models costs seconds that `--help` and argument errors should not pay.
  from absl import logging as absl_logging

  from fedask_jax import runner
  from fedask_jax.config import load_config

  from transformers.utils import logging as transformers_logging

  # Not actionable here: dp_accounting's RDP logs a warning per order it drops (hundreds per calibration), and
  # the tokenizer warns about sequences longer than the model's context, which encoding truncates anyway.
  absl_logging.set_verbosity(absl_logging.ERROR)
  transformers_logging.set_verbosity_error()

  if args.command == "eval":
    try:
      result = runner.evaluate_run(args.run_dir)
    except _INPUT_ERRORS as error:
      return _fail(error)
    print(json.dumps(result))
    return 0

  try:
    experiment = runner.prepare(load_config(args.config, args.overrides))
  except _INPUT_ERRORS as error:
    return _fail(error)
  from fedask_jax.checkpoint import UnreadableCheckpoints

  try:
    summary = runner.train(experiment, progress=not args.quiet, stop_after=args.stop_after)
  except UnreadableCheckpoints as error:  # found only when train resumes; anything else keeps its traceback
    return _fail(error)
  print(runner.format_summary(summary, experiment.run_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
