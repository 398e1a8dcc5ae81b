"""CI smoke test of the experiments: `experiments/exact_aggregation.py --quick`, run as a user runs it (a
subprocess from the repository root), writes its report, and its numbers show Theorem 2: in DP mode (A frozen
and shared) the sketch aggregate equals the exact mean up to float32 round-off for every oversampling p, while
with both factors trained and p = 0 it does not."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import exact_aggregation as ea  # noqa: E402  (experiments/exact_aggregation.py)


def test_exact_aggregation_quick(tmp_path):
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
  done = subprocess.run(
    [sys.executable, "experiments/exact_aggregation.py", "--quick", "--out", str(tmp_path)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  stem = tmp_path / "exact_aggregation_quick"
  for suffix in (".md", ".json", ".png"):
    assert (stem.with_suffix(suffix)).stat().st_size > 0, suffix
  report = json.loads(stem.with_suffix(".json").read_text())
  dp, both = (case["summary"]["per_p"] for case in report["cases"])
  assert [p["oversample"] for p in dp] == [0, 1, 2, 4, 8, report["config"]["covering_oversample"]]
  # (a) Theorem 2: every p, every layer, round and Omega draw at float32 round-off (ea.ROUNDOFF_TOLERANCE = 1e-4,
  # ~840 eps32; measured ~1e-5 at p = 0, ~2e-6 at p >= 1), and the aggregate has rank <= r.
  assert max(p["max"] for p in dp) < ea.ROUNDOFF_TOLERANCE, dp
  assert report["cases"][0]["summary"]["rank_max"] <= report["cases"][0]["rank"]
  # (b) Both factors trained, p = 0: the sketch misses part of T's range; measured >= 0.07 on every layer and
  # round, so 1e-2 (100x the round-off tolerance) separates the cases with a wide margin.
  assert both[0]["min"] > 1e-2, both[0]
  assert report["cases"][1]["summary"]["rank_min"] > report["cases"][1]["rank"] + 8
  assert "Theorem 2 holds" in stem.with_suffix(".md").read_text()
