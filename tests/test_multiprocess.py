"""Multi-process runs through `jax.distributed` on this CPU (fedask_jax.runner.processes, fedask_jax.launch): the
same final adapters under every process layout, a killed process that ends the others, relaunches that resume to
the uninterrupted result, and processes that disagree refused before anything is compiled.

Every run is a subprocess of the CLI (`jax.distributed.initialize` comes before JAX's first computation, which
this process has long made), DP FedASK on the tiny Llama of run_fixtures: K = 4 clients per round, one per
device of 2 processes x 2 devices. The runs share a persistent compilation cache: a cached executable computes
what a fresh one does.

Equality. 2 processes x 2 devices and 1 process x 4 devices run the same program on the same 4-device mesh (the
same clients on the same devices, the same reductions), the first with gloo's cross-process collectives: their
adapters are compared bit for bit. 1 process x 1 device trains each client the same way, but sums the clients'
updates on one device rather than across four (another float32 summation order), amplified by a few AdamW
steps and FedASK's QR/SVD: rtol 1e-5 / atol 1e-6, as tests/test_sharding.py allows between 4 devices and 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest
import yaml
from run_fixtures import assert_same_run, compilation_cache_env, make_tiny_setup, metrics_lines, signal_on_line
from safetensors.numpy import load_file

from fedask_jax import runner
from fedask_jax.checkpoint import state as checkpoint_state
from fedask_jax.config import load_config
from fedask_jax.launch import free_port

# DP FedASK, a round's 4 clients split over 4 devices; checkpoints every round, the last 3 kept.
OVERRIDES = {
  "strategy": "fedask",
  "rounds": 3,
  "num_clients": 8,
  "clients_per_round": 4,
  "privacy": {"enabled": True, "target_epsilon": 3.0},
  "checkpoint": {"every": 1, "keep": 3},
}
WAIT = 300  # seconds: a bound on one tiny run on a loaded 2-core machine, far above its ~20 s
# A killed process is noticed once its heartbeats have been missing this long (distributed.heartbeat_timeout).
HEARTBEAT = 5
SAME_PROGRAM = dict(rtol=1e-5, atol=1e-6)


class Runs(NamedTuple):
  root: Path
  raw: dict
  straight: Path  # the uninterrupted 2 x 2 run's directory
  env: dict  # the children's environment: CPU only, a persistent compilation cache shared by the runs


def config_file(runs: Runs, name: str, **changes) -> Path:
  path = runs.root / f"{name}.yaml"
  path.write_text(yaml.safe_dump({**runs.raw, "run_dir": str(runs.root / name), **changes}))
  return path


def launch(runs: Runs, config: Path, processes: int, devices: int, *args: str, **kwargs) -> subprocess.Popen:
  """`fedask-jax launch --processes P --devices-per-process D -- train --config CONFIG ARGS`."""
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "fedask_jax.cli",
      "launch",
      "--processes",
      str(processes),
      "--devices-per-process",
      str(devices),
      "--",
      "train",
      "--config",
      str(config),
      *args,
    ],
    env=runs.env,
    text=True,
    **kwargs,
  )


def run_launch(runs: Runs, config: Path, processes: int, devices: int) -> str:
  """Launches a run to its end; returns its stderr."""
  process = launch(runs, config, processes, devices, "--quiet", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  _, err = process.communicate(timeout=WAIT)
  assert process.returncode == 0, err[-4000:]
  return err


def process_of(
  runs: Runs, config: Path, process_id: int, address: str, *args: str, env: dict | None = None, **kwargs
) -> subprocess.Popen:
  """One process of a 2 x 2 run started by hand, as on a cluster (no launcher)."""
  return subprocess.Popen(
    [
      sys.executable,
      "-m",
      "fedask_jax.cli",
      "train",
      "--config",
      str(config),
      *args,
      f"distributed.coordinator_address={address}",
      "distributed.num_processes=2",
      f"distributed.process_id={process_id}",
    ],
    env={**runs.env, "JAX_NUM_CPU_DEVICES": "2", **(env or {})},
    text=True,
    **kwargs,
  )


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
  return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
  root = tmp_path_factory.mktemp("multiprocess")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache_env(root)}
  runs = Runs(root, {**make_tiny_setup(root), **OVERRIDES}, root / "straight", env)
  began = time.monotonic()
  run_launch(runs, config_file(runs, "straight"), 2, 2)
  print(f"2 processes x 2 devices, {OVERRIDES['rounds']} rounds: {time.monotonic() - began:.1f} s")
  return runs


def test_every_process_layout_gives_the_same_adapters(runs):
  straight = adapters(runs.straight)
  # The run trained: the adapters moved away from their initialisation (lora_b starts at zero).
  assert max(np.abs(x).max() for name, x in straight.items() if "lora_B" in name) > 1e-3
  assert (runs.straight / "summary.json").is_file() and metrics_lines(runs.straight)[-1]["epsilon"] <= 3.0

  run_launch(runs, config_file(runs, "one_by_four"), 1, 4)
  four = adapters(runs.root / "one_by_four")
  differences = {"1 x 4": max(float(np.abs(four[n] - straight[n]).max()) for n in straight)}
  assert_same_run(runs.root / "one_by_four", runs.straight, 3)

  # This test process has one CPU device: the 1 x 1 run is trained here.
  assert jax.device_count() == 1
  runner.train(runner.prepare(load_config(str(config_file(runs, "one_by_one")))), progress=False)
  one = adapters(runs.root / "one_by_one")
  differences["1 x 1"] = max(float(np.abs(one[n] - straight[n]).max()) for n in straight)
  for name in straight:
    np.testing.assert_allclose(one[name], straight[name], **SAME_PROGRAM, err_msg=name)
  print(f"max |adapter - 2 x 2 run's|: {differences}")


def test_a_killed_process_ends_the_other_and_relaunches_resume_to_the_same_result(runs):
  """Process 1 killed while process 0 writes round 2's checkpoint: process 0 ends with JAX's error once the
  heartbeats are missed (no hang). The relaunch resumes from round 1; a SIGTERM to the launcher stops both
  processes after the same round, checkpointed; the next relaunch finishes as the uninterrupted run did."""
  config = config_file(runs, "killed", distributed={"heartbeat_timeout": HEARTBEAT})
  run_dir, paused = runs.root / "killed", runs.root / "paused"
  address = f"127.0.0.1:{free_port()}"
  # Process 0 commits the checkpoints (orbax's primary process): the hook holds it inside round 2's commit.
  first = process_of(
    runs,
    config,
    0,
    address,
    "--quiet",
    env={checkpoint_state.PAUSE_BEFORE_COMMIT: f"2:{paused}"},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  second = process_of(runs, config, 1, address, "--quiet", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + WAIT
    while not paused.exists():
      assert first.poll() is None and time.monotonic() < deadline, "process 0 did not reach round 2's checkpoint"
      time.sleep(0.05)
    second.kill()
    killed = time.monotonic()
    _, err = first.communicate(timeout=WAIT)
    ended = time.monotonic() - killed
  finally:
    for process in (first, second):
      if process.poll() is None:
        process.kill()
  # JAX's coordination service ends the process (LOG(FATAL): SIGABRT) a heartbeat timeout or so after the kill.
  assert first.returncode == -signal.SIGABRT, err[-3000:]
  assert "Terminating process because the JAX distributed service detected fatal errors" in err
  assert ended < 12 * HEARTBEAT, f"process 0 took {ended:.0f} s to end"
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1", "2.orbax-checkpoint-tmp"]

  # The relaunch resumes from round 1; SIGTERM reaches the launcher during round 2, and both processes stop once
  # it is checkpointed.
  relaunched = launch(runs, config, 2, 2, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  err = signal_on_line(relaunched, f"[0] resuming {run_dir} from the checkpoint of round 1", signal.SIGTERM, WAIT)
  assert relaunched.returncode == 128 + signal.SIGTERM, err[-3000:]
  stopped = [line for line in err.splitlines() if "stopped by" in line]
  assert stopped == [
    f"[0] stopped by SIGTERM after round 2 of 3 (checkpoint {run_dir / 'checkpoints' / '2'}); "
    f"resume with: fedask-jax launch --processes 2 --devices-per-process 2 -- train --config {config}"
  ]
  assert "Traceback" not in err
  assert [r["round"] for r in metrics_lines(run_dir)] == [0, 1, 2]

  run_launch(runs, config, 2, 2)
  assert_same_run(run_dir, runs.straight, 3)


@pytest.mark.parametrize("case", ["different config", "K not divisible"])
def test_processes_that_disagree_are_refused_before_compilation(runs, case):
  """Both processes exit with code 2 and one error line naming the rule, before anything is loaded or compiled
  (JAX logs every compilation with JAX_LOG_COMPILES=1, and there is none)."""
  config = config_file(runs, case.replace(" ", "_"))
  address = f"127.0.0.1:{free_port()}"
  extra = {"different config": ([], ["lr=0.02"]), "K not divisible": (["clients_per_round=2"],) * 2}[case]
  processes = [
    process_of(
      runs,
      config,
      i,
      address,
      "--quiet",
      *extra[i],
      env={"JAX_LOG_COMPILES": "1"},
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
    )
    for i in (0, 1)
  ]
  errors = [process.communicate(timeout=WAIT)[1] for process in processes]
  expected = {
    "K not divisible": [
      "error: clients_per_round=2 cannot be split evenly over the 4 devices (2 processes): use a multiple of 4."
    ]
    * 2,
    "different config": [
      f"error: the processes of this run have different configs: process 1 differs from "
      f"process 0{detail}. Start every process with the same config and overrides (only "
      "distributed.process_id differs)."
      for detail in ("", "; this process (process 1) differs in lr: 0.01 in process 0, 0.02 here")
    ],
  }[case]
  for process, err, line in zip(processes, errors, expected):
    assert process.returncode == 2, err[-3000:]
    assert line in err.splitlines(), err[-3000:]
    assert "Compiling" not in err and "Traceback" not in err
  assert not (runs.root / case.replace(" ", "_")).exists()


@pytest.mark.parametrize(
  "argv, message",
  [
    (
      ["--processes", "0", "--", "train", "--config", "c.yaml"],
      "argument --processes: expected an integer >= 1, got '0'",
    ),
    (
      ["--processes", "2", "--", "eval", "--run_dir", "runs/x"],
      "fedask-jax launch runs a train command, got 'eval --run_dir runs/x': write fedask-jax launch --processes 2 -- "
      "train --config CONFIG.",
    ),
    (
      ["--processes", "2", "--", "train", "--config", "c.yaml", "distributed.process_id=1"],
      "distributed.process_id=1: the launcher sets the distributed section itself; remove them.",
    ),
  ],
)
def test_the_launcher_refuses_what_it_cannot_run_before_starting_anything(capsys, argv, message):
  from fedask_jax import cli

  assert cli.main(["launch", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err, err
