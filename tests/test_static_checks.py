"""Static checks: mypy on the package, with the configuration in setup.cfg.

The annotations are part of the API (the package ships py.typed), so they are checked like the code: a wrong
hint or an unhandled None fails here. A cold run takes about 40 s of CPU (mypy analyses jax, flax and numpy's
stubs too); the cache goes to a temporary directory so that the run leaves the checkout clean.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_passes_on_the_package(tmp_path):
  # Same interpreter as pytest, so the mypy and the third-party packages it resolves are those under test.
  result = subprocess.run(
      [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")], cwd=REPO, capture_output=True,
      text=True, timeout=900)
  assert result.returncode == 0, f"mypy found errors (setup.cfg [mypy]):\n{result.stdout}\n{result.stderr}"
