"""Fault tests: non-finite clients in the compiled round (fedask_jax.simulation), damaged checkpoints
(fedask_jax.checkpoint.state), runs killed with SIGKILL inside a round and inside a checkpoint write, and runs
stopped by SIGINT / SIGTERM, that resume to the uninterrupted run's result (fedask_jax.runner through the CLI).

Tolerances. The round tests compare a round with a poisoned client against the same round run on the other
clients only: the clients' local training is the same program on the same inputs (bit-identical), but the
aggregation sums K = 3 terms (one of weight exactly 0) instead of 2, which XLA may order differently: a few
float32 ulps, amplified at most ~10x by FedASK's QR/SVD, hence rtol 1e-5 / atol 1e-6; leaking the poisoned
client in would give NaN, and a wrong renormalisation changes results at O(0.1). Resumed runs are compared
bit for bit: every random draw derives from the run key and the round (fedask_jax.runner.loop module docstring).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import nnx
from run_fixtures import assert_same_run, compilation_cache_env, make_tiny_setup, metrics_lines, signal_on_line

from fedask_jax import cli, runner, simulation
from fedask_jax.adapters import combine, select
from fedask_jax.checkpoint import state as checkpoint_state
from fedask_jax.checkpoint.state import StateCheckpoints, UnreadableCheckpoints
from fedask_jax.config import load_config
from fedask_jax.lora import Linear, LoRAConfig, inject_lora
from fedask_jax.strategies import STRATEGIES, ClientResult, get_strategy

NUM_CLIENTS = 10
CLIENT_IDS = np.array([7, 0, 4], np.int32)
WEIGHTS = np.array([3.0, 1.0, 2.0], np.float32)
POISONED = 1  # index into CLIENT_IDS: client 0
CLOSE = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite clients in the compiled round.


class TinyMLP(nnx.Module):
  """x [.., 6] -> fc2(tanh(fc1(x))) [.., 5], both layers LoRA-adapted (rank 2): a round compiles in about a
  second."""

  def __init__(self):
    key = jax.random.key(0)
    self.fc1 = Linear(6, 8)
    self.fc2 = Linear(8, 5)
    self.fc1.kernel.set_value(jax.random.normal(jax.random.fold_in(key, 1), (6, 8)) / np.sqrt(6))
    self.fc2.kernel.set_value(jax.random.normal(jax.random.fold_in(key, 2), (8, 5)) / np.sqrt(8))
    inject_lora(self, LoRAConfig(rank=2, alpha=4.0, target_modules=("fc1", "fc2")), jax.random.fold_in(key, 3))

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


class Examples(NamedTuple):
  """x [..., 6], y [..., 5], scale [...] (1, or NaN / Inf to poison an example), example_mask [...]."""

  x: jax.Array
  y: jax.Array
  scale: jax.Array
  example_mask: jax.Array


def scaled_squared_error(model, example):
  """0.5 ||model(x) - y||^2 times the example's scale: a NaN or Inf scale makes its gradient non-finite."""
  return 0.5 * jnp.sum((model(example.x[None])[0] - example.y) ** 2) * example.scale


def make_batches(poison: dict[int, float], steps: int = 3, capacity: int = 4) -> Examples:
  """[K, S, capacity, ...] batches; client k of `poison` gets scale poison[k] on its first step's first example
  (a real one: example_mask 1 there)."""
  k = len(CLIENT_IDS)
  key = jax.random.key(42)
  mask = np.array(jax.random.bernoulli(jax.random.fold_in(key, 2), 0.7, (k, steps, capacity)))
  scale = np.ones((k, steps, capacity), np.float32)
  for client, value in poison.items():
    scale[client, 0, 0], mask[client, 0, 0] = value, True
  return Examples(
    jax.random.normal(jax.random.fold_in(key, 0), (k, steps, capacity, 6)),
    jax.random.normal(jax.random.fold_in(key, 1), (k, steps, capacity, 5)),
    jnp.asarray(scale),
    jnp.asarray(mask),
  )


def random_state(rnd: simulation.FederatedRound) -> simulation.ServerState:
  """Every leaf random (numpy, to copy from): non-zero lora_b, FedSA-LoRA client factors and SCAFFOLD
  controls, so that a client's start and its per-client state are not trivially zero."""
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(x.dtype), rnd.init(NUM_CLIENTS))


def run_round(rnd, state, batches, rows):
  """Round 1 on the clients `rows` of CLIENT_IDS (a fresh device copy of the numpy `state`: it is donated)."""
  take = lambda x: x[np.asarray(rows)]
  new, metrics = rnd(
    jax.tree.map(jnp.asarray, state),
    jax.tree.map(take, batches),
    jnp.asarray(CLIENT_IDS[rows]),
    jnp.asarray(WEIGHTS[rows]),
    jax.random.key(5),
    1,
  )
  return jax.tree.map(np.asarray, new), jax.device_get(metrics)


def assert_left_out(new, reference, start, metrics):
  np.testing.assert_array_equal(metrics["client_valid"], [True, False, True])
  assert metrics["invalid_clients"] == 1 and metrics["skipped"] == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new))
  # The left-out client changes nothing, per-client state included (FedSA-LoRA's own lora_b, SCAFFOLD's c_k
  # and c): the result is the round run on the other clients only.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **CLOSE), new, reference)
  # The round moved the adapters: the comparison is not between two copies of the start state.
  assert max(np.abs(x - y).max() for x, y in zip(jax.tree.leaves(new.adapters), jax.tree.leaves(start.adapters))) > 1e-3


def synthetic_results(rnd: simulation.FederatedRound, state: simulation.ServerState) -> ClientResult:
  """Client results [K] as round 1's local training would shape them: each client's start moved at random on
  the trained factor(s), the other one kept; a random mean gradient of the trained factor(s)."""
  trained = rnd.trained(1)
  starts, _ = jax.jit(jax.vmap(rnd.strategy.client_start, in_axes=(None, None, 0)))(
    state.strategy_state, state.adapters, jnp.asarray(CLIENT_IDS)
  )
  rng = np.random.default_rng(3)
  noise = lambda tree: jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), tree)
  moved = combine(jax.tree.map(np.add, select(starts, trained), noise(select(starts, trained))), starts)
  return ClientResult(jax.tree.map(jnp.asarray, moved), jax.tree.map(jnp.asarray, noise(select(starts, trained))))


def poison_result(results: ClientResult, where: str, value: float, client: int = POISONED) -> ClientResult:
  """`value` in one entry of `client`'s first leaf of `where` ("adapters" or "mean_gradient")."""
  leaves, treedef = jax.tree.flatten(getattr(results, where))
  leaves[0] = leaves[0].at[(client,) + (0,) * (leaves[0].ndim - 1)].set(value)
  return results._replace(**{where: jax.tree.unflatten(treedef, leaves)})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_server_step_leaves_out_a_nonfinite_client(name):
  """For every strategy: an Inf in one client's mean gradient (its adapters finite) and the aggregate is that
  of the other two clients (weights 3 and 2 renormalised to 3/5 and 2/5); every client non-finite (NaN or Inf,
  in adapters or gradients) and the state comes back bit-identical, marked skipped."""
  rnd = simulation.FederatedRound(TinyMLP(), get_strategy(name), per_example_loss=scaled_squared_error)
  start = random_state(rnd)
  results = synthetic_results(rnd, jax.tree.map(jnp.asarray, start))
  server_step = jax.jit(functools.partial(simulation.server_step, rnd.strategy))
  aggregate = lambda results, rows: jax.tree.map(
    np.asarray,
    server_step(
      jax.tree.map(jnp.asarray, start),
      results,
      jnp.asarray(WEIGHTS[rows]),
      jnp.asarray(CLIENT_IDS[rows]),
      jax.random.key(5),
    ),
  )
  poisoned = poison_result(results, "mean_gradient", float("inf"))
  new, metrics = aggregate(poisoned, np.arange(3))
  rows = np.array([0, 2])
  reference, _ = aggregate(jax.tree.map(lambda x: x[rows], results), rows)
  assert_left_out(new, reference, start, metrics)

  poisoned = poison_result(poison_result(poisoned, "adapters", float("nan"), 0), "adapters", -float("inf"), 2)
  skipped_state, skipped = aggregate(poisoned, np.arange(3))
  assert skipped["skipped"] == 1 and skipped["invalid_clients"] == 3
  jax.tree.map(np.testing.assert_array_equal, skipped_state, start)


def test_round_leaves_out_a_client_whose_loss_is_nan():
  """Through the compiled round: client 0's first example has a NaN loss factor, so its (non-private) update is
  NaN; the round must equal the same round run on the other clients only, and with every client poisoned return
  the state bit-identical. (Under DP a NaN example does not get this far: `test_dp_round_counts_nonfinite_examples`.)
  """
  name = "scaffold"  # per-client state, and a gradient correction that the NaN client must not reach
  rnd = simulation.FederatedRound(
    TinyMLP(), get_strategy(name), per_example_loss=scaled_squared_error, optimizer=optax.adam(0.05)
  )
  start = random_state(rnd)
  new, metrics = run_round(rnd, start, make_batches({POISONED: float("nan")}), [0, 1, 2])
  reference, reference_metrics = run_round(rnd, start, make_batches({}), [0, 2])
  assert np.isnan(metrics["client_loss"][POISONED])
  # Counted: the poisoned example, and (without DP its NaN gradient reaches the client's adapters) every later
  # example of that client; none of the others'.
  counts = metrics["nonfinite_examples"]
  assert counts[POISONED] >= 1 and np.delete(counts, POISONED).sum() == 0
  np.testing.assert_allclose(metrics["train_loss"], reference_metrics["train_loss"], **CLOSE)
  assert_left_out(new, reference, start, metrics)

  skipped_state, skipped = run_round(rnd, start, make_batches({k: float("nan") for k in range(3)}), [0, 1, 2])
  assert skipped["skipped"] == 1 and skipped["invalid_clients"] == 3 and np.isnan(skipped["train_loss"])
  jax.tree.map(np.testing.assert_array_equal, skipped_state, start)


@pytest.mark.parametrize("mechanism", ["b_space", "w_space"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_dp_round_counts_nonfinite_examples(mechanism, value):
  """Under DP a non-finite example's gradient is zeroed by the clipping, so its client stays valid and its update
  finite; the round counts it (nonfinite_examples) where it would otherwise show only as a NaN client loss. The
  clipped fraction is over the round's real examples: the poisoned one counts as clipped (its norm is not
  finite), every other as unclipped under C = 1e6."""
  dp = simulation.DPConfig(clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=3.0, mechanism=mechanism)
  rnd = simulation.FederatedRound(
    TinyMLP(), get_strategy("fedask"), dp=dp, per_example_loss=scaled_squared_error, optimizer=optax.sgd(0.1)
  )
  batches = make_batches({POISONED: value})
  new, metrics = run_round(rnd, random_state(rnd), batches, [0, 1, 2])
  np.testing.assert_array_equal(metrics["client_valid"], [True, True, True])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new))
  np.testing.assert_array_equal(metrics["nonfinite_examples"], np.arange(3) == POISONED)
  assert not np.isfinite(metrics["client_loss"][POISONED])
  assert np.isfinite(np.delete(metrics["client_loss"], POISONED)).all()
  assert metrics["clipped_fraction"] == pytest.approx(1 / int(np.asarray(batches.example_mask).sum()))


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints.


def small_state(round_index: int) -> dict:
  key = jax.random.key(round_index)
  return {
    "adapters": jax.random.normal(key, (300,)),
    "key": jax.random.fold_in(key, 7),
    "round": jnp.asarray(round_index, jnp.int32),
  }


def flip_bytes(path: Path) -> None:
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 8):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def array_files(step: Path) -> list[Path]:
  """The OCDBT data files of a checkpoint's state (in state/d and state/ocdbt.process_<i>/d)."""
  return sorted(p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def swap_state(step: Path) -> None:
  """Replace the checkpoint's state by the previous round's: whole, valid files that orbax restores without
  complaint (a mixed-up copy or backup), which only the SHA-256 in the ledger tells apart."""
  shutil.rmtree(step / "state")
  shutil.copytree(step.parent / str(int(step.name) - 1) / "state", step / "state")


# Each damage with the error `restore` must raise: (type, message pattern or None).
DAMAGE = {
  "state of another round": (swap_state, ValueError, "do not match the SHA-256 saved with them"),
  "flipped array bytes": (lambda step: [flip_bytes(p) for p in array_files(step)], Exception, None),
  "truncated array files": (lambda step: [truncate(p) for p in array_files(step)], Exception, None),
  "truncated ledger": (lambda step: truncate(step / "ledger" / "metadata"), json.JSONDecodeError, "Unterminated"),
  "emptied tree metadata": (
    lambda step: (step / "state" / "_METADATA").write_bytes(b""),
    json.JSONDecodeError,
    "Expecting value",
  ),
}


@pytest.fixture
def three_checkpoints(tmp_path):
  checkpoints = StateCheckpoints(tmp_path / "ck", keep=3)
  for t in (1, 2, 3):
    checkpoints.save(t, small_state(t), {"round": t})
  yield checkpoints
  checkpoints.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(three_checkpoints, damage):
  checkpoints = three_checkpoints
  corrupt, error, message = DAMAGE[damage]
  corrupt(checkpoints.directory / "3")
  with pytest.raises(error, match=message) as raised:
    checkpoints.restore(3, small_state(0))
  with pytest.warns(UserWarning, match=r"checkpoint of round 3 in .* is unreadable"):
    restored = checkpoints.restore_latest(small_state(0))
  assert restored.round == 2 and restored.ledger == {"round": 2}
  assert [r for r, _ in restored.unreadable] == [3]
  assert restored.unreadable[0][1].startswith(type(raised.value).__name__)
  expected = small_state(2)
  np.testing.assert_array_equal(restored.state["adapters"], expected["adapters"])
  np.testing.assert_array_equal(jax.random.key_data(restored.state["key"]), jax.random.key_data(expected["key"]))
  # A resumed run saves round 3 again: it replaces the damaged one.
  checkpoints.save(3, small_state(3), {"round": 3})
  assert checkpoints.restore_latest(small_state(0)).round == 3


def test_no_readable_checkpoint_is_a_clear_error(three_checkpoints):
  checkpoints = three_checkpoints
  for t in (1, 2, 3):
    flip_bytes(array_files(checkpoints.directory / str(t))[0])
    truncate(checkpoints.directory / str(t) / "ledger" / "metadata")
  with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"no readable checkpoint in .*round 3: .*round 1: "):
    checkpoints.restore_latest(small_state(0))
  empty = StateCheckpoints(checkpoints.directory.parent / "empty", keep=1)
  assert empty.restore_latest(small_state(0)) is None
  with pytest.raises(ValueError, match="'state_sha256' is reserved"):
    empty.save(1, small_state(1), {"state_sha256": "x"})
  empty.close()


# ---------------------------------------------------------------------------------------------------------------
# Killed runs and a damaged checkpoint under the runner (subprocesses of the CLI).

# SCAFFOLD with adapter dropout: its per-client control variates and every random stream (client sampling,
# batches, dropout) must be restored after each kill. Non-private to keep the runs short: tests/test_runner.py
# resumes DP FedASK bit for bit. Checkpoints every round, the last 3 kept.
OVERRIDES = {
  "strategy": "scaffold",
  "rounds": 4,
  "checkpoint": {"every": 1, "keep": 3},
  "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1},
}
WAIT = 300  # seconds: a bound on one tiny run on a loaded 2-core machine, far above its ~10 s


class Runs(NamedTuple):
  root: Path
  raw: dict
  straight: Path  # the uninterrupted run's directory
  env: dict  # the children's environment: a persistent compilation cache shared by the runs


def config_file(runs: Runs, name: str) -> Path:
  path = runs.root / f"{name}.yaml"
  path.write_text(yaml.safe_dump({**runs.raw, "run_dir": str(runs.root / name)}))
  return path


def cli_process(runs: Runs, config: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, "-m", "fedask_jax.cli", "train", "--config", str(config), *args],
    env={**runs.env, **(env or {})},
    **kwargs,
  )


def run_cli(runs: Runs, config: Path) -> str:
  """Runs `train` to the end; returns its stderr."""
  process = cli_process(runs, config, "--quiet", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, err = process.communicate(timeout=WAIT)
  assert process.returncode == 0, err
  return err


def kill(process: subprocess.Popen) -> int:
  """SIGKILL (if it is still running); its exit code: -SIGKILL when the kill ended it."""
  process.send_signal(signal.SIGKILL)
  return process.wait(timeout=WAIT)


def checkpoint_dirs(run_dir: Path) -> list[str]:
  return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
  root = tmp_path_factory.mktemp("faults")
  env = {**os.environ, **compilation_cache_env(root)}
  runs = Runs(root, {**make_tiny_setup(root), **OVERRIDES}, root / "straight", env)
  run_cli(runs, config_file(runs, "straight"))
  return runs


def test_a_run_killed_in_a_checkpoint_write_and_in_a_round_resumes_to_the_same_result(runs):
  config, run_dir = config_file(runs, "killed"), runs.root / "killed"

  # (b) Killed inside round 3's checkpoint write: the hook pauses after the files are in orbax's temporary
  # directory, before the rename that commits them.
  paused = runs.root / "paused"
  process = cli_process(
    runs,
    config,
    "--quiet",
    env={checkpoint_state.PAUSE_BEFORE_COMMIT: f"3:{paused}"},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.monotonic() + WAIT
    while not paused.exists():
      assert process.poll() is None and time.monotonic() < deadline, "the run did not reach round 3's checkpoint"
      time.sleep(0.02)
  finally:
    code = kill(process)
  assert code == -signal.SIGKILL and Path(paused.read_text()).name == "3.orbax-checkpoint-tmp"
  assert checkpoint_dirs(run_dir) == ["1", "2", "3.orbax-checkpoint-tmp"]
  assert [r["round"] for r in metrics_lines(run_dir)] == [0, 1, 2, 3]

  # (a) Killed inside round 3 of the resumed run: right after restoring round 2 (and dropping metrics line 3)
  # it samples round 3's batches and runs the round, loading or compiling both first.
  process = cli_process(runs, config, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    for line in process.stderr:
      if line.startswith(f"resuming {run_dir} from the checkpoint of round 2"):
        break
    else:
      pytest.fail(f"the resumed run exited with {process.wait()} without resuming from round 2")
  finally:
    code = kill(process)
  assert code == -signal.SIGKILL
  assert checkpoint_dirs(run_dir) == ["1", "2", "3.orbax-checkpoint-tmp"]
  assert [r["round"] for r in metrics_lines(run_dir)] == [0, 1, 2]

  run_cli(runs, config)
  assert checkpoint_dirs(run_dir) == ["2", "3", "4"]
  assert_same_run(run_dir, runs.straight, 4)


def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one_to_the_same_result(runs, capsys):
  run_dir = runs.root / "damaged"
  shutil.copytree(runs.straight, run_dir)  # its config.yaml differs in run_dir only, which a resume may change
  swap_state(run_dir / "checkpoints" / "4")
  config = config_file(runs, "damaged")
  err = run_cli(runs, config)
  assert "UserWarning: checkpoint of round 4 in" in err
  assert "warning: the checkpoint of round 4 is unreadable (ValueError:" in err and "falling back to round 3" in err
  assert_same_run(run_dir, runs.straight, 4)

  # None readable: a clear error, before anything is trained.
  for step in ("2", "3", "4"):
    truncate(run_dir / "checkpoints" / step / "ledger" / "metadata")
  experiment = runner.prepare(load_config(str(config)))
  unreadable = r"no readable checkpoint in .*checkpoints \(round 4"
  with pytest.warns(UserWarning), pytest.raises(UnreadableCheckpoints, match=unreadable):
    runner.train(experiment, progress=False)
  # Through the CLI: one line and exit code 2, no traceback.
  with pytest.warns(UserWarning):
    assert cli.main(["train", "--config", str(config), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no readable checkpoint in") and "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_a_checkpointed_round_and_the_run_resumes_to_the_same_result(runs, signum):
  """Ctrl-C (SIGINT) or a scheduler's SIGTERM during the rounds: the round in progress finishes and is checkpointed,
  one line says where the run stopped and the command that resumes it, the exit code is 128 + the signal's number
  (130, 143); the resumed run ends as the uninterrupted one, bit for bit."""
  name = signal.Signals(signum).name
  config, run_dir = config_file(runs, name), runs.root / name
  # With progress on, the notes are printed once the signals are caught, before round 0's evaluation: the signal
  # lands in that evaluation or in round 1 (the rounds are what a test of Ctrl-C must reach).
  process = cli_process(runs, config, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  err = signal_on_line(process, "eval: ", signum, WAIT)
  assert process.returncode == 128 + signum, err
  assert "Traceback" not in err
  stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
  assert len(stopped) == 1, err
  match = re.fullmatch(
    rf"stopped by {name} after round (\d) of 4 \(checkpoint (.*)\); resume with: fedask-jax train "
    rf"--config {re.escape(str(config))}",
    stopped[0],
  )
  assert match, stopped[0]
  last = int(match[1])
  assert last < 4 and Path(match[2]) == run_dir / "checkpoints" / str(last)
  assert checkpoint_dirs(run_dir) == [str(t) for t in range(max(1, last - 2), last + 1)]
  assert [r["round"] for r in metrics_lines(run_dir)] == list(range(last + 1))

  run_cli(runs, config)
  assert_same_run(run_dir, runs.straight, 4)
