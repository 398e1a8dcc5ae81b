"""FedASK (NeurIPS 2025, arXiv 2507.09990; docs/design.md, section 1.3): local training of one factor under DP, and
exact aggregation of the clients' products by the two-stage randomized-SVD sketch (`fedask_jax.sketch`).

Round t: under DP, clients train lora_b only with lora_a frozen at the global value; without DP they train
both. The server draws one Gaussian Omega per layer from the round's server key (shared by all clients: in
deployment they derive it from the same seed), runs the two stages on the clients' factors and splits the rank-r
reconstruction into the new global (lora_a, lora_b) by the strategy's gauge (`fedask_jax.sketch.split_factors`):
the paper's balanced (Q U_r S_r^{1/2}, S_r^{1/2} V_r^T), or one that holds lora_a, the factor frozen under DP,
at its initial scale. With a shared frozen factor the aggregate has rank <= r and the
reconstruction is exact for any oversampling p >= 0 (Theorem 2); with both factors trained it is the best
rank-r approximation within the sketch's range (the paper recommends p = 2..4). The round's metrics carry the
exactness certificate `reconstruction_error`: max over layers of
||lora_a lora_b - sum_k w_k lora_a_k lora_b_k||_F / ||sum_k w_k lora_a_k lora_b_k||_F.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedask_jax import sketch
from fedask_jax._checks import check_choice, check_int
from fedask_jax.adapters import Adapters, Trained
from fedask_jax.strategies.base import ClientResult, Strategy, no_state, shared_start

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
        f"build all adapters with the same LoRAConfig.rank.")
  return next(iter(ranks.values()))


def check_oversample(oversample: Any) -> int:
  """Raise ValueError unless the oversampling p is an integer >= 0."""
  return check_int("oversample", oversample, 0, what="the sketch oversampling p", hint=" (the paper uses 2..4)")


def check_gauge(gauge: Any) -> str:
  """Raise ValueError unless `gauge` names a reconstruction gauge (`fedask_jax.sketch.GAUGES`)."""
  return check_choice("gauge", gauge, sketch.GAUGES, what="the split of the reconstruction into factors")


def trained_factor(results: ClientResult) -> Trained:
  """The factor(s) the clients trained this round, read from the (static) structure of their mean gradients,
  which hold None for the frozen factor."""
  first = next(iter(results.mean_gradient.values()))
  return "lora_b" if first.lora_a is None else "lora_a" if first.lora_b is None else "both"


def sketch_server_update(oversample: int, certify: bool, gauge: str, fixed_next: Callable[[Trained], str]
                         ) -> Callable[..., tuple[Adapters, Any, dict[str, Array]]]:
  """The server step of FedASK: two-stage sketch with width r + p, Omega from the round's server key, split by
  `gauge`. `fixed_next(trained this round)` names the factor the next round freezes, whose scale a gauge other
  than balanced holds at the Frobenius norm of the factor frozen this round (lora_a when both were trained), so
  that scale stays the initial adapter's over a run."""

  def server_update(state: Any, global_adapters: Adapters, results: ClientResult, weights: Array,
                    client_ids: Array, key: Array) -> tuple[Adapters, Any, dict[str, Array]]:
    del client_ids
    rank = adapter_rank(global_adapters)
    omegas = sketch.make_omegas(key, global_adapters, rank + oversample)
    trained = trained_factor(results)
    frozen = "lora_a" if trained != "lora_a" else "lora_b"
    scales = {name: jnp.linalg.norm(getattr(f, frozen).astype(jnp.float32)) for name, f in global_adapters.items()}
    new = sketch.aggregate_adapters(results.adapters, weights, omegas, rank, gauge, scales, fixed_next(trained))
    metrics = {}
    if certify:
      _, metrics["reconstruction_error"] = sketch.adapters_reconstruction_error(results.adapters, weights, new)
    return new, state, metrics

  return server_update


def fedask(oversample: int = 2, certify: bool = True, gauge: str = "balanced") -> Strategy:
  """FedASK with sketch oversampling p = `oversample`; `certify` adds the exactness certificate to the metrics
  (one QR of [in, r + K r] per layer: switch it off for very many clients if it shows in the round time);
  `gauge` splits the reconstruction (`fedask_jax.sketch.split_factors`: "balanced" is the paper's), holding
  lora_a, the factor frozen under DP, at its initial scale for the other gauges."""
  return Strategy(name="fedask", trained=train_lora_b_if_private, init=no_state, client_start=shared_start,
                  gradient_correction=None,
                  server_update=sketch_server_update(check_oversample(oversample), certify, check_gauge(gauge),
                                                     lambda trained: "lora_a"))
