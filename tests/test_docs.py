"""The documentation builds with warnings as errors: a malformed docstring, a cross-reference to a `fedask_jax.`
name that does not exist or a broken link in docs/*.md fails `sphinx-build -W -b html`. (The doctest builder would
run the README's examples, which tests/test_readme.py runs in a fraction of the time; there are no others.)"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sphinx_html_build_has_no_warnings(tmp_path):
  # --keep-going: report every warning, then fail (-W), rather than stop at the first. -E: read every source.
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "--keep-going",
      "-E",
      "-q",
      "-b",
      "html",
      str(ROOT / "docs"),
      str(tmp_path / "html"),
      "-d",
      str(tmp_path / "doctrees"),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, f"sphinx-build -b html failed:\n{result.stderr}\n{result.stdout[-3000:]}"
  # A build that documented nothing would pass too: the API pages must hold the package's objects.
  page = (tmp_path / "html/api/privacy.html").read_text(encoding="utf-8")
  assert 'id="fedask_jax.privacy.accounting.DPSchedule"' in page


def test_no_doctest_outside_the_readme():
  # The suite runs the README's examples only (tests/test_readme.py); an example added to a docstring or a docs
  # page would be shown as tested but never run. Add one, and this test must run `sphinx-build -b doctest` too.
  sources = sorted((ROOT / "fedask_jax").rglob("*.py")) + sorted((ROOT / "docs").rglob("*.md"))
  holding = [str(path.relative_to(ROOT)) for path in sources if ">>> " in path.read_text(encoding="utf-8")]
  assert not holding, f"doctests that the suite does not run: {holding}"
