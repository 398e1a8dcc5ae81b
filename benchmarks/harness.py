"""What the benchmarks share: the thread setting they run under, the timing of variants side by side, the record
of the machine and its load, and the result file.

Every time is a median of runs after compilation and an untimed warm-up pass, the variants alternating run by
run so that the load of a shared machine hits them alike (`time_alternating`); compile times (lower + compile)
are reported apart (`compile_timed`). Import this module before jax: it sets the OpenBLAS threads.

(A module of its own name rather than `_common`: experiments/_common.py would shadow it in a process that
imports both, as the test suite does.)
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

# JAX's CPU QR and SVD call OpenBLAS LAPACK (through scipy), whose threads busy-wait when cores are shared: on
# our loaded 2-core machine a 4096 x 20 QR took 0.2-0.6 s with the default threads and 0.5 ms with one. The
# sketch's QR/SVD are on thin matrices that gain nothing from threads (dense products run on XLA's own thread
# pool, unaffected). This must precede jax's first LAPACK call; an explicit OPENBLAS_NUM_THREADS in the
# environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402  (after the thread setting)

# A timed variant: (prepare, run). Only run(prepare()) is timed; prepare makes what the run consumes (e.g. a fresh
# copy of a donated state), and run blocks until its results are ready.
Variant = tuple[Callable[[], Any], Callable[[Any], Any]]


def seconds(fn: Callable[[], Any]) -> float:
  """Wall seconds of `fn()` (which must block until its results are ready)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
  """(the compiled function, seconds of lower + compile) of a jitted function for `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def time_alternating(variants: dict[str, Variant], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """{name: seconds of each timed run}: `warmup` untimed passes, then `repeats` passes in which every variant
  runs once, in turn."""
  times: dict[str, list[float]] = {name: [] for name in variants}
  for timed in [False] * warmup + [True] * repeats:
    for name, (prepare, run) in variants.items():
      args = prepare()
      elapsed = seconds(functools.partial(run, args))
      if timed:
        times[name].append(elapsed)
  return times


def summary(times: list[float], compile_s: float | None) -> dict[str, Any]:
  """A variant's figures: median and min of its runs, the runs, and its compile time."""
  return {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times, "compile_s": compile_s}


def machine(load_before: Sequence[float]) -> dict[str, Any]:
  """The machine, the device and the software, and the 1, 5 and 15-minute load averages when the benchmark
  started (`load_before`, from `os.getloadavg()`) and now: the machine may be shared, so compare ratios measured
  side by side in one run rather than seconds across runs."""
  device = jax.devices()[0]
  return {
    "platform": platform.platform(),
    "processor": platform.processor(),
    "cpus": os.cpu_count(),
    "device": f"{device.platform}: {device.device_kind}",
    "devices": len(jax.devices()),
    "jax": jax.__version__,
    "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    "load_average_before": list(load_before),
    "load_average_after": list(os.getloadavg()),
  }


def write(result: dict[str, Any], path: pathlib.Path) -> None:
  """Writes the result file (JSON) and says where."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {path}")
