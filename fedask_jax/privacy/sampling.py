"""Poisson sampling of a client's examples as a mask over a fixed-capacity batch (docs/design.md, sections 3.3 and 4.4).

DP-SGD's amplification by sampling (the accounting in `fedask_jax.privacy.accounting`) assumes Poisson sampling:
each of the client's n examples joins a step's batch independently with probability q (docs/design.md, section 4.5:
q = batch_size / n, so the expected batch size q n = batch_size). The realised batch size is Binomial(n, q), but a
compiled round needs static shapes, so a step holds `capacity` slots: the sampled examples fill a prefix of the
slots and a bool mask marks them.

Overflow. When more than `capacity` examples are sampled (probability `overflow_probability(n, q, capacity)`,
at most the `overflow_prob` that `batch_capacity` was asked for), a uniformly random subset of `capacity` of them
is kept: truncated Poisson sampling, `jax_privacy.batch_selection.CyclicPoissonSampling(truncated_batch_size=
capacity)`. What it means for the guarantee: under the natural coupling (same Bernoulli draws) the truncated
mechanism equals Poisson DP-SGD except on the overflow events; over a run their union has probability
eta <= m * overflow_prob (m: the steps that may use the client's data, R S, weighted by the probability q_c that
a round includes the client under uniform client sampling), the total variation distance between the two
mechanisms' outputs is <= eta, and so an (epsilon, delta) guarantee accounted for Poisson DP-SGD becomes
(epsilon, delta + (1 + e^epsilon) eta) for the truncated one (`fedask_jax.privacy.accounting.overflow_delta`).
Under add/remove neighbours take the overflow probability at n + 1 examples. So pick `overflow_prob` from the
delta budget, not the other way round: a per-step 1e-6 over 8000 steps at epsilon 3 adds 0.17 to delta; 1e-12
keeps it below delta / 10 at delta 1e-5, for a few more slots (the binomial tail falls off fast: in the paper's
setting, n = 1500 and q = 0.004, the capacity goes from 21 to 30).
(`dp_accounting.TruncatedSubsampledGaussianDpEvent` accounts for truncation exactly, arXiv 2508.15089, but only
with the PLD accountant; the bound above serves both.)

Why not `jax_privacy.batch_selection`: its samplers are host-side NumPy iterators that yield variable-length
index arrays, which cannot run inside the compiled, vmapped round; the tests use its truncated Poisson
sampler as a reference for the law of the batch size.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import scipy.stats

from fedask_jax._checks import check_int, check_real

Array = jax.Array

#: The default per-step overflow probability of `batch_capacity`, `plan_privacy` and the config's
#: privacy.overflow_prob: over the paper's 8000 steps at epsilon 3 it costs (1 + e^3) 8000 1e-12 < 2e-7 of delta
#: (module docstring), for a few more slots than 1e-6 would take.
DEFAULT_OVERFLOW_PROB = 1e-12


def _check_rate(rate: Any) -> None:
  check_real(
    "rate",
    rate,
    0,
    1,
    lo_open=True,
    what="the Poisson sampling rate q",
    traced_ok=True,
    hint=" (q = batch_size / num_examples; use a batch size no larger than the client's dataset)",
  )


def overflow_probability(num_examples: int, rate: float, capacity: int) -> float:
  """P(Binomial(num_examples, rate) > capacity): the chance a Poisson batch does not fit `capacity` slots."""
  num_examples = check_int("num_examples", num_examples, 0)
  capacity = check_int("capacity", capacity, 0)
  _check_rate(rate)
  return float(scipy.stats.binom.sf(capacity, num_examples, rate))


def batch_capacity(num_examples: int, rate: float, overflow_prob: float = DEFAULT_OVERFLOW_PROB) -> int:
  """Smallest capacity c >= 1 with P(Binomial(num_examples, rate) > c) <= overflow_prob.

  Host-side (static shapes). For clients of different sizes sharing one compiled shape, take the maximum over
  clients. See the module docstring for what `overflow_prob` costs in delta.
  """
  num_examples = check_int("num_examples", num_examples, 1)
  _check_rate(rate)
  check_real(
    "overflow_prob",
    overflow_prob,
    0,
    1,
    lo_open=True,
    hi_open=True,
    what="the per-step overflow probability",
    hint=", e.g. 1e-12 (smaller costs a few more slots)",
  )
  sf = lambda c: scipy.stats.binom.sf(c, num_examples, rate)
  # isf inverts in floating point; step to the exact smallest c that meets the bound.
  c = int(min(max(scipy.stats.binom.isf(overflow_prob, num_examples, rate), 0), num_examples))
  while sf(c) > overflow_prob:
    c += 1
  while c > 0 and sf(c - 1) <= overflow_prob:
    c -= 1
  return max(c, 1)


def poisson_sample(
  key: Array,
  num_examples: int | Array,
  rate: float | Array,
  capacity: int,
  max_examples: int | None = None,
) -> tuple[Array, Array]:
  """Poisson-sample a batch of at most `capacity` of `num_examples` examples; jit- and vmap-safe.

  Each example i < num_examples is selected independently with probability `rate`. If more than `capacity`
  are selected, a uniformly random subset of `capacity` of them is kept (see the module docstring).

  Args:
    key: PRNG key (one per client and step: `fold_in`).
    num_examples: n, a Python int or a traced int scalar. Traced, it must not exceed the static
      `max_examples`: the client's data are padded to `max_examples` rows so that clients of different sizes
      share one compiled shape, and rows >= n are never selected.
    rate: q in (0, 1], Python float or traced scalar (e.g. batch_size / n per client).
    capacity: static number of slots, 1 <= capacity <= max_examples (`batch_capacity`).
    max_examples: static upper bound on n; defaults to `num_examples` when that is a Python int.

  Returns:
    (indices [capacity] int32, mask [capacity] bool). The selected examples fill a prefix of the slots in a
    uniformly random order; mask marks them. All indices are distinct and in [0, max_examples); those under
    the mask are in [0, num_examples), the others point at unselected rows and must be ignored.
  """
  if isinstance(num_examples, numbers.Integral):
    num_examples = check_int("num_examples", num_examples, 0)
    if max_examples is None:
      max_examples = num_examples
    elif num_examples > max_examples:
      raise ValueError(f"num_examples={num_examples} exceeds max_examples={max_examples}: raise max_examples.")
  elif max_examples is None:
    raise ValueError(
      "num_examples is a traced value, so the static shape needs max_examples: pass max_examples >= the "
      "largest client's number of examples (its data padded to that many rows)."
    )
  max_examples = check_int("max_examples", max_examples, 1)
  capacity = check_int("capacity", capacity, 1)
  if capacity > max_examples:
    raise ValueError(
      f"capacity={capacity} exceeds max_examples={max_examples}: a batch cannot hold more slots than there "
      f"are examples; use capacity <= {max_examples}."
    )
  _check_rate(rate)
  # One uniform u_i per example: i is selected iff u_i < q. Given the selected set, its u_i are i.i.d.
  # Uniform[0, q), so ordering by u is a uniformly random order of the selected examples: the `capacity`
  # smallest u are the selected examples (a uniform subset of them on overflow), followed by unselected ones.
  # float32 uniforms lie on a 2^-23 grid, so the realised rate is q rounded up to that grid (< 1.2e-7 above q,
  # a relative change in epsilon far below the accountant's own discretisation), and ties only bias which
  # examples survive an overflow.
  u = jax.random.uniform(key, (max_examples,), jnp.float32)
  u = jnp.where(jnp.arange(max_examples) < num_examples, u, 2.0)
  neg_u, indices = jax.lax.top_k(-u, capacity)
  return indices.astype(jnp.int32), -neg_u < rate
