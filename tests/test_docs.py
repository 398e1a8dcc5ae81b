"""The documentation builds: Sphinx with warnings as errors (a malformed docstring, a cross-reference to a
`fedask_jax.` name that does not exist, a broken link in docs/*.md), and the doctest builder, which runs the
README's ```pycon examples and every doctest in the docstrings."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("builder", ["html", "doctest"])
def test_sphinx_build_has_no_warnings(builder, tmp_path):
  # --keep-going: report every warning, then fail (-W), rather than stop at the first.
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder, str(ROOT / "docs"),
       str(tmp_path / builder), "-d", str(tmp_path / "doctrees")],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"sphinx-build -b {builder} failed:\n{result.stderr}\n{result.stdout[-3000:]}"
  if builder == "doctest":
    summary = (tmp_path / builder / "output.txt").read_text()
    # A build that ran no example would pass without testing anything: the README's must have run.
    ran = re.search(r"^\s*(\d+) tests$", summary, re.M)
    assert "Document: readme" in summary and ran and int(ran.group(1)) > 0, summary

