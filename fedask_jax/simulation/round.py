"""The round: `client_update` mapped over the sampled clients (`map_clients`), then the `server_step`
(`round_step`, pure), and `FederatedRound`, which builds both for one model and compiles them.

Clients are mapped by `vmap`, in chunks of `client_chunk` clients with `lax.map(..., batch_size=...)` so that
hundreds fit in memory (results do not depend on the chunk size), the frozen base weights passed once,
unbatched. With more than one device the client axis is split over a 1-D `jax.sharding.Mesh` with axis
"clients" by `jax.shard_map` (the frozen state and the server state replicated): each device trains its clients
with no communication, and XLA adds the collectives that the server step needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fedask_jax import privacy
from fedask_jax._checks import check_int
from fedask_jax.adapters import Adapters, Trained, check_trained
from fedask_jax.data.batching import shard_rows
from fedask_jax.numerics import normalise_weights
from fedask_jax.simulation.client import (
  ClientMetrics,
  DPConfig,
  LocalTraining,
  causal_lm_example_loss,
  client_update,
  default_optimizer,
  local_training,
)
from fedask_jax.simulation.server import ServerState, server_step
from fedask_jax.strategies.base import ClientResult, Strategy

Array = jax.Array

SERVER_STREAM = 2**32 - 1
SAMPLING_STREAM = 2**32 - 2
DATA_STREAM = 2**32 - 3
CLIENT_AXIS = "clients"


def sample_clients(round_key: Array, num_clients: int, clients_per_round: int) -> Array:
  """K = clients_per_round distinct ids [K] int32, uniform without replacement, from `round_key`."""
  num_clients = check_int("num_clients", num_clients, 1)
  clients_per_round = check_int("clients_per_round", clients_per_round, 1)
  if clients_per_round > num_clients:
    raise ValueError(
      f"clients_per_round={clients_per_round} exceeds num_clients={num_clients}: sample at most {num_clients}."
    )
  if num_clients > DATA_STREAM:
    raise ValueError(f"num_clients={num_clients}: client ids must stay below {DATA_STREAM} (key streams).")
  key = jax.random.fold_in(round_key, SAMPLING_STREAM)
  return jax.random.choice(key, num_clients, (clients_per_round,), replace=False).astype(jnp.int32)


def client_weights(client_sizes: Array, client_ids: Array) -> Array:
  """w_k = n_k / sum_{j sampled} n_j [K] float32: sampled clients weighted by their number of examples."""
  return normalise_weights(jnp.asarray(client_sizes, jnp.float32)[client_ids])


def client_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all, every host's) with the "clients" axis, of Auto type so that the
  compiler shards the server step as it sees fit."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (CLIENT_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def data_key(round_key: Array) -> Array:
  """The key to draw round `round_key`'s client batches with (`fedask_jax.simulation`: key streams)."""
  return jax.random.fold_in(round_key, DATA_STREAM)


def server_key(round_key: Array) -> Array:
  """The server's key of round `round_key` (FedASK's Omega), `server_step`'s `key`."""
  return jax.random.fold_in(round_key, SERVER_STREAM)


def map_clients(
  training: LocalTraining,
  trained: Trained,
  state: ServerState,
  frozen_state: Any,
  batches: Any,
  client_ids: Array,
  round_key: Array,
  noise_multiplier: Array | None = None,
  *,
  client_chunk: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[ClientResult, ClientMetrics]:
  """`client_update` of every sampled client, keyed `fold_in(round_key, client_id)`: results and metrics with
  a leading [K] axis, vmapped in chunks of `client_chunk` (None: all), split over `mesh`'s devices."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(round_key, client_ids)

  def local(st, fr, bs, ids, ks):
    one = lambda xs: client_update(training, trained, st, fr, *xs, noise_multiplier=noise_multiplier)
    return jax.lax.map(one, (bs, ids, ks), batch_size=client_chunk or 0)

  if mesh is None or mesh.size == 1:
    return local(state, frozen_state, batches, client_ids, keys)
  # check_vma=False: the body has no collectives, and its scans start from replicated values (the global
  # adapters) that become per-device ones, which the varying-axes check would make us cast by hand.
  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P(), P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS)),
    out_specs=P(CLIENT_AXIS),
    check_vma=False,
  )
  return sharded(state, frozen_state, batches, client_ids, keys)


def round_step(
  training: LocalTraining,
  trained: Trained,
  state: ServerState,
  frozen_state: Any,
  batches: Any,
  client_ids: Array,
  weights: Array,
  round_key: Array,
  noise_multiplier: Array | None = None,
  *,
  client_chunk: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[ServerState, dict[str, Array]]:
  """One round (pure): `map_clients`, then `server_step` with `server_key(round_key)`.

  Returns the new state and the metrics: `server_step`'s, plus train_loss [] (the unweighted mean of the valid
  clients' losses), clipped_fraction [] (the fraction of the valid clients' real examples of the round whose
  gradient was clipped; NaN without any), client_loss [K], nonfinite_examples [K] and update_norm [K]
  (`ClientMetrics`).
  """
  results, client = map_clients(
    training,
    trained,
    state,
    frozen_state,
    batches,
    client_ids,
    round_key,
    noise_multiplier,
    client_chunk=client_chunk,
    mesh=mesh,
  )
  new_state, metrics = server_step(training.strategy, state, results, weights, client_ids, server_key(round_key))
  valid = metrics["client_valid"]
  # Over the valid clients only: 0 / 0 = NaN in a skipped round says there was no valid client to average.
  sum_valid = lambda x: jnp.sum(jnp.where(valid, x, 0))
  return new_state, dict(
    metrics,
    train_loss=sum_valid(client.loss) / jnp.sum(valid),
    client_loss=client.loss,
    update_norm=client.update_norm,
    nonfinite_examples=client.nonfinite_examples,
    clipped_fraction=sum_valid(client.clipped_examples) / sum_valid(client.examples),
  )


class FederatedRound:
  """A compiled federated round for one model, strategy and training configuration (`fedask_jax.simulation`).

  Build with the model (an `nnx.Module` adapted by `fedask_jax.lora.inject_lora`); it is split once
  into (graphdef, LoRA state, frozen state), and the frozen state is passed to every compiled round unbatched.
  `state = rnd.init(num_clients)`, then `state, metrics = rnd(state, batches, client_ids, weights, round_key,
  round_index)` per round; the previous state's buffers are donated (do not reuse it). Inside a program of your
  own (several rounds in one `jax.jit`, a `lax.scan` over rounds) use the pure `step` instead; `lower` and
  `compile` give the compiled round for inspection and timing.

  Args:
    model: the base model with LoRA adapters (its adapters are the initial global adapters).
    strategy: a `fedask_jax.strategies.Strategy`.
    optimizer: the local optax optimiser (default `default_optimizer()`), fresh state every round.
    dp: `DPConfig` for DP-SGD, or None for non-private training.
    per_example_loss: `(model, example) -> scalar`; default `causal_lm_example_loss`.
    client_chunk: clients trained at once per device (None: all K at once); results do not depend on it beyond
      float32 summation order, and it need not divide K (the last chunk holds the rest). It trades memory for
      parallelism: accelerators want large chunks (leave it None on a GPU), while on a CPU, compute-bound
      anyway, small chunks keep the working set in cache (the runner uses 4 there: `benchmarks/README.md`).
    mesh: a 1-D mesh with axis "clients" to shard the client axis over; default: all devices when there are
      several, none with one.

  Attributes:
    training: the `LocalTraining` of `client_update`.
    initial_adapters: the model's adapters.
    frozen_state: the model's non-LoRA state, replicated over the mesh.
  """

  def __init__(
    self,
    model: nnx.Module,
    strategy: Strategy,
    *,
    optimizer: optax.GradientTransformation | None = None,
    dp: DPConfig | None = None,
    per_example_loss: Callable[[nnx.Module, Any], Array] = causal_lm_example_loss,
    client_chunk: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
  ):
    if client_chunk is not None:
      check_int("client_chunk", client_chunk, 1, hint=" (or None: all clients at once)")
    self.strategy = strategy
    self.dp = dp
    self.client_chunk = client_chunk
    self.training, self.initial_adapters, frozen_state = local_training(
      model, strategy, optimizer if optimizer is not None else default_optimizer(), dp, per_example_loss
    )
    if mesh is None and jax.device_count() > 1:
      mesh = client_mesh()
    if mesh is not None and (mesh.axis_names != (CLIENT_AXIS,) or mesh.axis_types != (AxisType.Auto,)):
      raise ValueError(
        f"mesh with axes {mesh.axis_names} of types {mesh.axis_types}: expected a 1-D mesh with axis "
        f"{CLIENT_AXIS!r} of type Auto (the compiler places the server step's collectives); build it with "
        "fedask_jax.simulation.client_mesh()."
      )
    self.mesh = mesh
    if mesh is not None:
      frozen_state = jax.device_put(frozen_state, NamedSharding(mesh, P()))
    self.frozen_state = frozen_state
    self._compiled: dict[tuple[str, str], jax.stages.Wrapped] = {}

  def init(self, num_clients: int, adapters: Adapters | None = None) -> ServerState:
    """Server state for `num_clients` clients, from `adapters` (default: the model's initial adapters)."""
    num_clients = check_int("num_clients", num_clients, 1)
    # A copy: the first round donates the state's buffers, and the initial adapters must outlive it.
    adapters = jax.tree.map(jnp.copy, self.initial_adapters if adapters is None else adapters)
    state = ServerState(adapters, self.strategy.init(adapters, num_clients))
    if self.mesh is not None:
      state = jax.device_put(state, NamedSharding(self.mesh, P()))
    return state

  def trained(self, round_index: int | Array) -> Trained:
    """The strategy's trained factor(s) in round `round_index` (1-based), checked against the mechanism.

    `round_index` may be an int array, traced inside the caller's jit or scan, when the strategy's choice does
    not depend on it (every strategy but fedask-alt); a strategy that needs its value (fedask-alt's alternation)
    raises a ValueError saying how to scan it."""
    private = self.dp is not None
    if hasattr(round_index, "dtype") and (
      jnp.shape(round_index) != () or not jnp.issubdtype(round_index.dtype, jnp.integer)
    ):
      raise ValueError(
        f"round_index: {round_index.dtype}{list(jnp.shape(round_index))} array; expected an int "
        "scalar (the round's number t >= 1)."
      )
    if isinstance(round_index, jax.core.Tracer):
      try:
        # Why the ignore: strategies take an int t; a traced one is passed on purpose, to find out whether this
        # strategy's choice depends on t (it then fails to concretise, caught below).
        trained = self.strategy.trained(round_index, private)  # type: ignore[arg-type]
      except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        raise ValueError(
          f"strategy {self.strategy.name!r} chooses its trained factor from the round index, which is traced "
          "here, but the factor is static (one compiled round per choice). Pass a Python int: the round index "
          "only picks the factor, so any round with the same factor will do. To lax.scan fedask-alt, run two "
          "rounds per scan step, with round_index=1 (lora_b) and round_index=2 (lora_a), each with its own "
          "round key (README, 'Bring your own model')."
        ) from None
    else:
      round_index = check_int(
        "round_index",
        int(round_index) if hasattr(round_index, "dtype") else round_index,
        1,
        what="the round index (rounds are numbered from 1)",
      )
      trained = self.strategy.trained(round_index, private)
    check_trained(trained)
    if self.dp is not None and self.dp.mechanism == "w_space" and trained == "both":
      raise ValueError(
        f"dp.mechanism='w_space' needs a frozen factor, but strategy {self.strategy.name!r} trains both factors "
        f"in round {round_index}: use mechanism='b_space', or a strategy that freezes one (fedask, fedask-alt, "
        "ffa-lora)."
      )
    return trained

  def _jit(self, kind: str, trained: Trained) -> jax.stages.Wrapped:
    if (kind, trained) not in self._compiled:
      check_trained(trained)
      fn = round_step if kind == "round" else map_clients
      bound = functools.partial(fn, self.training, trained, client_chunk=self.client_chunk, mesh=self.mesh)
      self._compiled[kind, trained] = jax.jit(bound, donate_argnums=0 if kind == "round" else ())
    return self._compiled[kind, trained]

  def compiled(self, trained: Trained) -> jax.stages.Wrapped:
    """The jitted `round_step` for one trained-factor choice: (state, frozen_state, batches, client_ids, weights,
    round_key[, noise_multiplier]) -> (state, metrics); the state argument is donated. A noise multiplier passed
    as an array is traced (one compilation for every sigma); left out, `dp.noise_multiplier` is a constant."""
    return self._jit("round", trained)

  def _inputs(
    self, batches: Any, client_ids: Array, weights: Array | None, noise_multiplier: float | Array | None
  ) -> tuple[Any, ...]:
    """The round's per-client inputs, checked and placed on the mesh, and the noise override as an array."""
    if noise_multiplier is not None:
      if self.dp is None:
        raise ValueError(
          f"noise_multiplier={noise_multiplier!r} given to a round without DP: build it with dp=DPConfig(...)."
        )
      privacy.check_noise_multiplier(noise_multiplier)
      noise_multiplier = jnp.float32(noise_multiplier)
    if not hasattr(batches, "example_mask"):
      raise ValueError(
        f"batches of type {type(batches).__name__} have no example_mask: pass a fedask_jax.data.Batch (or a "
        "NamedTuple with the per-example fields and example_mask [K, local_steps, capacity])."
      )
    k = jnp.shape(client_ids)[0] if jnp.ndim(client_ids) == 1 else None
    if (
      k is None
      or any(jnp.shape(x)[0] != k for x in jax.tree.leaves(batches))
      or (weights is not None and jnp.shape(weights) != (k,))
    ):
      raise ValueError(
        f"client_ids {jnp.shape(client_ids)}, weights {None if weights is None else jnp.shape(weights)} and batches "
        f"{[jnp.shape(x) for x in jax.tree.leaves(batches)]}: expected ids [K], weights [K] and batch leaves "
        "[K, local_steps, capacity, ...] for the same K."
      )
    if self.mesh is not None and self.mesh.size > 1:
      if k % self.mesh.size:
        raise ValueError(
          f"{k} clients per round cannot be split evenly over {self.mesh.size} devices: use a multiple of "
          f"{self.mesh.size} clients per round."
        )
      batches, client_ids, weights = shard_rows((batches, client_ids, weights), self.mesh)
    return batches, client_ids, weights, () if noise_multiplier is None else (noise_multiplier,)

  def step(
    self,
    state: ServerState,
    batches: Any,
    client_ids: Array,
    weights: Array,
    round_key: Array,
    round_index: int | Array,
    *,
    noise_multiplier: float | Array | None = None,
    frozen_state: Any = None,
  ) -> tuple[ServerState, dict[str, Array]]:
    """The round as a pure function, for the caller's own `jax.jit` / `lax.scan` (arguments as `__call__`).

    Not jitted and nothing donated: it traces `round_step` into the caller's program, so R rounds can run as one
    compiled `lax.scan`. `round_index` (1-based) only picks the trained factor (`trained`): a traced int array
    is fine for strategies whose choice does not depend on it; fedask-alt needs a Python int (1 or 2 pick its
    factors; the round's randomness is all in `round_key`). `frozen_state` defaults to `self.frozen_state`,
    which a jitted caller then closes over and XLA embeds as a constant: for a large model pass
    `rnd.frozen_state` through an argument of your jitted function instead. `noise_multiplier` may be traced.
    """
    trained = self.trained(round_index)
    batches, client_ids, weights, noise = self._inputs(batches, client_ids, weights, noise_multiplier)
    return round_step(
      self.training,
      trained,
      state,
      self.frozen_state if frozen_state is None else frozen_state,
      batches,
      client_ids,
      weights,
      round_key,
      *noise,
      client_chunk=self.client_chunk,
      mesh=self.mesh,
    )

  def lower(
    self,
    state: ServerState,
    batches: Any,
    client_ids: Array,
    weights: Array,
    round_key: Array,
    round_index: int,
    *,
    noise_multiplier: float | None = None,
  ) -> jax.stages.Lowered:
    """The compiled round that `__call__` with these arguments runs, lowered (`jax.stages.Lowered`: `.as_text()`,
    `.cost_analysis()`, `.compile()`); nothing runs and nothing is donated."""
    trained = self.trained(round_index)
    batches, client_ids, weights, noise = self._inputs(batches, client_ids, weights, noise_multiplier)
    return self.compiled(trained).lower(state, self.frozen_state, batches, client_ids, weights, round_key, *noise)

  def compile(
    self,
    state: ServerState,
    batches: Any,
    client_ids: Array,
    weights: Array,
    round_key: Array,
    round_index: int,
    *,
    noise_multiplier: float | None = None,
  ) -> jax.stages.Compiled:
    """`lower(...).compile()`: time compilation apart from the run, read `.memory_analysis()` or
    `.cost_analysis()`. Calling the result runs the round with the explicit arguments of `compiled`."""
    return self.lower(
      state, batches, client_ids, weights, round_key, round_index, noise_multiplier=noise_multiplier
    ).compile()

  def client_results(
    self,
    state: ServerState,
    batches: Any,
    client_ids: Array,
    round_key: Array,
    round_index: int,
    *,
    noise_multiplier: float | None = None,
  ) -> tuple[ClientResult, ClientMetrics]:
    """The clients of round `round_index` without the server step (jitted, nothing donated): their
    `ClientResult` [K] and `ClientMetrics` [K], exactly as the round computes them (arguments as `__call__`)."""
    trained = self.trained(round_index)
    batches, client_ids, _, noise = self._inputs(batches, client_ids, None, noise_multiplier)
    return self._jit("clients", trained)(state, self.frozen_state, batches, client_ids, round_key, *noise)

  def __call__(
    self,
    state: ServerState,
    batches: Any,
    client_ids: Array,
    weights: Array,
    round_key: Array,
    round_index: int,
    *,
    noise_multiplier: float | None = None,
  ) -> tuple[ServerState, dict[str, Array]]:
    """Run round `round_index` (1-based) on the sampled clients.

    batches: leaves [K, S, capacity, ...] (`fedask_jax.data.Batch`); client_ids [K] int; weights [K]
    (`client_weights`; any scale, normalised by `server_step`); round_key: `fold_in(run_key, round_index)`.
    Returns the new state (the old one is donated) and the metrics of `round_step`.

    noise_multiplier: sigma for this round instead of `dp.noise_multiplier` (DP rounds only). It is an argument
    of the compiled round, not a constant of it, so a sweep over epsilon (over sigma) compiles once.
    """
    trained = self.trained(round_index)
    batches, client_ids, weights, noise = self._inputs(batches, client_ids, weights, noise_multiplier)
    return self.compiled(trained)(state, self.frozen_state, batches, client_ids, weights, round_key, *noise)
