"""Empirical privacy auditing of the client DP-SGD mechanism: a high-confidence lower bound on epsilon.

The game (Jagielski et al. 2020, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?"; Nasr et al. 2021, "Adversary Instantiation"; Nasr et al. 2023, "Tight Auditing of Differentially Private
Machine Learning"). A client holds D (n examples) or its add/remove neighbour D' = D + {canary}. It runs the
mechanism as implemented (`fedask_jax.privacy`: T local steps, each a Poisson-sampled batch, `dp_gradient` or
`wspace_dp_gradient`, an SGD step) and releases its final trained factor theta_T. We run it N times on D' ("in")
and N times on D ("out") with fresh randomness and score each release by s = <theta_T - theta_0, u>, u the
direction in which the canary moves the factor. For any threshold t, the test "s >= t" has true- and
false-positive rates TPR, FPR, and an (epsilon, delta)-DP mechanism forces TPR <= e^epsilon FPR + delta, so

    epsilon >= log((TPR - delta) / FPR).

With Clopper-Pearson bounds TPR_lb = 1 - FNR_ub and FPR_ub, each at level alpha / 2 (alpha = 1 - confidence),
eps_lb = log((TPR_lb - delta) / FPR_ub) is below the mechanism's true epsilon with probability >= 1 - alpha
(union bound). If eps_lb exceeds the epsilon we claim, the claim (or the code) is wrong.

Threshold choice: held out. The threshold maximising the bound on a random half of each side's runs is tested
once on the other half (`jax_privacy.auditing.Split`). It is valid for any law of the scores, atoms included (a
noise-free mechanism puts every "out" score at exactly 0), at the price of half the runs. jax_privacy's default
(`Bonferroni`) maximises over all thresholds on the whole sample but divides alpha by the number of thresholds
on the data-dependent ROC frontier, not by a family fixed in advance, so its guarantee is heuristic; we report
it beside ours as a cross-check only. Not used: `CanaryScoreAuditor.epsilon_from_gdp`, whose `abs` over
isf(FPR_ub) - ppf(FNR_ub) turns trivial (negative) evidence into a bound (it returns epsilon ~ 3 for identical
in/out score distributions; google-deepmind/jax_privacy PR #270).

Ceiling: with n evaluation runs per side even perfectly separated scores certify only
log(((alpha/2)^(1/n) - delta) / (1 - (alpha/2)^(1/n))) ~ log(n / log(2 / alpha)) (`max_certifiable_epsilon`):
a broken mechanism (epsilon = infinity) is reported at this ceiling, which grows with log N.

The sampled mechanism (`audit_dp_gradient` with `sampling`). Over R rounds the canary's client is drawn
K of N by the runner's sampler (q_c = K / N per round, independently) and, when drawn, runs its S local steps
from the last released factor and releases the result; the adversary sees every release and who took part, as
the `sampled` accounting assumes (`fedask_jax.privacy.accounting`). The score is the transcript's Gaussian log
likelihood ratio. The claim audited is the `sampled` epsilon at the q_c the accountant is told
(`privacy.epsilon_spent(privacy.DPSchedule(q, S, R, q_c), sigma, delta)`): the real mechanism must stay below
it, and a mechanism whose accountant is told a smaller q_c than K / N claims too little, which the audit shows
when the gap is wide enough for its runs.

The canary (`linear_canary_problem`) is a gradient canary (Nasr et al. 2023): a tiny LoRA-adapted
`fedask_jax.lora.Linear`, y = x @ (W0 + s lora_a lora_b) with lora_a [in, r] frozen and lora_b [r, out]
trained, whose frozen lora_a reserves its last column for an input coordinate that only the canary uses; with a
huge target the canary's gradient has norm >> C (clipped to exactly C) and lives in a coordinate of lora_b that
no other example's gradient touches. That coordinate
is u, and the audit is as strong as a white-box audit of the released factor can be: in the single-step,
q = 1 setting the in/out scores are N(C, sigma^2 C^2) vs N(0, sigma^2 C^2) (times lr / (q n), and s in
W-space), the Gaussian mechanism itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax_privacy import auditing as jp_auditing

from fedask_jax import privacy
from fedask_jax._checks import check_choice, check_int, check_real
from fedask_jax.lora import Linear, LoRAConfig, split_lora

Array = jax.Array
# (params, batch [capacity, ...], example_mask [capacity], key) -> (grad like params, DPStats): a DP gradient of
# `fedask_jax.privacy` with everything else bound (`functools.partial`).
Mechanism = Callable[[Any, Any, Array, Array], tuple[Any, Any]]

SPACES = ("b_space", "w_space")
# Stream constants for fold_in: the in and out runs, and each step's Poisson sampling and noise.
_OUT_STREAM, _IN_STREAM = 0, 1
_SAMPLING_STREAM, _NOISE_STREAM = 0, 1
# The canary's client id in `sampled_client_release` (any id is drawn with probability K / N).
CANARY_CLIENT = 0


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


def _check_schedule(steps: Any, sample_rate: Any) -> None:
  check_int("steps", steps, 1, what="the number of local DP steps T")
  check_real("sample_rate", sample_rate, 0, 1, lo_open=True, what="the Poisson rate q", hint=" (batch size / n)")


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


def client_release(
  mechanism: Mechanism,
  params: Any,
  data: Any,
  num_examples: int,
  key: Array,
  *,
  steps: int,
  sample_rate: float,
  learning_rate: float = 1.0,
) -> Any:
  """The client's released factor after T DP-SGD steps: theta_T = theta_0 - lr sum_t g_t (jit- and vmap-safe).

  Step t (key k_t = fold_in(key, t)): a Poisson batch of the first `num_examples` rows of `data`
  (`privacy.poisson_sample` with rate q, key fold_in(k_t, 0), capacity = all rows of `data`, so never
  truncated), the DP gradient g_t = mechanism(theta, batch, mask, fold_in(k_t, 1)), and an SGD step. SGD keeps
  the canary's contribution linear in theta_T (the strongest final-model audit); any other optimiser is
  post-processing of the same noisy gradients.

  Args:
    mechanism: (params, batch, example_mask, key) -> (grad, DPStats), e.g. `functools.partial(
      privacy.dp_gradient, loss, clip_norm=..., noise_multiplier=..., expected_batch_size=q n)`.
    params: the trained factor(s) theta_0 (pytree).
    data: pytree with leading axis [M, ...], M >= num_examples rows (rows past num_examples are never sampled).
    num_examples: n <= M, a Python int or a traced int32 scalar.
    key: PRNG key of the run.
    steps: T >= 1. sample_rate: q in (0, 1]. learning_rate: lr.

  Returns:
    theta_T, like `params`.
  """
  _check_schedule(steps, sample_rate)
  rows = {jnp.shape(x)[0] for x in jax.tree.leaves(data)}
  if len(rows) != 1:
    raise ValueError(f"data leaves have leading axes {sorted(rows)}: every leaf needs the same example axis [M, ...].")
  (max_examples,) = rows

  def step(theta, t):
    step_key = jax.random.fold_in(key, t)
    indices, mask = privacy.poisson_sample(
      jax.random.fold_in(step_key, _SAMPLING_STREAM), num_examples, sample_rate, max_examples, max_examples
    )
    batch = jax.tree.map(lambda x: x[indices], data)
    grad, _ = mechanism(theta, batch, mask, jax.random.fold_in(step_key, _NOISE_STREAM))
    return jax.tree.map(lambda p, g: p - learning_rate * g, theta, grad), None

  theta, _ = jax.lax.scan(step, params, jnp.arange(steps))
  return theta


class ClientSampling(NamedTuple):
  """R rounds that each draw K of N clients: sample_clients(round_key, N, K) -> [K] int32 ids.

  Pass the runner's `fedask_jax.simulation.sample_clients` to audit what runs (uniform without replacement from
  a fresh key each round: a given client takes part with probability q_c = K / N, independently across rounds).
  The sampler is an argument, not an import, because `auditing` sits beside the simulation in the package's
  layers (docs/design.md, section 2.1).
  """

  rounds: int
  clients_per_round: int
  num_clients: int
  sample_clients: Callable[[Array, int, int], Array]


def _check_sampling(sampling: Any) -> None:
  if not isinstance(sampling, ClientSampling):
    raise TypeError(
      f"sampling={sampling!r}: expected a ClientSampling(rounds, clients_per_round, num_clients, sample_clients)."
    )
  if not callable(sampling.sample_clients):
    raise TypeError(
      f"sampling.sample_clients={sampling.sample_clients!r}: expected the client sampler, e.g. "
      "fedask_jax.simulation.sample_clients."
    )
  check_int("sampling.rounds", sampling.rounds, 1, what="the number of rounds R")
  check_int("sampling.num_clients", sampling.num_clients, 1, what="the number of clients N")
  check_int("sampling.clients_per_round", sampling.clients_per_round, 1, what="the clients drawn per round K")
  if sampling.clients_per_round > sampling.num_clients:
    raise ValueError(
      f"sampling.clients_per_round={sampling.clients_per_round} exceeds sampling.num_clients="
      f"{sampling.num_clients}: draw at most {sampling.num_clients} clients per round."
    )


def sampled_client_release(
  mechanism: Mechanism,
  params: Any,
  data: Any,
  num_examples: int,
  key: Array,
  sampling: ClientSampling,
  *,
  steps: int,
  sample_rate: float,
  learning_rate: float = 1.0,
) -> tuple[Any, Array]:
  """The canary client's releases over R rounds of uniform client sampling (jit- and vmap-safe).

  Round t (key k_t = fold_in(key, t)) draws K of N clients with `sampling.sample_clients(k_t, N, K)` (the
  runner's sampler: `simulation.sample_clients`); the canary's client is id `CANARY_CLIENT` = 0, so it takes
  part with probability q_c = K / N, independently across rounds. When it does, it runs `client_release` (S = `steps`
  local DP-SGD steps, key fold_in(k_t, 0) as the runner keys client 0) from the current factor and releases
  the result, which becomes the next round's starting point; when it does not, nothing of it is released and
  the factor stays. Everyone sees who took part (the `sampled` participation model of
  `fedask_jax.privacy.accounting`). The other clients' messages are computed without the canary's data from
  what was released, so they are post-processing and left out: the audit sees the canary client's messages
  alone, the strongest position.

  Args:
    sampling: R, K and N. Other arguments as in `client_release`.

  Returns:
    (theta_R like `params`, the number of rounds the client took part in, an int32 scalar).
  """
  _check_schedule(steps, sample_rate)
  _check_sampling(sampling)

  def one_round(theta, t):
    round_key = jax.random.fold_in(key, t)
    drawn = sampling.sample_clients(round_key, sampling.num_clients, sampling.clients_per_round)
    present = jnp.any(drawn == CANARY_CLIENT)
    released = client_release(
      mechanism,
      theta,
      data,
      num_examples,
      jax.random.fold_in(round_key, CANARY_CLIENT),
      steps=steps,
      sample_rate=sample_rate,
      learning_rate=learning_rate,
    )
    return jax.tree.map(lambda new, old: jnp.where(present, new, old), released, theta), present

  theta, present = jax.lax.scan(one_round, params, jnp.arange(sampling.rounds))
  return theta, jnp.sum(present, dtype=jnp.int32)


def canary_scores(
  mechanism: Mechanism,
  params: Any,
  data: Any,
  direction: Any,
  key: Array,
  *,
  num_runs: int,
  steps: int,
  sample_rate: float,
  learning_rate: float = 1.0,
  chunk_size: int = 8192,
  sampling: ClientSampling | None = None,
  canary_step: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Scores of N runs with the canary and N without: one client update, or R rounds of client sampling.

  `sampling` None: each run is `client_release` and its score s = <theta_T - theta_0, u>.

  `sampling` given: each run is `sampled_client_release`; the adversary sees every released factor and who took
  part. With m = `canary_step` (the canary's movement along u in a step that samples it: lr C / (q n), times s in
  W-space), a round the client takes part in moves the factor along u by N(S q m, S sigma'^2) with the canary
  (q = 1) and N(0, S sigma'^2) without, sigma' = sigma m, and a round it misses releases nothing. The log
  likelihood ratio of the whole transcript is then proportional to

      s = <theta_R - theta_0, u> - k S q m / 2,    k = the rounds it took part in,

  the Neyman-Pearson score (absent rounds sit at ratio 1; a present round is a Gaussian shift judged from its
  midpoint). Any score gives a valid bound; this one is the most powerful at q = 1 (at q < 1 it is the
  midpoint of the means, still valid).

  `data` has n + 1 rows, the canary last: "in" runs sample from all n + 1 rows, "out" runs from the first n
  (add/remove neighbours; the normaliser q n inside `mechanism` is the same for both). Run i of side c uses
  the key fold_in(fold_in(key, c), i), c = 1 in, 0 out. The runs are vmapped in chunks of `chunk_size`
  (`lax.map`) under one `jit` shared by both sides; results do not depend on the chunk size.

  Args:
    direction: u, a pytree like `params` (the canary's update direction; need not be unit norm).
    num_runs: N per side.
    sampling: None, or R, K and N (`sampled_client_release`).
    canary_step: m > 0 (`CanaryProblem.canary_step`), with `sampling` only.
    Other arguments as in `client_release`.

  Returns:
    (scores_in [N], scores_out [N]) float64 NumPy arrays.
  """
  num_runs = _check_runs("num_runs", num_runs)
  _check_schedule(steps, sample_rate)
  # Why the ignore below: jax's stubs leave PyTreeDef unresolved ("PyTreeDef?"), which mypy will not compare.
  if jax.tree.structure(direction) != jax.tree.structure(params) or any(  # type: ignore[operator]
    jnp.shape(u) != jnp.shape(p) for u, p in zip(jax.tree.leaves(direction), jax.tree.leaves(params))
  ):
    raise ValueError("direction must have the structure and shapes of params (one score weight per parameter).")
  rows = {jnp.shape(x)[0] for x in jax.tree.leaves(data)}
  check_int("chunk_size", chunk_size, 1, hint=" (runs vmapped at once; memory only)")
  if len(rows) != 1 or min(rows) < 2:
    raise ValueError(
      f"data leaves have leading axes {sorted(rows)}: expected one example axis [n + 1, ...], n >= 1, with the "
      "canary in the last row."
    )
  (total,) = rows
  if sampling is None:
    if canary_step is not None:
      raise ValueError("canary_step is the sampled score's offset: pass it with sampling, or leave it out.")
  else:
    _check_sampling(sampling)
    check_real(
      "canary_step",
      canary_step,
      0,
      lo_open=True,
      what="the canary's movement along u per sampled step",
      hint=" (CanaryProblem.canary_step)",
    )

  def one_run(run_key, num_examples):
    if sampling is None:
      theta = client_release(
        mechanism,
        params,
        data,
        num_examples,
        run_key,
        steps=steps,
        sample_rate=sample_rate,
        learning_rate=learning_rate,
      )
      offset = 0.0
    else:
      theta, taken = sampled_client_release(
        mechanism,
        params,
        data,
        num_examples,
        run_key,
        sampling,
        steps=steps,
        sample_rate=sample_rate,
        learning_rate=learning_rate,
      )
      offset = taken * steps * sample_rate * canary_step / 2
    moved = jax.tree.map(lambda new, old: new.astype(jnp.float32) - old.astype(jnp.float32), theta, params)
    return (
      sum(jnp.vdot(m, u.astype(jnp.float32)) for m, u in zip(jax.tree.leaves(moved), jax.tree.leaves(direction)))
      - offset
    )

  # Equal chunks covering N (a few spare runs, dropped): lax.map would compile a ragged last chunk apart. The
  # side (its key and n + 1 or n) is traced, so both sides share one compilation.
  num_chunks = -(-num_runs // chunk_size)
  size = -(-num_runs // num_chunks)

  @jax.jit
  def run_side(side_key, num_examples):
    return jax.lax.map(
      lambda i: one_run(jax.random.fold_in(side_key, i), num_examples), jnp.arange(num_chunks * size), batch_size=size
    )

  def scores(side: int, num_examples: int) -> np.ndarray:
    out = run_side(jax.random.fold_in(key, side), jnp.asarray(num_examples, jnp.int32))
    return np.asarray(out, np.float64)[:num_runs]

  return scores(_IN_STREAM, total), scores(_OUT_STREAM, total - 1)


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


def audit_dp_gradient(
  mechanism: Mechanism,
  params: Any,
  data: Any,
  direction: Any,
  key: Array,
  *,
  delta: float,
  confidence: float = 0.95,
  **score_options: Any,
) -> AuditResult:
  """Audit a client's DP-SGD: `canary_scores` of N runs per side, then `audit_scores` (module docstring).

  The claim audited is the epsilon the accountant gives for this mechanism's sigma and schedule at `delta`:
  `privacy.epsilon_spent(privacy.DPSchedule(q, local_steps=T, rounds=1), sigma, delta)` for one client update,
  `privacy.epsilon_spent(privacy.DPSchedule(q, T, R, K / N), sigma, delta)` with `sampling`; the audit passes
  when `epsilon_lower_bound` <= that claim.

  Args:
    delta, confidence: as in `epsilon_lower_bound`.
    **score_options: `canary_scores`' keyword arguments (num_runs, steps, sample_rate, learning_rate,
      chunk_size, sampling, canary_step).
  """
  delta = _check_delta(delta)
  confidence = _check_confidence(confidence)
  scores = canary_scores(mechanism, params, data, direction, key, **score_options)
  return audit_scores(*scores, delta, confidence)


@dataclasses.dataclass(frozen=True)
class CanaryProblem:
  """A tiny LoRA-adapted linear layer with n ordinary examples and one gradient canary (`linear_canary_problem`).

  Layer: `fedask_jax.lora.Linear`, y = x @ kernel + s (x @ lora_a) @ lora_b, kernel W0 [in, out], lora_a
  [in, r] frozen, lora_b [r, out] trained (FedASK's local step), s = alpha / r; per-example loss
  0.5 ||y - target||^2 over one token.

  params: {"linear": lora_b [r, out]} (zeros, theta_0). frozen: lora_a [in, r]. kernel: W0 [in, out].
  scaling: s. data: {"x": [n + 1, 1, in], "target": [n + 1, 1, out]}, the canary in the last row.
  direction: {"linear": [r, out]}, u = e_{r-1} e_{out-1}^T, the canary's update direction.
  num_examples: n (without the canary).
  """

  params: dict[str, Array]
  frozen: Array
  kernel: Array
  scaling: float
  data: dict[str, Array]
  direction: dict[str, Array]
  num_examples: int

  def _layer(self, wspace_probe: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    in_features, out_features = self.kernel.shape
    rank = self.frozen.shape[1]
    layer = Linear(in_features, out_features)
    layer.kernel = nnx.Param(self.kernel)
    layer.add_lora(LoRAConfig(rank=rank, alpha=self.scaling * rank, target_modules=("linear",)), jax.random.key(0))
    layer.lora_a = nnx.LoRAParam(self.frozen)
    layer.wspace_probe = wspace_probe
    return split_lora(layer)

  def mechanism(
    self, space: str, *, clip_norm: float, noise_multiplier: float, expected_batch_size: float
  ) -> Mechanism:
    """The DP gradient of lora_b through the real layer: "b_space" (`privacy.dp_gradient`) or "w_space"
    (`privacy.wspace_dp_gradient`, W-space probe of `Linear`), with C, sigma and q n bound."""
    check_choice("space", space, SPACES)
    graphdef, lora_state, rest = self._layer(space == "w_space")

    def model(b):
      flat = [(path, var.replace(b) if path[-1] == "lora_b" else var) for path, var in nnx.to_flat_state(lora_state)]
      return nnx.merge(graphdef, nnx.from_flat_state(flat), rest, copy=True)

    def loss(layer, example):
      return 0.5 * jnp.sum((layer(example["x"]) - example["target"]) ** 2)

    kwargs: dict[str, Any] = dict(
      clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size
    )
    if space == "b_space":
      return functools.partial(privacy.dp_gradient, lambda p, example: loss(model(p["linear"]), example), **kwargs)

    def per_example_fn(p, perturbations, example):
      init = (
        None
        if perturbations is None
        else nnx.from_flat_state([(("lora_output",), nnx.Perturbation(perturbations["linear"]))])
      )
      value, sown = nnx.capture(loss, nnx.Intermediate, init=init)(model(p["linear"]), example)
      return value, {"linear": dict(nnx.to_flat_state(sown))[("lora_input",)].get_value()[0]}

    return functools.partial(
      privacy.wspace_dp_gradient, per_example_fn, frozen={"linear": self.frozen}, scaling=self.scaling, **kwargs
    )

  def canary_step(
    self, space: str, *, clip_norm: float, expected_batch_size: float, learning_rate: float = 1.0
  ) -> float:
    """m: how far a step that samples the canary moves lora_b along u, lr C / (q n) in B-space and s lr C / (q n)
    in W-space (its W-space gradient, clipped to C, maps to s C u; `linear_canary_problem`), while the canary's
    gradient is far above C and its direction u."""
    check_choice("space", space, SPACES)
    return (1.0 if space == "b_space" else self.scaling) * learning_rate * clip_norm / expected_batch_size


def linear_canary_problem(
  key: Array,
  *,
  num_examples: int = 15,
  in_features: int = 8,
  out_features: int = 4,
  rank: int = 2,
  alpha: float = 4.0,
  canary_gradient_norm: float = 100.0,
) -> CanaryProblem:
  """Build a `CanaryProblem`: n Gaussian examples and a gradient canary that no other example can mask.

  lora_a = [Q | e_{in-1}] with Q [in, r-1] orthonormal and zero in the last input coordinate, so
  lora_a^T lora_a = I (the W-space noise s lora_a^T N is isotropic in lora_b, as the B-space noise is) and
  lora_b's last row is driven by input coordinate in-1 alone. Ordinary examples have x_{in-1} = 0 (their
  gradients never touch that row); the canary is x = e_{in-1}, target = canary_gradient_norm e_{out-1}, and
  W0's last row is 0, so at theta_0 its gradients are dl/dW = -canary_gradient_norm e_{in-1} e_{out-1}^T and
  dl/dlora_b = -s canary_gradient_norm u:
  norms canary_gradient_norm (W-space) and s canary_gradient_norm (B-space), to exceed C (clipped to exactly C)
  or, with clipping off, to show it. The target is so far away that u stays the gradient's direction over a
  few local steps.
  """
  for name, value, minimum in [
    ("num_examples", num_examples, 1),
    ("in_features", in_features, 2),
    ("out_features", out_features, 1),
    ("rank", rank, 1),
  ]:
    check_int(name, value, minimum)
  if rank > min(in_features, out_features):
    raise ValueError(
      f"rank={rank} with in_features={in_features}, out_features={out_features}: need rank <= min(in, out)."
    )
  check_real("canary_gradient_norm", canary_gradient_norm, 0, lo_open=True, hint=" (>= C to be clipped to C)")
  keys = jax.random.split(key, 4)
  kernel = jax.random.normal(keys[0], (in_features, out_features)) / math.sqrt(in_features)
  kernel = kernel.at[-1].set(0.0)
  basis, _ = jnp.linalg.qr(jax.random.normal(keys[1], (in_features - 1, rank)))
  frozen = jnp.zeros((in_features, rank)).at[:-1, :-1].set(basis[:, :-1]).at[-1, -1].set(1.0)
  x = jax.random.normal(keys[2], (num_examples, 1, in_features)).at[..., -1].set(0.0)
  target = jax.random.normal(keys[3], (num_examples, 1, out_features))
  canary_x = jnp.zeros((1, 1, in_features)).at[..., -1].set(1.0)
  canary_target = jnp.zeros((1, 1, out_features)).at[..., -1].set(canary_gradient_norm)
  data = {"x": jnp.concatenate([x, canary_x]), "target": jnp.concatenate([target, canary_target])}
  params = {"linear": jnp.zeros((rank, out_features))}
  direction = {"linear": jnp.zeros((rank, out_features)).at[-1, -1].set(1.0)}
  return CanaryProblem(params, frozen, kernel, alpha / rank, data, direction, num_examples)
