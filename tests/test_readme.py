"""The README's examples must keep working: its ```pycon blocks are doctests, run here as `sphinx-build -b doctest`
runs them (docs/conf.py), without a Sphinx build's cost."""

import doctest
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# sphinx.ext.doctest's default `doctest_default_flags`, so that an example passes here exactly when it passes in
# `sphinx-build -b doctest`.
FLAGS = doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL | doctest.DONT_ACCEPT_TRUE_FOR_1


def test_readme_examples_pass_as_doctests():
  text = README.read_text(encoding="utf-8")
  blocks = list(re.finditer(r"^```pycon\n(.*?)^```", text, re.S | re.M))
  assert blocks, "README.md has no ```pycon block"
  parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=FLAGS)
  globs: dict = {}
  for i, block in enumerate(blocks):
    # lineno: the block's first line in README.md (0-based), so that a failure names the README's line.
    test = parser.get_doctest(block.group(1), globs, f"README.md, pycon block {i + 1}", str(README),
                              text.count("\n", 0, block.start(1)))
    # A block without a `>>>` prompt would pass without testing anything.
    assert test.examples, f"{test.name} holds no doctest example"
    # One namespace for all blocks, as in one Sphinx document: a later block may use an earlier one's names.
    runner.run(test, clear_globs=False)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} README examples failed; doctest's report is above"
