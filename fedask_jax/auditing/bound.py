"""The statistics of the audit: an epsilon lower bound from canary scores (Clopper-Pearson at a held-out
threshold), the ceiling a number of runs can certify, and the audit's answer from scores (`audit_scores`).

The game, the threshold choice and the ceiling: `fedask_jax.auditing`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from jax_privacy import auditing as jp_auditing

from fedask_jax._checks import check_int, check_real


def _check_confidence(confidence: Any) -> float:
  # jax_privacy asks for significance in (0, 0.5).
  return float(
    check_real(
      "confidence", confidence, 0.5, 1, lo_open=True, hi_open=True, what="the confidence level", hint=", e.g. 0.95"
    )
  )


def _check_delta(delta: Any) -> float:
  return float(
    check_real("delta", delta, 0, 1, hi_open=True, what="delta", hint=", the delta of the claim audited (e.g. 1e-5)")
  )


def _check_runs(name: str, value: Any) -> int:
  return check_int(
    name, value, 2, hint=" (the held-out threshold needs runs on both halves; thousands give a useful bound)"
  )


def _as_scores(name: str, scores: Any) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise ValueError(f"{name} has shape {scores.shape}: expected one score per run, [N].")
  _check_runs(f"len({name})", len(scores))
  if not np.all(np.isfinite(scores)):
    raise ValueError(
      f"{name} holds {int(np.sum(~np.isfinite(scores)))} non-finite scores: the mechanism released NaN/inf "
      "parameters; fix the run (learning rate, loss) before auditing it."
    )
  return scores


def epsilon_lower_bound(
  scores_in: Any,
  scores_out: Any,
  delta: float,
  confidence: float = 0.95,
  *,
  threshold: float | None = None,
  seed: int = 0,
) -> float:
  """Epsilon lower bound at `confidence` from canary scores, by Clopper-Pearson at one threshold.

  eps_lb = max(0, log((TPR_lb - delta) / FPR_ub)) for the test "score >= t" (module docstring), through
  `jax_privacy.auditing.CanaryScoreAuditor.epsilon_clopper_pearson` (one-sided: "in" scores are the higher).

  Args:
    scores_in: [N_in] scores of the runs with the canary; scores_out: [N_out] without it (N >= 2 each).
    delta: the delta of the (epsilon, delta) claim audited.
    confidence: 1 - alpha; eps_lb <= the true epsilon with at least this probability.
    threshold: None (default): chosen on a random half of each side (`seed`) and tested on the other half.
      A number: tested on all runs; valid only if it was fixed without looking at these scores.
    seed: the split's seed; any seed fixed before the runs is valid.

  Returns:
    eps_lb >= 0 (0 when no threshold gives evidence).
  """
  scores_in = _as_scores("scores_in", scores_in)
  scores_out = _as_scores("scores_out", scores_out)
  delta = _check_delta(delta)
  confidence = _check_confidence(confidence)
  if threshold is None:
    strategy = jp_auditing.Split(threshold_estimation_frac=0.5, seed=seed)
  else:
    strategy = jp_auditing.Explicit(float(threshold))
  auditor = jp_auditing.CanaryScoreAuditor(scores_in, scores_out)
  return float(auditor.epsilon_clopper_pearson(1 - confidence, delta, one_sided=True, threshold_strategy=strategy))


def max_certifiable_epsilon(num_runs: int, delta: float, confidence: float = 0.95) -> float:
  """The largest `epsilon_lower_bound` (held-out threshold) N runs per side can give: the audit's ceiling.

  Perfectly separated scores leave n = N - floor(N / 2) evaluation runs per side with no error, whose
  Clopper-Pearson bounds at level alpha / 2 are TPR_lb = (alpha/2)^(1/n) and FPR_ub = 1 - (alpha/2)^(1/n):
  eps_max = max(0, log((TPR_lb - delta) / FPR_ub)) ~ log(n / log(2 / alpha)). A broken mechanism is reported
  here.
  """
  num_runs = _check_runs("num_runs", num_runs)
  delta = _check_delta(delta)
  alpha = 1 - _check_confidence(confidence)
  n = num_runs - num_runs // 2
  log_tpr_lb = math.log(alpha / 2) / n
  tpr_lb = math.exp(log_tpr_lb)
  if tpr_lb <= delta:
    return 0.0
  return max(0.0, math.log(tpr_lb - delta) - math.log(-math.expm1(log_tpr_lb)))


class AuditResult(NamedTuple):
  """The outcome of `audit_dp_gradient` (or `audit_scores`).

  epsilon_lower_bound: held-out Clopper-Pearson bound (`epsilon_lower_bound`), the audit's answer.
  bonferroni_epsilon: jax_privacy's all-threshold Bonferroni bound on all runs (heuristic; cross-check).
  max_certifiable: `max_certifiable_epsilon(num_runs, ...)`, the ceiling with these runs.
  auroc: the area under the in/out ROC curve (0.5: no signal).
  num_runs: N per side. confidence: 1 - alpha. delta: the delta audited.
  scores_in, scores_out: [N] the canary scores.
  """

  epsilon_lower_bound: float
  bonferroni_epsilon: float
  max_certifiable: float
  auroc: float
  num_runs: int
  confidence: float
  delta: float
  scores_in: np.ndarray
  scores_out: np.ndarray


def audit_scores(scores_in: Any, scores_out: Any, delta: float, confidence: float = 0.95) -> AuditResult:
  """The audit's answer from N canary scores per side: `epsilon_lower_bound` (held-out threshold, seed 0) and
  the cross-checks of `AuditResult`."""
  scores_in = _as_scores("scores_in", scores_in)
  scores_out = _as_scores("scores_out", scores_out)
  if len(scores_in) != len(scores_out):
    raise ValueError(f"{len(scores_in)} scores in and {len(scores_out)} out: run the same number on each side.")
  delta = _check_delta(delta)
  confidence = _check_confidence(confidence)
  auditor = jp_auditing.CanaryScoreAuditor(scores_in, scores_out)
  return AuditResult(
    epsilon_lower_bound=epsilon_lower_bound(scores_in, scores_out, delta, confidence),
    bonferroni_epsilon=float(auditor.epsilon_clopper_pearson(1 - confidence, delta)),
    max_certifiable=max_certifiable_epsilon(len(scores_in), delta, confidence),
    auroc=float(auditor.attack_auroc()),
    num_runs=len(scores_in),
    confidence=confidence,
    delta=delta,
    scores_in=scores_in,
    scores_out=scores_out,
  )
