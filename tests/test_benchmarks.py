"""benchmarks/run.py and benchmarks/torch_peer.py at tiny sizes: the timed variants compute the same round, and
the JSON carries every figure the issue asks for."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402  (benchmarks/harness.py)
import run as bench  # noqa: E402  (benchmarks/run.py)
import torch_peer  # noqa: E402

from fedask_jax import simulation  # noqa: E402
from fedask_jax.models import load_pretrained  # noqa: E402

TINY = bench.Setup(
  hidden=32,
  layers=1,
  heads=2,
  intermediate=64,
  vocab=64,
  sequence=8,
  clients=3,
  local_steps=2,
  batch=2,
  scaling=(1, 3),
  rank=4,
  alpha=8.0,
  chunk=2,
)
# A tiny aggregation problem: the real one (4096 x 4096) takes seconds per dense run.
TINY_AGG = dict(m=64, n=48, r=4, p=2, k=3)


def products(adapters):
  """{path: a @ b [in, out]} in float64: the aggregate itself, free of the factors' sign/rotation ambiguity."""
  return {name: np.asarray(a, np.float64) @ np.asarray(b, np.float64) for name, (a, b) in adapters.items()}


def as_pairs(adapters):
  return {name: (f.lora_a, f.lora_b) for name, f in adapters.items()}


def relative_errors(x, y):
  return {name: float(np.linalg.norm(x[name] - y[name]) / np.linalg.norm(y[name])) for name in y}


@pytest.fixture(scope="module")
def result():
  # One torch thread: tiny ops on several threads cost seconds per round in wake-ups on a busy machine.
  return bench.run(TINY, repeats=bench.MIN_REPEATS, agg_problem=TINY_AGG, mode="test", torch_threads=(1,))


def test_loop_gives_the_compiled_rounds_adapters():
  rounds = bench.Rounds(TINY, with_torch=False)
  b = bench.Bench(rounds, TINY.clients)
  compiled_state, _ = rounds.dp(b.round_args()[0], b.batches, b.ids, b.weights, b.round_key, 1)
  loop_state, _ = rounds.loop(b.state0, bench.loop_inputs(b.batches, b.ids, b.weights, b.round_key))
  # Same keys, so the same DP noise: only float32 summation order differs (vmapped vs one client at a time),
  # ~1e-7 relative per op; 2 AdamW steps and the sketch stay far below 1e-4.
  errors = relative_errors(products(as_pairs(loop_state.adapters)), products(as_pairs(compiled_state.adapters)))
  assert max(errors.values()) < 1e-4, errors
  # The round really moved the adapters (lora_b starts at zero): the comparison is not of two zeros.
  assert all(np.linalg.norm(p) > 0 for p in products(as_pairs(compiled_state.adapters)).values())


def test_torch_peer_computes_the_same_round(tmp_path):
  """With sigma = 0 (no noise: the two stacks' random streams differ) and a clip norm small enough that every
  example is clipped, the PyTorch + peft + Opacus round gives our compiled round's aggregate a @ b."""
  clip = 1e-3
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY.hf_config())).save_pretrained(tmp_path)
  model = load_pretrained(tmp_path, lora=TINY.lora(), seed=3)
  dp = simulation.DPConfig(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=float(TINY.batch))
  rnd = simulation.FederatedRound(model, bench.get_strategy("fedask", certify_every=0), dp=dp)
  batches = bench.make_batches(TINY, TINY.clients, seed=1)
  ids = jnp.arange(TINY.clients)
  weights = jnp.asarray([0.5, 0.3, 0.2])
  start = {name: (np.asarray(a), np.asarray(b)) for name, (a, b) in as_pairs(rnd.initial_adapters).items()}
  state, metrics = rnd(rnd.init(TINY.clients), batches, ids, weights, jax.random.key(2), 1)
  assert float(metrics["clipped_fraction"]) == 1.0

  peer = torch_peer.TorchFedASKRound(
    TINY.hf_config(),
    rank=TINY.rank,
    alpha=TINY.alpha,
    target_modules=TINY.lora().target_modules,
    clip_norm=clip,
    noise_multiplier=0.0,
    expected_batch_size=float(TINY.batch),
    checkpoint=str(tmp_path),
    device="cpu",
  )
  as_torch = {
    name: torch.from_numpy(np.asarray(getattr(batches, name)).astype(np.int64 if name == "input_ids" else bool))
    for name in ("input_ids", "attention_mask", "loss_mask")
  }
  new = peer(peer.to_torch(start), as_torch, torch.tensor(np.asarray(weights)), seed=0)
  ours, theirs = products(as_pairs(state.adapters)), products(peer.to_flax(new))
  # float32 forward/backward in two libraries (different summation orders, ~1e-6 relative on the gradients),
  # then AdamW, whose first steps are ~lr * sign(g) and so do not amplify relative errors: 1e-3 leaves a wide
  # margin while any difference in the mathematics (clipping, normalisation, loss mask, lr) is O(1).
  errors = relative_errors(theirs, ours)
  assert max(errors.values()) < 1e-3, errors


def test_missing_peer_is_recorded_with_its_reason(monkeypatch, result):
  def fail(name):
    raise ImportError(f"No module named {name!r}")

  monkeypatch.setattr(torch_peer.importlib, "import_module", fail)
  reason = torch_peer.missing()
  assert reason is not None and "torch" in reason and "bench" in reason
  without = dict(result, torch_round_s=None)
  ratios, goals = bench.ratios_and_goals(without)
  assert ratios["torch_over_round"] is None and goals["torch_over_round"]["met"] is None


def test_json_has_every_figure(result, tmp_path):
  for key in ("round_s", "loop_s", "limit_s", "nodp_round_s", "torch_round_s", "agg_fedask_s", "agg_dense_s"):
    assert result[key] > 0, key
  for variant in (
    "round",
    "loop",
    "limit",
    "nodp_round",
    "nodp_both_round",
    "torch_round",
    "sketch_aggregation",
    "certificate",
  ):
    timing = result["main"][variant]
    assert len(timing["runs_s"]) == bench.MIN_REPEATS and timing["median_s"] == np.median(timing["runs_s"])
    assert timing["compile_s"] > 0
  assert result["agg_client_bytes"] == {"fedask": (64 + 48) * (4 + 2) * 4, "dense": 64 * 48 * 4}
  assert [row["clients"] for row in result["scaling"]] == [1, 3]
  for row in result["scaling"]:
    assert row["round_s"] > 0 and row["loop_s"] > 0 and row["memory_bytes"]["round"]["peak"] > 0
  # K = 3 > chunk = 2: the chunked round runs and needs less XLA memory than all clients at once.
  chunked = result["scaling"][1]["memory_bytes"]
  assert chunked["chunked_round"]["temp"] < chunked["round"]["temp"]
  ratios = result["ratios"]
  assert ratios["loop_over_round"] == result["loop_s"] / result["round_s"]
  assert ratios["round_over_limit"] == result["round_s"] / result["limit_s"]
  assert ratios["dp_overhead"] == result["round_s"] / result["nodp_round_s"]
  assert ratios["torch_over_round"] == result["torch_round_s"] / result["round_s"]
  assert ratios["agg_speedup"] == result["agg_dense_s"] / result["agg_fedask_s"]
  assert ratios["certificate_over_round"] == result["certificate_s"] / result["round_s"]
  assert set(result["goals"]) == {name for name, *_ in bench.GOALS}
  assert len(result["machine"]["load_average_before"]) == 3
  assert result["flops"]["model_flops_per_round"] > 0
  path = tmp_path / "run.json"
  path.write_text(json.dumps(result))
  assert json.loads(path.read_text())["ratios"] == pytest.approx(ratios)
  assert "ratios:" in bench.table(result)


@pytest.mark.parametrize("warmup", [0, 1, 2])
def test_time_alternating_warms_up_and_interleaves(warmup):
  calls = []
  variants = {name: (lambda name=name: name, lambda arg: calls.append(arg)) for name in ("x", "y")}
  times = harness.time_alternating(variants, repeats=3, warmup=warmup)
  assert calls == ["x", "y"] * (warmup + 3)  # the untimed warm-up passes, then 3 timed ones, alternating
  assert {name: len(t) for name, t in times.items()} == {"x": 3, "y": 3}
  summary = harness.summary(times["x"], compile_s=0.5)
  assert summary["median_s"] == np.median(times["x"]) and summary["min_s"] == min(times["x"])


def test_memory_bytes_counts_arguments_outputs_and_donations():
  x = jnp.zeros((256, 256), jnp.float32)
  plain = bench.memory_bytes(jax.jit(lambda v: v * 2).lower(x).compile())
  assert plain["argument"] == plain["output"] == x.nbytes and plain["alias"] == 0
  donated = bench.memory_bytes(jax.jit(lambda v: v * 2, donate_argnums=0).lower(x).compile())
  assert donated["alias"] == x.nbytes and donated["peak"] == plain["peak"] - x.nbytes


def test_scale_mode_runs_and_reports_every_figure(tmp_path):
  # The scale mode's code path at a tiny size (CI's CPU): bfloat16 base weights, the head at the response
  # positions, K = 2 and 4 with client_chunk chosen below min(K, 2).
  setup = bench.dataclasses.replace(TINY, scaling=(2, 4), dtype="bfloat16", response_only=True)
  result = bench.run_scale(setup, repeats=bench.MIN_REPEATS, peak_flops=1e12, largest_chunk=2)
  assert result["setup"]["parameters"] > 0 and result["setup"]["dtype"] == "bfloat16"
  assert [row["clients"] for row in result["scaling"]] == [2, 4]
  for row in result["scaling"]:
    assert row["client_chunk"] == 2 and row["fits_budget"]
    assert len(row["round_runs_s"]) == bench.MIN_REPEATS and row["round_s"] == np.median(row["round_runs_s"])
    assert row["round_over_limit"] == row["round_s"] / row["limit_s"]
    assert row["compile_s"]["round"] > 0 and row["compile_s"]["limit"] > 0
    assert row["mfu"]["round"] == row["model_flops"] / row["round_s"] / 1e12
    assert row["memory_bytes"]["round"]["peak"] > 0
  # The limit runs one chunk of clients' tokens and is scaled by K / chunk: twice the clients, twice the FLOPs.
  assert result["scaling"][1]["model_flops"] == 2 * result["scaling"][0]["model_flops"]
  path = tmp_path / "scale.json"
  path.write_text(json.dumps(result))
  assert json.loads(path.read_text())["scaling"][0]["clients"] == 2
  assert "round/limit" in bench.scale_table(result)


def test_chunk_candidates_divide_k():
  assert bench.chunk_candidates(1024, 256) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
  assert bench.chunk_candidates(8, 256) == [8, 4, 2, 1]
  assert bench.chunk_candidates(6, 4) == [2, 1]
