"""The `fedask-jax` command.

    fedask-jax train --config experiments/configs/quickstart.yaml [key=value ...]
    fedask-jax eval --run_dir runs/quickstart
    fedask-jax privacy --delta 1e-5 --sample-rate 0.004 --local-steps 10 --rounds 800 --clients-per-round 2 \
        --num-clients 10 --participation sampled --accountant pld --target-epsilon 1 [--json]
    fedask-jax launch --processes 2 --devices-per-process 2 -- train --config ... [key=value ...]

`train` runs (or resumes, in the same run_dir) a federated fine-tuning run (`fedask_jax.runner`); `eval`
reports the held-out loss of a run's latest checkpoint as one JSON line; `privacy` is the privacy calculator
(`fedask_jax.privacy.calculate`): the noise multiplier a target epsilon needs, or the epsilon a noise multiplier
gives, for a run's schedule; `launch` runs `train` as several processes on this machine (`fedask_jax.launch`).
Any problem with the arguments, the config or the inputs it names (`fedask_jax.config.validation`: what is
checked, and where) is reported as one line `error: ...` on stderr with exit code 2, without a traceback, before
anything is compiled.

SIGINT (Ctrl-C) or SIGTERM during `train`'s rounds stops it after the round in progress, checkpointed, with one
line `stopped by SIGINT after round t of T ...; resume with: <the same command>` on stderr and exit code 130
(SIGINT) or 143 (SIGTERM): 128 + the signal's number, as shells report a process that the signal ended
(`fedask_jax.runner.processes`). A Ctrl-C while the run is prepared (loading the model and data) ends it at
once with exit code 130, the run directory unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence

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


def _at_least_one(what: str) -> Callable[[str], int]:
  """An argparse type: an integer >= 1, refused with a message naming `what`."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = 0
    if value < 1:
      raise argparse.ArgumentTypeError(f"expected {what} >= 1, got {text!r}")
    return value

  return parse


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="fedask-jax", description="Differentially private federated LoRA fine-tuning (FedASK) in JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser(
    "train",
    help="run or resume a federated fine-tuning run",
    description="Run the rounds of a config; the same command on the same run_dir resumes from its latest checkpoint.",
  )
  train.add_argument("--config", required=True, help="YAML config file (see fedask_jax.config)")
  train.add_argument(
    "overrides",
    nargs="*",
    metavar="key=value",
    help="dotted overrides parsed as YAML values, e.g. rounds=20 privacy.target_epsilon=6",
  )
  train.add_argument("--quiet", action="store_true", help="no progress bar or notes; only the summary")
  train.add_argument(
    "--stop_after",
    type=_at_least_one("a round number"),
    metavar="ROUND",
    help="stop after this round, checkpointed, as an interruption would (resume later)",
  )
  evaluate = commands.add_parser("eval", help="held-out loss of a run's latest checkpoint")
  evaluate.add_argument("--run_dir", required=True, help="the run directory of a (finished or interrupted) run")
  calculator = commands.add_parser(
    "privacy",
    help="privacy calculator: sigma for a target epsilon, or epsilon for a sigma",
    description="Example-level (epsilon, delta)-DP of one client's data over a run (fedask_jax.privacy). "
    "Prints the asked participation model and, for comparison, the others.",
  )
  calculator.add_argument("--delta", type=float, required=True, help="delta, e.g. 1e-5")
  calculator.add_argument(
    "--sample-rate",
    type=float,
    required=True,
    help="q: per-local-step Poisson rate within a client (batch_size / the smallest client's "
    "examples), not multiplied by clients-per-round / num-clients",
  )
  calculator.add_argument("--local-steps", type=int, required=True, help="S: local steps per round")
  calculator.add_argument("--rounds", type=int, required=True, help="R: rounds")
  calculator.add_argument("--clients-per-round", type=int, required=True, help="K: clients drawn per round")
  calculator.add_argument("--num-clients", type=int, required=True, help="N: clients in the federation")
  # Participation models and accountants are checked by fedask_jax.privacy (importing it here costs seconds).
  calculator.add_argument(
    "--participation",
    default=None,
    help="sampled, worst_case or expected (NOT a guarantee); default: sampled when K < N, worst_case when K = N",
  )
  calculator.add_argument("--accountant", default=None, help="pld (default) or rdp")
  solve = calculator.add_mutually_exclusive_group(required=True)
  solve.add_argument("--target-epsilon", type=float, help="find the smallest sigma that meets this epsilon")
  solve.add_argument("--noise-multiplier", type=float, help="find the epsilon of this sigma")
  calculator.add_argument("--json", action="store_true", help="one JSON object (the asked model only)")
  launch = commands.add_parser(
    "launch",
    help="run `train` as several processes on this machine (CPU devices)",
    description="Start a train command as PROCESSES processes joined by jax.distributed, each with "
    "DEVICES_PER_PROCESS CPU devices, their output prefixed by [process]; stop them all when one "
    "fails.",
  )
  count = _at_least_one("an integer")
  launch.add_argument("--processes", type=count, required=True, help="the number of processes")
  launch.add_argument("--devices-per-process", type=count, default=1, help="CPU devices of each process")
  launch.add_argument(
    "train_command",
    nargs=argparse.REMAINDER,
    metavar="-- train --config CONFIG [key=value ...]",
    help="the train command every process runs",
  )
  return parser


def _fail(error: Exception) -> int:
  message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr)
  return 2


def _privacy(args: argparse.Namespace) -> int:
  """`fedask-jax privacy`: the calculator's result for the asked model (JSON), or a table of all three."""
  from fedask_jax import privacy

  accountant = args.accountant or privacy.DEFAULT_ACCOUNTANT
  try:
    schedule = privacy.DPSchedule.from_federation(
      sample_rate=args.sample_rate,
      local_steps=args.local_steps,
      rounds=args.rounds,
      clients_per_round=args.clients_per_round,
      num_clients=args.num_clients,
      participation=args.participation,
    )
    ask = dict(target_epsilon=args.target_epsilon, noise_multiplier=args.noise_multiplier)
    result = privacy.calculate(schedule, args.delta, accountant, **ask)
    if args.json:
      print(json.dumps(result))
      return 0
    others = [
      privacy.calculate(dataclasses.replace(schedule, participation=p), args.delta, accountant, **ask)
      for p in privacy.PARTICIPATION
      if p != schedule.participation
    ]
  except ValueError as error:
    return _fail(error)
  print(
    f"schedule: q {schedule.sample_rate:g} per local step, {schedule.local_steps} local steps, "
    f"{schedule.rounds} rounds, {args.clients_per_round} of {args.num_clients} clients per round "
    f"(q_c {schedule.participation_rate:.4g}); delta {args.delta:g}; accountant {accountant}"
  )
  notes = {
    "sampled": "rigorous: uniform client sampling, independent across rounds",
    "worst_case": "rigorous: any client selection",
    "expected": "NOT a guarantee: the official code's heuristic, under-states epsilon",
  }
  print(f"{'participation':<14} {'noise multiplier':>16} {'epsilon':>9}  what it guarantees")
  for row in [result, *others]:
    mark = " *" if row is result else ""
    print(
      f"{row['participation'] + mark:<14} {row['noise_multiplier']:>16.4f} {row['epsilon']:>9.4f}  "
      f"{notes[row['participation']]}"
    )
  print(
    "* the asked model"
    + ("; each row's sigma is the smallest meeting the target epsilon" if args.target_epsilon is not None else "")
  )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the console script; returns the exit code (0, or 2 on a config or input error)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = _parser().parse_args(argv)
  except _UsageError as error:
    return _fail(error)
  if args.command == "launch":
    from fedask_jax.launch import launch

    command = args.train_command[1:] if args.train_command[:1] == ["--"] else args.train_command
    try:
      # Checked here, before any process starts, and rewritten with the overrides last, after which the launcher
      # appends each process's distributed.* ones.
      train = _parser().parse_args(command)
      if train.command != "train":
        raise _UsageError(
          f"fedask-jax launch runs a train command, got {shlex.join(command)!r}: write "
          "fedask-jax launch --processes 2 -- train --config CONFIG."
        )
      flags = (["--quiet"] if train.quiet else []) + (
        ["--stop_after", str(train.stop_after)] if train.stop_after else []
      )
      return launch(
        args.processes,
        args.devices_per_process,
        ["train", "--config", train.config, *flags, *train.overrides],
        resume_command=shlex.join(["fedask-jax", *argv]),
      )
    except (_UsageError, ValueError) as error:
      return _fail(error)
  # Deferred: importing JAX and the models costs seconds that `--help` and argument errors should not pay.
  import jax

  if args.command == "privacy":
    return _privacy(args)

  from transformers.utils import logging as transformers_logging

  from fedask_jax import runner
  from fedask_jax.config import load_config
  from fedask_jax.launch import COMMAND_ENV

  # Not actionable here: the tokenizer warns about sequences longer than the model's context, which encoding
  # truncates anyway.
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
  except KeyboardInterrupt:
    print("interrupted while preparing the run: nothing was trained, the run directory is unchanged", file=sys.stderr)
    return 128 + signal.SIGINT
  from fedask_jax.checkpoint import UnreadableCheckpoints

  try:
    summary = runner.train(experiment, progress=not args.quiet, stop_after=args.stop_after)
  except UnreadableCheckpoints as error:  # found only when train resumes; anything else keeps its traceback
    return _fail(error)
  except runner.Interrupted as stop:
    if runner.processes.is_primary():
      command = os.environ.get(COMMAND_ENV) or shlex.join(["fedask-jax", *argv])
      every = " (in every process)" if jax.process_count() > 1 and COMMAND_ENV not in os.environ else ""
      print(f"{stop}; resume with: {command}{every}", file=sys.stderr)
    return 128 + stop.signum
  if summary is not None:  # process 0's
    print(runner.format_summary(summary, experiment.run_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
