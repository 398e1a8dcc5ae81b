"""A federated run's privacy plan from plain arguments, without a config: `plan_privacy` (docs/design.md,
section 4.5).

Client sizes public (default, `sample_rate=None`): client k samples each local step's batch by Poisson sampling
with rate q_k = batch_size / n_k. One noise multiplier serves all clients, calibrated for the largest rate
q = batch_size / min_k n_k: every client's data, the smallest client's included, is then
(target_epsilon, delta)-DP, and larger clients spend less. The server weights clients by n_k, so the sizes are
public metadata and the guarantee is for neighbours of equal sizes (replacing one example).
Client sizes private (`sample_rate=q`): every client samples at the one public rate q, the noisy sum is divided
by batch_size and the sampled clients weigh the same (`fedask_jax.simulation.round_sampler(sample_rate=q)`):
sigma, the rate, the normaliser and the weights depend on no client's size, and the guarantee covers adding or
removing one example.

The schedule accounted is `DPSchedule.from_federation` (q, local_steps, rounds, q_c = clients_per_round /
num_clients) under `participation`: by default "sampled" when clients_per_round < num_clients (which needs a
uniform draw of the clients with a fresh key each round, as `fedask_jax.simulation.sample_clients` does) and
"worst_case" when all take part. Client sampling enters only through clients_per_round and num_clients (q_c),
never through a rate: q is the rate of an example within its client's local step, and a rate already multiplied
by K / N would under-state epsilon.

Batches have a fixed capacity: the largest over clients of `batch_capacity(n_k + 1, q_k, overflow_prob)` (n_k + 1:
the add-one neighbour). A batch cannot have more slots than the largest client (n examples) has rows, and that
client's add-one neighbour overflows n slots with probability q^(n + 1), so a rate with q^(n + 1) above
overflow_prob is refused. The overflow's cost in delta, `overflow_delta(overflow_prob, schedule,
target_epsilon)`, is taken out of delta before calibration, so the total is delta; epsilon is accounted at the
rest, `accountant_delta`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedask_jax._checks import check_int, check_real
from fedask_jax.privacy.accounting import (
  DEFAULT_ACCOUNTANT,
  DPSchedule,
  _check_common,
  calibrate_noise,
  epsilon_spent,
  overflow_delta,
)
from fedask_jax.privacy.sampling import DEFAULT_OVERFLOW_PROB, batch_capacity, overflow_probability


@dataclasses.dataclass(frozen=True, eq=False)
class PrivacyPlan:
  """The DP parameters of a federated run (module docstring).

  Attributes:
    noise_multiplier: sigma, for `fedask_jax.simulation.DPConfig` (noise std sigma C on each step's clipped sum).
    schedule: what is accounted (q = batch_size / min_k n_k, or the public sample_rate with private sizes; the
      participation model resolved).
    sample_rates: q_k [N] float64, each client's Poisson rate (batch_size / n_k, or sample_rate for all).
    sample_rate: the public rate of private client sizes, for `fedask_jax.simulation.round_sampler`'s
      sample_rate (every client samples at it, the sampled clients weigh the same); None with public sizes.
    capacity: slots per local step, the batches' static size (`fedask_jax.simulation.round_sampler`'s capacity).
    target_epsilon: the epsilon the whole run spends (for its smallest client).
    delta: the total delta.
    accountant_delta: delta minus overflow_delta, what epsilon is accounted at.
    overflow_delta: the truncated-Poisson cost.
    accountant: "pld" or "rdp".
  """

  noise_multiplier: float
  schedule: DPSchedule
  sample_rates: np.ndarray
  sample_rate: float | None
  capacity: int
  target_epsilon: float
  delta: float
  accountant_delta: float
  overflow_delta: float
  accountant: str

  def epsilon(self, rounds: int | None = None) -> float:
    """Epsilon spent by the smallest client after `rounds` rounds (default: all), at `accountant_delta`; the
    total delta is still `delta`."""
    schedule = self.schedule if rounds is None else self.schedule.after(rounds)
    return epsilon_spent(schedule, self.noise_multiplier, self.accountant_delta, self.accountant)


def _check_slots(sizes: np.ndarray, rates: np.ndarray, overflow_prob: float, private: bool) -> None:
  """Refuse a rate at which an add-one neighbour's batch overflows the slots more often than overflow_prob.

  Slots cannot outnumber the largest client's n examples (the padded rows), and the add-one neighbour of that
  client has n + 1: all n + 1 are sampled, which no capacity of n slots holds, with probability q^(n + 1) (the
  smaller clients' neighbours fit). The delta charged for overflow assumes at most overflow_prob per step.
  """
  largest = int(sizes.max())
  q = float(rates[np.argmax(sizes)])
  real = overflow_probability(largest + 1, q, largest)
  if real <= overflow_prob:
    return
  # q^(n + 1) <= overflow_prob  <=>  q <= overflow_prob^(1 / (n + 1)).
  ceiling = overflow_prob ** (1 / (largest + 1))
  if private:
    fix = f"lower sample_rate to at most {ceiling:.3g}"
  elif int(largest * ceiling) >= 1:
    fix = f"lower batch_size to at most {int(largest * ceiling)}"
  else:
    fix = "no batch size does at these client sizes: use larger clients (the runner: fewer num_clients)"
  raise ValueError(
    f"the largest client ({largest} examples) samples at the Poisson rate q = {q:.4g}: its add-one neighbour's "
    f"batch overflows the {largest} slots a batch can have (one per example row) with probability "
    f"q^{largest + 1} = {real:.3g} per step, above overflow_prob={overflow_prob:g}, so the delta charged for "
    f"overflow would not hold: {fix}, or raise overflow_prob (its cost in delta is checked against delta)."
  )


def plan_privacy(
  *,
  target_epsilon: float,
  delta: float,
  rounds: int,
  local_steps: int,
  batch_size: int,
  client_sizes: Any,
  clients_per_round: int,
  participation: str | None = None,
  overflow_prob: float = DEFAULT_OVERFLOW_PROB,
  accountant: str = DEFAULT_ACCOUNTANT,
  sample_rate: float | None = None,
) -> PrivacyPlan:
  """The privacy plan of R rounds of S local DP-SGD steps, K of N clients per round (module docstring).

  Args:
    target_epsilon: the epsilon the run may spend (for every client).
    delta: the total delta, overflow allowance included.
    rounds: R.
    local_steps: S, DP-SGD steps per round a client takes part in.
    batch_size: b, the expected batch size of a local step and the normaliser of its noisy sum; with public
      sizes the Poisson rate is q_k = b / n_k, so b <= min_k n_k.
    client_sizes: n_k [N], every client's number of examples (N = len(client_sizes), all clients, not only one
      round's).
    clients_per_round: K <= N, drawn uniformly each round: the only way client sampling enters the plan.
    participation: None ("sampled" when K < N, "worst_case" when K = N), or a model of `DPSchedule`.
    overflow_prob: per-step probability that a Poisson batch overflows its capacity (its delta cost is taken
      out of delta; 1e-12 costs a few slots and almost none of it).
    accountant: "pld" (default) or "rdp".
    sample_rate: None: client sizes public (q_k = b / n_k, weights n_k). A rate q in (0, 1]: client sizes
      private, every client samples each of its examples at q per local step and the sampled clients weigh the
      same; e.g. b over a public estimate of a client's size. q is never multiplied by K / N.

  Raises ValueError naming the argument when a client has fewer than batch_size examples (public sizes), when
  the largest client's add-one neighbour would overflow its slots more often than overflow_prob, when the
  overflow takes half of delta or more, or when no noise multiplier meets the target (`calibrate_noise`).
  """
  sizes = np.asarray(client_sizes)
  if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(sizes.dtype, np.integer) or sizes.min() < 1:
    raise ValueError(
      f"client_sizes {sizes.dtype}{list(sizes.shape)} (min {sizes.min() if sizes.size else None}): "
      "expected one integer >= 1 per client [N], every client's number of examples."
    )
  b = check_int("batch_size", batch_size, 1, what="the expected batch size")
  check_real(
    "overflow_prob",
    overflow_prob,
    0,
    1,
    lo_open=True,
    hi_open=True,
    what="the per-step overflow probability",
    hint=", e.g. 1e-12",
  )
  if sample_rate is None:
    smallest = int(sizes.min())
    if b > smallest:
      raise ValueError(
        f"batch_size={b} exceeds the smallest client's {smallest} examples, so its Poisson rate "
        "q = batch_size / n would exceed 1: lower batch_size, or leave out (merge) the clients with fewer "
        "examples (the runner: lower num_clients or raise data.min_client_size)."
      )
    rates = b / sizes.astype(np.float64)
  else:
    check_real(
      "sample_rate",
      sample_rate,
      0,
      1,
      lo_open=True,
      what="the public Poisson rate of private client sizes",
      hint=" (the rate within a client's local step; client sampling is clients_per_round / num_clients)",
    )
    rates = np.full(len(sizes), float(sample_rate))
  _check_slots(sizes, rates, overflow_prob, private=sample_rate is not None)
  schedule = DPSchedule.from_federation(
    sample_rate=float(rates.max()),
    local_steps=local_steps,
    rounds=rounds,
    clients_per_round=clients_per_round,
    num_clients=len(sizes),
    participation=participation,
  )
  _check_common(schedule, delta, accountant)
  check_real(
    "target_epsilon", target_epsilon, 0, lo_open=True, what="the privacy target", hint=" (the paper uses 1, 3, 6)"
  )
  overflow = overflow_delta(overflow_prob, schedule, target_epsilon)
  if overflow >= delta / 2:
    raise ValueError(
      f"overflow_prob={overflow_prob:g} costs delta {overflow:.3g} over {schedule.describe()}, at least half of "
      f"delta={delta:g}: lower overflow_prob (e.g. 1e-12)."
    )
  sigma = calibrate_noise(schedule, target_epsilon, delta - overflow, accountant)
  capacity = max(batch_capacity(int(n) + 1, float(q), overflow_prob) for n, q in set(zip(sizes, rates)))
  return PrivacyPlan(
    sigma,
    schedule,
    rates,
    None if sample_rate is None else float(sample_rate),
    capacity,
    target_epsilon,
    delta,
    delta - overflow,
    overflow,
    accountant,
  )
