"""The mechanism as run: a client's DP-SGD release (`client_release`), the canary client over rounds of uniform
client sampling (`sampled_client_release`), the canary scores of N runs per side (`canary_scores`) and the audit
driver (`audit_dp_gradient`).

The game and the score: `fedask_jax.auditing`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedask_jax import privacy
from fedask_jax._checks import check_choice, check_int, check_real
from fedask_jax.auditing.bound import AuditResult, _check_confidence, _check_delta, _check_runs, audit_scores

Array = jax.Array
# (params, batch [capacity, ...], example_mask [capacity], key) -> (grad like params, DPStats): a DP gradient of
# `fedask_jax.privacy` with everything else bound (`functools.partial`).
Mechanism = Callable[[Any, Any, Array, Array], tuple[Any, Any]]
# Stream constants for fold_in: the in and out runs, and each step's Poisson sampling and noise.
_OUT_STREAM, _IN_STREAM = 0, 1
_SAMPLING_STREAM, _NOISE_STREAM = 0, 1
# The canary's client id in `sampled_client_release` (any id is drawn with probability K / N).
CANARY_CLIENT = 0
# How each side's Poisson rate is set: the runner's privacy.client_sizes modes (`canary_scores`).
CLIENT_SIZES = ("private", "public")


def _check_schedule(steps: Any, sample_rate: Any) -> None:
  check_int("steps", steps, 1, what="the number of local DP steps T")
  if not isinstance(sample_rate, jax.Array):  # a traced rate (`canary_scores`' sides) is the caller's to check
    check_real("sample_rate", sample_rate, 0, 1, lo_open=True, what="the Poisson rate q", hint=" (batch size / n)")


def client_release(
  mechanism: Mechanism,
  params: Any,
  data: Any,
  num_examples: int,
  key: Array,
  *,
  steps: int,
  sample_rate: float | Array,
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
    steps: T >= 1. sample_rate: q in (0, 1], a Python float or a float32 scalar (may be traced, then
      unchecked). learning_rate: lr.

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
  sample_rate: float | Array,
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
  client_sizes: str = "private",
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

  `data` has n + 1 rows, the canary last: "in" runs sample from all n + 1 rows (D'), "out" runs from the first n
  (D), add/remove-one neighbours of different sizes. Each side samples as the runner's `privacy.client_sizes`
  mode would (`client_sizes`):

  - "private": both sides at the public rate q = `sample_rate`, whatever their size.
  - "public": each side at q_k = b / n_k with b = q n, the configured batch size: D at q = `sample_rate`,
    D' at b / (n + 1) = q n / (n + 1). The rate then tells D from D' even where the canary is not sampled,
    which the accounting at q does not cover (it covers replace-one neighbours, of equal sizes).

  In both modes the normaliser of the noisy sum inside `mechanism` is b = q n for both sides (the runner passes
  the configured batch size whatever the mode), and the release is the client's own message: the weight
  n_k / sum_j n_j that the server gives it in public mode is applied after the release (were the sizes
  released too, add/remove-one neighbours would differ in plain sight; the audit asks whether the message
  alone stays within the claim). Run i of side c uses
  the key fold_in(fold_in(key, c), i), c = 1 in, 0 out. The runs are vmapped in chunks of `chunk_size`
  (`lax.map`) under one `jit` shared by both sides; results do not depend on the chunk size.

  Args:
    direction: u, a pytree like `params` (the canary's update direction; need not be unit norm).
    num_runs: N per side.
    sampling: None, or R, K and N (`sampled_client_release`).
    canary_step: m > 0 (`CanaryProblem.canary_step`), with `sampling` only.
    sample_rate: q, the rate of the "out" side D (of both sides with `client_sizes` "private").
    client_sizes: "private" (default) or "public", the runner's mode whose neighbours are audited.
    Other arguments as in `client_release`.

  Returns:
    (scores_in [N], scores_out [N]) float64 NumPy arrays.
  """
  num_runs = _check_runs("num_runs", num_runs)
  _check_schedule(steps, sample_rate)
  check_choice("client_sizes", client_sizes, CLIENT_SIZES)
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

  def one_run(run_key, num_examples, rate):
    if sampling is None:
      theta = client_release(
        mechanism,
        params,
        data,
        num_examples,
        run_key,
        steps=steps,
        sample_rate=rate,
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
        sample_rate=rate,
        learning_rate=learning_rate,
      )
      # Both sides' scores use the same offset (D's rate): one that depended on the side would leak it.
      offset = taken * steps * sample_rate * canary_step / 2
    moved = jax.tree.map(lambda new, old: new.astype(jnp.float32) - old.astype(jnp.float32), theta, params)
    return (
      sum(jnp.vdot(m, u.astype(jnp.float32)) for m, u in zip(jax.tree.leaves(moved), jax.tree.leaves(direction)))
      - offset
    )

  # Equal chunks covering N (a few spare runs, dropped): lax.map would compile a ragged last chunk apart. The
  # side (its key, n + 1 or n, its rate) is traced, so both sides share one compilation.
  num_chunks = -(-num_runs // chunk_size)
  size = -(-num_runs // num_chunks)

  @jax.jit
  def run_side(side_key, num_examples, rate):
    return jax.lax.map(
      lambda i: one_run(jax.random.fold_in(side_key, i), num_examples, rate),
      jnp.arange(num_chunks * size),
      batch_size=size,
    )

  def scores(side: int, num_examples: int) -> np.ndarray:
    # The runner's q_k = b / n_k with b = q n (public sizes), or q for every size (private).
    rate = sample_rate * (total - 1) / num_examples if client_sizes == "public" else sample_rate
    out = run_side(jax.random.fold_in(key, side), jnp.asarray(num_examples, jnp.int32), jnp.float32(rate))
    return np.asarray(out, np.float64)[:num_runs]

  return scores(_IN_STREAM, total), scores(_OUT_STREAM, total - 1)


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
  `privacy.epsilon_spent(privacy.DPSchedule(q, T, R, K / N), sigma, delta)` with `sampling`, q = `sample_rate`
  (D's rate, the largest, for which the runner calibrates with `client_sizes` "public"); the audit passes
  when `epsilon_lower_bound` <= that claim.

  Args:
    delta, confidence: as in `epsilon_lower_bound`.
    **score_options: `canary_scores`' keyword arguments (num_runs, steps, sample_rate, learning_rate,
      chunk_size, sampling, canary_step, client_sizes).
  """
  delta = _check_delta(delta)
  confidence = _check_confidence(confidence)
  scores = canary_scores(mechanism, params, data, direction, key, **score_options)
  return audit_scores(*scores, delta, confidence)
