"""FedASK (NeurIPS 2025, arXiv 2507.09990; docs/design.md, section 1.3): local training of one factor under DP, and
exact aggregation of the clients' products by the two-stage randomized-SVD sketch (`fedask_jax.sketch`).

Round t: under DP, clients train lora_b only with lora_a frozen at the global value; without DP they train
both. The server draws one Gaussian Omega per layer from the round's server key (shared by all clients: in
deployment they derive it from the same seed), runs the two stages on the clients' factors and splits the rank-r
reconstruction into the new global (lora_a, lora_b) by the strategy's gauge (`fedask_jax.sketch.split_factors`):
the paper's balanced (Q U_r S_r^{1/2}, S_r^{1/2} V_r^T), or one that holds lora_a, the factor frozen under DP,
at its initial scale. With a shared frozen factor the aggregate has rank <= r and the
reconstruction is exact for any oversampling p >= 0 (Theorem 2); with both factors trained it is the best
rank-r approximation within the sketch's range (the paper recommends p = 2..4). Every `certify_every`-th
aggregation (the 1st, the (1 + N)-th, ...; 0: never) the round's metrics carry the exactness certificate
`reconstruction_error`: max over layers of ||lora_a lora_b - sum_k w_k lora_a_k lora_b_k||_F /
||sum_k w_k lora_a_k lora_b_k||_F, NaN in the other rounds. The strategy's state counts the aggregations so far.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedask_jax import sketch
from fedask_jax._checks import check_choice, check_int
from fedask_jax.adapters import Adapters, Trained
from fedask_jax.strategies.base import ClientResult, Strategy, shared_start

Array = jax.Array


def train_lora_b_if_private(round_index: int, private: bool) -> Trained:
  """Under DP lora_b only (lora_a frozen, no quadratic noise term); without DP both factors."""
  del round_index
  return "lora_b" if private else "both"


def adapter_rank(adapters: Adapters) -> int:
  """The common LoRA rank r of all layers (lora_a: [..., in, r]); ValueError when layers disagree."""
  ranks = {name: f.lora_a.shape[-1] for name, f in adapters.items()}
  if len(set(ranks.values())) != 1:
    raise ValueError(
      f"adapter ranks differ across layers ({ranks}): the sketch aggregation uses one static rank; "
      f"build all adapters with the same LoRAConfig.rank."
    )
  return next(iter(ranks.values()))


def check_oversample(oversample: Any) -> int:
  """Raise ValueError unless the oversampling p is an integer >= 0."""
  return check_int("oversample", oversample, 0, what="the sketch oversampling p", hint=" (the paper uses 2..4)")


#: The certificate's default period. Its cost is two QRs of [in, r + K r] per layer
#: (`fedask_jax.sketch.reconstruction_error`), which benchmarks/run.py measures (certificate_s,
#: certificate_over_round). On the 2-core CPU (2026-12-05, load ~25) one certificate took 0.037 s against a 3.8 s
#: quick-mode round (K = 8: 1.0%) and 0.22 s against a 33 s full-mode round (K = 16: 0.7%), about 5x the sketch
#: aggregation itself, whose share of an accelerator's round is far larger (benchmarks/gpu.md). Every 10th round
#: keeps the CPU cost near 0.1% and bounds the accelerator's to a tenth of a certified round's, while a run of
#: tens of rounds is still checked several times.
CERTIFY_EVERY = 10


def check_certify_every(certify_every: Any) -> int:
  """Raise ValueError unless the certificate's period is an integer >= 0 (0: never)."""
  return check_int(
    "certify_every", certify_every, 0, what="the certificate's period in rounds", hint=" (0: never, 1: every round)"
  )


def count_aggregations(adapters: Adapters, num_clients: int) -> Array:
  """`init` of the sketch strategies: the number of aggregations so far (int32 []), which schedules the
  certificate."""
  del adapters, num_clients
  return jnp.zeros((), jnp.int32)


def check_gauge(gauge: Any) -> str:
  """Raise ValueError unless `gauge` names a reconstruction gauge (`fedask_jax.sketch.GAUGES`)."""
  return check_choice("gauge", gauge, sketch.GAUGES, what="the split of the reconstruction into factors")


def trained_factor(results: ClientResult) -> Trained:
  """The factor(s) the clients trained this round, read from the (static) structure of their mean gradients,
  which hold None for the frozen factor."""
  first = next(iter(results.mean_gradient.values()))
  return "lora_b" if first.lora_a is None else "lora_a" if first.lora_b is None else "both"


def sketch_server_update(
  oversample: int, certify_every: int, gauge: str, fixed_next: Callable[[Trained], str]
) -> Callable[..., tuple[Adapters, Any, dict[str, Array]]]:
  """The server step of FedASK: two-stage sketch with width r + p, Omega from the round's server key, split by
  `gauge`, and the certificate in every `certify_every`-th aggregation (state: `count_aggregations`).
  `fixed_next(trained this round)` names the factor the next round freezes, whose scale a gauge other than
  balanced holds at the Frobenius norm of the factor frozen this round (lora_a when both were trained), so that
  scale stays the initial adapter's over a run."""

  def server_update(
    state: Array, global_adapters: Adapters, results: ClientResult, weights: Array, client_ids: Array, key: Array
  ) -> tuple[Adapters, Array, dict[str, Array]]:
    del client_ids
    rank = adapter_rank(global_adapters)
    omegas = sketch.make_omegas(key, global_adapters, rank + oversample)
    trained = trained_factor(results)
    frozen = "lora_a" if trained != "lora_a" else "lora_b"
    scales = {name: jnp.linalg.norm(getattr(f, frozen).astype(jnp.float32)) for name, f in global_adapters.items()}
    new = sketch.aggregate_adapters(results.adapters, weights, omegas, rank, gauge, scales, fixed_next(trained))
    metrics = {}
    if certify_every:
      certify = lambda: sketch.adapters_reconstruction_error(results.adapters, weights, new)[1]
      # A cond, not a select: the rounds without the certificate skip its QRs.
      skip = lambda: jnp.full((), jnp.nan, jax.eval_shape(certify).dtype)
      metrics["reconstruction_error"] = jax.lax.cond(state % certify_every == 0, certify, skip)
    return new, state + 1, metrics

  return server_update


def sketch_strategy(
  name: str,
  trained: Callable[[int, bool], Trained],
  oversample: Any,
  certify_every: Any,
  gauge: Any,
  fixed_next: Callable[[Trained], str],
) -> Strategy:
  """A strategy that aggregates by the sketch (FedASK and its variants), arguments checked."""
  return Strategy(
    name=name,
    trained=trained,
    init=count_aggregations,
    client_start=shared_start,
    gradient_correction=None,
    server_update=sketch_server_update(
      check_oversample(oversample), check_certify_every(certify_every), check_gauge(gauge), fixed_next
    ),
  )


def fedask(oversample: int = 2, certify_every: int = CERTIFY_EVERY, gauge: str = "balanced") -> Strategy:
  """FedASK with sketch oversampling p = `oversample`; the exactness certificate in the metrics of every
  `certify_every`-th round (module docstring; 0: never); `gauge` splits the reconstruction
  (`fedask_jax.sketch.split_factors`: "balanced" is the paper's), holding lora_a, the factor frozen under DP, at
  its initial scale for the other gauges."""
  return sketch_strategy("fedask", train_lora_b_if_private, oversample, certify_every, gauge, lambda trained: "lora_a")
