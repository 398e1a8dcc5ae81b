"""A round's draw of clients and batches as one jitted function, with no `Config`: `round_sampler`.

Round t's clients are `sample_clients(round_key)` (K of N, uniform without replacement) and their batches
`fedask_jax.data.client_batches` from `data_key(round_key)` (Poisson under DP, uniform minibatches without).
Their weights depend on whether the clients' sizes n_k are public (docs/design.md, section 4.5): with public
sizes client k samples at q_k = batch_size / n_k and weighs n_k / sum_{j sampled} n_j (`client_weights`); with
private sizes every client samples at one public rate q and the sampled clients weigh the same, so nothing the
round computes from a client's examples depends on n_k. This is exactly what the runner draws
(`fedask_jax.runner.round_sampler` builds it from a config), so an experiment or a user's own loop that uses it
trains on the same batches as `fedask-jax train`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedask_jax.data.batching import Batch, ClientData, client_batches
from fedask_jax.simulation.round import client_weights, data_key, sample_clients

Array = jax.Array


def round_sampler(
  num_clients: int,
  clients_per_round: int,
  *,
  local_steps: int,
  batch_size: int,
  capacity: int,
  sampling: str = "poisson",
  sample_rate: float | None = None,
) -> Callable[[Array, ClientData], tuple[Array, Array, Batch]]:
  """`sample(round_key, client_data) -> (client_ids [K] int32, weights [K] float32, batches)`, jitted.

  batches: a `Batch` [K, S, capacity, L] (S = local_steps). Pure, so it also runs inside the caller's own jit or
  `lax.scan` over rounds. `client_data` is a `ClientData` [N, M, L] with client_sizes [N]: put it on the device
  once (`jax.device_put`); NumPy arrays work but are copied to the device at every call. The other arguments
  are as `sample_clients` and `client_batches` take them ("poisson" for DP-SGD, "uniform" without;
  `fedask_jax.privacy.plan_privacy` gives the capacity), and are checked when the first call traces it.

  sample_rate: None (client sizes public): client k samples at batch_size / n_k and weighs
    n_k / sum_{j sampled} n_j. A rate q in (0, 1] (client sizes private, `PrivacyPlan.sample_rate`): every
    client samples each example at q per local step and the K sampled clients weigh 1 each. q is the rate
    within a client; the client sampling K / N is `clients_per_round` / `num_clients`, never a factor of q.
  """

  @jax.jit
  def sample(round_key: Array, client_data: ClientData) -> tuple[Array, Array, Batch]:
    sizes = client_data.client_sizes
    if sizes.shape != (num_clients,):
      raise ValueError(
        f"client_data.client_sizes has shape {sizes.shape}: expected ({num_clients},), one size per "
        "client (num_clients)."
      )
    ids = sample_clients(round_key, num_clients, clients_per_round)
    batches = client_batches(
      data_key(round_key),
      client_data,
      ids,
      local_steps=local_steps,
      batch_size=batch_size,
      capacity=capacity,
      sampling=sampling,
      sample_rate=sample_rate,
    )
    weights = client_weights(jnp.asarray(sizes), ids) if sample_rate is None else jnp.ones(ids.shape, jnp.float32)
    return ids, weights, batches

  return sample
