"""Server-state checkpoints of a federated run through orbax's `CheckpointManager`.

A checkpoint of round t holds two items: `state`, a pytree of arrays (the global adapters, the strategy's
state such as SCAFFOLD's control variates or FedSA-LoRA's per-client factors, the run key, the round), and
`ledger`, a JSON dict (the privacy ledger: noise multiplier, sampling rate, accountant, steps and epsilon spent,
plus whatever else the runner records). Typed PRNG keys are stored as their raw key data and re-wrapped on
restore, so a run resumes with the very same keys (docs/design.md, section 6.2).

Several processes (`jax.distributed`): every process calls `save` and `restore` together, with the same state;
arrays over every process's devices are written through orbax's multi-process support (each shard once, by
the process that holds it; the step committed by process 0 once all have written), and host values (numpy,
keys) once. The directory must be one that every process sees.

Layout: `<directory>/<round>/{state,ledger}`. Faults:

- A killed save: orbax writes each step to `<round>.orbax-checkpoint-tmp` and renames it when complete, so an
  interrupted save leaves no step behind and `rounds` only sees whole checkpoints; the next save of that round
  replaces the leftover temporary directory.
- A damaged checkpoint (a truncated or garbled file, a state copied from another round): orbax and
  tensorstore keep no checksum of array data (a garbled byte can restore silently as a wrong value, another
  round's state restores without complaint), so the ledger also records the SHA-256 of the state's arrays
  (`STATE_DIGEST`), checked on restore. `restore_latest` skips unreadable checkpoints, newest first,
  with a warning, and a later save of a skipped round replaces it.
- Test hook: with the environment variable `PAUSE_BEFORE_COMMIT` (FEDASK_JAX_PAUSE_BEFORE_COMMIT) set to
  `<round>:<file>`, the save of that round writes its temporary directory, then `<file>` (holding the
  temporary directory's path), and waits, never committing, for the test to kill the process inside the write
  (tests/test_faults.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedask_jax._checks import check_int

STATE_DIGEST = "state_sha256"
PAUSE_BEFORE_COMMIT = "FEDASK_JAX_PAUSE_BEFORE_COMMIT"


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_key_data(x: Any) -> Any:
  """A typed PRNG key as its raw key data in a numpy array: a host value, the same in every process, which orbax
  writes once (it refuses an array on one process's device in a multi-process run); other leaves as they are."""
  return np.asarray(jax.random.key_data(x)) if _is_key(x) else x


def state_digest(raw: Any) -> str:
  """SHA-256 (hex) of a pytree of arrays (no typed keys): every leaf's path, dtype, shape and bytes, in order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(raw)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      # Multi-host: the server state is replicated, so every host hashes its own full copy.
      leaf = leaf.addressable_data(0)
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


class _PausingRename(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename, paused between the write and the commit (the module docstring's test hook)."""

  async def finalize(self):
    round_index, path = os.environ[PAUSE_BEFORE_COMMIT].split(":", 1)
    if self.get_final().name == round_index:
      # Renamed into place, so that the waiting test never reads it half-written.
      Path(path + ".tmp").write_text(str(self.get()), encoding="utf-8")
      os.replace(path + ".tmp", path)
      while True:
        await asyncio.sleep(1.0)
    await super().finalize()


class UnreadableCheckpoints(ValueError):
  """A run directory has checkpoints but none restores: an input problem the CLI reports in one line."""


class Restored(NamedTuple):
  """`restore_latest`'s result: the round, its state and ledger, and (round, error) of every newer checkpoint
  that could not be read."""

  round: int
  state: Any
  ledger: dict[str, Any]
  unreadable: tuple[tuple[int, str], ...]


class StateCheckpoints:
  """Round-indexed orbax checkpoints of a pytree `state` and a JSON `ledger`, keeping the newest `keep`.

  Saves are synchronous (the round loop waits): a save then a crash never leaves a half-written latest step.
  Keep at least 2 for `restore_latest` to have a checkpoint to fall back to.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int):
    check_int("keep", keep, 1, what="the number of checkpoints kept")
    self.directory = Path(os.path.abspath(directory))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=True,
        temporary_path_class=_PausingRename if os.environ.get(PAUSE_BEFORE_COMMIT) else None,
      ),
      item_names=("state", "ledger"),
    )

  def rounds(self) -> list[int]:
    """The rounds that have a complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_round(self) -> int | None:
    """The newest checkpointed round, or None."""
    return self._manager.latest_step()

  def save(self, round_index: int, state: Any, ledger: dict[str, Any]) -> None:
    """Checkpoint `state` (pytree of arrays; typed PRNG keys allowed) and `ledger` (JSON) as round t, with the
    state's digest in the ledger; an existing checkpoint of round t (one `restore_latest` skipped) is replaced."""
    if STATE_DIGEST in ledger:
      raise ValueError(f"ledger key {STATE_DIGEST!r} is reserved for the state's digest: rename that entry.")
    raw = jax.tree.map(_host_key_data, state)
    if round_index in self._manager.all_steps():
      self._manager.delete(round_index)
    self._manager.save(
      round_index,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(raw), ledger=ocp.args.JsonSave({**ledger, STATE_DIGEST: state_digest(raw)})
      ),
      force=True,
    )
    self._manager.wait_until_finished()

  def restore(self, round_index: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """(state, ledger) of round t; `template` is a state of the same structure, shapes and dtypes. Raises
    ValueError when the restored arrays do not match the digest saved with them (a damaged checkpoint); orbax's
    own errors (missing or unparsable files) pass through."""
    abstract = jax.tree.map(lambda x: ocp.utils.to_shape_dtype_struct(_host_key_data(x)), template)
    restored = self._manager.restore(
      round_index, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), ledger=ocp.args.JsonRestore())
    )
    ledger = dict(restored.ledger)
    # Checkpoints written before digests were recorded have none to check.
    expected = ledger.pop(STATE_DIGEST, None)
    if expected is not None and state_digest(restored.state) != expected:
      raise ValueError(
        f"checkpoint {self.directory / str(round_index)}: the restored arrays do not match the SHA-256 saved "
        "with them (a damaged file)."
      )
    state = jax.tree.map(
      lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
      template,
      restored.state,
    )
    return state, ledger

  def restore_latest(self, template: Any) -> Restored | None:
    """The newest checkpoint that restores (`restore`), or None when there is no checkpoint.

    Unreadable checkpoints are skipped, newest first, each with a `warnings.warn`; they stay on disk until a
    save of the same round replaces them. Raises `UnreadableCheckpoints` when there are checkpoints but none is
    readable.
    """
    unreadable: list[tuple[int, str]] = []
    for round_index in reversed(self.rounds()):
      try:
        state, ledger = self.restore(round_index, template)
      # Any failure: a damaged checkpoint shows as tensorstore, JSON, Unicode or OS errors, or our digest check.
      except Exception as error:  # noqa: BLE001
        message = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        unreadable.append((round_index, message))
        warnings.warn(
          f"checkpoint of round {round_index} in {self.directory} is unreadable ({message}); trying the previous one.",
          stacklevel=2,
        )
        continue
      return Restored(round_index, state, ledger, tuple(unreadable))
    if unreadable:
      detail = "; ".join(f"round {r}: {m}" for r, m in unreadable)
      raise UnreadableCheckpoints(
        f"no readable checkpoint in {self.directory} ({detail}): restore the directory from a backup, or move "
        "it away to start the run over."
      )
    return None

  def close(self) -> None:
    self._manager.close()
