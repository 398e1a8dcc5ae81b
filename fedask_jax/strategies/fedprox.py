"""FedProx (Li et al., MLSys 2020) on LoRA factors: FedAvg whose clients minimise
`f_k(theta) + mu/2 ||theta - theta_global||^2` over the trained factors (both).

The proximal gradient `mu (theta - theta_global)` is added to the client's gradient at every local step.
Under DP it is added after clipping and noise: it depends on the client's data only through its already
privatised iterates, so it is post-processing and costs no privacy (and is not clipped).
"""

from __future__ import annotations

from typing import Any

import jax

from fedask_jax._checks import check_real
from fedask_jax.adapters import Adapters
from fedask_jax.strategies.base import Strategy, no_state, shared_start, train_both
from fedask_jax.strategies.fedavg import average_factors


def fedprox(mu: float = 0.01) -> Strategy:
  """FedProx with proximal weight `mu` >= 0 (mu = 0 is FedAvg); both factors trained, averaged separately."""
  check_real("fedprox mu", mu, 0, what="the proximal weight", hint=" (e.g. 0.01)")

  def proximal_gradient(context: Any, params: Adapters, start: Adapters) -> Adapters:
    del context
    return jax.tree.map(lambda x, x0: mu * (x - x0), params, start)

  return Strategy(
    name="fedprox",
    trained=train_both,
    init=no_state,
    client_start=shared_start,
    gradient_correction=proximal_gradient,
    server_update=average_factors,
  )
