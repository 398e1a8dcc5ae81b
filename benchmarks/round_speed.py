"""Seconds per federated round: the compiled, vmapped round against a Python loop over clients.

Model: a Llama-style decoder (`fedask_jax.models.LlamaForCausalLM`, random weights), 4 layers, d = 256, 4 heads,
SwiGLU width 688 (Llama's 8/3 d), vocabulary 4096; LoRA r = 16, alpha = 32 on q_proj and v_proj. Round: DP
FedASK (B-space, C = 1, sigma = 1; clients train lora_b), 2 local steps of AdamW on batches of 4 sequences of
128 tokens (all 4 slots real), K clients, sketch aggregation with its certificate.

- vmapped: `FederatedRound`'s compiled round, one `jit` over local training of all K clients (vmap) and the
  aggregation; with `client_chunk` c, the clients go c at a time (`lax.map` over chunks of a vmap).
- loop: the same one-client update (`fedask_jax.simulation.client_update`) jitted on its own and called K times
  from Python, the results stacked, then the jitted server step (`fedask_jax.simulation.server_step`).

Each is compiled and run once first (compile time recorded separately), then they run alternately `repeats` times
(so machine load hits all alike), each run ended by `block_until_ready`; the table gives the medians and the
ratio loop / vmapped (> 1: the compiled round is faster).
The machine's CPU is shared, so compare the ratio rather than absolute seconds. By default the process runs on
one CPU (jaxlib 0.10.2 can deadlock batched LAPACK calls with several; see below).

    python benchmarks/round_speed.py [--clients 8 64 --repeats 3 --client-chunks 0 8 1 --all-cpus]
        [--out benchmarks/results/round_speed.json]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys

# jaxlib 0.10.2's batched LAPACK kernels (QR/SVD under vmap: the sketch's layer groups and its certificate)
# split a batch over XLA's intra-op thread pool and block the calling pool thread until the pieces finish
# (jaxlib/cpu/lapack_kernels.cc, ParallelBatchMap). With two pool threads (this 2-core machine) and the
# certificate's two independent batched QRs running at once after the local-training loop, both threads
# waited forever: 4 of the last 4 runs of the 8-client round hung (gdb: both tf_XLAEigen threads in
# ParallelBatchMap / BlockingCounter::Wait; --xla_cpu_multi_thread_eigen=false did not help). With one CPU
# the pool has one thread and the kernels run inline, so by default the process pins itself to one CPU before
# jax starts; both sides of the comparison run under it. --all-cpus keeps every CPU (for a jaxlib without
# the bug).
ALL_CPUS = "--all-cpus" in sys.argv
if not ALL_CPUS:
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])

import harness  # noqa: E402  (benchmarks/harness.py, before jax: it sets the OpenBLAS threads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedask_jax import simulation  # noqa: E402
from fedask_jax.data.batching import Batch  # noqa: E402
from fedask_jax.lora import LoRAConfig, inject_lora  # noqa: E402
from fedask_jax.models import LlamaConfig, LlamaForCausalLM, init_random  # noqa: E402
from fedask_jax.strategies import get_strategy  # noqa: E402

MODEL = LlamaConfig(
  model_type="llama",
  vocab_size=4096,
  hidden_size=256,
  intermediate_size=688,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=4,
  head_dim=64,
)
LORA = LoRAConfig(rank=16, alpha=32.0, target_modules=("q_proj", "v_proj"))
SEQUENCE, BATCH, LOCAL_STEPS = 128, 4, 2
DP = simulation.DPConfig(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=float(BATCH))


def make_round(client_chunk: int | None) -> simulation.FederatedRound:
  model = init_random(LlamaForCausalLM(MODEL), jax.random.key(0))
  inject_lora(model, LORA, jax.random.key(1))
  return simulation.FederatedRound(model, get_strategy("fedask"), dp=DP, client_chunk=client_chunk)


def make_batches(num_clients: int) -> Batch:
  """Random tokens [K, S, B, L]; the loss on the second half of each sequence (the "response")."""
  shape = (num_clients, LOCAL_STEPS, BATCH, SEQUENCE)
  ids = jax.random.randint(jax.random.key(2), shape, 0, MODEL.vocab_size, jnp.int32)
  loss_mask = jnp.broadcast_to(jnp.arange(SEQUENCE) >= SEQUENCE // 2, shape)
  return Batch(ids, jnp.ones(shape, bool), loss_mask, jnp.ones(shape[:3], bool))


def measure(num_clients: int, repeats: int = 3, client_chunks: tuple[int | None, ...] = (None,)) -> dict:
  """Compile and median run seconds of the vmapped round (per `client_chunk`, None = all K at once) and of the
  Python loop, for K = num_clients, all runs interleaved."""
  chunks = list(dict.fromkeys(None if c is None or c >= num_clients else c for c in client_chunks))
  rounds = {chunk: make_round(chunk) for chunk in chunks}
  rnd = rounds[chunks[0]]
  trained = rnd.trained(1)
  state0 = rnd.init(num_clients)
  batches = make_batches(num_clients)
  ids = jnp.arange(num_clients, dtype=jnp.int32)
  weights = jnp.full((num_clients,), 1.0 / num_clients)
  round_key = jax.random.key(3)
  fresh_state = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, state0))  # the round donates its state

  def round_variant(chunk_round: simulation.FederatedRound) -> tuple[harness.Variant, float]:
    args = lambda: (fresh_state(), chunk_round.frozen_state, batches, ids, weights, round_key)
    compiled, compile_s = harness.compile_timed(chunk_round.compiled(trained), *args())
    return (args, lambda a: jax.block_until_ready(compiled(*a))), compile_s

  variants, compile_s = {}, {}
  for chunk, chunk_round in rounds.items():
    variants[chunk], compile_s[chunk] = round_variant(chunk_round)

  update = jax.jit(functools.partial(simulation.client_update, rnd.training, trained))
  server_step = jax.jit(functools.partial(simulation.server_step, rnd.strategy))
  client_batch = lambda k: jax.tree.map(lambda x: x[k], batches)

  def loop(state):
    results = [
      update(state, rnd.frozen_state, client_batch(k), ids[k], jax.random.fold_in(round_key, k))[0]
      for k in range(num_clients)
    ]
    return jax.block_until_ready(
      server_step(
        state, jax.tree.map(lambda *xs: jnp.stack(xs), *results), weights, ids, simulation.server_key(round_key)
      )
    )

  loop_compile = harness.seconds(lambda: loop(state0))  # compiles the one-client update and the aggregation
  times = harness.time_alternating({**variants, "loop": (lambda: state0, loop)}, repeats)
  prepare, run = variants[chunks[0]]
  _, metrics = run(prepare())
  loop_summary = harness.summary(times["loop"], loop_compile)
  return {
    "clients": num_clients,
    "loop": loop_summary,
    "vmapped": [
      dict(
        harness.summary(times[c], compile_s[c]),
        client_chunk=c,
        loop_over_vmapped=loop_summary["median_s"] / statistics.median(times[c]),
      )
      for c in chunks
    ],
    "train_loss": float(metrics["train_loss"]),
    "reconstruction_error": float(metrics["reconstruction_error"]),
  }


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--clients", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--client-chunks",
    type=int,
    nargs="+",
    default=[0, 8, 1],
    help="client_chunk values of the vmapped round to time; 0 = all clients at once",
  )
  parser.add_argument("--out", default="benchmarks/results/round_speed.json")
  parser.add_argument(
    "--all-cpus",
    action="store_true",
    help="do not pin the process to one CPU (read before jax starts; see the comment at the top)",
  )
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats}: time at least one run (the median of >= 3 is the intended use).")
  if any(c < 0 for c in args.client_chunks):
    parser.error(f"--client-chunks={args.client_chunks}: chunk sizes are >= 1, or 0 for all clients at once.")
  chunks = tuple(c or None for c in args.client_chunks)
  load_before = os.getloadavg()
  rows = [measure(k, args.repeats, chunks) for k in args.clients]
  print(
    f"{'clients':>7} | {'client_chunk':>12} | {'vmapped s/round':>15} | {'loop s/round':>12} | "
    f"{'loop / vmapped':>14} | {'compile vmapped / loop (s)':>26}"
  )
  for row in rows:
    for v in row["vmapped"]:
      chunk = "all" if v["client_chunk"] is None else v["client_chunk"]
      print(
        f"{row['clients']:>7} | {chunk:>12} | {v['median_s']:>15.3f} | {row['loop']['median_s']:>12.3f} | "
        f"{v['loop_over_vmapped']:>14.2f} | {v['compile_s']:>12.1f} / {row['loop']['compile_s']:<11.1f}"
      )
  result = {
    "benchmark": "round_speed",
    "setup": {
      "model": {k: v for k, v in vars(MODEL).items() if k != "rope"},
      "lora_rank": LORA.rank,
      "lora_targets": list(LORA.target_modules),
      "sequence": SEQUENCE,
      "batch": BATCH,
      "local_steps": LOCAL_STEPS,
      "strategy": "fedask",
      "dp": vars(DP),
      "optimizer": "adamw 5e-4",
      "repeats": args.repeats,
    },
    "machine": dict(harness.machine(load_before), cpus_used=len(os.sched_getaffinity(0))),
    "results": rows,
  }
  harness.write(result, pathlib.Path(args.out))
  return result


if __name__ == "__main__":
  main()
