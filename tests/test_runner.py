"""Tests for fedask_jax.runner: bit-identical resumption, the run-directory guard, the metrics log, the privacy
plan, and the eval command on an interrupted run."""

import json
import re

import chex
import jax
import numpy as np
import pytest
import scipy.stats
import yaml
from run_fixtures import make_tiny_setup
from safetensors.numpy import load_file

from fedask_jax import cli, evaluation, privacy, runner
from fedask_jax import data as fdata
from fedask_jax.config import ConfigError, from_dict
from fedask_jax.simulation import FederatedRound, causal_lm_example_loss

# DP FedASK with adapter dropout: every random stream of a round (client sampling, Poisson batches, DP noise,
# dropout, the sketch's Omega) has to be reproduced on resume.
DP_OVERRIDES = {
  "strategy": "fedask",
  "privacy": {"enabled": True, "target_epsilon": 8.0, "overflow_prob": 1e-12},
  "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1},
}


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
  sizes = np.array([100, 140] + [400] * 8)  # the defaults' num_clients = 10
  plan, capacity = runner.plan_privacy(config, sizes)
  tails = [scipy.stats.binom.sf(capacity, n + 1, 8 / n) for n in sizes]
  assert max(tails) <= 1e-9
  assert max(scipy.stats.binom.sf(capacity - 1, n + 1, 8 / n) for n in sizes) > 1e-9
  # The defaults' 2 of 10 clients per round.
  assert plan.schedule == privacy.DPSchedule(8 / 100, 5, 10, 0.2, "sampled")
  # The runner's plan is the config-free primitive's over the config's values.
  p = config.privacy
  direct = privacy.plan_privacy(
    target_epsilon=p.target_epsilon,
    delta=p.delta,
    rounds=10,
    local_steps=5,
    batch_size=8,
    client_sizes=sizes,
    clients_per_round=config.clients_per_round,
    overflow_prob=1e-9,
    accountant=p.accountant,
  )
  assert (plan.noise_multiplier, plan.capacity, plan.overflow_delta) == (
    direct.noise_multiplier,
    direct.capacity,
    direct.overflow_delta,
  )
  with pytest.raises(ConfigError, match="batch_size=8 exceeds the smallest client's 7 examples"):
    runner.plan_privacy(config, np.array([7, 100]))
  with pytest.raises(ConfigError, match="overflow_prob=0.001 costs delta"):
    runner.plan_privacy(from_dict({"privacy": {"overflow_prob": 1e-3}}), sizes)


@pytest.mark.parametrize(
  "sizes, batch_size, fix", [([9, 9, 9], 8, "no batch size does"), ([20, 20], 16, "lower batch_size to at most 5")]
)
def test_rates_near_one_that_overflow_the_slots_are_refused(sizes, batch_size, fix):
  """A batch has at most as many slots as the largest client has examples (n), so its add-one neighbour's batch
  overflows them when all n + 1 examples are drawn: P(Binomial(n + 1, q) > n), 0.31 and 9.2e-3 per step for the
  issue's two examples, far above overflow_prob = 1e-12. Refused, with the largest batch size that fits."""
  n = max(sizes)
  config = from_dict({"batch_size": batch_size, "num_clients": len(sizes), "clients_per_round": 1})
  real = scipy.stats.binom.sf(n, n + 1, batch_size / n)
  with pytest.raises(ConfigError, match=rf"q\^{n + 1} = {real:.3g} per step, above overflow_prob=1e-12.*{fix}"):
    runner.plan_privacy(config, np.array(sizes))
  if "at most 5" in fix:
    for b, fits in ((5, True), (6, False)):
      assert (scipy.stats.binom.sf(n, n + 1, b / n) <= 1e-12) == fits
    _, capacity = runner.plan_privacy(
      from_dict({"batch_size": 5, "num_clients": 2, "clients_per_round": 1}), np.array(sizes)
    )
    assert capacity <= n and scipy.stats.binom.sf(capacity, n + 1, 5 / n) <= 1e-12


def _dp_sizes_config(client_sizes, **privacy_keys):
  return from_dict(
    {
      "batch_size": 10,
      "num_clients": 3,
      "clients_per_round": 3,
      "local_steps": 20,
      "rounds": 4,
      "privacy": {"client_sizes": client_sizes, **privacy_keys},
    }
  )


def test_private_client_sizes_make_nothing_depend_on_a_client_size():
  """privacy.client_sizes: 'private': adding an example to a client (D -> D') changes neither sigma, the rate
  accounted, the weights, nor which of the client's other examples each step samples (same keys: the same
  uniforms against the same rate). 'public' (q_k = batch_size / n_k, weights n_k) changes all of them: the
  guarantee it gives is for neighbours of equal sizes."""
  sizes_d, sizes_d1 = np.array([50, 60, 80]), np.array([51, 60, 80])
  rows, length = 80, 2
  ids = np.broadcast_to(np.arange(rows, dtype=np.int32)[None, :, None], (3, rows, length)).copy()

  def client_data(sizes):
    valid = np.arange(rows)[None, :, None] < sizes[:, None, None]
    return fdata.ClientData(
      ids, np.broadcast_to(valid, ids.shape), np.broadcast_to(valid, ids.shape), sizes.astype(np.int32)
    )

  def draws(config, sizes, capacity):
    sample = runner.round_sampler(config, capacity)
    out = []
    for t in range(1, 4):
      client_ids, weights, batches = sample(jax.random.fold_in(jax.random.key(0), t), client_data(sizes))
      first = int(np.flatnonzero(np.asarray(client_ids) == 0)[0])
      steps = zip(np.asarray(batches.input_ids[first, :, :, 0]), np.asarray(batches.example_mask[first]))
      chosen = [frozenset(int(i) for i in step[mask] if i < 50) for step, mask in steps]
      out.append((chosen, dict(zip(np.asarray(client_ids).tolist(), np.asarray(weights).tolist()))))
    return out

  private = _dp_sizes_config("private", sample_rate=0.2)
  plan_d, capacity = runner.plan_privacy(private, sizes_d)
  plan_d1, _ = runner.plan_privacy(private, sizes_d1)
  assert (plan_d.noise_multiplier, plan_d.schedule) == (plan_d1.noise_multiplier, plan_d1.schedule)
  assert plan_d.schedule.sample_rate == plan_d.sample_rate == 0.2
  # The runner's plan is the config-free primitive's with the public rate.
  direct = privacy.plan_privacy(
    target_epsilon=private.privacy.target_epsilon,
    delta=private.privacy.delta,
    rounds=4,
    local_steps=20,
    batch_size=10,
    client_sizes=sizes_d,
    clients_per_round=3,
    sample_rate=0.2,
  )
  assert (direct.noise_multiplier, direct.capacity) == (plan_d.noise_multiplier, capacity)
  assert draws(private, sizes_d, capacity) == draws(private, sizes_d1, capacity)
  assert all(w == 1.0 for _, weights in draws(private, sizes_d, capacity) for w in weights.values())

  public = _dp_sizes_config("public")
  plan_d, capacity = runner.plan_privacy(public, sizes_d)
  plan_d1, _ = runner.plan_privacy(public, sizes_d1)
  assert plan_d.schedule.sample_rate == 10 / 50 and plan_d1.schedule.sample_rate == 10 / 51
  assert plan_d.sample_rate is None
  assert plan_d.noise_multiplier != plan_d1.noise_multiplier
  d, d1 = draws(public, sizes_d, capacity), draws(public, sizes_d1, capacity)
  assert [chosen for chosen, _ in d] != [chosen for chosen, _ in d1]
  assert [weights for _, weights in d] != [weights for _, weights in d1]


@pytest.mark.parametrize(
  "privacy_keys, match",
  [
    ({"client_sizes": "private"}, "privacy.sample_rate=None: privacy.client_sizes='private' needs a public"),
    ({"client_sizes": "private", "sample_rate": 1.5}, "privacy.sample_rate=1.5"),
    ({"sample_rate": 0.1}, "privacy.sample_rate=0.1 is the public rate of privacy.client_sizes='private'"),
  ],
)
def test_client_size_keys_are_checked(privacy_keys, match):
  with pytest.raises(ConfigError, match=re.escape(match)):
    from_dict({"privacy": privacy_keys})


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


def test_metrics_log_writes_strict_json(tmp_path):
  # RFC 8259 has no NaN or Infinity: they are written null, at any depth; finite values are kept as they are.
  log = runner.MetricsLog(tmp_path / "metrics.jsonl")
  log.append({"round": 1, "reconstruction_error": float("nan"), "client_loss": [1.5, float("inf")], "t": {"s": 2.0}})
  strict = lambda name: pytest.fail(f"{name} in metrics.jsonl")
  line = json.loads(log.path.read_text(), parse_constant=strict)
  assert line == {"round": 1, "reconstruction_error": None, "client_loss": [1.5, None], "t": {"s": 2.0}}


def test_rounds_without_the_certificate_write_null(straight):
  """The straight run (FedASK, sketch.certify_every 10 by default) certifies its first aggregation only: round 1
  has a reconstruction_error at float32 round-off, rounds 2 to 4 null, and every line is strict JSON."""
  _, _, straight_dir = straight
  strict = lambda name: pytest.fail(f"{name} in metrics.jsonl")
  lines = (straight_dir / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line, parse_constant=strict) for line in lines][1:]
  assert [r["round"] for r in records] == [1, 2, 3, 4]
  assert 0 <= records[0]["reconstruction_error"] < 1e-4  # float32 round-off of the exact aggregate, ~1e-6
  assert [r["reconstruction_error"] for r in records[1:]] == [None] * 3
  summary = json.loads((straight_dir / "summary.json").read_text())
  # Every tiny-task response is 4 letters and </s>: 5 targets, rounded up to 8 of the 15 predicting positions.
  assert summary["head_capacity"] == {"eval": 8, "train": 8}


def test_response_head_round_equals_the_full_head(tmp_path):
  """The runner computes the LM head at the response positions only (`runner.plan`, module docstring): its first
  DP round and its held-out loss equal those of the head at every position."""
  raw = dp_config(tmp_path, "run")
  experiment = runner.prepare(from_dict(raw))
  config, response_round = experiment.config, experiment.round_fn
  assert experiment.head_capacity["train"] < config.data.max_seq_len - 1  # the head is really cut
  full_round = FederatedRound(
    experiment.model,
    runner.make_strategy(config),
    optimizer=runner.make_optimizer(config),
    dp=response_round.dp,
    per_example_loss=causal_lm_example_loss,
    client_chunk=response_round.client_chunk,
  )
  round_key = jax.random.fold_in(runner.run_key(config), 1)
  ids, weights, batches = runner.round_sampler(config, experiment.capacity)(round_key, experiment.client_data)
  (got, got_metrics), (want, want_metrics) = [
    rnd(rnd.init(config.num_clients), batches, ids, weights, round_key, 1) for rnd in (response_round, full_round)
  ]
  # The same float32 cross-entropies summed in another order, through the same clipping and noise: ~1e-6.
  for name in ("train_loss", "client_loss", "clipped_fraction"):
    np.testing.assert_allclose(got_metrics[name], want_metrics[name], rtol=1e-5, err_msg=name)
  chex.assert_trees_all_close(got.adapters, want.adapters, rtol=1e-4, atol=1e-6)
  capacity = experiment.head_capacity["eval"]
  cut = evaluation.evaluate(experiment.model, experiment.eval_data, batch_size=20, capacity=capacity)
  full = evaluation.evaluate(experiment.model, experiment.eval_data, batch_size=20)
  assert cut.tokens == full.tokens and cut.eval_loss == pytest.approx(full.eval_loss, rel=1e-6)
  with pytest.raises(ValueError, match=r"capacity=4 but an example of the held-out set has 5 targets"):
    evaluation.evaluate(experiment.model, experiment.eval_data, capacity=4)


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
    counted, straight_dir
  )


def test_summary_counts_truncated_sequences(tmp_path):
  """Every tiny-task sequence is 11 tokens (<s>, four letters, "->", four letters, </s>): at max_seq_len 8 all
  240 training and 40 held-out sequences are cut, and summary.json says so (the straight run, at 16, cuts none)."""
  raw = make_tiny_setup(tmp_path)
  raw["data"]["max_seq_len"] = 8
  experiment = runner.prepare(from_dict(raw))
  summary = runner.summarize(experiment, [])
  assert (summary["train_examples"], summary["train_truncated"], summary["eval_truncated"]) == (240, 240, 40)
  assert summary["train_without_targets"] == 0


class _Poisoned:
  """A prepared run's round that reports one non-finite example for its first client in rounds 2 and 3."""

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __call__(self, *args):
    state, metrics = self.inner(*args)
    if args[-1] in (2, 3):
      metrics = dict(metrics, nonfinite_examples=metrics["nonfinite_examples"].at[0].set(1))
    return state, metrics


def test_nonfinite_warning_and_withheld_diagnostics(tmp_path, capsys):
  """Non-finite examples: one warning, naming the first round and the client, and the counts in the metrics
  and summary. privacy.release_diagnostics false withholds those and every other statistic of the raw
  training data (losses, clipped fraction) from metrics.jsonl, summary.json and the progress bar, and
  changes nothing else."""
  raw = make_tiny_setup(tmp_path)
  runs = {}
  for release in (True, False):
    config = from_dict(
      dict(raw, run_dir=str(tmp_path / f"release_{release}"), privacy=dict(raw["privacy"], release_diagnostics=release))
    )
    experiment = runner.prepare(config)
    experiment.round_fn = _Poisoned(experiment.round_fn)
    summary = runner.train(experiment, progress=True)
    runs[release] = (summary, metrics_without_timing(tmp_path / f"release_{release}"), capsys.readouterr().err)

  summary, records, err = runs[True]
  first_client = records[2]["clients"][0]
  assert err.count("warning:") == 1
  assert f"warning: round 2: training examples with a non-finite loss or gradient (client {first_client}: 1)" in err
  assert [sum(r["nonfinite_examples"]) for r in records[1:]] == [0, 1, 1, 0]
  assert summary["nonfinite_examples"] == 2 and "loss=" in err and "train: 240 examples" in err
  assert "2 training examples with a non-finite loss" in runner.format_summary(summary, tmp_path)

  withheld_summary, withheld, err = runs[False]
  assert "warning:" not in err and "loss=" not in err and "train: 240 examples" not in err
  assert withheld == [{k: v for k, v in r.items() if k not in runner.DIAGNOSTICS} for r in records]
  for key in ("train_truncated", "train_examples", "nonfinite_examples", "capacity", "head_capacity"):
    assert key in summary and key not in withheld_summary
  assert withheld_summary["final_train_loss"] is None
  # The rest is the same run's: eval losses, faults, ... (timings aside).
  same = lambda s: {
    k: v for k, v in s.items() if k in withheld_summary and "seconds" not in k and k != "final_train_loss"
  }
  assert same(withheld_summary) == same(summary)


@pytest.mark.parametrize(
  "clients_per_round,configured,expected",
  [(2, None, 2), (8, None, 4), (6, None, 4), (7, None, 4), (8, 8, 8), (8, 3, 3)],
)
def test_client_chunk_defaults_to_small_chunks_on_cpu(clients_per_round, configured, expected):
  """Unset: on a CPU chunks of min(K, 4), elsewhere all clients at once; a configured value is kept (it need not
  divide K: `FederatedRound` runs the rest as a last, smaller chunk)."""
  config = from_dict({"num_clients": 8, "clients_per_round": clients_per_round, "client_chunk": configured})
  on_cpu = jax.default_backend() == "cpu"
  assert runner.client_chunk(config) == (expected if on_cpu or configured is not None else None)
