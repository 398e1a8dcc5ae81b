"""Server aggregation time and per-client traffic: FedASK's two-stage sketch against dense aggregation.

FedASK (`fedask_jax.sketch.aggregate_layer`): stages 1-2 and reconstruction, never forming an m x n matrix
(docs/design.md, sections 1.3 and 1.4), by each linear-algebra route (`sketch.METHODS`: Householder QR + SVD,
and shifted Cholesky-QR + the SVD of the small factor); "fedask" in the JSON is the backend's default route
(`sketch.default_method`). Dense baseline: every client's product lora_a_k @ lora_b_k (m x n, what a
dense-update scheme sends) is formed and the K products are averaged. All are jitted and timed side by side in
one process (alternating runs, so machine load hits them alike): compile time (lower + compile) separately,
then the median of `repeats` runs after one warm-up call, each ended by `block_until_ready`.

The factors are in DP mode (one factor shared by all clients, as FedASK's frozen lora_a), so the aggregate
has rank <= r and the sketch is exact; the JSON records each route's exactness certificate (float32 round-off
when exact). Timing does not depend on the values.

    python benchmarks/aggregate.py [--m 4096 --n 4096 --r 16 --p 4 --k 10 --repeats 7]
        [--out benchmarks/results/aggregate.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib

import harness  # benchmarks/harness.py, before jax: it sets the OpenBLAS threads
import jax
import jax.numpy as jnp
import numpy as np

from fedask_jax import sketch
from fedask_jax.numerics import normalise_weights

FLOAT32_BYTES = 4


def dense_aggregate(lora_a: jax.Array, lora_b: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_k w_k lora_a_k @ lora_b_k [m, n] with every client's m x n product formed (weights normalised)."""
  products = jnp.matmul(lora_a, lora_b, precision=jax.lax.Precision.HIGHEST)
  return jnp.tensordot(weights, products, axes=1)


def measure(
  m: int = 4096, n: int = 4096, r: int = 16, p: int = 4, k: int = 10, repeats: int = 7, seed: int = 0
) -> dict:
  """Times jitted FedASK and dense aggregation of K float32 clients' (lora_a [m, r], lora_b [r, n]).

  Returns a JSON-ready dict: the problem, each FedASK route's figures (`harness.summary` and its exactness
  certificate; "routes", and "fedask": the default route) and the dense scheme's, the speed-up (dense / default
  route median), the bytes one client sends per round in each scheme (FedASK: Y_k [m, w] + P_k [n, w]; dense:
  [m, n]; w = min(r + p, m, n)), and the machine.
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats}: time at least one run (the median of >= 5 is the intended use).")
  load_before = os.getloadavg()
  key = jax.random.key(seed)
  lora_a = jnp.broadcast_to(jax.random.normal(jax.random.fold_in(key, 1), (m, r)), (k, m, r)) / np.sqrt(m)
  lora_b = jax.random.normal(jax.random.fold_in(key, 0), (k, r, n)) / np.sqrt(n)
  weights = normalise_weights(jax.random.uniform(jax.random.fold_in(key, 2), (k,), minval=0.5, maxval=1.5))
  omega = sketch.make_omega(jax.random.fold_in(key, 3), n, r + p)
  width = min(r + p, m, n)

  routes = {
    method: harness.compile_timed(
      jax.jit(functools.partial(sketch.aggregate_layer, method=method), static_argnames="rank"),
      lora_a,
      lora_b,
      weights,
      omega,
      r,
    )
    for method in sketch.METHODS
  }
  dense, dense_compile = harness.compile_timed(jax.jit(dense_aggregate), lora_a, lora_b, weights)
  fedask_args, dense_args = (lora_a, lora_b, weights, omega), (lora_a, lora_b, weights)
  variants = {
    method: (lambda: fedask_args, lambda args, c=compiled: jax.block_until_ready(c(*args)))
    for method, (compiled, _) in routes.items()
  }
  variants["dense"] = (lambda: dense_args, lambda args: jax.block_until_ready(dense(*args)))
  times = harness.time_alternating(variants, repeats)
  timed = {
    method: dict(
      harness.summary(times[method], compile_s),
      reconstruction_error=float(sketch.reconstruction_error(lora_a, lora_b, weights, *compiled(*fedask_args))),
    )
    for method, (compiled, compile_s) in routes.items()
  }
  fedask = timed[sketch.default_method()]
  result = {
    "problem": {
      "m": m,
      "n": n,
      "r": r,
      "p": p,
      "k": k,
      "width": width,
      "dtype": "float32",
      "repeats": repeats,
      "seed": seed,
    },
    "default_method": sketch.default_method(),
    "fedask": fedask,
    "routes": timed,
    "dense": harness.summary(times["dense"], dense_compile),
    "client_bytes_per_round": {"fedask": (m + n) * width * FLOAT32_BYTES, "dense": m * n * FLOAT32_BYTES},
    "fedask_reconstruction_error": fedask["reconstruction_error"],
  }
  result["speedup"] = result["dense"]["median_s"] / result["fedask"]["median_s"]
  result["machine"] = harness.machine(load_before)
  return result


def _table(result: dict) -> str:
  prob, traffic = result["problem"], result["client_bytes_per_round"]
  rows = [("scheme", "compile s", "median s", "client bytes/round")]
  for method, timed in result["routes"].items():
    rows.append((f"fedask {method}", f"{timed['compile_s']:.3f}", f"{timed['median_s']:.4f}", f"{traffic['fedask']:,}"))
  rows.append(
    ("dense", f"{result['dense']['compile_s']:.3f}", f"{result['dense']['median_s']:.4f}", f"{traffic['dense']:,}")
  )
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = [
    f"m={prob['m']} n={prob['n']} r={prob['r']} p={prob['p']} K={prob['k']} float32, "
    f"{result['machine']['device']}, median of {prob['repeats']}"
  ]
  lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
  lines.append(
    f"speed-up (dense / fedask {result['default_method']}): {result['speedup']:.1f}x; traffic ratio "
    f"(dense / fedask): {traffic['dense'] / traffic['fedask']:.1f}x; relative errors "
    + ", ".join(f"{method} {timed['reconstruction_error']:.2e}" for method, timed in result["routes"].items())
  )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--m", type=int, default=4096)
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--r", type=int, default=16)
  parser.add_argument("--p", type=int, default=4)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "aggregate.json")
  args = parser.parse_args(argv)
  result = measure(args.m, args.n, args.r, args.p, args.k, args.repeats, args.seed)
  print(_table(result))
  harness.write(result, args.out)
  return result


if __name__ == "__main__":
  main()
