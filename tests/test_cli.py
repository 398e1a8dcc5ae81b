"""End-to-end tests of the `fedask-jax` command on a tiny model: outputs of `train`, and one-line errors."""

import contextlib
import io
import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import yaml
from run_fixtures import make_tiny_setup

from fedask_jax import cli, privacy
from fedask_jax.checkpoint import import_peft
from fedask_jax.config import from_dict
from fedask_jax.evaluation import evaluate
from fedask_jax.models import load_pretrained, load_tokenizer
from fedask_jax.runner import MetricsLog, load_eval_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(root, config dict) of the tiny setup, shared by the tests of this module."""
  root = tmp_path_factory.mktemp("cli")
  return root, make_tiny_setup(root)


@pytest.fixture(scope="module")
def run(setup):
  """A 4-round non-private FedAvg run through the CLI, evaluated every 2 rounds: (config dict, run dir, stdout)."""
  root, raw = setup
  raw = dict(raw, eval=dict(raw["eval"], every=2))
  path = root / "config.yaml"
  path.write_text(yaml.safe_dump(raw))
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert cli.main(["train", "--config", str(path), "--quiet"]) == 0
  return raw, root / "run", stdout.getvalue()


def test_metrics_jsonl(run):
  _, run_dir, _ = run
  records = MetricsLog(run_dir / "metrics.jsonl").read()
  assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
  assert [("eval_loss" in r) for r in records] == [True, False, True, False, True]
  for r in records[1:]:
    assert np.isfinite(r["train_loss"]) and r["epsilon"] is None
    assert len(set(r["clients"])) == 2 and all(0 <= c < 4 for c in r["clients"])
    assert r["train_loss"] == pytest.approx(np.mean(r["client_loss"]), rel=1e-6)
    assert r["timing"]["compiled"] == (r["round"] == 1)
  # The synthetic task is learnable: four rounds of FedAvg at lr 1e-2 lower the held-out loss (fixed seed;
  # the first run of this test measured 2.586 -> 2.526).
  assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.02


def test_summary_plots_and_config(run):
  raw, run_dir, stdout = run
  records = MetricsLog(run_dir / "metrics.jsonl").read()
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["eval_loss_before"] == records[0]["eval_loss"]
  assert summary["eval_loss_after"] == records[-1]["eval_loss"]
  assert summary["seconds_per_round"] == pytest.approx(np.mean([r["timing"]["seconds"] for r in records[2:]]))
  assert summary["private"] is False and summary["rounds"] == 4
  assert f"{summary['eval_loss_before']:.4f}" in stdout and f"{summary['eval_loss_after']:.4f}" in stdout
  image = matplotlib.image.imread(run_dir / "loss.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
  assert not (run_dir / "epsilon.png").exists()  # non-private: nothing to plot
  assert from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())) == from_dict(raw)


def test_peft_export_is_the_final_adapter(run):
  """The exported adapter, imported into a fresh base model, gives the final round's held-out loss."""
  raw, run_dir, _ = run
  config = from_dict(raw)
  model = load_pretrained(config.model.path)
  lora = import_peft(model, run_dir / "adapter")
  assert (lora.rank, lora.alpha, tuple(sorted(lora.target_modules))) == (2, 4, ("q_proj", "v_proj"))
  result = evaluate(model, load_eval_data(config, load_tokenizer(config.model.path)), batch_size=20)
  # Same weights and inputs; only the batch composition differs from the runner's evaluation.
  assert result.eval_loss == pytest.approx(MetricsLog(run_dir / "metrics.jsonl").read()[-1]["eval_loss"], rel=1e-5)


def test_bad_config_exits_2_with_one_line(tmp_path):
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump({"rounds": 3}))
  script = os.path.join(os.path.dirname(sys.executable), "fedask-jax")
  result = subprocess.run(
    [script, "train", "--config", str(path), "lora.rnak=4"], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.startswith("error: unknown key 'lora.rnak'") and "Did you mean 'rank'?" in result.stderr
  assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
  "overrides, match",
  [
    (["data.path=/nonexistent/train.jsonl"], "error: JSONL source '/nonexistent/train.jsonl' is not a file"),
    (["privacy.enabled=true", "batch_size=61"], "error: batch_size=61 exceeds the smallest client's 60 examples"),
    (
      ["num_clients=5", "data.partition=natural", "data.category_column=category"],
      "error: data.partition='natural' over 'category' gives 8 clients but num_clients=5",
    ),
    (["lora.target_modules=[nope]"], "error: lora.target_modules=('nope',) matches no linear layer"),
    (
      ["privacy.enabled=true", "privacy.mechanism=w_space", "strategy=fedavg"],
      "error: dp.mechanism='w_space' needs a frozen factor",
    ),
  ],
)
def test_input_errors_found_while_preparing_exit_2(setup, tmp_path, capsys, overrides, match):
  root, raw = setup
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(dict(raw, run_dir=str(tmp_path / "run"))))
  assert cli.main(["train", "--config", str(path), "--quiet", *overrides]) == 2
  err = capsys.readouterr().err
  assert err.startswith(match) and err.count("\n") == 1
  assert not (tmp_path / "run").exists()  # nothing written before the input was accepted


def test_eval_of_a_directory_without_a_run(tmp_path, capsys):
  assert cli.main(["eval", "--run_dir", str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_peft_export_loads_in_peft_and_gives_our_logits(run):
  """The run's adapter/ loads with PEFT onto the Hugging Face model and reproduces our model's logits."""
  import peft
  import torch
  import transformers

  raw, run_dir, _ = run
  config = from_dict(raw)
  batch = load_eval_data(config, load_tokenizer(config.model.path))
  ids, mask = np.asarray(batch.input_ids[:4]), np.asarray(batch.attention_mask[:4])
  ours = load_pretrained(config.model.path)
  import_peft(ours, run_dir / "adapter")
  expected = np.asarray(ours(ids, mask))
  base = transformers.LlamaForCausalLM.from_pretrained(config.model.path).eval()
  with torch.no_grad():
    base_logits = base(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    got = adapted(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  # float32 on both sides, same weights: agreement to round-off (models' parity tests see ~1e-6).
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4)
  # The trained adapter changes the logits, so the agreement above is not that of two unadapted models.
  assert np.abs(got[real] - base_logits[real]).max() > 1e-3


# Prepended to a child process's code: PyTorch looks not installed, as without the dev extra. transformers asks
# `importlib.util.find_spec("torch")`, and an import of torch fails. (Not sys.modules["torch"] = None, which
# scipy's array-API helpers take for a loaded torch module.)
_WITHOUT_TORCH = """
import importlib.util, sys
class _NoTorch:
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] == "torch":
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *args: None if name == "torch" else _find_spec(name, *args)
sys.meta_path.insert(0, _NoTorch())
"""
_NO_TORCH_ADVICE = "PyTorch was not found"


def _python_without_torch(code: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", _WITHOUT_TORCH + code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )


def test_no_pytorch_advice_without_torch():
  # Control: transformers alone gives the advice, so its absence below is the package's filter at work.
  assert _NO_TORCH_ADVICE in _python_without_torch("import transformers").stderr
  # The CLI path imports transformers (through the runner) before it reads the config: one line, the error.
  cli_run = _python_without_torch("from fedask_jax.cli import main\nsys.exit(main(['train', '--config', 'nope.yaml']))")
  assert cli_run.returncode == 2
  assert cli_run.stderr.startswith("error: ") and cli_run.stderr.count("\n") == 1, cli_run.stderr
  # Other transformers warnings still show: a tokenizer input longer than its model_max_length (512), logged by
  # a transformers module, and a message on the "transformers" logger that the filter sits on.
  library = _python_without_torch(
    "import logging\nimport fedask_jax.runner\nfrom transformers import AutoTokenizer\n"
    "AutoTokenizer.from_pretrained('experiments/base_model')('a ' * 600)\n"
    "logging.getLogger('transformers').warning('another message on the transformers logger')\n"
  )
  assert library.returncode == 0, library.stderr
  assert _NO_TORCH_ADVICE not in library.stderr
  assert "Token indices sequence length is longer than the specified maximum" in library.stderr
  assert "[transformers] another message on the transformers logger" in library.stderr


# ---------------------------------------------------------------------------------------------------------------
# `fedask-jax privacy`, the calculator. A small schedule keeps each calibration well under a second.

CALCULATOR = [
  "privacy",
  "--delta",
  "1e-5",
  "--sample-rate",
  "0.02",
  "--local-steps",
  "5",
  "--rounds",
  "40",
  "--clients-per-round",
  "2",
  "--num-clients",
  "10",
]


def test_privacy_calculator_json_finds_sigma(capsys):
  assert cli.main([*CALCULATOR, "--target-epsilon", "2", "--json"]) == 0
  out = capsys.readouterr().out
  result = json.loads(out)
  assert out.count("\n") == 1
  assert {"noise_multiplier", "epsilon", "delta", "participation", "accountant"} <= set(result)
  # The defaults: sampled (2 < 10 clients per round) and PLD.
  assert (result["participation"], result["accountant"], result["delta"]) == ("sampled", "pld", 1e-5)
  schedule = privacy.DPSchedule(0.02, 5, 40, 0.2, "sampled")
  assert result["noise_multiplier"] == privacy.calibrate_noise(schedule, 2.0, 1e-5, "pld")
  assert result["epsilon"] == privacy.epsilon_spent(schedule, result["noise_multiplier"], 1e-5, "pld") <= 2.0


def test_privacy_calculator_json_finds_epsilon(capsys):
  assert (
    cli.main(
      [*CALCULATOR, "--noise-multiplier", "1.2", "--participation", "worst_case", "--accountant", "rdp", "--json"]
    )
    == 0
  )
  result = json.loads(capsys.readouterr().out)
  assert result["noise_multiplier"] == 1.2 and result["participation"] == "worst_case" and result["guarantee"]
  assert result["epsilon"] == privacy.epsilon_spent(
    privacy.DPSchedule(0.02, 5, 40, 1.0, "worst_case"), 1.2, 1e-5, "rdp"
  )


def test_privacy_calculator_human_output_through_the_console_script():
  """The three participation models side by side, the asked one marked, `expected` labelled as no guarantee.
  q = 0.5 and sigma = 3 make dp_accounting's RDP log "failed to converge" warnings, which stay out of stderr."""
  script = os.path.join(os.path.dirname(sys.executable), "fedask-jax")
  args = [
    "privacy",
    "--delta",
    "1e-5",
    "--sample-rate",
    "0.5",
    "--local-steps",
    "5",
    "--rounds",
    "40",
    "--clients-per-round",
    "2",
    "--num-clients",
    "10",
    "--accountant",
    "rdp",
    "--noise-multiplier",
    "3",
  ]
  result = subprocess.run([script, *args], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and result.stderr == ""
  rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:5]}
  assert set(rows) == {"sampled", "worst_case", "expected"} and "sampled *" in result.stdout
  assert "NOT a guarantee" in rows["expected"] and "NOT" not in rows["sampled"] + rows["worst_case"]
  for participation, line in rows.items():
    epsilon = privacy.epsilon_spent(privacy.DPSchedule(0.5, 5, 40, 0.2, participation), 3.0, 1e-5, "rdp")
    assert f" 3.0000 {epsilon:>9.4f}  " in line


def test_privacy_calculator_human_output_finds_each_models_sigma(capsys):
  """--target-epsilon without --json: one row per participation model, each with its own calibrated sigma and
  the epsilon that sigma spends; the asked model (worst_case here) first and marked."""
  assert cli.main([*CALCULATOR, "--target-epsilon", "2", "--participation", "worst_case"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("schedule: q 0.02 per local step, 5 local steps, 40 rounds, 2 of 10 clients")
  assert [line.split()[0] for line in lines[2:5]] == ["worst_case", "sampled", "expected"]
  assert "worst_case *" in lines[2]
  assert lines[5] == "* the asked model; each row's sigma is the smallest meeting the target epsilon"
  sigmas = {}
  for line in lines[2:5]:
    participation = line.split()[0]
    schedule = privacy.DPSchedule(0.02, 5, 40, 0.2, participation)
    sigma = privacy.calibrate_noise(schedule, 2.0, 1e-5, "pld")
    sigmas[participation] = sigma
    assert f"{sigma:>16.4f} {privacy.epsilon_spent(schedule, sigma, 1e-5, 'pld'):>9.4f}  " in line
  # The rigorous models in their order: sampled needs less noise than the worst case.
  assert sigmas["sampled"] < sigmas["worst_case"]


def test_privacy_calculator_exit_code_2_through_the_console_script():
  # An argument error, refused before JAX is imported: the process's exit code and its one stderr line.
  script = os.path.join(os.path.dirname(sys.executable), "fedask-jax")
  result = subprocess.run([script, *CALCULATOR, "--target-epsilon", "one"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr == (
    "error: argument --target-epsilon: invalid float value: 'one' (see fedask-jax privacy --help)\n"
  )


@pytest.mark.parametrize(
  "args, match",
  [
    (
      ["--target-epsilon", "1", "--noise-multiplier", "1"],
      "error: argument --noise-multiplier: not allowed with argument --target-epsilon",
    ),
    ([], "error: one of the arguments --target-epsilon --noise-multiplier is required"),
    (["--target-epsilon", "1", "--sample-rate", "1.5"], "error: sample_rate=1.5: the per-step Poisson rate q"),
    (["--target-epsilon", "1", "--sample-rate", "0"], "error: sample_rate=0.0"),
    (["--target-epsilon", "1", "--clients-per-round", "11"], "error: clients_per_round=11 exceeds num_clients=10"),
    (["--target-epsilon", "1", "--participation", "mean"], "error: participation='mean': unknown participation"),
    (["--target-epsilon", "1", "--accountant", "gdp"], "error: accountant='gdp': unknown accountant"),
    (["--target-epsilon", "0"], "error: target_epsilon=0.0"),
    (["--noise-multiplier", "-1"], "error: noise_multiplier=-1.0"),
    (["--target-epsilon", "1", "--delta", "0"], "error: delta=0.0"),
    (["--target-epsilon", "one"], "error: argument --target-epsilon: invalid float value: 'one'"),
  ],
)
def test_privacy_calculator_bad_arguments_exit_2(capsys, args, match):
  assert cli.main([*CALCULATOR, *args]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith(match) and captured.err.count("\n") == 1
