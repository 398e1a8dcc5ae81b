"""Server-state checkpoints of a federated run through orbax's `CheckpointManager`.

A checkpoint of round t holds two items: `state`, a pytree of arrays (the global adapters, the strategy's
state such as SCAFFOLD's control variates or FedSA-LoRA's per-client factors, the run key, the round), and
`ledger`, a JSON dict (the privacy ledger: noise multiplier, sampling rate, accountant, steps and epsilon spent,
plus whatever else the runner records). Typed PRNG keys are stored as their raw key data and re-wrapped on
restore, so a run resumes with the very same keys (design.md section 3).

Layout: `<directory>/<round>/{state,ledger}`; orbax writes each step to a temporary directory and renames it
when complete, so an interrupted save leaves no step behind and `latest_round` only sees whole checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class StateCheckpoints:
  """Round-indexed orbax checkpoints of a pytree `state` and a JSON `ledger`, keeping the newest `keep`.

  Saves are synchronous (the round loop waits): a save then a crash never leaves a half-written latest step.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep={keep!r}: keep at least one checkpoint.")
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True),
        item_names=("state", "ledger"))

  def rounds(self) -> list[int]:
    """The rounds that have a complete checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_round(self) -> int | None:
    """The newest checkpointed round, or None."""
    return self._manager.latest_step()

  def save(self, round_index: int, state: Any, ledger: dict[str, Any]) -> None:
    """Checkpoint `state` (pytree of arrays; typed PRNG keys allowed) and `ledger` (JSON) as round t."""
    raw = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(raw), ledger=ocp.args.JsonSave(ledger)), force=True)
    self._manager.wait_until_finished()

  def restore(self, round_index: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """(state, ledger) of round t; `template` is a state of the same structure, shapes and dtypes."""
    abstract = jax.tree.map(
        lambda x: ocp.utils.to_shape_dtype_struct(jax.random.key_data(x) if _is_key(x) else x), template)
    restored = self._manager.restore(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), ledger=ocp.args.JsonRestore()))
    state = jax.tree.map(
        lambda t, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        template, restored.state)
    return state, dict(restored.ledger)

  def close(self) -> None:
    self._manager.close()
