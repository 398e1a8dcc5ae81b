"""The README's examples must keep working: its ```pycon blocks are doctests, run here as `sphinx-build -b doctest`
runs them (docs/conf.py), without a Sphinx build's cost. Its paper-setting noise table must stay the
accountant's."""

import contextlib
import doctest
import io
import json
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
    test = parser.get_doctest(
      block.group(1), globs, f"README.md, pycon block {i + 1}", str(README), text.count("\n", 0, block.start(1))
    )
    # A block without a `>>>` prompt would pass without testing anything.
    assert test.examples, f"{test.name} holds no doctest example"
    # One namespace for all blocks, as in one Sphinx document: a later block may use an earlier one's names.
    runner.run(test, clear_globs=False)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} README examples failed; doctest's report is above"


def _noise_table():
  """The README's paper-setting table: the calculator's arguments (from the command above it) and
  {(participation, accountant): {epsilon: sigma}}."""
  text = README.read_text()
  section = text[text.index("### How much noise: the paper's setting") :]
  command = re.search(r"```bash\n.*?(fedask-jax privacy .*?)\ndone", section, re.S).group(1)
  args = command.replace("\\\n", " ").split()[1:]
  header, _, *rows = re.search(r"^\| noise multiplier sigma .*?\n(?=\n)", section, re.S | re.M).group(0).splitlines()
  epsilons = [float(e) for e in re.findall(r"epsilon = (\d+)", header)]
  table = {}
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    participation, accountant = re.fullmatch(r"`(\w+)`, (\w+)", cells[0]).groups()
    table[participation, accountant.lower()] = dict(zip(epsilons, map(float, cells[1:4])))
  return args, table


def test_readme_noise_table_is_the_calculators():
  """Every cell of the paper-setting table is the smallest sigma meeting its epsilon to within the calibration's
  0.1% (with the printed 4 decimals), and one cell is what the README's own calculator command prints."""
  from fedask_jax import cli, privacy

  args, table = _noise_table()
  assert set(table) == {(p, a) for p in privacy.PARTICIPATION for a in privacy.ACCOUNTANTS}
  assert all(set(row) == {1.0, 3.0, 6.0} for row in table.values())
  # The calculator on the README's command for the cheapest cell (RDP, 0.3 s of CPU): the same 4 decimals.
  cell = [a.replace("$acc", "rdp").replace("$eps", "1") for a in args]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main([*cell, "--participation", "worst_case", "--json"]) == 0
  result = json.loads(out.getvalue())
  assert round(result["noise_multiplier"], 4) == table["worst_case", "rdp"][1.0]
  # Every cell: sigma_c (calibrated) meets the target and sigma_c (1 - 1e-3) does not; the table shows sigma_c
  # rounded to 4 decimals, so sigma + 5e-5 >= sigma_c meets it and (sigma - 5e-5)(1 - 1e-3) misses it. Two
  # epsilons per cell instead of a calibration each: 36 accountant calls, ~3 s of CPU.
  options = dict(zip(cell[1::2], cell[2::2]))
  delta = float(options["--delta"])
  for (participation, accountant), row in table.items():
    schedule = privacy.DPSchedule.from_federation(
      sample_rate=float(options["--sample-rate"]),
      local_steps=int(options["--local-steps"]),
      rounds=int(options["--rounds"]),
      clients_per_round=int(options["--clients-per-round"]),
      num_clients=int(options["--num-clients"]),
      participation=participation,
    )
    for epsilon, sigma in row.items():
      assert privacy.epsilon_spent(schedule, sigma + 5e-5, delta, accountant) <= epsilon, (participation, accountant)
      assert privacy.epsilon_spent(schedule, (sigma - 5e-5) * (1 - 1e-3), delta, accountant) > epsilon, (
        participation,
        accountant,
      )
