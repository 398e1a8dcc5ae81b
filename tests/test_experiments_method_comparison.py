"""experiments/method_comparison.py on a tiny grid (2 methods x 2 epsilons x IID x 2 seeds, 2 rounds): compiled
rounds are reused across epsilons and seeds, the runs file resumes, a run reproduces `fedask-jax train`, and the
report's mean and std are numpy's."""

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
# epsilons are private so that one compiled DP round per method serves both sigmas and both seeds (the
# non-private rounds compile the same way; the quick mode's invocation line checks them). L = 96 tokens: 34 of
# the 48 problems keep answer tokens (at 48, only 3 would).
TINY = mc.Settings(
    methods=("fedask", "ffa-lora"), epsilons=(1.0, 3.0), partitions=("iid",), seeds=(0, 1), rounds=2,
    num_clients=1, clients_per_round=1, local_steps=1, batch_size=4, max_seq_len=96, max_train_examples=48,
    eval_examples=8, eval_batch_size=8, min_client_size=4, accuracy_problems=2, accuracy_tokens=4)


@pytest.fixture(scope="module")
def tiny_grid(tmp_path_factory):
  path = tmp_path_factory.mktemp("method_comparison") / "runs.jsonl"
  grid, made = mc.run_grid(TINY, path, progress=False)
  return grid, made, path


def runs_of(path):
  return [r for r in runner.MetricsLog(path).read() if r["kind"] == "run"]


def test_the_grid_compiles_each_round_once_and_resumes(tiny_grid):
  grid, made, path = tiny_grid
  assert made == 8
  # One compilation per (method, DP) round variant, sampler and evaluation, for 8 runs over 2 sigmas and 2 seeds.
  expected = {"round fedask dp lora_b": 1, "round ffa-lora dp lora_b": 1, "sampler poisson": 1, "evaluate": 1}
  assert grid.compile_counts() == expected
  assert grid.expected_compiles() == expected
  invocation = [r for r in runner.MetricsLog(path).read() if r["kind"] == "invocation"]
  assert len(invocation) == 1 and invocation[0]["compile_counts"] == expected
  # Different epsilons give different sigmas through the same compiled round.
  sigmas = {r["target_epsilon"]: r["noise_multiplier"] for r in runs_of(path)}
  assert sigmas[1.0] > sigmas[3.0] > 0
  # Exact match over 2 problems: 0, 1/2 or 1.
  assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in runs_of(path))
  # The runs trained on answer tokens (a round whose Poisson batch holds no target token reports loss 0).
  assert all(any(loss > 0 for loss in r["train_loss"]) for r in runs_of(path))

  # Everything done: a second invocation runs nothing.
  assert mc.run_grid(TINY, path, grid=grid, progress=False)[1] == 0
  # Two runs lost (a killed invocation): exactly those rerun, bit-identical, with no new compilation.
  lines = runner.MetricsLog(path).read()
  lost = [r for r in lines if r["kind"] == "run" and r["seed"] == 1 and r["target_epsilon"] == 3.0]
  assert len(lost) == 2
  path.write_text("".join(json.dumps(r) + "\n" for r in lines if r not in lost))
  assert mc.run_grid(TINY, path, grid=grid, progress=False)[1] == 2
  redone = {r["method"]: r for r in runs_of(path) if r["seed"] == 1 and r["target_epsilon"] == 3.0}
  for old in lost:
    assert redone[old["method"]]["eval_loss"] == old["eval_loss"]
    assert redone[old["method"]]["train_loss"] == old["train_loss"]
  assert len(runs_of(path)) == 8
  assert grid.compile_counts() == expected


def test_runs_made_under_other_settings_are_refused(tiny_grid):
  _, _, path = tiny_grid
  with pytest.raises(ValueError, match="other settings"):
    mc.done_runs(runner.MetricsLog(path).read(), dataclasses.replace(TINY, rounds=3), path)


def test_run_reproduces_the_runner(tiny_grid, tmp_path):
  _, _, path = tiny_grid
  record = next(r for r in runs_of(path) if r["method"] == "ffa-lora" and r["target_epsilon"] == 1.0
                and r["seed"] == 1)
  config = dataclasses.replace(mc.run_config(TINY, "ffa-lora", 1.0, "iid", 1), run_dir=str(tmp_path / "run"))
  summary = runner.train(runner.prepare(config), progress=False)
  assert summary["noise_multiplier"] == record["noise_multiplier"]
  assert summary["epsilon"] == record["epsilon_spent"]
  assert summary["capacity"] == record["capacity"]
  # Same keys, batches, noise and initial adapters; the runner's sigma is a constant of its compiled round and
  # ours a traced argument, so XLA may fuse the noise scaling differently: float32 rounding over 2 steps only
  # (bit-identical on CPU with jax 0.10.2).
  np.testing.assert_allclose(record["eval_loss"], summary["eval_loss_after"], rtol=1e-5)
  np.testing.assert_allclose(record["final_train_loss"], summary["final_train_loss"], rtol=1e-5)


def test_summary_mean_and_std_are_numpys(tiny_grid):
  _, _, path = tiny_grid
  runs = runs_of(path)
  rows = mc.summarize(runs)
  assert len(rows) == 4
  for row in rows:
    losses = [r["eval_loss"] for r in runs if (r["method"], r["partition"], r["target_epsilon"]) ==
              (row["method"], row["partition"], row["target_epsilon"])]
    assert row["n"] == len(losses) == 2
    assert row["eval_loss_mean"] == pytest.approx(np.mean(losses), rel=1e-12)
    assert row["eval_loss_std"] == pytest.approx(np.std(losses, ddof=1), rel=1e-12)
    assert row["eval_loss_std"] > 0


def test_summary_on_synthetic_records():
  rng = np.random.default_rng(0)
  runs = [{"method": m, "partition": p, "target_epsilon": e, "seed": s, "eval_loss": float(rng.normal(4, 0.1)),
           "accuracy": None, "epsilon_spent": None if e is None else e * 0.999,
           "noise_multiplier": None if e is None else 1.0 / e}
          for m in ("fedask", "fedavg") for p in ("iid", "dir0.1") for e in (1.0, None) for s in range(3)]
  rows = {(r["method"], r["partition"], r["target_epsilon"]): r for r in mc.summarize(runs)}
  for (m, p, e), row in rows.items():
    losses = np.array([r["eval_loss"] for r in runs if (r["method"], r["partition"], r["target_epsilon"]) == (m, p, e)])
    assert row["eval_loss_mean"] == pytest.approx(losses.mean(), rel=1e-12)
    assert row["eval_loss_std"] == pytest.approx(losses.std(ddof=1), rel=1e-12)
    assert row["epsilon_spent_max"] == (None if e is None else pytest.approx(0.999 * e))
  gap = mc.paired_gap(runs, "fedask", "fedavg", "iid", 1.0)
  pick = lambda m: np.array([r["eval_loss"] for r in sorted(runs, key=lambda r: r["seed"])
                             if (r["method"], r["partition"], r["target_epsilon"]) == (m, "iid", 1.0)])
  d = pick("fedask") - pick("fedavg")
  assert gap[0] == pytest.approx(d.mean(), rel=1e-12)
  assert gap[1] == pytest.approx(d.std(ddof=1) / math.sqrt(3), rel=1e-12)
  assert gap[2] == 3


def test_report_files(tiny_grid):
  _, _, path = tiny_grid
  out = path.parent
  (out / "tiny_runs.jsonl").write_text(path.read_text())
  result = mc.write_report(TINY, out, "tiny", "test")
  assert (out / "tiny.png").stat().st_size > 0
  text = (out / "tiny.md").read_text()
  assert "fedask" in text and "ffa-lora" in text and "as expected" in text
  assert json.loads((out / "tiny.json").read_text())["summary"] == result["summary"]


def test_the_cpu_mode_is_the_whole_grid_with_shorter_runs():
  # The mode that runs the grid on a CPU must not drop any of the axes (7 methods, epsilon 1/3/6/inf, IID
  # and both Dirichlets, >= 3 seeds), only shorten the runs; the federation is the paper's.
  cpu, full = mc.MODES["cpu"], mc.MODES["full"]
  assert (cpu.methods, cpu.epsilons, cpu.partitions, cpu.seeds) == (full.methods, full.epsilons, full.partitions,
                                                                    full.seeds)
  assert len(cpu.seeds) >= 3 and set(cpu.methods) == set(mc.METHODS)
  assert (cpu.num_clients, cpu.clients_per_round) == (full.num_clients, full.clients_per_round) == (10, 2)
  assert cpu.rounds * cpu.local_steps * cpu.batch_size < full.rounds * full.local_steps * full.batch_size


def test_quick_contradicting_mode_is_refused(capsys):
  for mode in ("cpu", "full"):
    with pytest.raises(SystemExit) as exit_info:
      mc.main(["--quick", "--mode", mode, "--report"])
    assert exit_info.value.code == 2
    assert "--quick is --mode quick" in capsys.readouterr().err
