"""experiments/method_comparison.py on a tiny grid (2 methods x 2 epsilons x IID x 2 seeds, 2 rounds) and a tiny
tuning (2 rates and their edge extensions, 1 seed): compiled rounds are reused across learning rates, epsilons and
seeds, the runs files resume, a run reproduces `fedask-jax train` at its learning rate, the validation split is
disjoint from the training and test problems, the edge rule extends the rates, and the report's numbers are
numpy's."""

import dataclasses
import json
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import method_comparison as mc  # noqa: E402  (experiments/method_comparison.py)

from fedask_jax import runner  # noqa: E402

# One client holding all 48 examples: its data need no padding, so the runner's own shapes (and hence its Poisson
# draws) are the grid's, and a grid run must reproduce `runner.train` (test_run_reproduces_the_runner). Both
# epsilons are private so that one compiled DP round per method serves both sigmas, every rate and both seeds (the
# non-private rounds compile the same way; the quick mode's invocation line checks them). L = 96 tokens: 34 of
# the 48 problems keep answer tokens (at 48, only 3 would).
TINY = mc.Settings(
  methods=("fedask:norm", "ffa-lora"),
  epsilons=(1.0, 3.0),
  partitions=("iid",),
  seeds=(0, 1),
  rounds=2,
  num_clients=1,
  clients_per_round=1,
  local_steps=1,
  batch_size=4,
  max_seq_len=96,
  train_examples=48,
  validation_examples=16,
  eval_examples=8,
  eval_batch_size=8,
  min_client_size=4,
  tuning_steps=(-3, -2),
  max_extension=1,
  tuning_seeds=(7,),
  accuracy_problems=2,
  accuracy_tokens=4,
)
COMPILES = {"round fedask:norm dp lora_b": 1, "round ffa-lora dp lora_b": 1, "sampler poisson": 1, "evaluate": 1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out = tmp_path_factory.mktemp("method_comparison")
  tuning = out / "tiny_tuning_runs.jsonl"
  grid, tuned = mc.run_tuning(TINY, tuning, progress=False)
  lrs = mc.tuned_lrs(TINY, tuning)
  grid, made = mc.run_grid(TINY, out / "tiny_runs.jsonl", lrs, grid=grid, progress=False)
  return grid, tuned, made, out, lrs


def runs_of(path):
  return [r for r in runner.MetricsLog(path).read() if r["kind"] == "run"]


def test_tuning_follows_the_protocol(tiny):
  grid, tuned, _, out, lrs = tiny
  runs = runs_of(out / "tiny_tuning_runs.jsonl")
  assert len(runs) == tuned >= 2 * 2 * 2  # 2 methods x 2 epsilons x 2 base rates, plus any extensions
  assert {r["partition"] for r in runs} == {"iid"} and {r["seed"] for r in runs} == {7}
  assert all("valid_loss" in r and "eval_loss" not in r for r in runs)
  curves = mc.tuning_curves(TINY, runs)
  for (method, epsilon), curve in curves.items():
    steps = curve["steps"]
    assert curve["complete"] and set(TINY.tuning_steps) <= set(steps)
    assert -3 - TINY.max_extension <= steps[0] and steps[-1] <= -2 + TINY.max_extension
    losses = {k: curve["losses"][k][0] for k in steps}
    assert curve["best"] == min(losses, key=losses.get)  # the argmin of the (one-seed) validation loss
    # Either the best rate has a worse neighbour on both sides, or the extension limit stopped the search.
    assert curve["interior"] or steps[0] == -3 - TINY.max_extension or steps[-1] == -2 + TINY.max_extension
    assert lrs[method, epsilon] == mc.lattice_lr(curve["best"])
  # One compilation per (method, DP, trained factor) for every rate and sigma, shared with the grid's runs.
  assert grid.compile_counts() == grid.expected_compiles() == COMPILES


def test_the_edge_rule_on_synthetic_curves(tmp_path):
  settings = dataclasses.replace(
    TINY, methods=("ffa-lora",), epsilons=(1.0,), tuning_steps=(-3, -2, -1), max_extension=2, tuning_seeds=(0, 1)
  )
  record = lambda k, seed, loss: {
    "method": "ffa-lora",
    "target_epsilon": 1.0,
    "partition": "iid",
    "seed": seed,
    "lr": mc.lattice_lr(k),
    "valid_loss": loss,
  }
  falling = lambda steps: [record(k, s, 5.0 - 0.1 * (k + 4) + 0.01 * s) for k in steps for s in (0, 1)]
  # Loss falling with the rate: the best is the top edge, so the next rate up is asked for, for both seeds.
  runs = falling((-3, -2, -1))
  assert not mc.tuning_curves(settings, runs)[("ffa-lora", 1.0)]["complete"]
  assert mc.tuning_points(settings, runs) == [("ffa-lora", 1.0, "iid", s, mc.lattice_lr(0)) for s in (0, 1)]
  # Worse one step up: the best is interior, the tuning is complete.
  done = runs + [record(0, s, 5.0) for s in (0, 1)]
  curve = mc.tuning_curves(settings, done)[("ffa-lora", 1.0)]
  assert curve["complete"] and curve["interior"] and curve["best"] == -1 and mc.tuning_points(settings, done) == []
  # Still falling: extended up to max_extension = 2 steps beyond the base lattice, then stopped on the edge.
  curve = mc.tuning_curves(settings, falling((-3, -2, -1, 0, 1)))[("ffa-lora", 1.0)]
  assert curve["complete"] and not curve["interior"] and curve["steps"] == [-3, -2, -1, 0, 1] and curve["best"] == 1
  with pytest.raises(ValueError, match="not complete for ffa-lora eps 1"):
    mc.tuned_lrs(settings, tmp_path / "no_tuning_runs.jsonl")


def test_the_grid_compiles_each_round_once_and_resumes(tiny):
  grid, _, made, out, lrs = tiny
  path = out / "tiny_runs.jsonl"
  assert made == 8
  runs = runs_of(path)
  assert all(r["lr"] == lrs[r["method"], r["target_epsilon"]] for r in runs)
  assert grid.compile_counts() == COMPILES
  invocation = [r for r in runner.MetricsLog(path).read() if r["kind"] == "invocation"]
  assert len(invocation) == 1 and invocation[0]["compile_counts"] == COMPILES
  # Different epsilons give different sigmas through the same compiled round.
  sigmas = {r["target_epsilon"]: r["noise_multiplier"] for r in runs}
  assert sigmas[1.0] > sigmas[3.0] > 0
  # Exact match over 2 problems: 0, 1/2 or 1; per-round records as long as the run.
  assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in runs)
  assert all(len(r["clipped_per_round"]) == len(r["lora_a_scale"]) == TINY.rounds for r in runs)
  # FFA-LoRA never changes lora_a; fedask:norm holds its norm (the gauge's promise), both to float32 round-off.
  for r in runs:
    np.testing.assert_allclose(r["lora_a_scale"], 1.0, rtol=1e-5)
  # The sketch's certificate in every FedASK run: exact to float32 round-off under DP (one factor shared); None
  # for the other strategies, which report none.
  for r in runs:
    if r["method"].startswith("fedask"):
      assert 0 <= r["reconstruction_error"] < 1e-5
    else:
      assert r["reconstruction_error"] is None
  # The runs trained on answer tokens (a round whose Poisson batch holds no target token reports loss 0).
  assert all(any(loss > 0 for loss in r["train_loss"]) for r in runs)

  # Everything done: a second invocation runs nothing.
  assert mc.run_grid(TINY, path, lrs, grid=grid, progress=False)[1] == 0
  # Two runs lost (a killed invocation): exactly those rerun, bit-identical, with no new compilation.
  lines = runner.MetricsLog(path).read()
  lost = [r for r in lines if r["kind"] == "run" and r["seed"] == 1 and r["target_epsilon"] == 3.0]
  assert len(lost) == 2
  path.write_text("".join(json.dumps(r) + "\n" for r in lines if r not in lost))
  assert mc.run_grid(TINY, path, lrs, grid=grid, progress=False)[1] == 2
  redone = {r["method"]: r for r in runs_of(path) if r["seed"] == 1 and r["target_epsilon"] == 3.0}
  for old in lost:
    assert redone[old["method"]]["eval_loss"] == old["eval_loss"]
    assert redone[old["method"]]["train_loss"] == old["train_loss"]
  assert len(runs_of(path)) == 8
  assert grid.compile_counts() == COMPILES


def test_the_validation_split_is_neither_trained_on_nor_tested(tiny):
  grid = tiny[0]
  config = mc.run_config(TINY, "ffa-lora", 1.0, "iid", 0)
  train = runner.load_records(config, "train", None)
  test = runner.load_records(config, "eval", None)
  n, v = TINY.train_examples, TINY.validation_examples
  assert [r["question"] for r in grid.records] == [r["question"] for r in train[:n]]
  assert grid.validation_data.num_examples == v
  held = {r["question"] for r in train[n : n + v]}
  assert not held & {r["question"] for r in train[:n]} and not held & {r["question"] for r in test}


def test_runs_made_under_other_settings_are_refused(tiny):
  out = tiny[3]
  with pytest.raises(ValueError, match="other settings"):
    mc.done_runs(
      runner.MetricsLog(out / "tiny_runs.jsonl").read(), dataclasses.replace(TINY, rounds=3), out / "tiny_runs.jsonl"
    )


def test_run_reproduces_the_runner(tiny, tmp_path):
  out, lrs = tiny[3], tiny[4]
  record = next(
    r
    for r in runs_of(out / "tiny_runs.jsonl")
    if r["method"] == "fedask:norm" and r["target_epsilon"] == 1.0 and r["seed"] == 1
  )
  config = dataclasses.replace(
    mc.run_config(TINY, "fedask:norm", 1.0, "iid", 1, record["lr"]), run_dir=str(tmp_path / "run")
  )
  assert config.lr == record["lr"] == lrs["fedask:norm", 1.0] and config.sketch.gauge == "norm"
  summary = runner.train(runner.prepare(config), progress=False)
  assert summary["noise_multiplier"] == record["noise_multiplier"]
  assert summary["epsilon"] == record["epsilon_spent"]
  assert summary["capacity"] == record["capacity"]
  # Same keys, batches, noise and initial adapters; the runner's sigma and lr are constants of its compiled round
  # and ours traced arguments, so XLA may fuse the scaling differently: float32 rounding over 2 steps only.
  np.testing.assert_allclose(record["eval_loss"], summary["eval_loss_after"], rtol=1e-5)
  np.testing.assert_allclose(record["final_train_loss"], summary["final_train_loss"], rtol=1e-5)


def test_summary_mean_and_std_are_numpys(tiny):
  runs = runs_of(tiny[3] / "tiny_runs.jsonl")
  rows = mc.summarize(runs)
  assert len(rows) == 4
  for row in rows:
    losses = [
      r["eval_loss"]
      for r in runs
      if (r["method"], r["partition"], r["target_epsilon"]) == (row["method"], row["partition"], row["target_epsilon"])
    ]
    assert row["n"] == len(losses) == 2
    assert row["eval_loss_mean"] == pytest.approx(np.mean(losses), rel=1e-12)
    assert row["eval_loss_std"] == pytest.approx(np.std(losses, ddof=1), rel=1e-12)
    assert row["eval_loss_std"] > 0


def test_summary_and_gaps_on_synthetic_records():
  rng = np.random.default_rng(0)
  methods = ("fedask:balanced", "fedask:norm", "fedask-alt:balanced", "fedavg")
  runs = [
    {
      "method": m,
      "partition": p,
      "target_epsilon": e,
      "seed": s,
      "lr": 0.01,
      "eval_loss": float(rng.normal(4, 0.1)),
      "accuracy": None,
      "epsilon_spent": None if e is None else e * 0.999,
      "noise_multiplier": None if e is None else 1.0 / e,
    }
    for m in methods
    for p in ("iid", "dir0.1")
    for e in (1.0, None)
    for s in range(3)
  ]
  rows = mc.summarize(runs)
  by_cell = {(r["method"], r["partition"], r["target_epsilon"]): r for r in rows}
  for (m, p, e), row in by_cell.items():
    losses = np.array([r["eval_loss"] for r in runs if (r["method"], r["partition"], r["target_epsilon"]) == (m, p, e)])
    assert row["eval_loss_mean"] == pytest.approx(losses.mean(), rel=1e-12)
    assert row["eval_loss_std"] == pytest.approx(losses.std(ddof=1), rel=1e-12)
    assert row["epsilon_spent_max"] == (None if e is None else pytest.approx(0.999 * e))
  pick = lambda m, p, e: np.array(
    [
      r["eval_loss"]
      for r in sorted(runs, key=lambda r: r["seed"])
      if (r["method"], r["partition"], r["target_epsilon"]) == (m, p, e)
    ]
  )
  gap = mc.paired_gap(runs, "fedask:norm", "fedavg", "iid", 1.0)
  d = pick("fedask:norm", "iid", 1.0) - pick("fedavg", "iid", 1.0)
  assert gap == pytest.approx((d.mean(), d.std(ddof=1) / math.sqrt(3), 3), rel=1e-12)
  # Each FedASK variant against the best method that is not FedASK (fedask-alt counts, the other gauges do not).
  gaps = mc.fedask_gaps(runs, rows)
  assert set(gaps) == {"fedask:balanced", "fedask:norm"}
  for variant, entries in gaps.items():
    assert len(entries) == 4
    for p, e, best, g in entries:
      rivals = {m: by_cell[m, p, e]["eval_loss_mean"] for m in ("fedask-alt:balanced", "fedavg")}
      assert best == min(rivals, key=rivals.get)
      assert g == mc.paired_gap(runs, variant, best, p, e)
  assert mc.best_or_tied((0.05, 0.03, 3)) and not mc.best_or_tied((0.07, 0.03, 3)) and mc.best_or_tied((-1, 9, 3))


def test_report_files(tiny):
  out = tiny[3]
  mode = "tinymode"
  mc.MODES[mode] = TINY
  try:
    for kind in ("", "_tuning"):
      runs = (out / f"tiny{kind}_runs.jsonl").read_text()
      (out / f"method_comparison_tuned_{mode}{kind}_runs.jsonl").write_text(runs)
    result = mc.write_report(mode, out, "test")
  finally:
    del mc.MODES[mode]
  stem = out / f"method_comparison_tuned_{mode}"
  assert stem.with_suffix(".png").stat().st_size > 0
  assert (out / f"method_comparison_tuned_{mode}_tuning.png").stat().st_size > 0
  text = stem.with_suffix(".md").read_text()
  assert "fedask:norm" in text and "ffa-lora" in text and "as expected" in text and "best or tied" in text
  saved = json.loads(stem.with_suffix(".json").read_text())
  assert saved["summary"] == result["summary"] and len(saved["tuning"]) == 4


def test_the_cpu_mode_is_the_whole_grid_with_shorter_runs():
  # The mode that runs the grid on a CPU must not drop any of the issues' axes (the 7 strategies, the FedASK
  # gauges, epsilon 1/3/6/inf, IID and both Dirichlets, >= 3 seeds), only shorten the runs; the federation is the
  # paper's; the tuning lattice spans at least 3e-3 to 0.1 in factors of 2 with seeds disjoint from the grid's.
  cpu, full, long = mc.MODES["cpu"], mc.MODES["full"], mc.MODES["long"]
  assert (cpu.methods, cpu.epsilons, cpu.partitions, cpu.seeds) == (
    full.methods,
    full.epsilons,
    full.partitions,
    full.seeds,
  )
  assert len(cpu.seeds) >= 3 and set(cpu.methods) == set(mc.METHODS)
  assert {mc.split_method(m)[0] for m in cpu.methods} == set(mc.STRATEGIES)
  assert {f"fedask:{g}" for g in mc.sketch.GAUGES} <= set(cpu.methods)
  assert (cpu.num_clients, cpu.clients_per_round) == (full.num_clients, full.clients_per_round) == (10, 2)
  assert cpu.rounds * cpu.local_steps * cpu.batch_size < full.rounds * full.local_steps * full.batch_size
  rates = [mc.lattice_lr(k) for k in cpu.tuning_steps]
  assert min(rates) <= 3.2e-3 and max(rates) >= 0.1 and np.allclose(np.diff(np.log2(rates)), 1)
  assert len(cpu.tuning_seeds) >= 3 and not set(cpu.tuning_seeds) & set(cpu.seeds)
  # The long mode: >= 100 rounds of the FedASK gauges, FFA-LoRA and FedAvg at eps 1 and 6, IID and Dir(0.1).
  assert long.rounds >= 100 and long.lr_source == "cpu" and long.training()["train_examples"] == cpu.train_examples
  assert {f"fedask:{g}" for g in mc.sketch.GAUGES} | {"ffa-lora", "fedavg"} <= set(long.methods)
  assert (long.epsilons, long.partitions, len(long.seeds)) == ((1.0, 6.0), ("iid", "dir0.1"), 3)


def test_method_names_carry_the_gauge_of_the_sketch_strategies():
  assert mc.split_method("fedask-alt:orthonormal") == ("fedask-alt", "orthonormal")
  assert mc.split_method("scaffold") == ("scaffold", None)
  for bad in ("fedask", "fedavg:norm", "fedask:paper", "fedadam"):
    with pytest.raises(ValueError, match="expected a strategy"):
      mc.split_method(bad)
  assert "sketch.gauge=orthonormal" in mc.run_overrides(TINY, "fedask:orthonormal", 1.0, "iid", 0, 0.02)


def test_the_long_mode_tunes_with_the_cpu_modes_settings():
  # The long mode's rates are the cpu mode's, tuned on the long mode's methods and epsilons only.
  tuning = mc.tuning_settings_of(mc.MODES["long"])
  assert tuning.training() == mc.MODES["cpu"].training() and tuning.tuning_steps == mc.MODES["cpu"].tuning_steps
  assert (tuning.methods, tuning.epsilons) == (mc.MODES["long"].methods, mc.MODES["long"].epsilons)
  assert mc.stems("long") == ("method_comparison_tuned_long", "method_comparison_tuned_cpu")
  assert mc.tuning_settings_of(TINY) is TINY


def test_quick_contradicting_mode_is_refused(capsys):
  for mode in ("cpu", "full"):
    with pytest.raises(SystemExit) as exit_info:
      mc.main(["--quick", "--mode", mode, "--report"])
    assert exit_info.value.code == 2
    assert "--quick is --mode quick" in capsys.readouterr().err
