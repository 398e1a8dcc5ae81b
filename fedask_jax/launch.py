"""`fedask-jax launch`: a multi-process run on one machine, to try `jax.distributed` without a cluster.

    fedask-jax launch --processes 2 --devices-per-process 2 -- train --config experiments/configs/quickstart.yaml

starts `fedask-jax train ... distributed.coordinator_address=127.0.0.1:<port> distributed.num_processes=2
distributed.process_id=<i>` once per process, each with `--devices-per-process` CPU devices (JAX_PLATFORMS=cpu,
JAX_NUM_CPU_DEVICES) and a free local port for the coordinator; it prefixes each line of their output with
`[i] `. When a process fails (any exit code but 0, and 130 / 143, a stop on a signal that every process makes
together), the launcher kills the others (a run cannot go on without one of its processes), after a short
grace so that a refusal that every process reaches (a bad config) is printed by all of them. SIGINT (Ctrl-C) and
SIGTERM sent to the launcher are passed on to every process, which stop together after a checkpointed round
(`fedask_jax.runner.processes`); the processes run in their own sessions, so that a Ctrl-C in the terminal
reaches each of them once, through the launcher. The exit code is that of the first process that failed, else
that of the processes.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import BinaryIO

# fedask_jax.runner.processes.STOP_SIGNALS, not imported: the launcher itself runs without JAX.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Exit codes of a run stopped by SIGINT / SIGTERM: every process stops after the same round, so none is killed.
_STOPPED = tuple(128 + signum for signum in STOP_SIGNALS)
# Seconds the others get to exit on their own once one process failed.
GRACE = 5.0
# Exported to the processes: the command that resumes the run, for the line a stopped run prints.
COMMAND_ENV = "FEDASK_JAX_COMMAND"


def free_port() -> int:
  """A TCP port that is free on this machine now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _forward(stream: BinaryIO, prefix: bytes, out: BinaryIO) -> None:
  """Copies `stream` to `out`, `prefix` at the start of every line; a line ending in a carriage return (a
  progress bar redrawn in place) is copied as soon as it ends."""
  pending = b""
  while chunk := os.read(stream.fileno(), 65536):
    pending += chunk
    *lines, pending = re.split(rb"(?<=[\r\n])", pending)
    if lines:
      out.write(b"".join(prefix + line for line in lines))
      out.flush()
  if pending:
    out.write(prefix + pending + b"\n")
    out.flush()


def _exit_code(returncode: int) -> int:
  """A child's exit status as a shell reports it: 128 + n for a process that signal n ended."""
  return 128 - returncode if returncode < 0 else returncode


def launch(
  processes: int, devices_per_process: int, command: Sequence[str], *, resume_command: str | None = None
) -> int:
  """Runs `fedask-jax <command>` (a `train` command whose key=value overrides come last) as `processes` processes
  of `devices_per_process` CPU devices each (module docstring); returns the exit code. `resume_command` is what
  a run stopped by a signal tells the user to run again (default: the processes' own command)."""
  command = list(command)
  if command[:1] != ["train"]:
    raise ValueError(f"fedask-jax launch runs a train command (its overrides last), got {shlex.join(command)!r}.")
  given = [arg for arg in command[1:] if arg.startswith("distributed.")]
  if given:
    raise ValueError(f"{' '.join(given)}: the launcher sets the distributed section itself; remove them.")
  address = f"127.0.0.1:{free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_per_process), "PYTHONUNBUFFERED": "1"}
  if resume_command is not None:
    env[COMMAND_ENV] = resume_command
  children = []
  for i in range(processes):
    argv = [
      sys.executable,
      "-m",
      "fedask_jax.cli",
      *command,
      f"distributed.coordinator_address={address}",
      f"distributed.num_processes={processes}",
      f"distributed.process_id={i}",
    ]
    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    children.append(child)
  prefixes = [f"[{i}] ".encode() for i in range(processes)]
  copiers = [
    threading.Thread(target=_forward, args=(stream, prefix, out), daemon=True)
    for child, prefix in zip(children, prefixes)
    for stream, out in ((child.stdout, sys.stdout.buffer), (child.stderr, sys.stderr.buffer))
  ]
  for copier in copiers:
    copier.start()

  def forward_signal(signum, frame):
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {signum: signal.signal(signum, forward_signal) for signum in STOP_SIGNALS}
  failed: tuple[int, int] | None = None  # (process, exit code) of the first failure
  deadline = None
  try:
    while any(child.poll() is None for child in children):
      if failed is None:
        for i, child in enumerate(children):
          code = child.poll()
          if code is not None and code != 0 and _exit_code(code) not in _STOPPED:
            failed, deadline = (i, _exit_code(code)), time.monotonic() + GRACE
            sys.stderr.write(f"launch: process {i} exited with code {_exit_code(code)}; stopping the others\n")
            break
      elif deadline is not None and time.monotonic() > deadline:  # set together with failed
        for child in children:
          if child.poll() is None:
            child.kill()
      time.sleep(0.05)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    for child in children:
      if child.poll() is None:
        child.kill()
      child.wait()
    for copier in copiers:
      copier.join()
  if failed is not None:
    return failed[1]
  codes = [_exit_code(child.returncode) for child in children]
  return next((code for code in codes if code != 0), 0)
