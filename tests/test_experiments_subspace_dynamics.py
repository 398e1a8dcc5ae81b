"""experiments/subspace_dynamics.py: its principal angles against scipy.linalg.subspace_angles, and its per-layer
summary on constructed subspaces with known angles."""

import pathlib
import sys

import numpy as np
import pytest
import scipy.linalg

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import subspace_dynamics as sd  # noqa: E402  (experiments/subspace_dynamics.py)


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
    }
    for t in (1, 2)
  ]
  summary = sd.summarize({"rounds": rounds})
  last = summary["per_round"][-1]
  assert last["largest_mean"] == pytest.approx(0.4) and last["largest_max"] == pytest.approx(0.6)
  assert last["mean_angle"] == pytest.approx(0.15) and last["change"] == pytest.approx(0.3)
  assert last["scale"] == pytest.approx(1.0) and last["clipped_fraction"] == pytest.approx(0.5)
  assert summary["max_largest"] == pytest.approx(0.6) and not summary["a_never_changed"]
