"""experiments/subspace_dynamics.py: its principal angles against scipy.linalg.subspace_angles, and its per-layer
summary on constructed subspaces with known angles."""

import pathlib
import sys

import numpy as np
import pytest
import scipy.linalg

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import _common  # noqa: E402  (experiments/_common.py)
import subspace_dynamics as sd  # noqa: E402  (experiments/subspace_dynamics.py)

from fedask_jax.config import load_config  # noqa: E402


def random_basis(rng, n, k):
  return rng.normal(size=(n, k))


@pytest.mark.parametrize("n, kx, ky", [(20, 3, 3), (20, 5, 3), (16, 2, 6), (128, 8, 8)])
def test_principal_angles_match_scipy(n, kx, ky):
  rng = np.random.default_rng(n + kx + ky)
  x, y = random_basis(rng, n, kx), random_basis(rng, n, ky)
  # scipy returns them descending; both are backward-stable float64 computations (1e-12 of angles ~1).
  np.testing.assert_allclose(sd.principal_angles(x, y), np.sort(scipy.linalg.subspace_angles(x, y)), atol=1e-12)


@pytest.mark.parametrize("size", [1e-3, 1e-6, 1e-9])
def test_small_angles_keep_their_relative_accuracy(size):
  rng = np.random.default_rng(1)
  x = random_basis(rng, 30, 4)
  y = x + size * random_basis(rng, 30, 4)
  ours, reference = sd.principal_angles(x, y), np.sort(scipy.linalg.subspace_angles(x, y))
  # Both use sines for small angles, so agree to a few float64 ulps of 1 relative to the angle itself;
  # arccos of the cosines would be off by ~1e-8 absolute, i.e. 10x the angle at size 1e-9.
  np.testing.assert_allclose(ours, reference, rtol=1e-5)
  assert ours.max() < 100 * size


def test_same_subspace_in_another_basis_has_zero_angles_and_a_known_rotation_is_found():
  rng = np.random.default_rng(2)
  x = random_basis(rng, 24, 4)
  mixed = x @ random_basis(rng, 4, 4)  # same column space, other basis and scale
  assert sd.principal_angles(x, mixed).max() < 1e-12
  # Rotate the first orthonormal basis vector by theta towards a direction orthogonal to the subspace.
  q, _ = np.linalg.qr(np.concatenate([x, random_basis(rng, 24, 1)], axis=1))
  theta = 0.3
  rotated = q[:, :4].copy()
  rotated[:, 0] = np.cos(theta) * q[:, 0] + np.sin(theta) * q[:, 4]
  np.testing.assert_allclose(sd.principal_angles(q[:, :4], rotated), [0, 0, 0, theta], atol=1e-12)
  summary = sd.angle_summary({"layer": q[:, :4]}, {"layer": rotated})["layer"]
  assert summary["largest"] == pytest.approx(theta, abs=1e-12)
  assert summary["mean"] == pytest.approx(theta / 4, abs=1e-12)
  # ||a_t - a_0|| = ||(cos - 1) q0 + sin q4|| = sqrt(2 - 2 cos theta) over ||a_0|| = 2 (four unit columns).
  assert summary["change"] == pytest.approx(np.sqrt(2 - 2 * np.cos(theta)) / 2, rel=1e-12)
  # A rotation keeps the norm; a rescaled basis of the same subspace changes it by the factor.
  assert summary["scale"] == pytest.approx(1.0, rel=1e-12)
  assert sd.angle_summary({"layer": q[:, :4]}, {"layer": 0.25 * q[:, :4]})["layer"]["scale"] == pytest.approx(0.25)


def test_summary_of_rounds():
  rounds = [
    {
      "round": t,
      "layers": {
        "x": {"largest": 0.1 * t, "mean": 0.05 * t, "change": 0.2, "scale": 0.5},
        "y": {"largest": 0.3 * t, "mean": 0.1 * t, "change": 0.4, "scale": 1.5},
      },
      "a_unchanged": False,
      "clipped_fraction": 0.25 * t,
      "reconstruction_error": 1e-6 * t,
      "train_loss": 5.0 - t,
    }
    for t in (1, 2)
  ]
  summary = sd.summarize({"rounds": rounds})
  last = summary["per_round"][-1]
  assert last["largest_mean"] == pytest.approx(0.4) and last["largest_max"] == pytest.approx(0.6)
  assert last["mean_angle"] == pytest.approx(0.15) and last["change"] == pytest.approx(0.3)
  assert last["scale"] == pytest.approx(1.0) and last["clipped_fraction"] == pytest.approx(0.5)
  assert last["reconstruction_error"] == pytest.approx(2e-6) and last["train_loss"] == pytest.approx(3.0)
  assert summary["max_largest"] == pytest.approx(0.6) and not summary["a_never_changed"]


def test_each_run_config_has_its_gauge_rate_and_a_certificate_every_round():
  # The overrides go through the config's own validation (a gauge on a strategy that ignores it is an error).
  settings = sd.SETTINGS[True]
  names = [m.name for m in sd.METHODS]
  assert len(set(names)) == len(names) and set(sd.ANGLE_METHODS) <= set(names)
  for method in sd.METHODS:
    config = load_config(_common.QUICKSTART, sd.overrides(method, settings))
    assert config.strategy == method.strategy and config.privacy.enabled == method.private
    assert config.lr == (method.lr or load_config(_common.QUICKSTART).lr)
    if method.gauge is None:
      assert method.strategy == "ffa-lora"
    else:
      assert config.sketch.gauge == method.gauge and config.sketch.certify_every == 1
  # Every gauge under DP at both rates, with FFA-LoRA at both rates as the reference.
  private = {(m.strategy, m.gauge, m.lr) for m in sd.METHODS if m.private}
  for lr in (None, sd.TUNED_LR):
    assert {("fedask", g, lr) for g in sd.GAUGES} | {("ffa-lora", None, lr)} <= private


def synthetic_report():
  """A report as `measure` writes it, with made-up per-round numbers: A's scale 0.1 * (index of the run + 1)."""
  results = []
  for i, method in enumerate(sd.METHODS):
    layers = {"q": {"largest": 1e-6, "mean": 1e-6, "change": 0.5, "scale": 0.1 * (i + 1)}}
    rounds = [
      dict(
        round=t,
        trained="lora_b",
        train_loss=4.0 + i / 100,
        clipped_fraction=0.5 if method.private else None,
        reconstruction_error=1e-6 * (i + 1) if method.gauge else None,
        a_unchanged=method.strategy == "ffa-lora",
        layers=layers,
      )
      for t in (1, 2, 3)
    ]
    result = dict(
      **{k: v for k, v in vars(method).items() if k not in ("name", "lr")},
      method=method.name,
      lr=method.lr or 1e-2,
      rounds=rounds,
      noise_multiplier=0.7 if method.private else None,
      rank=8,
    )
    results.append(dict(result, summary=sd.summarize(result)))
  config = dict(
    command="test",
    total_seconds=1.0,
    device=dict(device_kind="cpu", backend="cpu", machine="x86_64"),
    settings=vars(sd.SETTINGS[True]),
  )
  return dict(stem="sd", config=config, results=results)


def test_gauge_report_from_the_results_alone(tmp_path):
  report = synthetic_report()
  groups = sd.gauge_results(report)
  assert list(groups) == [1e-2, sd.TUNED_LR]
  for lr, runs in groups.items():
    assert [r["gauge"] for r in runs] == [*sd.GAUGES, None] and {r["lr"] for r in runs} == {lr}
  text = sd.markdown(report)
  # The per-round table of lr 1e-2: balanced is run 0 (scale 0.1), orthonormal and norm runs 4 and 5.
  table = text.split("Per round at lr 0.01:")[1]
  assert "| 1 | 0.50 | 0.50 | 0.50 | 0.50 | 0.100 | 0.500 | 0.600 | 1.0e-06 | 5.0e-06 | 6.0e-06 |" in table
  # The largest certificate: run 8 (norm at the tuned rate); the angles are all 1e-6 rad.
  assert "The certificate is at most 9e-06 in every round of every gauge: float32 round-off" in text
  assert "largest angle at most 1e-06 rad" in text
  sd.plot(report, tmp_path / "sd.png")
  assert (tmp_path / "sd.png").stat().st_size > 0 and (tmp_path / "sd_gauges.png").stat().st_size > 0


def test_a_report_without_gauge_runs_has_no_gauge_section(tmp_path):
  # A results file written before the gauge runs existed: the four angle runs, without gauge or lr fields.
  report = synthetic_report()
  report["results"] = [
    {k: v for k, v in r.items() if k not in ("gauge", "lr")}
    for r in report["results"]
    if r["method"] in sd.ANGLE_METHODS
  ]
  text = sd.markdown(report)
  assert "## Findings" in text and "Gauges" not in text and "certificate" not in text.split("## Findings")[1]
  sd.plot(report, tmp_path / "sd.png")
  assert (tmp_path / "sd.png").exists() and not (tmp_path / "sd_gauges.png").exists()
