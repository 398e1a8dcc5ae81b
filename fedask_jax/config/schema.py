"""The run configuration's schema: one frozen dataclass per section, with its defaults; `Config` is the whole
run. Every key is documented here; `fedask_jax.config.parsing` reads them from YAML and overrides, and
`fedask_jax.config.validation` states their ranges and the rules between them.

Paths (model.path, data.path, data.eval_path, run_dir) are used as written: a relative path is relative to the
working directory the command runs in, which for the configs under experiments/configs is the repository root.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal


class ConfigError(ValueError):
  """A configuration problem, reported to the user as one line (`fedask-jax` exits with code 2)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The frozen base model.

  Attributes:
    path: a Hugging Face checkpoint directory (config.json, safetensors, tokenizer files) or a hub id.
    dtype: parameter and compute dtype of the base model (adapters stay float32, as PEFT's default).
  """

  path: str = "experiments/base_model"
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training and held-out data (`fedask_jax.data`).

  Attributes:
    source: "gsm8k" (`load_gsm8k`: records with a derived `category`; `path` is a folder, file or hub id,
      None the carried data/gsm8k), "jsonl" (local JSON-lines files `path` and `eval_path`), "hf" (Hugging
      Face `datasets`: `path` a hub id, a builder or a `save_to_disk` folder, `name` its config, `train_split`
      / `eval_split`) or "tfds" (tensorflow-datasets `path` with `train_split` / `eval_split`, `data_dir`;
      ArrayRecord datasets are read without TensorFlow).
    path: see `source`.
    eval_path: the held-out JSONL file (source "jsonl" only).
    name: the Hugging Face dataset config (source "hf").
    data_dir: tensorflow-datasets' data directory (source "tfds").
    train_split, eval_split: split names (sources "gsm8k", "hf", "tfds").
    template: "alpaca" or "plain" (`fedask_jax.data.templates`).
    template_fields: the template's field names, e.g. {instruction_field: question, input_field: null,
      response_field: answer} for Alpaca on GSM8K.
    max_seq_len: L, tokens per example (longer ones are truncated and counted).
    max_train_examples: keep the first examples of the training split only (None: all).
    partition: "iid" (stratified by `category_column`), "dirichlet" (Dirichlet(`dirichlet_alpha`) over
      `category_column`) or "natural" (one client per value of `category_column`).
    category_column: the records' category column (iid, dirichlet) or client column (natural); None for
      iid means no stratification.
    dirichlet_alpha: the Dirichlet concentration (the paper: 0.1, 0.5, 1.0).
    min_client_size: dirichlet and natural partitions give every client at least this many examples.
    strip_calculator: remove GSM8K's <<a*b=c>> calculator annotations (source "gsm8k").
  """

  source: Literal["gsm8k", "jsonl", "hf", "tfds"] = "gsm8k"
  path: str | None = None
  eval_path: str | None = None
  name: str | None = None
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  template: Literal["alpaca", "plain"] = "alpaca"
  template_fields: dict[str, str | None] = dataclasses.field(
    default_factory=lambda: {"instruction_field": "question", "input_field": None, "response_field": "answer"}
  )
  max_seq_len: int = 256
  max_train_examples: int | None = None
  partition: Literal["iid", "dirichlet", "natural"] = "iid"
  category_column: str | None = "category"
  dirichlet_alpha: float = 0.5
  min_client_size: int = 1
  strip_calculator: bool = False


@dataclasses.dataclass(frozen=True)
class LoRASection:
  """LoRA hyper-parameters (`fedask_jax.lora.LoRAConfig`, PEFT's semantics)."""

  rank: int = 8
  alpha: float = 16.0
  target_modules: tuple[str, ...] = ("q_proj", "v_proj")
  dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class SketchConfig:
  """FedASK's sketch (fedask, fedask-alt): width r + oversample; certify_every: the exactness certificate (the
  aggregation's relative error, metric `reconstruction_error`) in rounds 1, 1 + N, 1 + 2N, ... (0: never; the
  default is `fedask_jax.strategies.fedask.CERTIFY_EVERY`, chosen by its measured cost); gauge splits the
  reconstruction into factors (`fedask_jax.sketch.split_factors`: "balanced", the paper's, or "orthonormal" /
  "norm", which hold the frozen factor at its initial scale)."""

  oversample: int = 2
  certify_every: int = 10
  gauge: Literal["balanced", "orthonormal", "norm"] = "balanced"  # fedask_jax.sketch.GAUGES


# The sketch section's keys, passed to the strategies that take them (fedask, fedask-alt).
SKETCH_KEYS = ("oversample", "certify_every", "gauge")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """Example-level DP of every client's data (docs/design.md, section 4).

  Attributes:
    enabled: DP-SGD on (Poisson sampling, clipping, noise) or off (uniform minibatches, no noise).
    target_epsilon, delta: the guarantee, met by every client's data: sigma is calibrated for the largest
      Poisson rate q = batch_size / min_k n_k, so larger clients spend less (`fedask_jax.privacy.plan_privacy`).
    clip_norm: C, the per-example clipping norm.
    accountant: "pld" (privacy loss distributions, tighter; default) or "rdp" (Renyi DP), both through
      `dp_accounting` (`fedask_jax.privacy.accounting`).
    participation: null (default: "sampled" when clients_per_round < num_clients, else "worst_case"),
      "sampled" (rigorous and tight: each round includes a client with probability clients_per_round /
      num_clients, as the runner's uniform client sampling does), "worst_case" (rigorous for any selection:
      every round may include a client) or "expected" (the official code's heuristic; NOT a guarantee, it
      under-states epsilon).
    mechanism: "b_space" (clip and noise the trained factor's gradient, the official code) or "w_space"
      (clip dl/dW and project the noise, the paper's equation).
    overflow_prob: per-step probability that a Poisson batch overflows its fixed capacity. Its cost in delta
      (`fedask_jax.privacy.overflow_delta`) is taken out of `delta` before calibration, so the run as a whole
      is (target_epsilon, delta)-DP; 1e-12 (`fedask_jax.privacy.DEFAULT_OVERFLOW_PROB`) costs a few slots and
      almost none of delta.
    client_sizes: "public" (default, as the official code) or "private"; which neighbouring relation the
      guarantee covers (README: privacy). "public": client k samples at q_k = batch_size / n_k, sigma is
      calibrated for q = batch_size / min_k n_k and the server weights clients by n_k / sum_j n_j, so the sizes
      n_k are public metadata: the guarantee covers replacing one example (not adding or removing one, which
      changes n_k). "private": nothing that touches a client's examples depends on its size: every client
      samples at the public rate `sample_rate`, the noisy sum is divided by batch_size, sigma depends on the
      config only, and the server weights the sampled clients equally; the guarantee covers adding or
      removing one example.
    sample_rate: the public Poisson rate q of client_sizes "private" (required there, and only there), e.g.
      batch_size over a public estimate of a client's size; a client of batch_size / q examples then has
      batches of batch_size examples on average.
    release_diagnostics: true (default: a simulation's diagnostics) writes statistics of the raw training data,
      outside the guarantee, to metrics.jsonl, summary.json, the plots and the progress bar: the per-client
      and mean training losses, the clipped fraction, the non-finite example counts, the training set's
      truncation counts; false withholds them (what remains is covered by the guarantee or describes the
      public held-out set; README: privacy).
  """

  enabled: bool = True
  target_epsilon: float = 3.0
  delta: float = 1e-5
  clip_norm: float = 1.0
  accountant: Literal["rdp", "pld"] = "pld"
  participation: Literal["sampled", "worst_case", "expected"] | None = None
  mechanism: Literal["b_space", "w_space"] = "b_space"
  overflow_prob: float = 1e-12
  client_sizes: Literal["public", "private"] = "public"
  sample_rate: float | None = None
  release_diagnostics: bool = True


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The clients' local optimiser (optax), reset at the start of every round.

  name: "adamw" (the paper), "adam" or "sgd"; weight_decay: AdamW's decoupled decay; warmup_steps: linear
  warm-up over the first local steps of each round, then constant (the paper: 3).
  """

  name: Literal["adamw", "adam", "sgd"] = "adamw"
  weight_decay: float = 0.0
  warmup_steps: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation (token-mean cross-entropy on the responses, and its perplexity).

  every: evaluate every this many rounds (0: only before training and at the end); max_examples: the first
  examples of the held-out split (None: all); batch_size: examples per forward pass.
  """

  every: int = 0
  max_examples: int | None = 200
  batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Orbax checkpoints of the whole server state: every this many rounds and at the end, keeping `keep`."""

  every: int = 10
  keep: int = 2


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """A run over several processes through `jax.distributed` (`fedask_jax.runner.processes`; README, "Running
  across hosts"). All unset: one process. It says how a run is executed, not what it computes, so it is not part
  of the run directory's config.yaml, and a run may resume under other processes.

  Attributes:
    coordinator_address: "host:port" of process 0, where JAX's coordination service listens.
    num_processes: P, the number of processes.
    process_id: this process's index 0..P-1 (the only key in which the processes' configs differ).
    auto: let JAX read the three from the cluster's environment (SLURM, Cloud TPU, Open MPI) instead.
    heartbeat_timeout: seconds after which a process that stopped answering counts as dead, and JAX ends every
      other process (JAX's default: 100).
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  heartbeat_timeout: int = 100


@dataclasses.dataclass(frozen=True)
class Config:
  """A federated fine-tuning run.

  Attributes:
    strategy: a name of `fedask_jax.strategies.STRATEGIES`.
    strategy_args: the strategy's other hyper-parameters (e.g. {mu: 0.01} for fedprox); the sketch's come from
      `sketch`.
    rounds: T, federated rounds.
    num_clients: C, clients in the federation (for a natural partition: the number of natural clients).
    clients_per_round: K, clients sampled each round (uniformly without replacement).
    local_steps: tau, local optimiser steps per round.
    batch_size: examples per local step (the expected Poisson batch under DP).
    lr: the local learning rate.
    seed: run seed; every random draw derives from it (round keys `fold_in(run_key, round)`).
    run_dir: where metrics, checkpoints, plots and the adapter go.
    client_chunk: clients trained at once inside the round (memory), any value >= 1 (it need not divide
      clients_per_round); None: all K at once on an accelerator, chunks of 4 on a CPU
      (`fedask_jax.runner.client_chunk`).
  """

  strategy: str = "fedask"
  strategy_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  rounds: int = 100
  num_clients: int = 10
  clients_per_round: int = 2
  local_steps: int = 10
  batch_size: int = 6
  lr: float = 5e-4
  seed: int = 0
  run_dir: str = "runs/default"
  client_chunk: int | None = None
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  lora: LoRASection = dataclasses.field(default_factory=LoRASection)
  sketch: SketchConfig = dataclasses.field(default_factory=SketchConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
