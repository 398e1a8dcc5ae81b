"""The `fedask-jax` command.

    fedask-jax train --config experiments/configs/quickstart.yaml [key=value ...]
    fedask-jax eval --run_dir runs/quickstart

`train` runs (or resumes, in the same run_dir) a federated fine-tuning run (`fedask_jax.runner`); `eval`
reports the held-out loss of a run's latest checkpoint as one JSON line. Any problem with the config or the
inputs it names is reported as one line `error: ...` on stderr with exit code 2, before anything is compiled.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
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
  train.add_argument("--stop_after", type=int, metavar="ROUND",
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
  args = _parser().parse_args(argv)
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
    except ValueError as error:
      return _fail(error)
    print(json.dumps(result))
    return 0

  # ValueErrors before the first round are bad input (the config, or the files and columns it names);
  # errors after that are bugs and keep their traceback.
  try:
    experiment = runner.prepare(load_config(args.config, args.overrides))
  except ValueError as error:
    return _fail(error)
  summary = runner.train(experiment, progress=not args.quiet, stop_after=args.stop_after)
  print(runner.format_summary(summary, experiment.run_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
