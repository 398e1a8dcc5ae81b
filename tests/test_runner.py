"""Tests for fedask_jax.runner: bit-identical resumption, the run-directory guard, the metrics log, the privacy
plan, and the eval command on an interrupted run."""

import json

import jax
import numpy as np
import pytest
import scipy.stats
import yaml
from run_fixtures import make_tiny_setup
from safetensors.numpy import load_file

from fedask_jax import cli, privacy, runner
from fedask_jax.config import ConfigError, from_dict

# DP FedASK with adapter dropout: every random stream of a round (client sampling, Poisson batches, DP noise,
# dropout, the sketch's Omega) has to be reproduced on resume.
DP_OVERRIDES = {"strategy": "fedask", "privacy": {"enabled": True, "target_epsilon": 8.0, "overflow_prob": 1e-12},
                "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}}


def dp_config(root, run_name):
  raw = make_tiny_setup(root)
  raw.update(DP_OVERRIDES, run_dir=str(root / run_name))
  return raw


def write_config(root, raw, name):
  path = root / name
  path.write_text(yaml.safe_dump(raw))
  return path


def metrics_without_timing(run_dir):
  return [{k: v for k, v in r.items() if k != "timing"} for r in runner.MetricsLog(run_dir / "metrics.jsonl").read()]


def adapter_tensors(run_dir):
  return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """A 4-round DP FedASK run done in one go: (root, config path, run dir)."""
  root = tmp_path_factory.mktemp("runner")
  raw = dp_config(root, "straight")
  path = write_config(root, raw, "straight.yaml")
  assert cli.main(["train", "--config", str(path), "--quiet"]) == 0
  return root, raw, root / "straight"


def test_resume_is_bit_identical(straight):
  root, raw, straight_dir = straight
  raw = dict(raw, run_dir=str(root / "resumed"))
  path = write_config(root, raw, "resumed.yaml")
  assert cli.main(["train", "--config", str(path), "--quiet", "--stop_after", "2"]) == 0
  resumed_dir = root / "resumed"
  assert [r["round"] for r in metrics_without_timing(resumed_dir)] == [0, 1, 2]
  assert cli.main(["train", "--config", str(path), "--quiet"]) == 0
  # Identical metrics (losses, epsilon, clients, norms, eval) and identical final adapter bytes.
  assert metrics_without_timing(resumed_dir) == metrics_without_timing(straight_dir)
  a, b = adapter_tensors(straight_dir), adapter_tensors(resumed_dir)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # Training moved the adapters: the comparison above is not between two untouched initialisations.
  assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k)


def test_resume_restores_the_strategy_state(tmp_path):
  """SCAFFOLD keeps per-client control variates in the server state: resuming must restore them, or round 2's
  corrections (and so its adapters) differ."""
  raw = dict(make_tiny_setup(tmp_path), strategy="scaffold", rounds=2, checkpoint={"every": 1, "keep": 2})
  straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
  straight_path = write_config(tmp_path, dict(raw, run_dir=str(straight_dir)), "straight.yaml")
  resumed_path = write_config(tmp_path, dict(raw, run_dir=str(resumed_dir)), "resumed.yaml")
  assert cli.main(["train", "--config", str(straight_path), "--quiet"]) == 0
  assert cli.main(["train", "--config", str(resumed_path), "--quiet", "--stop_after", "1"]) == 0
  assert cli.main(["train", "--config", str(resumed_path), "--quiet"]) == 0
  assert metrics_without_timing(resumed_dir) == metrics_without_timing(straight_dir)
  a, b = adapter_tensors(straight_dir), adapter_tensors(resumed_dir)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_after_a_crash_between_checkpoints(straight):
  """A crash after round 3's metrics line but before its checkpoint: resume from round 2, rewrite line 3."""
  root, raw, straight_dir = straight
  raw = dict(raw, run_dir=str(root / "crashed"))
  path = write_config(root, raw, "crashed.yaml")
  assert cli.main(["train", "--config", str(path), "--quiet", "--stop_after", "2"]) == 0
  crashed_dir = root / "crashed"
  lines = (straight_dir / "metrics.jsonl").read_text().splitlines()
  # Round 3's line from the straight run, then half a line of round 4 (a write cut short).
  with open(crashed_dir / "metrics.jsonl", "a") as f:
    f.write(lines[3] + "\n" + lines[4][:20])
  assert cli.main(["train", "--config", str(path), "--quiet"]) == 0
  assert metrics_without_timing(crashed_dir) == metrics_without_timing(straight_dir)


def test_resume_with_another_config_is_refused(straight, capsys):
  root, raw, straight_dir = straight
  before = (straight_dir / "metrics.jsonl").read_text()
  changed = dict(raw, lr=raw["lr"] * 2, privacy=dict(raw["privacy"], delta=1e-6))
  path = write_config(root, changed, "changed.yaml")
  assert cli.main(["train", "--config", str(path), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: run_dir")
  assert "lr: 0.01 -> 0.02" in err and "privacy.delta: 1e-05 -> 1e-06" in err
  assert (straight_dir / "metrics.jsonl").read_text() == before


def test_eval_command_on_a_run(straight, capsys):
  _, _, straight_dir = straight
  assert cli.main(["eval", "--run_dir", str(straight_dir)]) == 0
  result = json.loads(capsys.readouterr().out)
  last = runner.MetricsLog(straight_dir / "metrics.jsonl").read()[-1]
  assert result["round"] == 4
  # Same adapters (restored from the checkpoint), same held-out set, same compiled function.
  assert result["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
  assert result["perplexity"] == pytest.approx(np.exp(result["eval_loss"]), rel=1e-9)


def test_epsilon_trajectory_is_the_sampled_schedule(straight):
  """The defaults: 2 of 4 clients per round, so participation "sampled" with q_c = 1/2, and the PLD accountant.
  Each round t's epsilon is that of t rounds of 3 Poisson-subsampled Gaussian steps at q = batch_size / smallest
  client (4 / 60), at the delta left after the overflow allowance (the accounting itself is tested against
  references in tests/test_privacy_accounting.py)."""
  _, raw, straight_dir = straight
  summary = json.loads((straight_dir / "summary.json").read_text())
  records = runner.MetricsLog(straight_dir / "metrics.jsonl").read()
  q, sigma = 4 / 60, summary["noise_multiplier"]
  assert summary["sample_rate"] == q
  assert (summary["participation"], summary["participation_rate"], summary["accountant"]) == ("sampled", 0.5, "pld")
  # (1 + e^epsilon) x 4 rounds x 3 steps x q_c x overflow_prob
  overflow = (1 + np.exp(8.0)) * 12 * 0.5 * 1e-12
  assert summary["accountant_delta"] == pytest.approx(1e-5 - overflow, rel=1e-12)
  for record in records[1:]:
    schedule = privacy.DPSchedule(q, 3, record["round"], 0.5, "sampled")
    assert record["epsilon"] == privacy.epsilon_spent(schedule, sigma, summary["accountant_delta"], "pld")
  # Calibrated: the whole run spends the target, to the calibration's 0.1% tolerance in sigma.
  assert 8.0 * 0.98 <= records[-1]["epsilon"] <= 8.0


def test_capacity_bounds_the_overflow():
  """The capacity is the smallest c with P(Binomial(n + 1, q) > c) <= overflow_prob for every client size n."""
  config = from_dict({"batch_size": 8, "rounds": 10, "local_steps": 5, "privacy": {"overflow_prob": 1e-9}})
  sizes = np.array([100, 140, 400])
  plan, capacity = runner.plan_privacy(config, sizes)
  tails = [scipy.stats.binom.sf(capacity, n + 1, 8 / n) for n in sizes]
  assert max(tails) <= 1e-9
  assert max(scipy.stats.binom.sf(capacity - 1, n + 1, 8 / n) for n in sizes) > 1e-9
  # The defaults' 2 of 10 clients per round.
  assert plan.schedule == privacy.DPSchedule(8 / 100, 5, 10, 0.2, "sampled")
  with pytest.raises(ConfigError, match="batch_size=8 exceeds the smallest client's 7 examples"):
    runner.plan_privacy(config, np.array([7, 100]))
  with pytest.raises(ConfigError, match="overflow_prob=0.001 costs delta"):
    runner.plan_privacy(from_dict({"privacy": {"overflow_prob": 1e-3}}), sizes)


def test_metrics_log_truncate_and_partial_line(tmp_path):
  log = runner.MetricsLog(tmp_path / "metrics.jsonl")
  for t in range(4):
    log.append({"round": t, "train_loss": float(t)})
  with open(log.path, "a") as f:
    f.write('{"round": 4, "tra')
  assert [r["round"] for r in log.read()] == [0, 1, 2, 3]
  assert [r["round"] for r in log.truncate(2)] == [0, 1, 2]
  assert log.path.read_text() == "".join(json.dumps({"round": t, "train_loss": float(t)}) + "\n" for t in range(3))
  with open(log.path, "a") as f:
    f.write("garbage\n{}\n")
  with pytest.raises(ValueError, match="metrics.jsonl:4 is not a JSON object"):
    log.read()


def test_summary_counts_left_out_clients_and_skipped_rounds(straight):
  """summary.json totals the rounds' fault metrics; a clean run reports zeros, and the summary line appears
  only when there was a fault."""
  _, raw, straight_dir = straight
  summary = json.loads((straight_dir / "summary.json").read_text())
  assert summary["invalid_clients"] == 0 and summary["skipped_rounds"] == 0
  assert "faults:" not in runner.format_summary(summary, straight_dir)
  experiment = runner.prepare(from_dict(raw), for_training=False)
  records = runner.MetricsLog(straight_dir / "metrics.jsonl").read()
  faults = {1: (1, 0), 3: (2, 1)}  # round: (invalid_clients, skipped)
  for record in records:
    if record["round"] in faults:
      record["invalid_clients"], record["skipped"] = faults[record["round"]]
  counted = runner.summarize(experiment, records)
  assert (counted["invalid_clients"], counted["skipped_rounds"]) == (3, 1)
  assert "faults: 3 client updates left out for non-finite values, 1 rounds skipped" in runner.format_summary(
      counted, straight_dir)


@pytest.mark.parametrize("clients_per_round,configured,expected", [
    (2, None, 2), (8, None, 4), (6, None, 3), (7, None, 1), (8, 8, 8), (8, 2, 2)])
def test_client_chunk_defaults_to_small_chunks_on_cpu(clients_per_round, configured, expected):
  """Unset: on a CPU the largest divisor of K up to 4, elsewhere all clients at once; a configured value is kept."""
  config = from_dict({"num_clients": 8, "clients_per_round": clients_per_round, "client_chunk": configured})
  on_cpu = jax.default_backend() == "cpu"
  assert runner.client_chunk(config) == (expected if on_cpu or configured is not None else None)
