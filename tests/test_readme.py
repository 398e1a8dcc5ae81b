"""The README's example must keep working: run its Python block and check what it prints."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_aggregates_exactly():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README.md has no ```python block"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(blocks[0], str(README), "exec"), {})
  printed = out.getvalue()
  error = float(re.search(r"relative aggregation error: (\S+)", printed).group(1))
  sigma = float(re.search(r"noise multiplier for \(3, 1e-5\)-DP: (\S+)", printed).group(1))
  # DP mode (lora_a shared): exact up to float32 round-off, ~1e-7 relative; 1e-4 leaves a wide margin.
  assert error < 1e-4
  # The right order for (3, 1e-5), q = 0.05, 100 rounds of 10 steps, 2 of 10 clients per round: PLD with sampled
  # participation gives 1.33, and the bound 2 rules out the worst case's 2.35 (all 1000 steps).
  assert 1.0 < sigma < 2.0
