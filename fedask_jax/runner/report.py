"""The run's report: plots and the summary (summary.json and the lines `fedask-jax train` prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedask_jax.runner.plan import Experiment
from fedask_jax.runner.rundir import ADAPTER_DIR, METRICS_FILE, SUMMARY_FILE

# Metrics computed from the raw training data, outside the DP guarantee: withheld from the metrics lines,
# the progress bar and the summary with privacy.release_diagnostics false.
DIAGNOSTICS = ("train_loss", "client_loss", "clipped_fraction", "nonfinite_examples")


def write_plots(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
  """loss.png (train loss per round, held-out loss where evaluated) and, with DP, epsilon.png (epsilon spent)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  # null (a NaN loss: `rundir.json_line`) plots as a gap.
  train = [(r["round"], np.nan if r["train_loss"] is None else r["train_loss"]) for r in records if "train_loss" in r]
  evals = [(r["round"], np.nan if r["eval_loss"] is None else r["eval_loss"]) for r in records if "eval_loss" in r]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss (sampled clients)")
  if evals:
    ax.plot(*zip(*evals), "o-", label="held-out loss")
  ax.set_xlabel("round")
  ax.set_ylabel("cross-entropy (nats / target token)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(run_dir / "loss.png", dpi=120)
  plt.close(fig)
  written.append(run_dir / "loss.png")
  eps = [(r["round"], r["epsilon"]) for r in records if r.get("epsilon") is not None]
  if eps:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*eps))
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "epsilon.png", dpi=120)
    plt.close(fig)
    written.append(run_dir / "epsilon.png")
  return written


def summarize(experiment: Experiment, records: list[dict[str, Any]]) -> dict[str, Any]:
  """The run's summary (summary.json) from its metrics records."""
  config, plan = experiment.config, experiment.privacy
  evals = [r for r in records if "eval_loss" in r]
  timed = [r["timing"]["seconds"] for r in records if "timing" in r and not r["timing"]["compiled"]]
  compiled = [r["timing"]["seconds"] for r in records if "timing" in r and r["timing"]["compiled"]]
  summary: dict[str, Any] = {
    "strategy": config.strategy,
    "rounds": max((r["round"] for r in records), default=0),
    "eval_loss_before": evals[0]["eval_loss"] if evals and evals[0]["round"] == 0 else None,
    "eval_loss_after": evals[-1]["eval_loss"] if evals and evals[-1]["round"] > 0 else None,
    "perplexity_before": evals[0]["perplexity"] if evals and evals[0]["round"] == 0 else None,
    "perplexity_after": evals[-1]["perplexity"] if evals and evals[-1]["round"] > 0 else None,
    "eval_examples": experiment.eval_data.num_examples,
    "final_train_loss": next((r["train_loss"] for r in reversed(records) if "train_loss" in r), None),
    # Rounds that compiled (the first of each trained-factor choice in a process) are excluded.
    "seconds_per_round": float(np.mean(timed)) if timed else None,
    "compile_round_seconds": float(np.mean(compiled)) if compiled else None,
    "private": plan is not None,
    # Faults (`fedask_jax.runner.loop`, module docstring): clients left out of an aggregate for a non-finite
    # update, and rounds with no valid client (the state left unchanged).
    "invalid_clients": sum(int(r.get("invalid_clients", 0)) for r in records),
    "skipped_rounds": sum(int(r.get("skipped", 0)) for r in records),
    "eval_truncated": experiment.eval_data.num_truncated,
  }
  if config.privacy.release_diagnostics:
    # Statistics of the raw training data: sequences cut to data.max_seq_len, the batch capacity (from the
    # largest client's size), the LM head's positions per example (from the longest response:
    # `fedask_jax.runner.plan`, module docstring), and examples with a non-finite loss or gradient over the rounds
    # (`fedask_jax.runner.loop`, module docstring).
    summary.update(
      experiment.train_counts,
      capacity=experiment.capacity,
      head_capacity=experiment.head_capacity,
      nonfinite_examples=sum(sum(r.get("nonfinite_examples", ())) for r in records),
    )
  if plan is not None:
    summary.update(
      epsilon=records[-1].get("epsilon") if records else None,
      target_epsilon=config.privacy.target_epsilon,
      delta=plan.delta,
      accountant_delta=plan.accountant_delta,
      overflow_delta=plan.overflow_delta,
      noise_multiplier=plan.noise_multiplier,
      sample_rate=plan.schedule.sample_rate,
      accountant=config.privacy.accountant,
      participation=plan.schedule.participation,
      participation_rate=plan.schedule.participation_rate,
      guarantee=plan.schedule.guarantee,
      client_sizes=config.privacy.client_sizes,
      mechanism=config.privacy.mechanism,
      clip_norm=config.privacy.clip_norm,
    )
  return summary


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
  """A few human-readable lines of `summary`."""
  lines = [f"{summary['strategy']}: {summary['rounds']} rounds"]
  if summary["eval_loss_before"] is not None and summary["eval_loss_after"] is not None:
    lines.append(
      f"held-out loss {summary['eval_loss_before']:.4f} (perplexity {summary['perplexity_before']:.2f}) before, "
      f"{summary['eval_loss_after']:.4f} (perplexity {summary['perplexity_after']:.2f}) after, on "
      f"{summary['eval_examples']} examples"
    )
  if summary["private"]:
    heuristic = " (expected participation: NOT a guarantee)" if summary["participation"] == "expected" else ""
    lines.append(
      f"privacy: epsilon spent {summary['epsilon']:.3f}{heuristic} (target {summary['target_epsilon']:g}) at delta "
      f"{summary['delta']:g}; noise multiplier {summary['noise_multiplier']:.4f}, q {summary['sample_rate']:.4g}, "
      f"participation {summary['participation']} (q_c {summary['participation_rate']:.4g}), "
      f"{summary['accountant']}, {summary['mechanism']}"
    )
  else:
    lines.append("privacy: off (non-private run)")
  if summary["invalid_clients"] or summary["skipped_rounds"] or summary.get("nonfinite_examples"):
    lines.append(
      f"faults: {summary['invalid_clients']} client updates left out for non-finite values, "
      f"{summary['skipped_rounds']} rounds skipped (no valid client), "
      f"{summary.get('nonfinite_examples', 'withheld')} training examples with a non-finite loss or "
      "gradient"
    )
  if summary["seconds_per_round"] is not None:
    lines.append(
      f"seconds per round: {summary['seconds_per_round']:.3f} (excluding compilation; rounds that "
      f"compiled took {summary['compile_round_seconds']:.1f} s)"
    )
  names = (METRICS_FILE, "loss.png", "epsilon.png", SUMMARY_FILE, ADAPTER_DIR + "/")
  files = [name for name in names if (run_dir / name).exists()]
  lines.append(f"run directory: {run_dir} ({', '.join(files)})")
  return "\n".join(lines)
