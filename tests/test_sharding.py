"""The federated round on several devices equals the round on one (fedask_jax.simulation, client axis sharded
over a 1-D "clients" mesh by `jax.shard_map`).

Four CPU devices are faked with XLA_FLAGS=--xla_force_host_platform_device_count=4, which must be set before
jax is imported, so that part runs in a subprocess; this process (one device) computes the same rounds and
compares. Tolerance: the same programs with the client axis split differently, as in test_simulation
(rtol 1e-5, atol 1e-6: float32 reductions ordered differently, amplified by a few optimiser steps and a QR/SVD).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
from test_simulation import B_SPACE, SAME_PROGRAM, W_SPACE, make_batches, make_round, random_state

NUM_DEVICES = 4
NUM_SAMPLED = 8
# (strategy, dp, round index, client chunk): the sketch under B-space DP with chunks inside each device,
# per-client state gathered and scattered (FedSA-LoRA), and the W-space mechanism's nnx.capture per device.
CASES = [("fedask", B_SPACE, 1, 1), ("fedsa-lora", None, 1, None), ("fedask-alt", W_SPACE, 2, None)]


def run_cases() -> dict[str, np.ndarray]:
  """Every case's new state and metrics, flattened to {case index + leaf path: array}, and per case the number
  of devices that hold the per-client metrics ("{i}/devices")."""
  ids = jnp.array([7, 0, 4, 9, 2, 5, 1, 8], jnp.int32)
  weights = jnp.arange(1.0, NUM_SAMPLED + 1)
  out = {}
  for i, (strategy, dp, round_index, chunk) in enumerate(CASES):
    rnd = make_round(strategy, dp, client_chunk=chunk)
    state, metrics = rnd(
      random_state(rnd),
      make_batches(i, num_clients=NUM_SAMPLED, steps=2),
      ids,
      weights,
      jax.random.key(20 + i),
      round_index,
    )
    for path, leaf in jax.tree_util.tree_flatten_with_path((state, metrics))[0]:
      out[f"{i}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    out[f"{i}/devices"] = np.array(len(metrics["client_loss"].sharding.device_set))
  return out


SCRIPT = textwrap.dedent(f"""
    import os, sys
    flags = os.environ.get("XLA_FLAGS", "")  # keep the caller's flags, add the fake devices
    os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count={NUM_DEVICES}"
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import jax, numpy as np, pytest
    assert jax.device_count() == {NUM_DEVICES}, jax.devices()
    from test_sharding import run_cases
    from test_simulation import make_batches, make_round, random_state
    np.savez(sys.argv[1], **run_cases())
    # K must split evenly over the devices.
    rnd = make_round("fedask")
    with pytest.raises(ValueError, match="split evenly"):
      rnd(random_state(rnd), make_batches(0, num_clients=6), jax.numpy.arange(6), jax.numpy.ones(6),
          jax.random.key(0), 1)
""")


def test_four_devices_equal_one(tmp_path):
  path = tmp_path / "sharded.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True, timeout=600
  )
  assert process.returncode == 0, process.stderr[-4000:]
  sharded = dict(np.load(path))
  assert jax.device_count() == 1
  single = run_cases()
  assert sharded.keys() == single.keys()
  for i in range(len(CASES)):
    assert sharded.pop(f"{i}/devices") == NUM_DEVICES  # the clients really ran on four devices
    assert single.pop(f"{i}/devices") == 1
  chex.assert_trees_all_close(sharded, single, **SAME_PROGRAM)
