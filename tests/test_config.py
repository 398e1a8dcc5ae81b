"""Tests for fedask_jax.config: YAML + dotted overrides, unknown keys, types, ranges, cross-field rules."""

import dataclasses
import inspect
import pathlib

import pytest
import yaml

from fedask_jax.config import (
  Config,
  ConfigError,
  apply_overrides,
  config_diff,
  from_dict,
  load_config,
  parse_override,
  to_dict,
)
from fedask_jax.strategies import STRATEGIES


def write_yaml(tmp_path, data, name="config.yaml"):
  path = tmp_path / name
  path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
  return path


def test_yaml_then_overrides_in_order(tmp_path):
  path = write_yaml(tmp_path, {"rounds": 7, "privacy": {"target_epsilon": 6, "accountant": "rdp"}, "lora": {"rank": 4}})
  config = load_config(
    path,
    [
      "rounds=9",
      "privacy.target_epsilon=1",
      "lora.target_modules=[q_proj, k_proj]",
      "strategy=fedprox",
      "strategy_args={mu: 0.1}",
      "rounds=11",
      "eval.max_examples=null",
    ],
  )
  assert config.rounds == 11  # the last override wins
  assert config.privacy.target_epsilon == 1.0 and isinstance(config.privacy.target_epsilon, float)
  assert config.privacy.accountant == "rdp"  # untouched YAML value kept
  assert config.lora.rank == 4 and config.lora.target_modules == ("q_proj", "k_proj")
  assert config.strategy_args == {"mu": 0.1}
  assert config.eval.max_examples is None
  # Unset keys keep the dataclass defaults.
  assert config.local_steps == Config().local_steps and config.data == Config().data


def test_exponent_without_dot_reads_as_float(tmp_path):
  # PyYAML (YAML 1.1) reads 1e-5 as the string "1e-5"; the config accepts it as the number it means.
  path = write_yaml(tmp_path, "privacy:\n  delta: 1e-5\n")
  assert load_config(path).privacy.delta == 1e-5
  assert load_config(None, ["lr=3e-4"]).lr == 3e-4


def test_round_trip_and_diff():
  config = load_config(
    None,
    [
      "rounds=3",
      "privacy.delta=1e-6",
      "data.template_fields={instruction_field: q, input_field: null, response_field: a}",
    ],
  )
  assert from_dict(to_dict(config)) == config
  assert from_dict(yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config
  other = dataclasses.replace(config, lr=1e-3, privacy=dataclasses.replace(config.privacy, accountant="rdp"))
  assert config_diff(config, other) == ["lr", "privacy.accountant"]
  assert config_diff(config, dataclasses.replace(config, run_dir="x"), ignore=("run_dir",)) == []


@pytest.mark.parametrize(
  "override, match",
  [
    ("privacy.delt=1e-6", r"unknown key 'privacy.delt'.*Did you mean 'delta'\?"),
    ("lora.rnak=4", r"unknown key 'lora.rnak'.*Did you mean 'rank'\?"),
    ("round=4", r"unknown key 'round'.*Did you mean 'rounds'\?"),
    ("optimiser.name=sgd", r"unknown key 'optimiser'.*Did you mean 'optimizer'\?"),
    ("zzz=1", r"unknown key 'zzz' in the config\. Known keys"),
  ],
)
def test_unknown_key_with_suggestion(override, match):
  with pytest.raises(ConfigError, match=match):
    load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
  path = write_yaml(tmp_path, {"sketch": {"oversampel": 3}})
  with pytest.raises(ConfigError, match=r"unknown key 'sketch.oversampel'.*Did you mean 'oversample'\?"):
    load_config(path)


@pytest.mark.parametrize(
  "overrides, match",
  [
    (["rounds=1.5"], r"rounds=1.5: expected an integer"),
    (["rounds=true"], r"rounds=True: expected an integer"),  # a bool is not an int
    (["lr=fast"], r"lr='fast': expected a finite number"),
    (["privacy.target_epsilon=.inf"], r"privacy.target_epsilon=inf: expected a finite number"),
    (["privacy.enabled=1"], r"privacy.enabled=1: expected true or false"),
    (["lora.target_modules=q_proj"], r"lora.target_modules='q_proj': expected a list"),
    (["data.partition=dirichet"], r"data.partition='dirichet': must be one of .*Did you mean 'dirichlet'\?"),
    (["privacy.mechanism=wspace"], r"must be one of \['b_space', 'w_space'\]\. Did you mean 'w_space'\?"),
    (["model=3"], r"model must be a mapping"),
    (["run_dir=5"], r"run_dir=5: expected a string"),
    (["strategy=fedaks"], r"strategy='fedaks': unknown strategy.*Did you mean 'fedask'\?"),
  ],
)
def test_type_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    load_config(None, overrides)


@pytest.mark.parametrize(
  "overrides, match",
  [
    (["num_clients=4", "clients_per_round=5"], r"clients_per_round=5 exceeds num_clients=4"),
    (["rounds=0"], r"rounds=0: must be >= 1"),
    (["lr=0"], r"lr=0.0: the learning rate must be > 0"),
    (["privacy.delta=0"], r"privacy.delta=0.0: must be in \(0, 1\)"),
    (["privacy.delta=1"], r"privacy.delta=1.0: must be in \(0, 1\)"),
    (["privacy.target_epsilon=0"], r"privacy.target_epsilon=0.0: must be > 0"),
    (["privacy.clip_norm=-1"], r"privacy.clip_norm=-1.0: the clipping norm must be > 0"),
    (["privacy.overflow_prob=1"], r"privacy.overflow_prob=1.0: must be in \(0, 1\)"),
    (["sketch.oversample=-1"], r"sketch.oversample=-1: must be >= 0"),
    (["sketch.certify_every=-1"], r"sketch.certify_every=-1: must be >= 0"),
    (["lora.rank=0"], r"lora.rank=0: must be an integer >= 1"),
    (["lora.alpha=0"], r"lora.alpha=0.0: must be a finite number > 0"),
    (["lora.dropout=1"], r"lora.dropout=1.0: must be in \[0, 1\)"),
    (["lora.target_modules=[]"], r"lora.target_modules is empty"),
    (["data.max_seq_len=1"], r"data.max_seq_len=1: must be >= 2"),
    (["data.dirichlet_alpha=0"], r"data.dirichlet_alpha=0.0: the concentration must be > 0"),
    (["client_chunk=-1"], r"client_chunk=-1: must be >= 1 .*need not divide"),
    (["eval.every=-1"], r"eval.every=-1: must be >= 0"),
    (["checkpoint.keep=0"], r"checkpoint.keep=0: must be >= 1"),
    (["optimizer.name=sgd", "optimizer.weight_decay=0.1"], r"weight_decay=0.1 applies to adamw only"),
  ],
)
def test_range_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    load_config(None, overrides)


@pytest.mark.parametrize(
  "overrides, match",
  [
    (["data.source=jsonl", "data.path=train.jsonl"], r"data.eval_path is required for data.source='jsonl'"),
    (["data.source=hf"], r"data.path is required for data.source='hf'"),
    (["data.eval_path=x.jsonl"], r"data.eval_path is for data.source='jsonl'"),
    (["data.partition=natural", "data.category_column=null"], r"needs data.category_column"),
    (["data.template=plain"], r"data.template_fields: template 'plain' got fields"),
    (["strategy=fedprox", "strategy_args={m: 0.1}"], r"strategy_args.m: .*Did you mean 'mu'\?"),
    (["strategy_args={oversample: 4}"], r"set it as sketch.oversample"),
    (["strategy_args={gauge: norm}"], r"set it as sketch.gauge"),
  ],
)
def test_cross_field_rules(overrides, match):
  with pytest.raises(ConfigError, match=match):
    load_config(None, overrides)


@pytest.mark.parametrize(
  "text, match",
  [
    ("rounds", r"override 'rounds' is not key=value"),
    ("=3", r"override '=3' is not key=value"),
    ("lora..rank=4", r"override key 'lora..rank' is not a dotted name"),
    ("rounds=[1,", r"override 'rounds=\[1,': the value is not valid YAML"),
  ],
)
def test_bad_override_syntax(text, match):
  with pytest.raises(ConfigError, match=match):
    parse_override(text)


def test_override_through_a_value_is_refused():
  with pytest.raises(ConfigError, match=r"rounds is a value \(3\), not a section"):
    apply_overrides({"rounds": 3}, ["rounds.x=1"])


@pytest.mark.parametrize(
  "content, match",
  [
    (None, r"does not exist"),
    ("- a\n- b\n", r"must hold a mapping of keys to values, not list"),
    ("rounds: [1,\n", r"is not valid YAML"),
  ],
)
def test_bad_config_file(tmp_path, content, match):
  path = tmp_path / "config.yaml"
  if content is not None:
    path.write_text(content)
  with pytest.raises(ConfigError, match=match):
    load_config(path)


CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "experiments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
  """Every config under experiments/configs parses, with only known keys, and passes `validate`."""
  config = load_config(path)
  assert config_diff(config, from_dict(to_dict(config))) == []


def test_sketch_defaults_are_the_strategies():
  # The schema has no import of the strategies (it is dependency-free), so its defaults are literals: they must
  # stay the ones fedask and fedask-alt take when called without a config.
  defaults = Config().sketch
  for name in ("fedask", "fedask-alt"):
    params = inspect.signature(STRATEGIES[name]).parameters
    assert (params["oversample"].default, params["certify_every"].default) == (
      defaults.oversample,
      defaults.certify_every,
    )
