"""Static checks: ruff's linter and formatter on the repository (pyproject.toml), mypy on the package (setup.cfg).

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
    [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy_cache")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, f"mypy found errors (setup.cfg [mypy]):\n{result.stdout}\n{result.stderr}"


def _ruff(*args):
  # Through the test interpreter, so the ruff pinned in the dev extra is the one that runs.
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args, "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_ruff_lint_passes():
  result = _ruff("check")
  assert result.returncode == 0, (
    f"ruff check found problems (pyproject.toml [tool.ruff.lint]); "
    f"`ruff check --fix .` fixes the ones marked [*]:\n{result.stdout}\n{result.stderr}"
  )


def test_ruff_format_is_applied():
  result = _ruff("format", "--check")
  assert result.returncode == 0, (
    f"files not in the repository's format; run `ruff format .`:\n{result.stdout}\n{result.stderr}"
  )
