"""The processes of a run: multi-process runs through `jax.distributed`, and stops on SIGINT / SIGTERM.

Multi-process runs (README, "Running across hosts"). With the config's `distributed` section set, every process
runs the same `fedask-jax train` command (the same config: `check_same_config` refuses a difference, naming the
keys, before anything is loaded); `start` calls `jax.distributed.initialize` with it, before JAX's first
computation. Every process then loads the same model and data, builds the same mesh over every process's devices
(`fedask_jax.simulation.client_mesh`) and samples the same clients (the same keys); each feeds the batches of the
clients whose devices it holds (`fedask_jax.simulation.FederatedRound`). Process 0 alone writes the run
directory's files (`is_primary`) and prints; checkpoints are written by every process together (orbax), so
`run_dir` must be a directory that every process sees (one machine, or a shared filesystem). A process that
dies makes the others end within `distributed.heartbeat_timeout` seconds: JAX's coordination service, which
misses its heartbeats, terminates them ("the JAX distributed service detected fatal errors ... another task
died"); restarting every process resumes from the last checkpoint.

Evaluation (`fedask_jax.evaluation.evaluate` with the round's mesh): sharded, each batch's rows split over every
device of every process, the two sums reduced across them, rather than done by process 0 while the others wait.
On separate hosts that divides the evaluation's work by the number of processes. It could not be measured faster
here: on one 2-core machine every CPU device shares the same cores, and one process evaluating the quickstart's
200 held-out problems took 10.9 s on 1 device, 13.4 s sharded over 2 and 14.9 s over 4 (best of 3; a busy
machine). Results are the same up to float32 summation order (5.2985030 against 5.2985032).

Stops (`StopSignals`). SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) are
caught while the rounds run: the round in progress finishes (a compiled round cannot be cut short, and the
round before it donated its state to it), is checkpointed, and `train` raises `fedask_jax.runner.Interrupted`;
`fedask-jax train` then prints one line and exits with 128 + the signal's number (130 for SIGINT, 143 for
SIGTERM, the shells' convention). In a multi-process run the processes agree after every round on whether any
of them was signalled, so that all stop after the same round. A second signal stops at once (SIGINT raises
KeyboardInterrupt, SIGTERM ends the process), losing the rounds since the last checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedask_jax.config import Config, ConfigError, flatten, to_dict
from fedask_jax.data.batching import shard_rows

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# How long a barrier waits for the slowest process (one still loading a large model); a process that died ends
# the others sooner, through JAX's heartbeats.
_BARRIER_TIMEOUT_MS = 3_600_000
# Every process passes the same barriers in the same order, so the n-th ones share their keys.
_barriers = itertools.count()


def _requested(config: Config) -> bool:
  d = config.distributed
  return d.auto or d.num_processes is not None


def start(config: Config) -> None:
  """Joins the run's processes when the config's `distributed` section asks for several (module docstring), then
  checks that every process has the same config (`check_same_config`); without it, nothing.

  `jax.distributed.initialize` must come before JAX's first computation: call this first. Calling it again in the
  same process (a second `prepare`) checks the config again and that it asks for the same processes.
  """
  d = config.distributed
  if not _requested(config):
    if jax.distributed.is_initialized():
      raise ConfigError(
        "this process already joined a multi-process run (jax.distributed.initialize), but the "
        "config's distributed section is unset: set it as for that run."
      )
    return
  if jax.distributed.is_initialized():
    if not d.auto and (jax.process_count(), jax.process_index()) != (d.num_processes, d.process_id):
      raise ConfigError(
        f"distributed.num_processes={d.num_processes}, distributed.process_id={d.process_id}: this process "
        f"already runs as process {jax.process_index()} of {jax.process_count()}: one process joins one run."
      )
  else:
    # The runner stops on SIGTERM itself (StopSignals, with every process agreeing on the round). JAX's preemption
    # service would install its own SIGTERM handler, under which a process ignores SIGTERM outside the rounds.
    jax.config.update("jax_enable_preemption_service", False)
    # Older JAX had no default: CPU runs need one. Why the ignore: jax.config's flags are attributes set at import
    # time, which its stubs do not declare.
    if jax.config.jax_cpu_collectives_implementation is None:  # type: ignore[attr-defined]
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(
        coordinator_address=d.coordinator_address,
        num_processes=d.num_processes,
        process_id=d.process_id,
        heartbeat_timeout_seconds=d.heartbeat_timeout,
      )
    except RuntimeError as error:
      if "before any JAX calls" not in str(error):
        raise
      raise ConfigError(
        "distributed: jax.distributed.initialize must come before JAX's first computation, and this process "
        "already used JAX: call fedask_jax.runner.prepare (or processes.start) first."
      ) from None
  check_same_config(config)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes the run directory's files and prints."""
  return jax.process_index() == 0


def _shared_keys(config: Config) -> dict[str, Any]:
  """The config as every process must have it, by dotted key: all of it but `distributed.process_id`."""
  keys = flatten(to_dict(config))
  del keys["distributed.process_id"]
  return keys


def check_same_config(config: Config) -> None:
  """Refuses (ConfigError, in every process) a run whose processes have different configs, naming the keys in which
  this process differs from process 0; nothing to check in a one-process run.

  Every process publishes its config in the key-value store of JAX's coordination service and reads the others'
  (their SHA-256, and process 0's whole config when it differs), before anything is loaded or compiled.
  """
  if jax.process_count() == 1:
    return
  client = ocp.multihost.get_jax_distributed_client()
  prefix, me = f"fedask_jax/config/{next(_barriers)}", jax.process_index()
  mine = _shared_keys(config)
  text = yaml.safe_dump(mine, sort_keys=True)
  client.key_value_set(f"{prefix}/text/{me}", text)
  client.key_value_set(f"{prefix}/digest/{me}", hashlib.sha256(text.encode()).hexdigest())
  client.wait_at_barrier(f"{prefix}/barrier", _BARRIER_TIMEOUT_MS)
  digests = {int(key.rsplit("/", 1)[1]): value for key, value in client.key_value_dir_get(f"{prefix}/digest/")}
  differ = sorted(p for p, digest in digests.items() if digest != digests[0])
  if not differ:
    return
  reference = yaml.safe_load(client.blocking_key_value_get(f"{prefix}/text/0", _BARRIER_TIMEOUT_MS))
  keys = sorted(k for k in set(reference) | set(mine) if reference.get(k) != mine.get(k))
  detail = (
    (
      f"; this process (process {me}) differs in "
      + ", ".join(f"{k}: {reference.get(k)!r} in process 0, {mine.get(k)!r} here" for k in keys[:8])
    )
    if keys
    else ""
  )
  raise ConfigError(
    f"the processes of this run have different configs: process{'es' if len(differ) > 1 else ''} "
    f"{', '.join(map(str, differ))} differ{'' if len(differ) > 1 else 's'} from process 0{detail}. Start every "
    "process with the same config and overrides (only distributed.process_id differs)."
  )


def wait_for_all(name: str) -> None:
  """Returns once every process has called `wait_for_all(name)` (a barrier of JAX's coordination service; nothing
  with one process). Each name is used once per process."""
  if jax.process_count() > 1:
    ocp.multihost.get_jax_distributed_client().wait_at_barrier(
      f"fedask_jax/{name}/{next(_barriers)}", _BARRIER_TIMEOUT_MS
    )


def join_collectives(mesh: jax.sharding.Mesh | None) -> None:
  """Runs one collective over every device of `mesh`, which every process must reach together (call it right after
  `wait_for_all`); nothing with one process.

  CPU collectives (gloo) set up their communicator at the first collective over a set of devices and give up on a
  process that has not joined it within 30 s ("Gloo context initialization failed: ... GetKeyValue() timed out").
  A resumed run's first collective came inside its first round, after a compilation that took one process over
  30 s longer than the other on a busy machine, and the run failed; set up here, the communicator serves every
  later collective over the mesh, which then waits for the slowest process.
  """
  if jax.process_count() > 1:
    if mesh is None:
      raise ValueError("join_collectives: a multi-process run needs its device mesh (FederatedRound.mesh).")
    ones = shard_rows(np.ones(mesh.size, np.float32), mesh)
    jax.block_until_ready(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones))


def host_local(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
  """`tree` (arrays of a round on `mesh`) as arrays on this process's first device, whole: what process 0
  evaluates, exports and logs. With several processes every process must call it (it gathers over the mesh);
  with one, `tree` itself."""
  if jax.process_count() == 1:
    return tree
  if mesh is None:
    raise ValueError("host_local: a multi-process run needs its device mesh (FederatedRound.mesh).")
  replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
  return jax.tree.map(lambda x: x.addressable_data(0), replicated)


class StopSignals:
  """SIGINT and SIGTERM caught while the rounds run (module docstring), as a context manager.

  Outside the main thread signals cannot be caught, and nothing is. `on_signal(signum)` is called (in the main
  thread, between two Python instructions) on the first one; a second restores the default actions and
  re-raises.
  """

  def __init__(self, on_signal: Callable[[int], None] = lambda signum: None):
    self.received = 0
    self._on_signal = on_signal
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():
      for signum in STOP_SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # None: a handler that Python did not install (JAX's C++ one); the default action is the closest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    if self.received:
      self.__exit__()
      signal.raise_signal(signum)
      return
    self.received = signum
    self._on_signal(signum)

  def agreed(self) -> int:
    """The signal after which every process stops now (0: none): this process's, else any other's. With several
    processes every process must call it after every round (it gathers one number from each)."""
    if jax.process_count() == 1:
      return self.received
    everyone = multihost_utils.process_allgather(np.int32(self.received))
    return self.received or int(everyone.max())
