"""The runner: from a `Config` to a finished run directory (docs/design.md, section 2.2).

    experiment = prepare(load_config("experiments/configs/quickstart.yaml"))   # loads, validates, plans
    summary = train(experiment)                                                 # the round loop

- `plan`: `prepare` does everything that can fail on bad input before anything is compiled: it checks the run
  directory against the config, loads the model, tokenizer and data, partitions the clients, and plans the
  privacy (`fedask_jax.privacy.plan_privacy`: noise multiplier, sampling rates, batch capacity).
- `loop`: `train` then runs the rounds, resuming from the latest checkpoint of the run directory when there is
  one (its docstring: resumption and faults); `evaluate_run` evaluates a run's latest checkpoint.
- `processes`: runs over several processes (`jax.distributed`), and stops on SIGINT / SIGTERM (`Interrupted`).
- `rundir`: the run directory's layout, the check that it belongs to the config, and the metrics log.
- `report`: the plots and the summary.
"""

from fedask_jax.runner import processes
from fedask_jax.runner.loop import Interrupted, evaluate_run, latest_adapters, round_sampler, train
from fedask_jax.runner.plan import (
  ADAPTER_INIT_STREAM,
  CPU_CLIENT_CHUNK,
  Experiment,
  client_chunk,
  load_eval_data,
  load_model,
  load_records,
  make_optimizer,
  make_strategy,
  partition,
  plan_privacy,
  prepare,
  run_key,
)
from fedask_jax.runner.report import DIAGNOSTICS, format_summary, summarize, write_plots
from fedask_jax.runner.rundir import (
  ADAPTER_DIR,
  CHECKPOINT_DIR,
  CONFIG_FILE,
  METRICS_FILE,
  SUMMARY_FILE,
  MetricsLog,
  check_run_dir,
)

__all__ = [
  "ADAPTER_DIR",
  "ADAPTER_INIT_STREAM",
  "CHECKPOINT_DIR",
  "CONFIG_FILE",
  "CPU_CLIENT_CHUNK",
  "DIAGNOSTICS",
  "METRICS_FILE",
  "SUMMARY_FILE",
  "Experiment",
  "Interrupted",
  "MetricsLog",
  "check_run_dir",
  "client_chunk",
  "evaluate_run",
  "format_summary",
  "latest_adapters",
  "load_eval_data",
  "load_model",
  "load_records",
  "make_optimizer",
  "make_strategy",
  "partition",
  "plan_privacy",
  "prepare",
  "processes",
  "round_sampler",
  "run_key",
  "summarize",
  "train",
  "write_plots",
]
