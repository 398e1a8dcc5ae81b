"""Speed, scale and cost of a DP FedASK round, measured side by side in one process.

One Llama-style model (`fedask_jax.models.LlamaForCausalLM`, random weights; LoRA r = 16, alpha = 32 on q_proj
and v_proj) and one round configuration: K clients, tau local steps of B-space DP-SGD (C = 1, sigma = 1; lora_b
trained, lora_a frozen, as FedASK under DP), batches of b sequences of L tokens (all b slots real, the loss on
the second half of each sequence), AdamW, the two-stage sketch aggregation (`get_strategy("fedask",
certify_every=0)`: no exactness certificate, as the official code; `build_round` says why). Measured:

- round_s: `FederatedRound`'s compiled round (one `jit`: K clients vmapped, tau steps scanned, aggregation);
- loop_s: the same round as the official PyTorch code is structured: a Python loop over the clients calling
  the jitted one-client update (`fedask_jax.simulation.client_update`), the results stacked, then the jitted
  server step (`fedask_jax.simulation.server_step`); the per-client inputs (batch slices, keys) are prepared
  outside the timer;
- limit_s: one jitted forward + backward (gradient of the same lora_b) of the K tau b examples as a single
  centralised batch, mean loss, no per-example gradients or clipping: the compute the round must at least do
  (on a CPU the round can beat it: its steps touch tau times fewer rows at once, README.md);
- chunked_round_s: the compiled round with `client_chunk` = setup.chunk clients vmapped at a time;
- nodp_round_s: the compiled round without DP, training the same factor (lora_b); nodp_both_round_s: FedASK's
  own non-private round, which trains both factors (twice the adapter gradients, for reference);
- torch_round_s: the same DP round with PyTorch + peft + Opacus (`benchmarks/torch_peer.py`; sequential
  clients, per-sample gradients by Opacus hooks), same configuration and hardware; recorded as missing, with
  the reason, when those are not installed;
- agg_fedask_s, agg_dense_s: server aggregation of K = 10 adapters of a 4096 x 4096 layer, r = 16, p = 4,
  against forming and averaging the dense products, and the bytes a client sends in each (`aggregate.py`);
- sketch_aggregation_s, certificate_s: on the main K's client results, the server's sketch aggregation of all layers
  (`sketch.aggregate_adapters`, the default route) and the exactness certificate
  (`sketch.adapters_reconstruction_error`) that a run computes every `sketch.certify_every` rounds, each jitted
  alone; certificate_over_round = certificate_s / round_s is what one certified round adds;
- scaling: round_s, loop_s, chunked_round_s (K > chunk) and memory for K in {1, 4, 16, 64, 256} (--quick: up
  to 64);
- ratios: loop_over_round, round_over_limit, dp_overhead = round_s / nodp_round_s, torch_over_round,
  agg_speedup = agg_dense_s / agg_fedask_s; goals: which of the issue's targets hold.

Every time is the median of >= 5 runs after compilation, the variants alternating run by run so that machine
load hits them alike, each run ended by `block_until_ready` (JAX) or by the end of the last backward/SVD
(PyTorch); compile times (lower + compile; for the loop and the peer the first call) are reported apart. On a
CPU the peer runs with 1 thread and with all cores, and its faster median is torch_round_s.
Peak memory: `compiled.memory_analysis()` (arguments + outputs + XLA temporaries - donated aliases: the
buffers XLA assigns for one call of the round, the same on every backend), and on a GPU/TPU also the device's
`peak_bytes_in_use` after the run (process-wide, so K is swept upwards). Achieved FLOP/s: the limit's FLOPs
as XLA counts them (`cost_analysis`; the model's forward and backward on K tau b examples, i.e. the useful
work) divided by the round's time.

Scale mode (`--scale`, `run_scale`): a Llama-style model of 110M parameters (d 768, 12 layers, 12 heads,
vocabulary 32,000, L = 256; bfloat16 base weights on accelerators, float32 on a CPU) with the LM head at the
response positions only, K in {8, 64, 256, 1024}; per K the DP round with the largest client_chunk whose XLA
buffers fit 90% of the device's memory, the compute limit on the same tokens, model FLOPs and MFU of both
(with --peak-tflops), compile time and memory (`scale_row`). On a CPU pass a small sweep (`--scaling 1`).

    python benchmarks/run.py [--quick | --scale] [--out benchmarks/results/run_quick.json] [--repeats 5]
        [--clients K] [--scaling 1 4 16 64 256] [--no-torch] [--peak-tflops T] [--profile DIR]

`--profile DIR` also writes a `jax.profiler` trace (Perfetto JSON) of one round, one loop and one limit step.
The machine may be shared: ratios measured side by side in one run are what counts, and the JSON records the
load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import operator
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# PyTorch's OpenMP threads spin-wait by default: on a loaded machine the peer's 2-thread round varied from 2 s
# to 33 s run to run (quick setup), against 0.5 s with passive waiting. Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import aggregate  # noqa: E402  (benchmarks/aggregate.py)
import harness  # noqa: E402  (benchmarks/harness.py, before jax: it sets the OpenBLAS threads)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch_peer  # noqa: E402  (benchmarks/torch_peer.py)
from flax import nnx  # noqa: E402

from fedask_jax import simulation, sketch  # noqa: E402
from fedask_jax.adapters import LoRAFactors  # noqa: E402
from fedask_jax.data import Batch, ClientData, client_batches  # noqa: E402
from fedask_jax.lora import LoRAConfig, from_adapters, inject_lora, split_lora, to_adapters  # noqa: E402
from fedask_jax.models import LlamaConfig, LlamaForCausalLM, init_random  # noqa: E402
from fedask_jax.objectives import causal_lm_loss, response_loss, response_positions  # noqa: E402
from fedask_jax.strategies import get_strategy  # noqa: E402

MIN_REPEATS = 5
EXAMPLES_PER_CLIENT = 32
# The issue's targets: (ratio, comparison, bound, where it applies).
GOALS = (
  ("round_over_limit", "<=", 1.3, "any"),
  ("dp_overhead", "<=", 1.5, "any"),
  ("torch_over_round", ">=", 3.0, "cpu"),
  ("agg_speedup", ">=", 10.0, "any"),
  ("loop_over_round_at_64", ">=", 10.0, "gpu"),
)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The model and round configuration: Llama dimensions (d, layers, heads, SwiGLU width, vocabulary),
  sequence length L, K = clients, tau = local_steps, b = batch; the K values of the scaling sweep; LoRA rank
  and alpha; the sketch's p; DP clip norm C and noise multiplier sigma; `chunk`, the client_chunk of the
  sweep's chunked round."""

  hidden: int
  layers: int
  heads: int
  intermediate: int
  vocab: int
  sequence: int
  clients: int
  local_steps: int
  batch: int
  scaling: tuple[int, ...]
  rank: int = 16
  alpha: float = 32.0
  oversample: int = 2
  clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  chunk: int = 4
  dtype: str = "float32"
  response_only: bool = False

  def llama(self) -> LlamaConfig:
    return LlamaConfig(
      model_type="llama",
      vocab_size=self.vocab,
      hidden_size=self.hidden,
      intermediate_size=self.intermediate,
      num_hidden_layers=self.layers,
      num_attention_heads=self.heads,
      num_key_value_heads=self.heads,
      head_dim=self.hidden // self.heads,
    )

  def hf_config(self) -> dict[str, Any]:
    """The same architecture as `transformers.LlamaConfig` keyword arguments (for the PyTorch peer)."""
    c = self.llama()
    return dict(
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_hidden_layers,
      num_attention_heads=c.num_attention_heads,
      num_key_value_heads=c.num_key_value_heads,
      head_dim=c.head_dim,
      rms_norm_eps=c.rms_norm_eps,
      rope_theta=c.rope.rope_theta,
      max_position_embeddings=max(512, self.sequence),
      tie_word_embeddings=c.tie_word_embeddings,
    )

  def lora(self) -> LoRAConfig:
    return LoRAConfig(rank=self.rank, alpha=self.alpha, target_modules=("q_proj", "v_proj"))

  def dp(self) -> simulation.DPConfig:
    return simulation.DPConfig(
      clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier, expected_batch_size=float(self.batch)
    )


SETUPS = {
  # The issue's configuration: d = 256, 4 layers, L = 128 (SwiGLU width 688 = Llama's 8/3 d).
  "full": Setup(
    hidden=256,
    layers=4,
    heads=4,
    intermediate=688,
    vocab=4096,
    sequence=128,
    clients=16,
    local_steps=2,
    batch=4,
    scaling=(1, 4, 16, 64, 256),
  ),
  # Under 5 minutes on a loaded 2-core CPU: half the width, depth, heads, sequence and vocabulary.
  "quick": Setup(
    hidden=128,
    layers=2,
    heads=2,
    intermediate=344,
    vocab=2048,
    sequence=64,
    clients=8,
    local_steps=2,
    batch=4,
    scaling=(1, 4, 16, 64),
  ),
  # Scale mode (`run_scale`): a Llama-style model of 110M parameters (d 768, 12 layers, 12 heads, SwiGLU 2048,
  # vocabulary 32,000, L = 256), bfloat16 base weights on accelerators, the head at the response positions only.
  "scale": Setup(
    hidden=768,
    layers=12,
    heads=12,
    intermediate=2048,
    vocab=32000,
    sequence=256,
    clients=64,
    local_steps=2,
    batch=4,
    scaling=(8, 64, 256, 1024),
    dtype="bfloat16",
    response_only=True,
  ),
}


# ----- the pieces -----


def build_model(setup: Setup, seed: int = 0) -> nnx.Module:
  """The Llama-style model with random weights in `setup.dtype` and float32 LoRA adapters (lora_b zero, as LoRA
  starts)."""
  model = init_random(LlamaForCausalLM(setup.llama(), dtype=jnp.dtype(setup.dtype)), jax.random.key(seed))
  inject_lora(model, setup.lora(), jax.random.fold_in(jax.random.key(seed), 1))
  return model


def build_round(
  model: nnx.Module, setup: Setup, private: bool, client_chunk: int | None = None
) -> simulation.FederatedRound:
  """The round under test: FedASK without its exactness certificate, B-space DP-SGD or none, the clients
  vmapped all at once or `client_chunk` at a time.

  certify_every=0: the official code has no certificate, and with it the full-mode round deadlocked within its
  first 1-3 runs, 4 times out of 4, on a 2-core CPU (jaxlib 0.10.2: the certificate's two batched QRs run
  concurrently, each LAPACK kernel waits in `ParallelBatchMap` for tasks queued on the same 2-thread pool that both
  of them occupy; README.md)."""
  strategy = get_strategy("fedask", oversample=setup.oversample, certify_every=0)
  return simulation.FederatedRound(
    model, strategy, dp=setup.dp() if private else None, client_chunk=client_chunk, per_example_loss=example_loss(setup)
  )


def response_capacity(setup: Setup) -> int | None:
  """The head's positions per example with `setup.response_only` (the loss is on the second half: L / 2
  targets), else None (the head at every position)."""
  return setup.sequence // 2 if setup.response_only else None


def example_loss(setup: Setup) -> Callable[..., Any]:
  capacity = response_capacity(setup)
  return simulation.causal_lm_example_loss if capacity is None else simulation.response_example_loss(capacity)


def make_batches(setup: Setup, num_clients: int, seed: int = 0) -> Batch:
  """One round's batches [K, tau, b, L] through `fedask_jax.data.client_batches` ("uniform": b real examples
  per step, no empty slot) from random tokens, EXAMPLES_PER_CLIENT per client; the loss on the second half."""
  key = jax.random.key(seed)
  shape = (num_clients, EXAMPLES_PER_CLIENT, setup.sequence)
  data = ClientData(
    input_ids=jax.random.randint(jax.random.fold_in(key, 0), shape, 0, setup.vocab, jnp.int32),
    attention_mask=jnp.ones(shape, bool),
    loss_mask=jnp.broadcast_to(jnp.arange(setup.sequence) >= setup.sequence // 2, shape),
    client_sizes=jnp.full((num_clients,), EXAMPLES_PER_CLIENT, jnp.int32),
  )
  return client_batches(
    simulation.data_key(jax.random.fold_in(key, 1)),
    data,
    jnp.arange(num_clients),
    local_steps=setup.local_steps,
    batch_size=setup.batch,
    capacity=setup.batch,
    sampling="uniform",
  )


def loop_round(rnd: simulation.FederatedRound, trained: str) -> Callable[..., Any]:
  """The round as a Python loop over clients (the official code's structure), same results as the compiled
  round: `run(state, client_inputs) -> (new ServerState, aggregation metrics)` with `client_inputs` from
  `loop_inputs`. The state is not donated."""
  update = jax.jit(functools.partial(simulation.client_update, rnd.training, trained))
  server = jax.jit(functools.partial(simulation.server_step, rnd.strategy))

  def run(state: simulation.ServerState, inputs: dict[str, Any]) -> tuple[simulation.ServerState, Any]:
    results = [
      update(state, rnd.frozen_state, batch, client_id, key)[0]
      for batch, client_id, key in zip(inputs["batches"], inputs["ids"], inputs["keys"])
    ]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *results)
    return server(state, stacked, inputs["weights"], inputs["client_ids"], simulation.server_key(inputs["round_key"]))

  return run


def loop_inputs(batches: Batch, client_ids: jax.Array, weights: jax.Array, round_key: jax.Array) -> dict[str, Any]:
  """Per-client slices of the round's inputs for `loop_round`: batch k, id k and key fold_in(round_key, id k)
  (the compiled round's client key), each already on device."""
  num = client_ids.shape[0]
  return jax.block_until_ready(
    {
      "batches": [jax.tree.map(operator.itemgetter(k), batches) for k in range(num)],
      "ids": [client_ids[k] for k in range(num)],
      "keys": [jax.random.fold_in(round_key, client_ids[k]) for k in range(num)],
      "weights": weights,
      "client_ids": client_ids,
      "round_key": round_key,
    }
  )


def limit_step(model: nnx.Module, capacity: int | None = None) -> tuple[Callable[..., Any], dict[str, jax.Array], Any]:
  """(step, lora_b, frozen_state): `step(lora_b {path: [r, out]}, frozen_state, batch [N, L]) -> (mean loss,
  gradient)` is one jitted centralised forward + backward of N examples w.r.t. lora_b, with lora_a at the
  model's value and no clipping; lora_b and frozen_state are the model's. With a `capacity`, the head runs at
  the response positions only, as the round's loss does (`response_capacity`)."""
  graphdef, lora_state, frozen_state = split_lora(model)
  start = to_adapters(lora_state)

  def loss(lora_b, frozen_state, batch):
    adapters = {name: LoRAFactors(factors.lora_a, lora_b[name]) for name, factors in start.items()}
    merged = nnx.merge(graphdef, from_adapters(lora_state, adapters), frozen_state)
    if capacity is None:
      logits = merged(batch.input_ids, batch.attention_mask)
      return jnp.mean(causal_lm_loss(logits, batch.input_ids, batch.loss_mask).per_example)
    positions, weights = response_positions(batch.loss_mask, capacity)
    logits = merged(batch.input_ids, batch.attention_mask, logit_positions=positions)
    return jnp.mean(response_loss(logits, batch.input_ids, positions, weights).per_example)

  return jax.jit(jax.value_and_grad(loss)), {name: f.lora_b for name, f in start.items()}, frozen_state


def memory_bytes(compiled: Any) -> dict[str, int]:
  """XLA's buffer assignment for one call: arguments + outputs + temporaries - donated aliases (`peak`)."""
  stats = compiled.memory_analysis()
  parts = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")}
  return dict(parts, peak=parts["argument"] + parts["output"] + parts["temp"] - parts["alias"])


def device_peak_bytes() -> int | None:
  """The device's `peak_bytes_in_use` since the process started (None where the backend keeps no such stat,
  e.g. the CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def flops(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled function (`cost_analysis`; loops' bodies are counted once, so use it on
  loop-free functions such as the limit step)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def matmul_flops_per_s(n: int = 2048, repeats: int = MIN_REPEATS) -> float:
  """Attainable float32 FLOP/s of one jitted n x n x n matmul (2 n^3 FLOPs) at XLA's default precision, the
  median of `repeats`: what this device delivers to dense GEMMs right now (load included)."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  product = jax.jit(jnp.matmul).lower(x, x).compile()
  jax.block_until_ready(product(x, x))
  seconds = harness.time_alternating({"matmul": (lambda: x, lambda a: jax.block_until_ready(product(a, a)))}, repeats)
  return 2 * n**3 / statistics.median(seconds["matmul"])


class Rounds:
  """What every K shares: the model, the compiled rounds' builders (DP, non-DP, DP with clients in chunks of
  `setup.chunk`), the loop's jitted one-client update and aggregation, the limit step and the PyTorch peer."""

  def __init__(self, setup: Setup, with_torch: bool = True, seed: int = 0):
    self.setup = setup
    self.model = build_model(setup, seed)
    self.dp = build_round(self.model, setup, private=True)
    self.nodp = build_round(self.model, setup, private=False)
    self.chunked = build_round(self.model, setup, private=True, client_chunk=setup.chunk)
    self.trained = self.dp.trained(1)
    self.loop = loop_round(self.dp, self.trained)
    self.limit = limit_step(self.model, response_capacity(setup))
    self.torch_missing = torch_peer.missing() if with_torch else "not run (--no-torch)"
    self.peer = None
    if self.torch_missing is None:
      self.peer = torch_peer.TorchFedASKRound(
        setup.hf_config(),
        rank=setup.rank,
        alpha=setup.alpha,
        target_modules=setup.lora().target_modules,
        clip_norm=setup.clip_norm,
        noise_multiplier=setup.noise_multiplier,
        expected_batch_size=float(setup.batch),
        oversample=setup.oversample,
        seed=seed,
      )


class Bench:
  """One K's inputs and the variants to time on them (module docstring); compile times in `compile_s`."""

  def __init__(self, rounds: Rounds, num_clients: int, seed: int = 0):
    self.rounds, self.num_clients = rounds, num_clients
    self.state0 = rounds.dp.init(num_clients)
    self.batches = make_batches(rounds.setup, num_clients, seed)
    self.ids = jnp.arange(num_clients, dtype=jnp.int32)
    self.weights = jnp.full((num_clients,), 1.0 / num_clients, jnp.float32)
    self.round_key = jax.random.fold_in(jax.random.key(seed), 7)
    self.compile_s: dict[str, float] = {}
    self.compiled: dict[str, Any] = {}

  def round_args(self) -> tuple:
    """Arguments of a compiled round, with a fresh copy of the state (the round donates it)."""
    state = jax.block_until_ready(jax.tree.map(jnp.copy, self.state0))
    return (state, self.rounds.dp.frozen_state, self.batches, self.ids, self.weights, self.round_key)

  def round(self, name: str, rnd: simulation.FederatedRound, trained: str) -> harness.Variant:
    """A compiled round (lower + compile timed as its compile time)."""
    compiled, self.compile_s[name] = harness.compile_timed(rnd.compiled(trained), *self.round_args())
    self.compiled[name] = compiled
    return self.round_args, lambda args: jax.block_until_ready(compiled(*args))

  def loop(self) -> harness.Variant:
    """The Python loop over clients (first call, which compiles what is not yet compiled, as compile time)."""
    run_loop = self.rounds.loop
    inputs = loop_inputs(self.batches, self.ids, self.weights, self.round_key)
    self.compile_s["loop"] = harness.seconds(lambda: jax.block_until_ready(run_loop(self.state0, inputs)))
    return lambda: inputs, lambda args: jax.block_until_ready(run_loop(self.state0, args))

  def limit(self) -> harness.Variant:
    """The centralised forward + backward of the round's K tau b examples as one batch."""
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), self.batches)
    step, lora_b, frozen_state = self.rounds.limit
    args = (lora_b, frozen_state, flat)
    compiled, self.compile_s["limit"] = harness.compile_timed(step, *args)
    self.compiled["limit"] = compiled
    return lambda: args, lambda a: jax.block_until_ready(compiled(*a))

  def torch(self, threads: int | None) -> harness.Variant:
    """The PyTorch peer on the same batches with `threads` intra-op threads (None on a GPU)."""
    import torch

    peer = self.rounds.peer
    adapters = peer.to_torch(peer.adapters())
    batches = {
      name: torch.from_numpy(
        np.asarray(getattr(self.batches, name)).astype(np.int64 if name == "input_ids" else bool)
      ).to(peer.device)
      for name in ("input_ids", "attention_mask", "loss_mask")
    }
    weights = torch.tensor(np.asarray(self.weights), device=peer.device)

    def prepare():
      if threads is not None:
        torch.set_num_threads(threads)

    name = "torch_round" if threads is None else f"torch_round_{threads}t"
    prepare()
    self.compile_s[name] = harness.seconds(lambda: peer(adapters, batches, weights, 0))
    return prepare, lambda _: peer(adapters, batches, weights, 0)


def torch_thread_counts(device: Any) -> list[int | None]:
  """The peer's settings to try: on the CPU one thread and all cores (the best choice depends on the machine's
  load: OpenMP threads that wait for each other lose most when other processes hold the cores); on a GPU None
  (torch's default)."""
  return [None] if device.type != "cpu" else sorted({1, os.cpu_count() or 1})


def measure_main(
  rounds: Rounds, repeats: int, profile: str | None, torch_threads: tuple[int, ...] | None = None
) -> dict:
  """Round, chunked round, loop, limit, the non-DP rounds and the PyTorch peer (with each of `torch_threads`,
  default `torch_thread_counts`) at K = setup.clients, alternating."""
  setup = rounds.setup
  bench = Bench(rounds, setup.clients)
  variants = {
    "round": bench.round("round", rounds.dp, rounds.trained),
    "loop": bench.loop(),
    "limit": bench.limit(),
    "nodp_round": bench.round("nodp_round", rounds.nodp, rounds.trained),
    "nodp_both_round": bench.round("nodp_both_round", rounds.nodp, "both"),
  }
  if setup.clients > setup.chunk:
    variants["chunked_round"] = bench.round("chunked_round", rounds.chunked, rounds.trained)
  if rounds.peer is not None:
    for threads in torch_threads or torch_thread_counts(rounds.peer.device):
      variants["torch_round" if threads is None else f"torch_round_{threads}t"] = bench.torch(threads)
  if profile is not None:
    _profile(profile, {name: variants[name] for name in ("round", "loop", "limit")})
  times = harness.time_alternating(variants, repeats)
  out = {name: harness.summary(t, bench.compile_s[name]) for name, t in times.items()}
  if rounds.peer is None:
    out["torch_round"] = {"missing": rounds.torch_missing}
  else:
    # The peer's best thread setting is its figure: the comparison should not rest on a bad OpenMP choice.
    settings = [name for name in out if name.startswith("torch_round_")]
    if settings:
      best = min(settings, key=lambda name: out[name]["median_s"])
      out["torch_round"] = dict(out[best], threads=int(best.removeprefix("torch_round_").removesuffix("t")))
    out["torch_round"].update(
      versions=torch_peer.versions(), device=str(rounds.peer.device), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")
    )
  model_flops = flops(bench.compiled["limit"])
  out["model_flops"] = model_flops
  out["achieved_flops_per_s"] = {
    name: model_flops / out[name]["median_s"] if model_flops and "median_s" in out[name] else None
    for name in ("round", "chunked_round", "loop", "limit", "torch_round")
    if name in out
  }
  out["matmul_flops_per_s"] = matmul_flops_per_s()
  out["memory_bytes"] = {name: memory_bytes(compiled) for name, compiled in bench.compiled.items()}
  out.update(measure_certificate(rounds, bench, repeats))
  _, metrics = bench.compiled["round"](*bench.round_args())
  out["round_metrics"] = {name: float(metrics[name]) for name in ("train_loss", "clipped_fraction")}
  return out


def measure_certificate(rounds: Rounds, bench: Bench, repeats: int) -> dict:
  """The sketch aggregation and the exactness certificate on the client results of `bench`'s round, each jitted
  alone and timed alternating: {"sketch_aggregation": summary, "certificate": summary} (module docstring)."""
  results, _ = rounds.dp.client_results(bench.state0, bench.batches, bench.ids, bench.round_key, 1)
  rank, adapters = rounds.setup.rank, results.adapters
  omegas = sketch.make_omegas(
    simulation.server_key(bench.round_key), bench.state0.adapters, rank + rounds.setup.oversample
  )
  aggregate, aggregate_compile = harness.compile_timed(
    jax.jit(functools.partial(sketch.aggregate_adapters, rank=rank)), adapters, bench.weights, omegas
  )
  aggregated = aggregate(adapters, bench.weights, omegas)
  certify, certify_compile = harness.compile_timed(
    jax.jit(sketch.adapters_reconstruction_error), adapters, bench.weights, aggregated
  )
  times = harness.time_alternating(
    {
      "sketch_aggregation": (lambda: None, lambda _: jax.block_until_ready(aggregate(adapters, bench.weights, omegas))),
      "certificate": (lambda: None, lambda _: jax.block_until_ready(certify(adapters, bench.weights, aggregated))),
    },
    repeats,
  )
  return {
    "sketch_aggregation": harness.summary(times["sketch_aggregation"], aggregate_compile),
    "certificate": harness.summary(times["certificate"], certify_compile),
  }


def _profile(directory: str, variants: dict[str, harness.Variant]) -> None:
  """One run of each variant inside `jax.profiler.trace` (TensorBoard and Perfetto files under `directory`)."""
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    for name, (prepare, run_fn) in variants.items():
      args = prepare()
      with jax.profiler.TraceAnnotation(f"bench:{name}"):
        run_fn(args)


def measure_scaling(rounds: Rounds, clients: int, repeats: int) -> dict:
  """Round (all clients at once, and in chunks of setup.chunk) and loop seconds and memory at K = `clients`."""
  bench = Bench(rounds, clients)
  variants = {"round": bench.round("round", rounds.dp, rounds.trained), "loop": bench.loop()}
  if clients > rounds.setup.chunk:
    variants["chunked_round"] = bench.round("chunked_round", rounds.chunked, rounds.trained)
  times = harness.time_alternating(variants, repeats)
  summaries = {name: harness.summary(t, bench.compile_s[name]) for name, t in times.items()}
  return scaling_row(clients, summaries, {name: memory_bytes(c) for name, c in bench.compiled.items()})


def scaling_row(clients: int, summaries: dict[str, dict], memory: dict[str, dict]) -> dict:
  """One K's row of the sweep from the timings of its round, loop and (if run) chunked round."""
  row: dict[str, Any] = {"clients": clients}
  for name in ("round", "loop", "chunked_round"):
    if name in summaries:
      row[f"{name}_s"] = summaries[name]["median_s"]
      row[f"{name}_runs_s"] = summaries[name]["runs_s"]
      row[f"{name}_compile_s"] = summaries[name]["compile_s"]
  row["loop_over_round"] = row["loop_s"] / row["round_s"]
  row["memory_bytes"] = {name: memory[name] for name in ("round", "chunked_round") if name in memory}
  row["device_peak_bytes"] = device_peak_bytes()
  return row


def ratios_and_goals(result: dict) -> tuple[dict, dict]:
  """The issue's ratios from the measured seconds, and each goal's bound, value and whether it holds."""
  main, agg = result["main"], result["aggregation"]
  torch_s = result["torch_round_s"]
  at_64 = [row["loop_over_round"] for row in result["scaling"] if row["clients"] == 64]
  ratios = {
    "loop_over_round": main["loop"]["median_s"] / main["round"]["median_s"],
    "round_over_limit": main["round"]["median_s"] / main["limit"]["median_s"],
    "dp_overhead": main["round"]["median_s"] / main["nodp_round"]["median_s"],
    "dp_overhead_vs_both": main["round"]["median_s"] / main["nodp_both_round"]["median_s"],
    "torch_over_round": None if torch_s is None else torch_s / main["round"]["median_s"],
    "agg_speedup": agg["dense"]["median_s"] / agg["fedask"]["median_s"],
    "certificate_over_round": main["certificate"]["median_s"] / main["round"]["median_s"],
    "loop_over_round_at_64": at_64[0] if at_64 else None,
    "chunked_speedup": main["round"]["median_s"] / main["chunked_round"]["median_s"]
    if "chunked_round" in main
    else None,
  }
  platform_name = jax.devices()[0].platform
  goals = {}
  for name, comparison, bound, where in GOALS:
    value = ratios[name]
    met = None if value is None else bool(value <= bound if comparison == "<=" else value >= bound)
    goals[name] = {
      "target": f"{comparison} {bound}",
      "value": value,
      "applies_here": where == "any" or where == platform_name,
      "met": met,
    }
  return ratios, goals


def run(
  setup: Setup,
  repeats: int = MIN_REPEATS,
  with_torch: bool = True,
  profile: str | None = None,
  agg_problem: dict | None = None,
  mode: str = "custom",
  peak_flops: float | None = None,
  torch_threads: tuple[int, ...] | None = None,
) -> dict:
  """Every measurement of the module docstring for `setup`; returns the JSON-ready result. `agg_problem`
  overrides the aggregation problem (m, n, r, p, k); `peak_flops` is the chip's peak FLOP/s, if known;
  `torch_threads` the CPU thread counts to run the peer with (default: 1 and all cores)."""
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats={repeats}: every time is a median of at least {MIN_REPEATS} runs; pass >= 5.")
  load_before, started = os.getloadavg(), time.perf_counter()
  rounds = Rounds(setup, with_torch)
  main = measure_main(rounds, repeats, profile, torch_threads)
  # The main comparison's K is not measured twice: its row reuses the main figures.
  scaling = [
    scaling_row(clients, main, main["memory_bytes"])
    if clients == setup.clients
    else measure_scaling(rounds, clients, repeats)
    for clients in sorted(setup.scaling)
  ]
  problem = dict(m=4096, n=4096, r=16, p=4, k=10) if agg_problem is None else agg_problem
  agg = aggregate.measure(**problem, repeats=repeats, seed=0)
  result = {
    "benchmark": "run",
    "mode": mode,
    "setup": dict(
      dataclasses.asdict(setup),
      strategy="fedask",
      dp_mechanism="b_space",
      trained=rounds.trained,
      optimizer="adamw lr 5e-4",
      batches="uniform, every slot real",
      repeats=repeats,
    ),
    "round_s": main["round"]["median_s"],
    "loop_s": main["loop"]["median_s"],
    "limit_s": main["limit"]["median_s"],
    "nodp_round_s": main["nodp_round"]["median_s"],
    "nodp_both_round_s": main["nodp_both_round"]["median_s"],
    "torch_round_s": main["torch_round"].get("median_s"),
    "agg_fedask_s": agg["fedask"]["median_s"],
    "agg_dense_s": agg["dense"]["median_s"],
    "sketch_aggregation_s": main["sketch_aggregation"]["median_s"],
    "certificate_s": main["certificate"]["median_s"],
    "agg_client_bytes": agg["client_bytes_per_round"],
    "compile_s": dict(
      {name: v["compile_s"] for name, v in main.items() if isinstance(v, dict) and "compile_s" in v},
      agg_fedask=agg["fedask"]["compile_s"],
      agg_dense=agg["dense"]["compile_s"],
    ),
    "flops": {
      "model_flops_per_round": main["model_flops"],
      "achieved_per_s": main["achieved_flops_per_s"],
      "matmul_per_s": main["matmul_flops_per_s"],
      "peak_per_s": peak_flops,
      "round_utilisation": None
      if not (peak_flops and main["achieved_flops_per_s"]["round"])
      else main["achieved_flops_per_s"]["round"] / peak_flops,
    },
    "main": main,
    "aggregation": agg,
    "scaling": scaling,
    "machine": harness.machine(load_before),
  }
  result["ratios"], result["goals"] = ratios_and_goals(result)
  result["wall_s"] = time.perf_counter() - started
  return result


# ----- scale mode -----


def memory_budget() -> int | None:
  """90% of the device's memory (`bytes_limit`), None where the backend reports none (the CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats or "bytes_limit" not in stats else int(0.9 * stats["bytes_limit"])


def chunk_candidates(clients: int, largest: int) -> list[int]:
  """client_chunk values to try, largest first: the powers of two <= min(clients, largest) that divide K."""
  return [c for c in (2**i for i in range(int(np.log2(max(1, min(clients, largest)))), -1, -1)) if clients % c == 0]


def scale_row(
  rounds: Rounds, clients: int, repeats: int, peak_flops: float | None, budget: int | None, largest_chunk: int
) -> dict:
  """One K of the scale mode: the compiled DP round with the largest client_chunk whose XLA buffers fit
  `budget` (without a budget: min(K, largest_chunk)), and the compute limit on the same tokens. The limit runs
  one chunk of clients' tokens (K tau b examples at once do not fit a device for large K) and is scaled by
  K / chunk: the same work, at the batch size the round itself runs. MFU = model FLOPs (XLA's count of the
  limit, scaled likewise) / seconds / peak."""
  setup, bench = rounds.setup, Bench(rounds, clients)
  chunk, fits = None, False
  for chunk in chunk_candidates(clients, largest_chunk):
    variant = bench.round("round", build_round(rounds.model, setup, private=True, client_chunk=chunk), rounds.trained)
    fits = budget is None or memory_bytes(bench.compiled["round"])["peak"] <= budget
    if fits:
      break
  limit_bench = Bench(rounds, chunk)
  times = harness.time_alternating({"round": variant, "limit": limit_bench.limit()}, repeats)
  round_s, limit_s = statistics.median(times["round"]), statistics.median(times["limit"]) * clients / chunk
  model_flops = flops(limit_bench.compiled["limit"])
  model_flops = None if model_flops is None else model_flops * clients / chunk
  mfu = lambda seconds: None if not (peak_flops and model_flops) else model_flops / seconds / peak_flops
  return {
    "clients": clients,
    "client_chunk": chunk,
    "fits_budget": fits,
    "round_s": round_s,
    "round_runs_s": times["round"],
    "limit_s": limit_s,
    "round_over_limit": round_s / limit_s,
    "compile_s": {"round": bench.compile_s["round"], "limit": limit_bench.compile_s["limit"]},
    "model_flops": model_flops,
    "achieved_flops_per_s": None if model_flops is None else model_flops / round_s,
    "mfu": {"round": mfu(round_s), "limit": mfu(limit_s)},
    "memory_bytes": {
      "round": memory_bytes(bench.compiled["round"]),
      "limit": memory_bytes(limit_bench.compiled["limit"]),
    },
    "device_peak_bytes": device_peak_bytes(),
  }


def run_scale(
  setup: Setup, repeats: int = MIN_REPEATS, peak_flops: float | None = None, largest_chunk: int = 64
) -> dict:
  """The scale mode: `scale_row` for every K of `setup.scaling`, ascending (the device's peak memory is
  process-wide), client_chunk tried from min(K, largest_chunk) down (each try is a compile;
  64 clients of the 110M model fit an H100's memory by our estimate); returns the JSON-ready result."""
  if repeats < MIN_REPEATS:
    raise ValueError(f"repeats={repeats}: every time is a median of at least {MIN_REPEATS} runs; pass >= 5.")
  load_before, started = os.getloadavg(), time.perf_counter()
  rounds = Rounds(setup, with_torch=False)
  parameters = sum(x.size for x in jax.tree.leaves(nnx.state(rounds.model, nnx.Param)))
  budget = memory_budget()
  rows = [scale_row(rounds, clients, repeats, peak_flops, budget, largest_chunk) for clients in sorted(setup.scaling)]
  return {
    "benchmark": "run",
    "mode": "scale",
    "setup": dict(
      dataclasses.asdict(setup),
      strategy="fedask",
      dp_mechanism="b_space",
      trained=rounds.trained,
      parameters=int(parameters),
      repeats=repeats,
      memory_budget_bytes=budget,
    ),
    "scaling": rows,
    "peak_flops_per_s": peak_flops,
    "machine": harness.machine(load_before),
    "wall_s": time.perf_counter() - started,
  }


def scale_table(result: dict) -> str:
  """The printed summary of the scale mode: one line per K."""
  s, machine = result["setup"], result["machine"]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  lines = [
    f"scale: Llama {s['parameters'] / 1e6:.0f}M parameters (d={s['hidden']} x {s['layers']}, V={s['vocab']}, "
    f"L={s['sequence']}, {s['dtype']}, response-only head {s['response_only']}), tau={s['local_steps']}, "
    f"b={s['batch']}, r={s['rank']}; {machine['device']}; median of {s['repeats']}",
    f"{'K':>5}{'chunk':>6}{'round s':>10}{'limit s':>10}{'round/limit':>12}{'MFU round':>10}{'MFU limit':>10}"
    f"{'compile s':>10}{'XLA GiB':>9}{'device GiB':>11}",
  ]
  for row in result["scaling"]:
    gib = lambda b: fmt(None if b is None else b / 2**30, ".2f")
    lines.append(
      f"{row['clients']:>5}{row['client_chunk']:>6}{row['round_s']:>10.3f}{row['limit_s']:>10.3f}"
      f"{row['round_over_limit']:>12.2f}{fmt(row['mfu']['round'], '.3f'):>10}"
      f"{fmt(row['mfu']['limit'], '.3f'):>10}{row['compile_s']['round']:>10.1f}"
      f"{gib(row['memory_bytes']['round']['peak']):>9}{gib(row['device_peak_bytes']):>11}"
    )
  return "\n".join(lines)


def table(result: dict) -> str:
  """The printed summary: seconds, FLOP/s, ratios and goals, then the scaling sweep."""
  s, main, fl = result["setup"], result["main"], result["flops"]
  machine = result["machine"]
  lines = [
    f"{result['mode']}: Llama d={s['hidden']} x {s['layers']} layers, L={s['sequence']}, K={s['clients']}, "
    f"tau={s['local_steps']}, b={s['batch']}, r={s['rank']}; {machine['device']}; median of {s['repeats']}; "
    f"load {machine['load_average_before'][0]:.1f} -> {machine['load_average_after'][0]:.1f}",
    f"{'variant':<18}{'median s':>10}{'min s':>10}{'compile s':>11}{'GFLOP/s':>9}",
  ]
  names = [
    name
    for name in (
      "round",
      "chunked_round",
      "loop",
      "limit",
      "nodp_round",
      "nodp_both_round",
      "sketch_aggregation",
      "certificate",
    )
    if name in main
  ]
  names += sorted(name for name in main if name.startswith("torch_round_")) + ["torch_round"]
  for name in names:
    v = main[name]
    if "missing" in v:
      lines.append(f"{name:<18}  missing: {v['missing']}")
      continue
    achieved = fl["achieved_per_s"].get(name)
    lines.append(
      f"{name:<18}{v['median_s']:>10.4f}{v['min_s']:>10.4f}{v['compile_s']:>11.2f}"
      f"{'' if achieved is None else f'{achieved / 1e9:.1f}':>9}"
    )
  agg = result["aggregation"]
  for name in ("fedask", "dense"):
    lines.append(
      f"{'agg_' + name:<18}{agg[name]['median_s']:>10.4f}{agg[name]['min_s']:>10.4f}"
      f"{agg[name]['compile_s']:>11.2f}   client sends {result['agg_client_bytes'][name]:,} B"
    )
  lines.append(
    f"model FLOPs per round {fl['model_flops_per_round'] / 1e9:.1f} G; a {2048}^3 matmul runs at "
    f"{fl['matmul_per_s'] / 1e9:.1f} GFLOP/s here"
    + (
      ""
      if fl["round_utilisation"] is None
      else f"; the round reaches {100 * fl['round_utilisation']:.1f}% of the chip's peak"
    )
  )
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  lines.append("ratios: " + ", ".join(f"{k} {fmt(v)}" for k, v in result["ratios"].items()))
  lines.append(
    "goals: "
    + ", ".join(
      f"{k} {g['target']}: {'-' if g['met'] is None else ('met' if g['met'] else 'MISSED')}"
      f"{'' if g['applies_here'] else ' (n/a here)'}"
      for k, g in result["goals"].items()
    )
  )
  lines.append(
    f"{'K':>5}{'round s':>10}{'chunked s':>11}{'loop s':>10}{'loop/round':>12}{'XLA MiB':>10}"
    f"{'chunked MiB':>13}{'device MiB':>12}"
  )
  mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
  for row in result["scaling"]:
    memory = row["memory_bytes"]
    lines.append(
      f"{row['clients']:>5}{row['round_s']:>10.4f}{fmt(row.get('chunked_round_s')):>11}"
      f"{row['loop_s']:>10.4f}{row['loop_over_round']:>12.2f}{mib(memory['round']['peak']):>10}"
      f"{mib(memory.get('chunked_round', {}).get('peak')):>13}{mib(row['device_peak_bytes']):>12}"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="the small configuration (< 5 min on 2 CPU cores)")
  parser.add_argument(
    "--scale",
    action="store_true",
    help="the 110M-parameter scale mode (on a CPU: float32, pass a small --scaling, e.g. 1)",
  )
  parser.add_argument(
    "--out", type=pathlib.Path, default=None, help="JSON output (default benchmarks/results/run_{quick,full}.json)"
  )
  parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
  parser.add_argument("--clients", type=int, default=None, help="K of the main comparison")
  parser.add_argument("--scaling", type=int, nargs="+", default=None, help="the K values of the sweep")
  parser.add_argument("--no-torch", action="store_true", help="do not run the PyTorch peer")
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=None,
    help="the chip's peak TFLOP/s at the round's precision, for the utilisation (gpu.md)",
  )
  parser.add_argument("--profile", default=None, help="write a jax.profiler trace of one round/loop/limit here")
  args = parser.parse_args(argv)
  mode = "scale" if args.scale else "quick" if args.quick else "full"
  setup = SETUPS[mode]
  if args.scale and jax.default_backend() == "cpu":
    setup = dataclasses.replace(setup, dtype="float32")  # XLA's CPU matmuls have no native bfloat16
  if args.clients is not None:
    setup = dataclasses.replace(setup, clients=args.clients)
  if args.scaling is not None:
    setup = dataclasses.replace(setup, scaling=tuple(args.scaling))
  if args.repeats < MIN_REPEATS:
    parser.error(f"--repeats={args.repeats}: every time is a median of at least {MIN_REPEATS} runs.")
  peak = None if args.peak_tflops is None else args.peak_tflops * 1e12
  if args.scale:
    result = run_scale(setup, args.repeats, peak)
    print(scale_table(result))
  else:
    result = run(setup, args.repeats, with_torch=not args.no_torch, profile=args.profile, mode=mode, peak_flops=peak)
    print(table(result))
  harness.write(result, args.out or pathlib.Path(__file__).parent / "results" / f"run_{mode}.json")
  return result


if __name__ == "__main__":
  main()
