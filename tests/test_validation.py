"""Input validation before any compilation (fedask_jax.config.validation module docstring): one test row per rule,
on the config alone (`load_config`), against the model, data and run directory it names (`runner.prepare`,
which builds but never compiles the round), and through the `fedask-jax` command (exit code 2, one line, no
traceback).

Every config key is covered by construction: the type test walks the dataclasses, and a meta-test checks that
each numeric key has a row in the range table, so a key added without a rule fails here.
"""

import collections
import dataclasses
import gzip
import importlib.util
import json
import re
import types
import typing

import pytest
import transformers
import yaml
from run_fixtures import make_tiny_setup

from fedask_jax import cli, runner
from fedask_jax.config import Config, ConfigError, apply_overrides, from_dict, load_config, to_dict

# ---------------------------------------------------------------------------------------------------------------
# The config alone.


def leaf_fields(cls=Config, prefix=""):
  """(dotted key, annotation) of every non-section field of the config dataclasses."""
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    tp = hints[field.name]
    if dataclasses.is_dataclass(tp):
      yield from leaf_fields(tp, f"{prefix}{field.name}.")
    else:
      yield f"{prefix}{field.name}", tp


def wrong_values(tp):
  """Values that are not of annotation `tp`: wrong types, bools posing as numbers, numbers as bools, NaN/inf."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):  # X | None: what is wrong for X is wrong here too
    return [v for arg in args if arg is not type(None) for v in wrong_values(arg)]
  if origin is typing.Literal:
    return ["bogus", 1]
  if origin is tuple:
    return ["q_proj", [1]]
  if origin is dict:
    return [3, "a"] + ([{"k": 5}] if args[1] is not typing.Any else [])
  return {
    int: ["3", True, 1.5],
    float: ["fast", True, float("nan"), float("inf"), -float("inf")],
    bool: [1, "true"],
    str: [5, True],
  }[tp]


def nested(key, value):
  *sections, leaf = key.split(".")
  raw = {leaf: value}
  for section in reversed(sections):
    raw = {section: raw}
  return raw


LEAVES = dict(leaf_fields())


@pytest.mark.parametrize("key", sorted(LEAVES))
def test_every_key_rejects_values_of_the_wrong_type(key):
  for value in wrong_values(LEAVES[key]):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}[=\[.]"):
      from_dict(nested(key, value))


# One row per range or cross-field rule: (key, overrides that break it, overrides at the boundary that pass,
# the message). The passing row proves the rule is not stricter than stated.
# A valid distributed section for two processes, as overrides.
DISTRIBUTED = (
  "distributed.coordinator_address=10.0.0.1:1234",
  "distributed.num_processes=2",
  "distributed.process_id=1",
)
RULES = [
  ("rounds", ["rounds=0"], ["rounds=1"], r"rounds=0: must be >= 1"),
  ("num_clients", ["num_clients=0"], ["num_clients=2"], r"num_clients=0: must be >= 1"),
  ("clients_per_round", ["clients_per_round=0"], ["clients_per_round=1"], r"clients_per_round=0: must be >= 1"),
  (
    "clients_per_round",
    ["num_clients=4", "clients_per_round=5"],
    ["num_clients=4", "clients_per_round=4"],
    r"clients_per_round=5 exceeds num_clients=4: sample at most 4",
  ),
  ("local_steps", ["local_steps=0"], ["local_steps=1"], r"local_steps=0: must be >= 1"),
  ("batch_size", ["batch_size=0"], ["batch_size=1"], r"batch_size=0: must be >= 1"),
  ("lr", ["lr=0"], ["lr=1e-9"], r"lr=0.0: the learning rate must be > 0"),
  ("seed", ["seed=-1"], ["seed=0"], r"seed=-1: must be in \[0, 2\^32\)"),
  ("seed", ["seed=4294967296"], ["seed=4294967295"], r"seed=4294967296: .*a larger seed repeats"),
  ("client_chunk", ["client_chunk=0"], ["clients_per_round=4", "client_chunk=3"], r"client_chunk=0: must be >= 1"),
  ("run_dir", ['run_dir=""'], ["run_dir=x"], r"run_dir is empty"),
  ("model.path", ['model.path=""'], ["model.path=x"], r"model.path is empty"),
  ("data.path", ['data.path=""'], ["data.path=null"], r"data.path is an empty string"),
  ("data.max_seq_len", ["data.max_seq_len=1"], ["data.max_seq_len=2"], r"data.max_seq_len=1: must be >= 2"),
  (
    "data.max_train_examples",
    ["data.max_train_examples=0"],
    ["data.max_train_examples=1"],
    r"data.max_train_examples=0: must be >= 1 or null",
  ),
  (
    "data.dirichlet_alpha",
    ["data.dirichlet_alpha=0"],
    ["data.dirichlet_alpha=1e-3"],
    r"data.dirichlet_alpha=0.0: the concentration must be > 0",
  ),
  (
    "data.min_client_size",
    ["data.min_client_size=0"],
    ["data.min_client_size=1"],
    r"data.min_client_size=0: must be >= 1",
  ),
  ("data.path", ["data.source=hf"], ["data.source=hf", "data.path=x"], r"data.path is required for data.source='hf'"),
  (
    "data.eval_path",
    ["data.source=jsonl", "data.path=t.jsonl"],
    ["data.source=jsonl", "data.path=t.jsonl", "data.eval_path=e.jsonl"],
    r"data.eval_path is required",
  ),
  ("data.eval_path", ["data.eval_path=e.jsonl"], ["data.eval_path=null"], r"data.eval_path is for data.source='jsonl'"),
  (
    "data.train_split",
    ["data.train_split=trian"],
    ["data.train_split=test"],
    r"data.train_split='trian': GSM8K has the splits 'train' and 'test'. Did you mean 'train'\?",
  ),
  (
    "data.name",
    ["data.name=main"],
    ["data.source=hf", "data.path=x", "data.name=main"],
    r"data.name is read by data.source='hf' only \(data.source='gsm8k'\)",
  ),
  ("data.data_dir", ["data.data_dir=/tmp"], ["data.data_dir=null"], r"data.data_dir is read by data.source='tfds'"),
  (
    "data.strip_calculator",
    ["data.source=hf", "data.path=x", "data.strip_calculator=true"],
    ["data.source=hf", "data.path=x", "data.strip_calculator=false"],
    r"data.strip_calculator removes GSM8K's",
  ),
  (
    "data.template_fields",
    ["data.template_fields={instruction_field: q, respons_field: a}"],
    ["data.template_fields={instruction_field: q, response_field: a}"],
    r"template 'alpaca' .*'respons_field' is not one of them. Did you mean 'response_field'\?",
  ),
  (
    "data.template_fields",
    ["data.template_fields={instruction_field: q, response_field: null}"],
    ["data.template_fields={instruction_field: q, input_field: null, response_field: a}"],
    r"data.template_fields.response_field is null: template 'alpaca' needs a value \(only input_field may be "
    r"null\)",
  ),
  (
    "data.template_fields",
    ["data.template=plain", "data.template_fields={separator: null}"],
    ["data.template=plain", "data.template_fields={separator: ''}"],
    r"data.template_fields.separator is null",
  ),
  (
    "data.category_column",
    ["data.partition=natural", "data.category_column=null"],
    ["data.partition=iid", "data.category_column=null"],
    r"data.partition='natural' needs data.category_column",
  ),
  ("lora.rank", ["lora.rank=0"], ["lora.rank=1"], r"lora.rank=0: must be an integer >= 1"),
  ("lora.alpha", ["lora.alpha=0"], ["lora.alpha=1e-3"], r"lora.alpha=0.0: must be a finite number > 0"),
  ("lora.dropout", ["lora.dropout=1"], ["lora.dropout=0.99"], r"lora.dropout=1.0: must be in \[0, 1\)"),
  ("lora.dropout", ["lora.dropout=-0.1"], ["lora.dropout=0"], r"lora.dropout=-0.1: must be in \[0, 1\)"),
  (
    "lora.target_modules",
    ["lora.target_modules=[]"],
    ["lora.target_modules=[q_proj]"],
    r"lora.target_modules is empty",
  ),
  (
    "lora.target_modules",
    ['lora.target_modules=[q_proj, ""]'],
    ["lora.target_modules=[q_proj]"],
    r"lora.target_modules=\['q_proj', ''\] holds an empty name",
  ),
  ("sketch.oversample", ["sketch.oversample=-1"], ["sketch.oversample=0"], r"sketch.oversample=-1: must be >= 0"),
  (
    "sketch.certify_every",
    ["sketch.certify_every=-1"],
    ["sketch.certify_every=0"],
    r"sketch.certify_every=-1: must be >= 0",
  ),
  ("sketch.gauge", ["sketch.gauge=nrm"], ["sketch.gauge=norm"], r"sketch.gauge='nrm': .*Did you mean 'norm'\?"),
  (
    "sketch.gauge",
    ["strategy=fedavg", "sketch.gauge=orthonormal"],
    ["strategy=fedask-alt", "sketch.gauge=orthonormal"],
    r"sketch.gauge='orthonormal' is read by the sketch strategies \(fedask, fedask-alt\) only; strategy='fedavg'",
  ),
  (
    "strategy_args",
    ["strategy=fedprox", "strategy_args={mu: -1}"],
    ["strategy=fedprox", "strategy_args={mu: 0}"],
    r"strategy_args of 'fedprox': fedprox mu=-1.0: the proximal weight must be a finite number >= 0",
  ),
  (
    "strategy_args",
    ["strategy=fedprox", "strategy_args={mu: fast}"],
    ["strategy=fedprox", "strategy_args={mu: 1e-3}"],
    r"strategy_args.mu='fast': expected a finite number",
  ),
  (
    "strategy_args",
    ["strategy=fedprox", "strategy_args={mu: true}"],
    ["strategy=fedprox", "strategy_args={mu: 1}"],
    r"strategy_args.mu=True: expected a finite number",
  ),  # a bool is not a number
  (
    "strategy_args",
    ["strategy=fedprox", "strategy_args={m: 0.1}"],
    ["strategy=fedprox", "strategy_args={}"],
    r"strategy_args.m: strategy 'fedprox' takes no such hyper-parameter. Did you mean 'mu'\?",
  ),
  (
    "privacy.target_epsilon",
    ["privacy.target_epsilon=0"],
    ["privacy.target_epsilon=0.01"],
    r"privacy.target_epsilon=0.0: must be > 0",
  ),
  (
    "privacy.target_epsilon",
    ["privacy.target_epsilon=101"],
    ["privacy.target_epsilon=100"],
    r"privacy.target_epsilon=101.0: must be <= 100",
  ),
  ("privacy.delta", ["privacy.delta=0"], ["privacy.delta=1e-12"], r"privacy.delta=0.0: must be in \(0, 1\)"),
  ("privacy.delta", ["privacy.delta=1"], ["privacy.delta=0.99"], r"privacy.delta=1.0: must be in \(0, 1\)"),
  (
    "privacy.clip_norm",
    ["privacy.clip_norm=0"],
    ["privacy.clip_norm=1e-6"],
    r"privacy.clip_norm=0.0: the clipping norm must be > 0",
  ),
  ("privacy.clip_norm", ["privacy.clip_norm=-1"], ["privacy.clip_norm=1"], r"privacy.clip_norm=-1.0: .* must be > 0"),
  (
    "privacy.overflow_prob",
    ["privacy.overflow_prob=0"],
    ["privacy.overflow_prob=1e-30"],
    r"privacy.overflow_prob=0.0: must be in \(0, 1\)",
  ),
  (
    "privacy.overflow_prob",
    ["privacy.overflow_prob=1"],
    ["privacy.overflow_prob=0.5"],
    r"privacy.overflow_prob=1.0: must be in \(0, 1\)",
  ),
  (
    "privacy.sample_rate",
    ["privacy.client_sizes=private"],
    ["privacy.client_sizes=private", "privacy.sample_rate=0.1"],
    r"privacy.sample_rate=None: privacy.client_sizes='private' needs a public Poisson rate in \(0, 1\]",
  ),
  (
    "privacy.sample_rate",
    ["privacy.client_sizes=private", "privacy.sample_rate=1.5"],
    ["privacy.client_sizes=private", "privacy.sample_rate=1"],
    r"privacy.sample_rate=1.5: .* in \(0, 1\]",
  ),
  (
    "privacy.sample_rate",
    ["privacy.sample_rate=0.1"],
    ["privacy.client_sizes=private", "privacy.sample_rate=0.1"],
    r"privacy.sample_rate=0.1 is the public rate of privacy.client_sizes='private'",
  ),
  (
    "optimizer.weight_decay",
    ["optimizer.weight_decay=-0.1"],
    ["optimizer.weight_decay=0"],
    r"optimizer.weight_decay=-0.1: must be >= 0",
  ),
  (
    "optimizer.weight_decay",
    ["optimizer.name=sgd", "optimizer.weight_decay=0.1"],
    ["optimizer.name=adamw", "optimizer.weight_decay=0.1"],
    r"weight_decay=0.1 applies to adamw only",
  ),
  (
    "optimizer.warmup_steps",
    ["optimizer.warmup_steps=-1"],
    ["optimizer.warmup_steps=0"],
    r"optimizer.warmup_steps=-1: must be >= 0",
  ),
  (
    "optimizer.warmup_steps",
    ["local_steps=10", "optimizer.warmup_steps=10"],
    ["local_steps=10", "optimizer.warmup_steps=9"],
    r"optimizer.warmup_steps=10 is not below local_steps=10: .* use warmup_steps < 10",
  ),
  ("eval.every", ["eval.every=-1"], ["eval.every=0"], r"eval.every=-1: must be >= 0"),
  ("eval.max_examples", ["eval.max_examples=0"], ["eval.max_examples=1"], r"eval.max_examples=0: must be >= 1"),
  ("eval.batch_size", ["eval.batch_size=0"], ["eval.batch_size=1"], r"eval.batch_size=0: must be >= 1"),
  ("checkpoint.every", ["checkpoint.every=-1"], ["checkpoint.every=0"], r"checkpoint.every=-1: must be >= 0"),
  ("checkpoint.keep", ["checkpoint.keep=0"], ["checkpoint.keep=1"], r"checkpoint.keep=0: must be >= 1"),
  (
    "distributed.num_processes",
    ["distributed.num_processes=2"],
    [DISTRIBUTED[0], DISTRIBUTED[1], DISTRIBUTED[2]],
    r"distributed.num_processes set without the others: .*coordinator_address, num_processes and process_id",
  ),
  (
    "distributed.num_processes",
    [DISTRIBUTED[0], "distributed.num_processes=0", "distributed.process_id=0"],
    [DISTRIBUTED[0], "distributed.num_processes=1", "distributed.process_id=0"],
    r"distributed.num_processes=0: must be >= 1",
  ),
  (
    "distributed.process_id",
    [DISTRIBUTED[0], DISTRIBUTED[1], "distributed.process_id=2"],
    list(DISTRIBUTED),
    r"distributed.process_id=2: must be in \[0, distributed.num_processes=2\)",
  ),
  (
    "distributed.process_id",
    ["distributed.auto=true", "distributed.process_id=0"],
    ["distributed.auto=true"],
    r"distributed.auto=true lets JAX read the processes from the cluster .*: remove distributed.process_id",
  ),
  (
    "distributed.coordinator_address",
    ["distributed.coordinator_address=node1", *DISTRIBUTED[1:]],
    ["distributed.coordinator_address=node1:1234", *DISTRIBUTED[1:]],
    r"distributed.coordinator_address='node1': expected host:port",
  ),
  (
    "distributed.heartbeat_timeout",
    ["distributed.heartbeat_timeout=0"],
    ["distributed.heartbeat_timeout=1"],
    r"distributed.heartbeat_timeout=0: must be >= 1 \(seconds\)",
  ),
  ("unknown key", ["privacy.delt=1e-6"], ["privacy.delta=1e-6"], r"unknown key 'privacy.delt'.*Did you mean 'delta'\?"),
]


@pytest.mark.parametrize("key, bad, good, match", RULES, ids=[f"{r[0]}:{' '.join(r[1])}" for r in RULES])
def test_range_and_cross_field_rules(key, bad, good, match):
  with pytest.raises(ConfigError, match=match):
    load_config(None, bad)
  load_config(None, good)


def test_every_numeric_key_has_a_range_rule():
  def numeric(tp):
    return tp in (int, float) or any(a in (int, float) for a in typing.get_args(tp))

  covered = {key for key, *_ in RULES}
  assert {key for key, tp in LEAVES.items() if numeric(tp)} - covered == set()


def test_strategy_args_are_typed_by_the_strategy_signature():
  # PyYAML reads 1e-3 as a string; fedprox's `mu: float` makes it the number it means.
  config = load_config(None, ["strategy=fedprox", "strategy_args={mu: 1e-3}"])
  assert config.strategy_args == {"mu": 1e-3} and isinstance(config.strategy_args["mu"], float)


def test_tfds_source_needs_tensorflow_datasets(monkeypatch):
  overrides = ["data.source=tfds", "data.path=mnist"]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match=r"data.source='tfds' needs tensorflow-datasets.*pip install"):
    load_config(None, overrides)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
  load_config(None, overrides)


# ---------------------------------------------------------------------------------------------------------------
# The config against the model, data and run directory it names (runner.prepare; nothing compiled).


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(root, config dict) of the tiny setup, plus: a GPT-2 with 16 learned positions sharing its tokenizer; a
  train file whose record 5 lacks its response; one with responses of 1 to 4 letters; an empty file; a
  corrupt and a truncated gzip."""
  root = tmp_path_factory.mktemp("validation")
  raw = make_tiny_setup(root)
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
  gpt2 = transformers.GPT2Config(
    vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2
  )
  transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2")
  tokenizer.save_pretrained(root / "gpt2")
  with gzip.open(root / "train.jsonl.gz", "rt") as f:
    records = [json.loads(line) for line in f]
  write_jsonl(
    root / "partial.jsonl", [{k: v for k, v in r.items() if i != 5 or k != "response"} for i, r in enumerate(records)]
  )
  write_jsonl(
    root / "mixed.jsonl",
    [dict(r, response=" ".join(r["response"].split()[: 1 + i % 4])) for i, r in enumerate(records)],
  )
  (root / "empty.jsonl").write_text("")
  (root / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b" + b"not gzip data" * 4)
  (root / "truncated.jsonl.gz").write_bytes((root / "train.jsonl.gz").read_bytes()[:200])
  return root, raw


def config_for(setup, tmp_path, overrides):
  root, raw = setup
  raw = dict(raw, run_dir=str(tmp_path / "run"))
  return from_dict(apply_overrides(raw, [o.replace("{root}", str(root)) for o in overrides]))


def train_records(setup):
  root, _ = setup
  with gzip.open(root / "train.jsonl.gz", "rt") as f:
    return [json.loads(line) for line in f]


# (overrides that break the rule, overrides at its boundary that pass, the message). The tiny Llama: hidden 32,
# 4 heads, 2 KV heads of 8 dims, so q_proj is 32 x 32 and v_proj 32 x 16; 240 train and 40 eval records; 4
# clients of 60.
PREPARE_RULES = [
  (
    ["lora.rank=17"],
    ["lora.rank=16"],
    r"lora.rank=17 exceeds min\(in, out\) = 16 of model.layers.0.self_attn.v_proj \(32 x 16, in x out\) \(and 1 "
    r"more targeted layer\), selected by lora.target_modules=\['q_proj', 'v_proj'\]: choose lora.rank <= 16",
  ),
  # Only the targeted layers bound the rank: without v_proj, 32 passes.
  (
    ["lora.rank=33", "lora.target_modules=[q_proj]"],
    ["lora.rank=32", "lora.target_modules=[q_proj]"],
    r"lora.rank=33 exceeds min\(in, out\) = 32 of model.layers.0.self_attn.q_proj \(32 x 32, in x out\) \(and 1 more",
  ),
  (
    ["lora.target_modules=[nope]"],
    ["lora.target_modules=[o_proj]"],
    r"lora.target_modules=\('nope',\) matches no linear layer of this model; available module names: "
    r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]",
  ),
  (
    ["model.path={root}/gpt2", "lora.target_modules=[c_attn]", "data.max_seq_len=17"],
    ["model.path={root}/gpt2", "lora.target_modules=[c_attn]", "data.max_seq_len=16"],
    r"data.max_seq_len=17 exceeds the 16 positions of model.path='.*gpt2'",
  ),
  (
    ["data.template_fields={prompt_field: prompt, response_field: answer, separator: ' '}"],
    ["data.template_fields={prompt_field: prompt, response_field: response, separator: ' '}"],
    r"data.template_fields.response_field='answer': 40 of the 40 eval records \(data.eval_path='.*eval.jsonl'\) "
    r"have no such column; record 0 has \['category', 'prompt', 'response'\]: set data.template_fields."
    r"response_field to one of them",
  ),
  (
    ["data.path={root}/partial.jsonl"],
    ["data.path={root}/train.jsonl.gz"],
    r"data.template_fields.response_field='response': 1 of the 240 train records .* record 5 has "
    r"\['category', 'prompt'\]",
  ),
  (
    ["data.category_column=topic"],
    ["data.category_column=null"],
    r"data.category_column='topic': 240 of the 240 train records .* set data.category_column to one of them "
    r"\(or null: an unstratified iid split\)",
  ),
  (
    ["data.eval_path={root}/empty.jsonl"],
    ["data.eval_path={root}/eval.jsonl"],
    r"data.eval_path='.*empty.jsonl': the eval split has no records",
  ),
  (
    ["num_clients=300"],
    ["num_clients=240", "batch_size=1"],
    r"num_clients=300 exceeds the 240 training records: 60 of the 300 clients would be empty",
  ),
  (
    ["data.max_train_examples=3"],
    ["data.max_train_examples=4", "batch_size=1"],
    r"num_clients=4 exceeds the 3 training records \(data.max_train_examples=3\): 1 of the 4 clients would be "
    r"empty",
  ),
  (
    ["data.partition=dirichlet", "data.min_client_size=61"],
    ["data.partition=dirichlet", "data.min_client_size=1"],
    r"data.min_client_size=61 for each of num_clients=4 needs 244 training records, but there are 240",
  ),
  # Dir(0.01) puts nearly all of each of the 8 letters on one client: 10 clients cannot all get 20 records.
  (
    ["data.partition=dirichlet", "data.dirichlet_alpha=0.01", "num_clients=10", "data.min_client_size=20"],
    ["data.partition=dirichlet", "data.dirichlet_alpha=100", "num_clients=10", "data.min_client_size=5"],
    r"data.partition='dirichlet': every draw of Dirichlet\(data.dirichlet_alpha=0.01\) over the 8 values of "
    r"'category' left some of the num_clients=10 clients with fewer than data.min_client_size=20 records: raise "
    r"data.dirichlet_alpha",
  ),
  # The tiny setup's clients hold 60 examples each: 61 exceeds every client, while 39 fits a client but not the
  # overflow rule (q^61 <= 1e-12 needs q <= 0.636, i.e. batch_size <= 38).
  (
    ["privacy.enabled=true", "batch_size=61"],
    ["privacy.enabled=true", "batch_size=38"],
    r"batch_size=61 exceeds the smallest client's 60 examples",
  ),
  (
    ["privacy.enabled=true", "batch_size=39"],
    ["privacy.enabled=true", "batch_size=38"],
    r"the largest client \(60 examples\) samples at the Poisson rate q = 0.65: .* lower batch_size to at most 38",
  ),
  (["batch_size=61"], ["batch_size=60"], r"batch_size=61 exceeds the largest client's 60 examples"),
  (
    ["data.max_seq_len=6"],
    ["data.max_seq_len=7"],
    r"data.max_seq_len=6: the prompt fills all 6 tokens in every one of the 40 eval examples",
  ),
  (["run_dir={root}/train.jsonl.gz"], ["run_dir={root}/fresh"], r"run_dir='.*train.jsonl.gz' is a file"),
]


@pytest.mark.parametrize("bad, good, match", PREPARE_RULES, ids=[" ".join(r[0]) for r in PREPARE_RULES])
def test_prepare_rules(setup, tmp_path, bad, good, match):
  # ValueError: a ConfigError, or the error of the library function that checks the rule (inject_lora).
  with pytest.raises(ValueError, match=match):
    runner.prepare(config_for(setup, tmp_path, bad))
  assert runner.prepare(config_for(setup, tmp_path, good)).round_fn is not None


def test_natural_partition_names_the_clients_min_client_size_dropped(setup, tmp_path):
  counts = collections.Counter(r["category"] for r in train_records(setup))
  size = sorted(counts.values())[2] + 1  # drops the 3 smallest letters (ties only drop more)
  kept = sum(c >= size for c in counts.values())
  with pytest.raises(
    ConfigError,
    match=rf"gives {kept} clients \({len(counts) - kept} of its {len(counts)} values "
    rf"have fewer than "
    rf"data.min_client_size={size} records\) but num_clients=8: set "
    rf"num_clients={kept} or lower data.min_client_size",
  ):
    runner.prepare(
      config_for(
        setup,
        tmp_path,
        ["data.partition=natural", "num_clients=8", "clients_per_round=2", f"data.min_client_size={size}"],
      )
    )


@pytest.mark.parametrize("max_seq_len", [9, 11])
def test_truncated_sequences_are_kept_and_counted(setup, tmp_path, max_seq_len):
  """The notes count the train examples longer than max_seq_len, by the tokenizer's own token count: BOS,
  prompt and separator, response, EOS (responses of 1 to 4 letters: 8 to 11 tokens)."""
  root, _ = setup
  tokenizer = transformers.AutoTokenizer.from_pretrained(root / "model")
  records = [json.loads(line) for line in (root / "mixed.jsonl").read_text().splitlines()]
  lengths = [
    len(tokenizer(r["prompt"] + " ")["input_ids"])
    + len(tokenizer(r["response"], add_special_tokens=False)["input_ids"])
    + 1
    for r in records
  ]
  expected = sum(n > max_seq_len for n in lengths)
  experiment = runner.prepare(
    config_for(setup, tmp_path, ["data.path={root}/mixed.jsonl", f"data.max_seq_len={max_seq_len}"])
  )
  assert f"train: 240 examples, {expected} truncated to {max_seq_len} tokens" in experiment.notes[1]
  assert (max_seq_len, expected) in ((9, 120), (11, 0))  # the data: a quarter each of 8, 9, 10, 11 tokens


def store_config(run_dir, config):
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / runner.CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config)))


def test_resume_with_the_same_config_passes(setup, tmp_path):
  config = config_for(setup, tmp_path, [])
  store_config(tmp_path / "run", config)
  runner.check_run_dir(config)


def test_resume_under_other_processes_passes(setup, tmp_path):
  # The distributed section says how a run is executed (its processes, a coordinator port that changes with every
  # launch), not what it computes.
  store_config(tmp_path / "run", config_for(setup, tmp_path, []))
  runner.check_run_dir(config_for(setup, tmp_path, list(DISTRIBUTED)))


@pytest.mark.parametrize(
  "changes, match",
  [
    (["lr=0.02"], r"holds a run with a different config \(lr: 0.02 -> 0.01\): resume with the same config"),
    (
      [
        "rounds=5",
        "lr=0.02",
        "seed=1",
        "batch_size=3",
        "local_steps=2",
        "num_clients=5",
        "clients_per_round=1",
        "lora.rank=1",
        "lora.alpha=2",
        "privacy.delta=1e-6",
      ],
      r"\(batch_size: 3 -> 4, .*, and 2 more: rounds, seed\)",
    ),
  ],
)
def test_resume_with_another_config_names_the_keys(setup, tmp_path, changes, match):
  stored = config_for(setup, tmp_path, changes)
  store_config(tmp_path / "run", stored)
  with pytest.raises(ConfigError, match=match):
    runner.prepare(config_for(setup, tmp_path, []))


def test_resume_from_checkpoints_without_their_config_is_refused(setup, tmp_path):
  (tmp_path / "run" / runner.CHECKPOINT_DIR).mkdir(parents=True)
  with pytest.raises(ConfigError, match=r"holds checkpoints but no config.yaml"):
    runner.prepare(config_for(setup, tmp_path, []))


def test_resume_with_an_invalid_stored_config_is_refused(setup, tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / runner.CONFIG_FILE).write_text("rounds: 0\n")
  with pytest.raises(ConfigError, match=r"config.yaml holds an invalid config \(rounds=0: must be >= 1\.\)"):
    runner.prepare(config_for(setup, tmp_path, []))


# ---------------------------------------------------------------------------------------------------------------
# Through the command: exit code 2, one line on stderr, no traceback, nothing written.


@pytest.mark.parametrize(
  "args, message",
  [
    (["privacy.delta=1"], "error: privacy.delta=1.0: must be in (0, 1)"),
    (["lora.rank=17"], "error: lora.rank=17 exceeds min(in, out) = 16 of model.layers.0.self_attn.v_proj"),
    (
      ["data.template_fields={prompt_field: question, response_field: response}"],
      "error: data.template_fields.prompt_field='question': 40 of the 40 eval records",
    ),
    (["num_clients=300"], "error: num_clients=300 exceeds the 240 training records"),
    # A corrupt and a truncated gzip: an OSError and an EOFError from Python's gzip, not ValueErrors.
    (["data.path={root}/corrupt.jsonl.gz"], "error: Unknown compression method"),
    (["data.path={root}/truncated.jsonl.gz"], "error: Compressed file ended before the end-of-stream marker"),
    (["--stop_after", "0"], "error: argument --stop_after: expected a round number >= 1, got '0'"),
  ],
)
def test_command_reports_one_line_and_exits_2(setup, tmp_path, capsys, args, message):
  root, raw = setup
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(dict(raw, run_dir=str(tmp_path / "run"))))
  assert cli.main(["train", "--config", str(path), "--quiet", *[a.replace("{root}", str(root)) for a in args]]) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
  assert "Traceback" not in captured.err and captured.out == ""
  assert not (tmp_path / "run").exists()


def test_command_refuses_a_resume_with_another_config(setup, tmp_path, capsys):
  root, raw = setup
  raw = dict(raw, run_dir=str(tmp_path / "run"))
  store_config(tmp_path / "run", from_dict(dict(raw, lr=0.02)))
  path = tmp_path / "config.yaml"
  path.write_text(yaml.safe_dump(raw))
  assert cli.main(["train", "--config", str(path), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: run_dir") and "(lr: 0.02 -> 0.01)" in err and err.count("\n") == 1
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [runner.CONFIG_FILE]


def test_command_line_usage_error_is_one_line(capsys):
  assert cli.main(["train"]) == 2
  err = capsys.readouterr().err
  assert err == "error: the following arguments are required: --config (see fedask-jax train --help)\n"
