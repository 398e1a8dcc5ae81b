"""Fixed-shape client batches for the compiled federated round (docs/design.md, sections 3.3 and 4.4).

All clients' encoded examples stay on device as one padded array `ClientData` [C, M, L] (C clients, M the
largest client's size, L the sequence length) with `client_sizes` [C]; rows >= client_sizes[c] are padding.
`client_batches` then draws, inside `jit`, the examples each sampled client uses at each local step:

- "poisson" (DP-SGD): at every local step each of client k's n_k examples joins independently with rate
  q_k = batch_size / n_k (docs/design.md, section 4.5), or with a public rate q that does not depend on n_k
  (`sample_rate`; the runner's privacy.client_sizes "private"), through
  `fedask_jax.privacy.sampling.poisson_sample`; the sampled examples fill a prefix of `capacity` slots and
  `example_mask` marks them (overflow handling and its cost in delta: that module's doc; `batch_capacity`
  chooses the capacity). A client with n_k < batch_size has q_k = 1 (every example at every step); DP
  accounting should use batch_size <= min_k n_k.
- "uniform" (non-private runs): a fixed-size minibatch of min(batch_size, n_k) distinct examples drawn
  uniformly without replacement at each step, independently across steps (no epochs).

Keys: client k's key is `fold_in(key, k)` with k its client id (not its position among the sampled), and
step s's key is `fold_in(client_key, s)` (docs/design.md, section 3.1), so a client's batches do not depend on which
other clients were sampled with it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedask_jax._checks import check_int
from fedask_jax.data.encoding import EncodedDataset
from fedask_jax.data.partition import Partition
from fedask_jax.privacy.sampling import poisson_sample

Array = jax.Array

SAMPLING = ("poisson", "uniform")


class ClientData(NamedTuple):
  """Every client's examples, padded to the largest client (rows >= client_sizes[c] are all-False masks).

  input_ids [C, M, L] int32; attention_mask [C, M, L] bool; loss_mask [C, M, L] bool;
  client_sizes [C] int32 (every entry >= 1).
  """

  input_ids: Array | np.ndarray
  attention_mask: Array | np.ndarray
  loss_mask: Array | np.ndarray
  client_sizes: Array | np.ndarray


class Batch(NamedTuple):
  """The local-training batches of K sampled clients over S local steps with B = capacity slots each.

  input_ids [K, S, B, L] int32; attention_mask [K, S, B, L] bool; loss_mask [K, S, B, L] bool, False in
  empty slots; example_mask [K, S, B] bool, True where the slot holds a sampled example. An empty slot holds
  the client's first example (so no attention row is fully masked) and must be ignored: it has no loss
  targets, and per-example gradients must be masked by example_mask before they are summed.
  """

  input_ids: Array
  attention_mask: Array
  loss_mask: Array
  example_mask: Array


def stack_clients(encoded: EncodedDataset, partition: Partition) -> ClientData:
  """Gathers each client's examples into padded host arrays [C, M, L] (M = the largest client's size).

  Returns numpy arrays; `jax.device_put` them (with a sharding over the client axis if wanted).
  """
  sizes = partition.sizes
  if sizes.size == 0 or sizes.min() < 1:
    raise ValueError(
      f"stack_clients: client sizes {sizes.tolist()[:20]} include an empty client; every client needs at "
      "least one example (Poisson sampling rate q = batch_size / n)."
    )
  for k, idx in enumerate(partition.client_indices):
    if idx.size and (idx.min() < 0 or idx.max() >= encoded.num_examples):
      raise ValueError(
        f"client {k} holds index {int(idx.max())} but the encoded dataset has {encoded.num_examples} "
        "examples: partition the same records that were encoded."
      )
  num_clients, max_size = len(sizes), int(sizes.max())
  # Padding rows point at example 0 but with all-False masks; they are never sampled.
  rows = np.zeros((num_clients, max_size), np.int64)
  valid = np.arange(max_size)[None, :] < sizes[:, None]
  for k, idx in enumerate(partition.client_indices):
    rows[k, : len(idx)] = idx
  return ClientData(
    input_ids=encoded.input_ids[rows],
    attention_mask=encoded.attention_mask[rows] & valid[..., None],
    loss_mask=encoded.loss_mask[rows] & valid[..., None],
    client_sizes=sizes.astype(np.int32),
  )


def client_batches(
  key: Array,
  client_data: ClientData,
  client_ids: Array,
  *,
  local_steps: int,
  batch_size: int,
  capacity: int,
  sampling: str = "poisson",
  sample_rate: float | None = None,
) -> Batch:
  """The batches of the sampled clients for one round (module doc); pure, jit- and vmap-safe.

  Args:
    key: the round's data key; the simulation passes `fedask_jax.simulation.data_key(round_key)` so that the
      batches and the DP noise of a step never share a key.
    client_data: `ClientData` [C, M, L], JAX or NumPy arrays (converted here once per call; under jit pass
      device arrays, which a NumPy argument of a jitted function becomes anyway).
    client_ids: [K] int ids of the sampled clients (may be traced).
    local_steps: S, static.
    batch_size: the expected ("poisson") or exact ("uniform") number of examples per step, static.
    capacity: B, the static number of slots per step (`fedask_jax.privacy.sampling.batch_capacity`);
      1 <= B <= M, and B >= batch_size for "uniform".
    sampling: "poisson" (DP) or "uniform" (non-private).
    sample_rate: "poisson" only: the rate q of every client, static; None (default): q_k = batch_size / n_k.

  Returns:
    A `Batch` with arrays [K, S, B, L] and example_mask [K, S, B].
  """
  if sampling not in SAMPLING:
    raise ValueError(f"sampling={sampling!r}: choose 'poisson' (DP-SGD) or 'uniform' (non-private).")
  for name, value in (("local_steps", local_steps), ("batch_size", batch_size), ("capacity", capacity)):
    check_int(name, value, 1, hint=" (it fixes a static shape)")
  max_size = client_data.input_ids.shape[1]
  if capacity > max_size:
    raise ValueError(
      f"capacity={capacity} exceeds the largest client's {max_size} examples: use capacity <= {max_size}."
    )
  if sample_rate is not None and (sampling != "poisson" or not 0 < sample_rate <= 1):
    raise ValueError(
      f"sample_rate={sample_rate!r} with sampling={sampling!r}: a Poisson rate in (0, 1], for "
      "sampling='poisson' only (None: batch_size / n_k per client)."
    )
  if sampling == "uniform" and capacity < batch_size:
    raise ValueError(
      f"capacity={capacity} < batch_size={batch_size}: uniform minibatches need capacity >= batch_size "
      "(capacity = batch_size wastes no slots)."
    )

  # NumPy arrays cannot be indexed by the traced client ids below.
  client_data = ClientData(*(jnp.asarray(x) for x in client_data))

  def sample_step(step_key: Array, num_examples: Array) -> tuple[Array, Array]:
    if sampling == "poisson":
      if sample_rate is not None:
        return poisson_sample(step_key, num_examples, sample_rate, capacity, max_examples=max_size)
      rate = jnp.minimum(batch_size / num_examples.astype(jnp.float32), 1.0)
      return poisson_sample(step_key, num_examples, rate, capacity, max_examples=max_size)
    # Rate 1 selects every example, and poisson_sample keeps a uniformly random subset of the selected ones
    # when they overflow the slots: batch_size slots give min(batch_size, n) distinct uniform examples.
    indices, mask = poisson_sample(step_key, num_examples, 1.0, batch_size, max_examples=max_size)
    pad = capacity - batch_size
    return jnp.pad(indices, (0, pad)), jnp.pad(mask, (0, pad))

  def one_client(client_id: Array) -> Batch:
    client_key = jax.random.fold_in(key, client_id)
    step_keys = jax.vmap(lambda s: jax.random.fold_in(client_key, s))(jnp.arange(local_steps))
    indices, mask = jax.vmap(sample_step, in_axes=(0, None))(step_keys, client_data.client_sizes[client_id])
    # Empty slots may point at padding rows; row 0 is always a real example of the client.
    indices = jnp.where(mask, indices, 0)
    take = lambda x: x[client_id, indices]  # [S, B, L]: one gather, without copying the client's [M, L] rows
    return Batch(
      input_ids=take(client_data.input_ids),
      attention_mask=take(client_data.attention_mask),
      loss_mask=take(client_data.loss_mask) & mask[..., None],
      example_mask=mask,
    )

  return jax.vmap(one_client)(jnp.asarray(client_ids, jnp.int32))


def shard_rows(inputs: Any, mesh: jax.sharding.Mesh) -> Any:
  """`inputs` (a pytree of leaves [K, ...]) with their rows split over the devices of a 1-D `mesh`, K a multiple
  of its size: the sampled clients of a round (`fedask_jax.simulation.FederatedRound`), a held-out batch
  (`fedask_jax.evaluation.evaluate`).

  With one process, `jax.device_put`. With several (`jax.distributed`), every process passes the same K rows
  (drawn with the same keys) and feeds only those that its own devices hold, through
  `jax.make_array_from_process_local_data`; leaves already laid out over every process's devices are taken as
  they are.
  """
  sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
  if jax.process_count() == 1:
    return jax.device_put(inputs, sharding)
  k = jax.tree.leaves(inputs)[0].shape[0]
  # This process's devices hold these slices of the K rows, in the order make_array_from_process_local_data
  # lays its local rows out.
  indices = sharding.addressable_devices_indices_map((k,)).values()
  # Every addressable device of a NamedSharding holds a slice of the rows (None only for devices it does not use).
  held = sorted(index[0].indices(k)[:2] for index in indices if index is not None)
  rows = np.concatenate([np.arange(start, stop) for start, stop in held])

  def place(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return jax.make_array_from_process_local_data(sharding, x[rows], (k,) + tuple(x.shape[1:]))

  return jax.tree.map(place, inputs)
