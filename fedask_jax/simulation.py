"""One compiled federated round: sampled clients' local (DP-)training, vmapped, and the strategy's aggregation,
all under one `jax.jit` (design.md section 2, layer 3).

Notation: `Adapters` = {dotted module path: LoRAFactors(a, b)}, a = lora_a [in, r] (the sketch's left, the
paper's A^T), b = lora_b [r, out] (right, the paper's B^T). K clients are sampled per round out of N, each runs
S = local_steps steps on batches of `capacity` slots of L tokens.

Round t (1-based) of `FederatedRound`:

1. The strategy names the trained factor(s), `strategy.trained(t, private)`: "a", "b" or "both". This is a
   static choice: each value gets its own compiled round (fedask-alt compiles two, for odd and even rounds),
   so a round computes, clips and noises gradients of the trained factors only. A traced switch would
   compute per-example gradients of both factors every round (twice the per-example gradient memory and
   FLOPs in B-space, and the W-space projection needs to know the frozen side), to save one compilation.
2. Local training, one client (`client_update`, written for one client; the round maps it): start from
   `strategy.client_start`, then `lax.scan` over the S local steps of: gradient of the trained factors
   (without DP the mean per-example loss over the real examples; with DP the B-space or W-space DP-SGD
   gradient of `fedask_jax.privacy`), plus the strategy's `gradient_correction` (FedProx, SCAFFOLD: added
   after privatisation, post-processing), then an optax step. The optimiser (AdamW by default, lr 5e-4, no
   weight decay, as the paper's Hugging Face trainer) starts from a fresh state every round: each round the
   official code builds a new trainer, and carrying Adam moments across rounds would be per-client state
   the method does not have.
3. The clients are mapped by `vmap` (in chunks of `client_chunk` clients with `lax.map(..., batch_size=...)`
   so hundreds fit in memory: results do not depend on the chunk size), the frozen base weights passed once,
   unbatched. With more than one device the client axis is split over a 1-D `jax.sharding.Mesh` with axis
   "clients" by `jax.shard_map` (the frozen state and the server state replicated): each device trains its
   clients with no communication, and XLA adds the collectives that the aggregation needs.
4. Faults, inside the same compiled function (no host round trip): client k is valid when every leaf of its
   result is finite (`finite_clients`). An invalid client (NaN or Inf, e.g. a diverged local run) gets weight 0,
   the valid clients' weights are renormalised to sum to 1, and its result is replaced by its start
   (`strategy.client_start`'s adapters and a zero mean gradient) with `jnp.where` before the strategy sees it,
   so that nothing non-finite enters a weighted sum (NaN * 0 is NaN) or the strategy's per-client state
   (FedSA-LoRA keeps that client's lora_b; SCAFFOLD keeps that client's control variate c_k, and so c, as if
   it had not been sampled). A round without a valid client returns the whole state (adapters and
   strategy state) unchanged, with metric `skipped` 1. Under DP a NaN example alone does not get this far:
   the clipping zeroes non-finite per-example gradients (jax_privacy's nan_safe), so its client stays valid.
5. The strategy aggregates (`strategy.aggregate`), and the round returns its metrics computed there: mean train
   loss and clipped fraction over the valid clients, per-client losses and update norms, `client_valid`,
   `invalid_clients`, `skipped`, and the strategy's own (FedASK: the exactness certificate
   `reconstruction_error`).

Keys (design.md section 3): client k's key is `fold_in(round_key, client_id)`, its step s key
`fold_in(client_key, s)`, from which the DP noise (`fold_in(step_key, 0)`) and per-example dropout keys
(`split(fold_in(step_key, 1), capacity)`) derive. The server's key (FedASK's Omega) is
`fold_in(round_key, SERVER_STREAM)`, client sampling uses `fold_in(round_key, SAMPLING_STREAM)`, and the
batches should be drawn with `data_key(round_key)` (= `fold_in(round_key, DATA_STREAM)`): reusing the round
key for `fedask_jax.data.client_batches` would make the Poisson sampling and the DP noise of a client's step
come from the same key. Client ids stay below these stream constants.

Several hosts (`jax.distributed`). The same code runs on a multi-host mesh:

    jax.distributed.initialize()                       # one process per host, before any other JAX call
    mesh = client_mesh()
    rnd = FederatedRound(model, strategy, mesh=mesh)  # every host loads the same base model
    ids = sample_clients(round_key, N, K)              # same ids on every host (same key)
    local = ...                                        # this host's K / process_count sampled clients' batches
    batches = jax.make_array_from_process_local_data(NamedSharding(mesh, P("clients")), local)
    state, metrics = rnd(state, batches, ids, weights, round_key, t)

each host feeding the rows of the clients whose devices it holds (the ids in the same order), K a multiple
of the device count.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fedask_jax import privacy
from fedask_jax.lora import (
    Adapters, LoRAFactors, Linear, from_adapters, path_name, set_wspace_probe, split_lora, to_adapters)
from fedask_jax.objectives import causal_lm_loss
from fedask_jax.strategies.base import ClientResult, Strategy, Trained, check_trained, combine, select

Array = jax.Array

MECHANISMS = ("b_space", "w_space")
SERVER_STREAM = 2**32 - 1
SAMPLING_STREAM = 2**32 - 2
DATA_STREAM = 2**32 - 3
CLIENT_AXIS = "clients"


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """DP-SGD of the local steps (`fedask_jax.privacy`; privacy semantics: design.md section 4).

  Attributes:
    clip_norm: C > 0, per-example L2 clipping norm (the paper: 1.0).
    noise_multiplier: sigma >= 0 (noise std sigma C on the clipped sum; `privacy.calibrate_noise`).
    expected_batch_size: q n, the normaliser of the noisy sum: the configured batch size, for clients with
      n_k >= batch size (Poisson rate q_k = batch_size / n_k).
    mechanism: "b_space" (default: clip and noise the trained factor's gradient, as the official code) or
      "w_space" (clip and noise dl/dW, project by the frozen factor, the paper's formula; needs a frozen
      factor, so strategies that train both factors cannot use it).
  """

  clip_norm: float
  noise_multiplier: float
  expected_batch_size: float
  mechanism: str = "b_space"

  def __post_init__(self):
    if not isinstance(self.clip_norm, numbers.Real) or not 0 < self.clip_norm < float("inf"):
      raise ValueError(f"dp.clip_norm={self.clip_norm!r}: the clipping norm C must be finite and > 0 (paper: 1.0).")
    if not isinstance(self.noise_multiplier, numbers.Real) or not 0 <= self.noise_multiplier < float("inf"):
      raise ValueError(
          f"dp.noise_multiplier={self.noise_multiplier!r}: sigma must be finite and >= 0 "
          "(fedask_jax.privacy.calibrate_noise finds it from epsilon).")
    if not isinstance(self.expected_batch_size, numbers.Real) or not self.expected_batch_size > 0:
      raise ValueError(
          f"dp.expected_batch_size={self.expected_batch_size!r}: q n must be > 0 (the configured batch size).")
    if self.mechanism not in MECHANISMS:
      raise ValueError(f"dp.mechanism={self.mechanism!r}: choose one of {MECHANISMS}.")


class ServerState(NamedTuple):
  """adapters: the global adapters; strategy_state: the strategy's state (per-client parts [N, ...])."""

  adapters: Adapters
  strategy_state: Any


class ClientMetrics(NamedTuple):
  """One client's round: loss (mean over local steps of the mean loss of the real examples), clipped_fraction
  (mean over steps of the fraction of real examples clipped; 0 without DP), update_norm (global L2 norm of
  final minus start adapters)."""

  loss: Array
  clipped_fraction: Array
  update_norm: Array


def causal_lm_example_loss(model: nnx.Module, example: Any) -> Array:
  """Default per-example loss: next-token cross-entropy on the example's target tokens (the response).

  example: input_ids, attention_mask, loss_mask [L] (a `fedask_jax.data.Batch` without its leading axes).
  The model sees a batch of one, `model(input_ids [1, L], attention_mask [1, L]) -> logits [1, L, V]`.
  """
  ids = example.input_ids[None]
  logits = model(ids, example.attention_mask[None])
  return causal_lm_loss(logits, ids, example.loss_mask[None]).per_example[0]


def default_optimizer() -> optax.GradientTransformation:
  """AdamW, lr 5e-4, betas (0.9, 0.999), eps 1e-8, no weight decay: the paper's local optimiser (Hugging Face's
  AdamW defaults; the paper's 3 warm-up steps are a schedule the caller can pass instead)."""
  return optax.adamw(5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def sample_clients(round_key: Array, num_clients: int, clients_per_round: int) -> Array:
  """K = clients_per_round distinct ids [K] int32, uniform without replacement, from `round_key`."""
  for name, value in (("num_clients", num_clients), ("clients_per_round", clients_per_round)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name}={value!r}: expected a Python integer >= 1.")
  if clients_per_round > num_clients:
    raise ValueError(
        f"clients_per_round={clients_per_round} exceeds num_clients={num_clients}: sample at most {num_clients}.")
  if num_clients > DATA_STREAM:
    raise ValueError(f"num_clients={num_clients}: client ids must stay below {DATA_STREAM} (key streams).")
  key = jax.random.fold_in(round_key, SAMPLING_STREAM)
  return jax.random.choice(key, num_clients, (clients_per_round,), replace=False).astype(jnp.int32)


def client_weights(client_sizes: Array, client_ids: Array) -> Array:
  """w_k = n_k / sum_{j sampled} n_j [K] float32: sampled clients weighted by their number of examples."""
  sizes = jnp.asarray(client_sizes, jnp.float32)[client_ids]
  return sizes / jnp.sum(sizes)


def client_mesh(devices: Any = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all, every host's) with the "clients" axis, of Auto type so that the
  compiler shards the aggregation as it sees fit."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (CLIENT_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def data_key(round_key: Array) -> Array:
  """The key to draw round `round_key`'s client batches with (module docstring: key streams)."""
  return jax.random.fold_in(round_key, DATA_STREAM)


def finite_clients(results: ClientResult) -> Array:
  """valid [K] bool: every entry of client k's result (its adapters and mean gradient, leaves [K, ...]) is
  finite (module docstring, step 4)."""
  finite = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(results)]
  return functools.reduce(jnp.logical_and, finite)


class FederatedRound:
  """A compiled federated round for one model, strategy and training configuration (module docstring).

  Build with the model (an `nnx.Module` whose adapted layers are `fedask_jax.lora.Linear`); it is split once
  into (graphdef, LoRA state, frozen state), and the frozen state is passed to every compiled round unbatched.
  `state = rnd.init(num_clients)`, then `state, metrics = rnd(state, batches, client_ids, weights, round_key,
  round_index)` per round; the previous state's buffers are donated (do not reuse it).

  Args:
    model: the base model with LoRA adapters (its adapters are the initial global adapters).
    strategy: a `fedask_jax.strategies.Strategy`.
    optimizer: the local optax optimiser (default `default_optimizer()`), fresh state every round.
    dp: `DPConfig` for DP-SGD, or None for non-private training.
    per_example_loss: `(model, example) -> scalar`; default `causal_lm_example_loss`.
    client_chunk: clients trained at once per device (None: all); results do not depend on it. It trades memory
      for parallelism: accelerators want large chunks, while on CPU, compute-bound anyway, small chunks keep the
      working set in cache (`benchmarks/round_speed.py`: on one CPU core, client_chunk=1 was the fastest).
    mesh: a 1-D mesh with axis "clients" to shard the client axis over; default: all devices when there are
      several, none with one.
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
    if client_chunk is not None and (not isinstance(client_chunk, int) or client_chunk < 1):
      raise ValueError(f"client_chunk={client_chunk!r}: expected None (all clients at once) or an int >= 1.")
    self.strategy = strategy
    self.optimizer = optimizer if optimizer is not None else default_optimizer()
    self.dp = dp
    self.per_example_loss = per_example_loss
    self.client_chunk = client_chunk
    wspace = dp is not None and dp.mechanism == "w_space"
    # Module paths are the keys under which nnx.capture reports the W-space probes.
    layers = [(path_name(p), tuple(p), m.scaling) for p, m in nnx.iter_modules(model)
              if isinstance(m, Linear) and m.lora_a is not None]
    self._paths = {name: path for name, path, _ in layers}
    self._scalings = {name: float(scaling) for name, _, scaling in layers}
    if not layers:
      raise ValueError("the model has no LoRA adapters: call fedask_jax.lora.inject_lora (or load it with lora=...).")
    # The probe is a static attribute: the graphdef keeps it, and the caller's model gets it switched off
    # again (outside nnx.capture a probing layer would sow attributes into the model).
    set_wspace_probe(model, wspace)
    self.graphdef, lora_state, frozen_state = split_lora(model)
    set_wspace_probe(model, False)
    self._lora_template = lora_state
    self.initial_adapters = to_adapters(lora_state)
    self._has_dropout = any(isinstance(var, nnx.RngKey) for _, var in nnx.to_flat_state(frozen_state))
    if mesh is None and jax.device_count() > 1:
      mesh = client_mesh()
    if mesh is not None and (mesh.axis_names != (CLIENT_AXIS,) or mesh.axis_types != (AxisType.Auto,)):
      raise ValueError(
          f"mesh with axes {mesh.axis_names} of types {mesh.axis_types}: expected a 1-D mesh with axis "
          f"{CLIENT_AXIS!r} of type Auto (the compiler places the aggregation's collectives); build it with "
          "fedask_jax.simulation.client_mesh().")
    self.mesh = mesh
    if mesh is not None:
      frozen_state = jax.device_put(frozen_state, NamedSharding(mesh, P()))
    self.frozen_state = frozen_state
    self._compiled: dict[str, Callable[..., Any]] = {}

  # ----- state -----

  def init(self, num_clients: int, adapters: Adapters | None = None) -> ServerState:
    """Server state for `num_clients` clients, from `adapters` (default: the model's initial adapters)."""
    if not isinstance(num_clients, int) or num_clients < 1:
      raise ValueError(f"num_clients={num_clients!r}: expected a Python int >= 1.")
    # A copy: the first round donates the state's buffers, and the initial adapters must outlive it.
    adapters = jax.tree.map(jnp.copy, self.initial_adapters if adapters is None else adapters)
    state = ServerState(adapters, self.strategy.init(adapters, num_clients))
    if self.mesh is not None:
      state = jax.device_put(state, NamedSharding(self.mesh, P()))
    return state

  def trained(self, round_index: int) -> Trained:
    """The strategy's trained factor(s) in round `round_index` (1-based), checked against the mechanism."""
    if not isinstance(round_index, int) or round_index < 1:
      raise ValueError(f"round_index={round_index!r}: rounds are numbered from 1 (a Python int).")
    trained = self.strategy.trained(round_index, self.dp is not None)
    check_trained(trained)
    if self.dp is not None and self.dp.mechanism == "w_space" and trained == "both":
      raise ValueError(
          f"dp.mechanism='w_space' needs a frozen factor, but strategy {self.strategy.name!r} trains both factors "
          f"in round {round_index}: use mechanism='b_space', or a strategy that freezes one (fedask, fedask-alt, "
          "ffa-lora).")
    return trained

  # ----- one client -----

  def _model(self, subset: Adapters, start: Adapters, frozen_state: Any, dropout_key: Array) -> nnx.Module:
    """The model with the trained `subset` and the rest of `start` as adapters, its RNG streams (LoRA
    dropout) keyed by `dropout_key`."""
    lora_state = from_adapters(self._lora_template, combine(subset, start))
    if self._has_dropout:
      # A fresh key per dropout stream, fold_in(dropout_key, index): the stored keys would give every example,
      # step and client the same masks.
      flat = nnx.to_flat_state(frozen_state)
      frozen_state = nnx.from_flat_state([
          (path, var.replace(jax.random.fold_in(dropout_key, i)) if isinstance(var, nnx.RngKey) else var)
          for i, (path, var) in enumerate(flat)])
    # copy: fresh Variables of this trace, which a dropout stream may mutate (it counts its calls).
    return nnx.merge(self.graphdef, lora_state, frozen_state, copy=True)

  def _gradient(self, trained: Trained, params: Adapters, start: Adapters, frozen_state: Any, batch: Any,
                key: Array, noise_multiplier: Array | None = None) -> tuple[Adapters, Array, Array]:
    """(gradient of the trained subset `params`, mean loss, clipped fraction) on one step's batch [capacity];
    `noise_multiplier` (traced) overrides `dp.noise_multiplier`."""
    capacity = batch.example_mask.shape[0]
    examples = (batch, jax.random.split(jax.random.fold_in(key, 1), capacity))
    noise_key = jax.random.fold_in(key, 0)

    def example_loss(subset, example):
      one, dropout_key = example
      return self.per_example_loss(self._model(subset, start, frozen_state, dropout_key), one)

    if self.dp is None:
      mask = batch.example_mask

      def mean_loss(subset):
        losses = jax.vmap(example_loss, in_axes=(None, 0))(subset, examples)
        return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

      loss, grad = jax.value_and_grad(mean_loss)(params)
      return grad, loss, jnp.zeros((), jnp.float32)
    dp = self.dp
    sigma = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    kwargs = dict(clip_norm=dp.clip_norm, noise_multiplier=sigma,
                  expected_batch_size=dp.expected_batch_size)
    if dp.mechanism == "b_space":
      grad, stats = privacy.dp_gradient(example_loss, params, examples, batch.example_mask, noise_key, **kwargs)
      return grad, stats.loss, stats.clipped_fraction
    frozen_side = "a" if trained == "b" else "b"
    as_subset = lambda factors: {
        n: LoRAFactors(x, None) if trained == "a" else LoRAFactors(None, x) for n, x in factors.items()}

    def per_example_fn(factors, perturbations, example):
      one, dropout_key = example
      model = self._model(as_subset(factors), start, frozen_state, dropout_key)
      init = None if perturbations is None else nnx.from_flat_state(
          [(self._paths[n] + ("lora_output",), nnx.Perturbation(x)) for n, x in perturbations.items()])
      loss, sown = nnx.capture(self.per_example_loss, nnx.Intermediate, init=init)(model, one)
      flat = dict(nnx.to_flat_state(sown))
      inputs = {n: flat[path + ("lora_input",)].get_value() for n, path in self._paths.items()}
      reused = sorted(n for n, calls in inputs.items() if len(calls) != 1)
      if reused:
        raise ValueError(
            f"adapted layers {reused} ran more than once per example: the W-space mechanism needs one input per "
            "layer (dl/dW = h^T G); use mechanism='b_space' for models that reuse a layer.")
      return loss, {n: calls[0] for n, calls in inputs.items()}

    grad, stats = privacy.wspace_dp_gradient(
        per_example_fn, {n: getattr(f, trained) for n, f in params.items()}, examples, batch.example_mask,
        noise_key, frozen={n: getattr(f, frozen_side) for n, f in start.items()}, scaling=self._scalings,
        frozen_side=frozen_side, **kwargs)
    return as_subset(grad), stats.loss, stats.clipped_fraction

  def client_update(self, trained: Trained, state: ServerState, frozen_state: Any, batch: Any, client_id: Array,
                    key: Array, noise_multiplier: Array | None = None) -> tuple[ClientResult, ClientMetrics]:
    """Local training of one client (no client axis), the unit that the round maps over clients.

    `lax.scan` over the S local steps of `batch` (leaves [S, capacity, ...], with example_mask [S, capacity])
    from `strategy.client_start(state.strategy_state, state.adapters, client_id)`, training the `trained`
    factor(s) only; `frozen_state` is the model's non-LoRA state (`self.frozen_state`); `key` is
    fold_in(round_key, client_id); `noise_multiplier`, when given (a traced scalar), replaces
    `dp.noise_multiplier`. Returns the client's `ClientResult` and `ClientMetrics`.
    """
    start, context = self.strategy.client_start(state.strategy_state, state.adapters, client_id)
    params0 = select(start, trained)
    correction = self.strategy.gradient_correction
    num_steps = batch.example_mask.shape[0]

    def step(carry, xs):
      params, opt_state, grad_sum = carry
      step_batch, index = xs
      grad, loss, clipped = self._gradient(
          trained, params, start, frozen_state, step_batch, jax.random.fold_in(key, index), noise_multiplier)
      grad_sum = jax.tree.map(jnp.add, grad_sum, grad)
      if correction is not None:
        grad = jax.tree.map(jnp.add, grad, correction(context, params, params0))
      updates, opt_state = self.optimizer.update(grad, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, grad_sum), (loss, clipped)

    carry = (params0, self.optimizer.init(params0), jax.tree.map(jnp.zeros_like, params0))
    (params, _, grad_sum), (losses, clipped) = jax.lax.scan(step, carry, (batch, jnp.arange(num_steps)))
    result = ClientResult(combine(params, start), jax.tree.map(lambda g: g / num_steps, grad_sum))
    update_norm = optax.global_norm(jax.tree.map(jnp.subtract, params, params0))
    return result, ClientMetrics(jnp.mean(losses), jnp.mean(clipped), update_norm)

  # ----- the round -----

  def _clients(self, trained: Trained, state: ServerState, frozen_state: Any, batches: Any, client_ids: Array,
               keys: Array, noise_multiplier: Array | None = None) -> tuple[ClientResult, ClientMetrics]:
    """`client_update` over the client axis [K]: vmapped in chunks, split over the mesh's devices."""
    def local(st, fr, bs, ids, ks):
      one = lambda xs: self.client_update(trained, st, fr, *xs, noise_multiplier=noise_multiplier)
      return jax.lax.map(one, (bs, ids, ks), batch_size=self.client_chunk or 0)

    if self.mesh is None or self.mesh.size == 1:
      return local(state, frozen_state, batches, client_ids, keys)
    # check_vma=False: the body has no collectives, and its scans start from replicated values (the global
    # adapters) that become per-device ones, which the varying-axes check would make us cast by hand.
    sharded = jax.shard_map(
        local, mesh=self.mesh, in_specs=(P(), P(), P(CLIENT_AXIS), P(CLIENT_AXIS), P(CLIENT_AXIS)),
        out_specs=P(CLIENT_AXIS), check_vma=False)
    return sharded(state, frozen_state, batches, client_ids, keys)

  def aggregate(self, state: ServerState, results: ClientResult, weights: Array, client_ids: Array,
                round_key: Array) -> tuple[ServerState, dict[str, Array]]:
    """The strategy's server step on the clients' results [K] (pure), leaving out the clients whose result is
    not finite (module docstring, step 4): weights w_k valid_k / sum_j w_j valid_j, invalid results replaced by
    the client's start, and the state returned unchanged when no client is valid.

    Returns (new state, metrics): the strategy's metrics plus client_valid [K] bool, invalid_clients [] int32
    and skipped [] int32 (1: no valid client, state unchanged; the strategy's metrics are then meaningless).
    """
    valid = finite_clients(results)
    weights = jnp.where(valid, jnp.asarray(weights, jnp.float32), 0.0)
    total = jnp.sum(weights)
    weights = weights / jnp.where(total > 0, total, 1.0)
    starts, _ = jax.vmap(self.strategy.client_start, in_axes=(None, None, 0))(
        state.strategy_state, state.adapters, client_ids)
    # A select, not a multiplication by valid_k: NaN * 0 is NaN.
    keep = lambda x, start: jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, start)
    results = ClientResult(jax.tree.map(keep, results.adapters, starts),
                           jax.tree.map(lambda g: keep(g, jnp.zeros_like(g)), results.mean_gradient))
    adapters, strategy_state, metrics = self.strategy.aggregate(
        state.strategy_state, state.adapters, results, weights, client_ids,
        jax.random.fold_in(round_key, SERVER_STREAM))
    adapters = jax.tree.map(lambda new, old: new.astype(old.dtype), adapters, state.adapters)
    skipped = ~jnp.any(valid)
    new_state = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), ServerState(adapters, strategy_state),
                             state)
    return new_state, dict(metrics, client_valid=valid, invalid_clients=jnp.sum(~valid, dtype=jnp.int32),
                           skipped=skipped.astype(jnp.int32))

  def _round(self, trained: Trained, state: ServerState, frozen_state: Any, batches: Any, client_ids: Array,
             weights: Array, round_key: Array, noise_multiplier: Array | None = None
             ) -> tuple[ServerState, dict[str, Array]]:
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(round_key, client_ids)
    results, client = self._clients(trained, state, frozen_state, batches, client_ids, keys, noise_multiplier)
    new_state, metrics = self.aggregate(state, results, weights, client_ids, round_key)
    valid = metrics["client_valid"]
    # Over the valid clients only: 0 / 0 = NaN in a skipped round says there was no valid client to average.
    mean_valid = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / jnp.sum(valid)
    metrics = dict(metrics, train_loss=mean_valid(client.loss), client_loss=client.loss,
                   update_norm=client.update_norm, clipped_fraction=mean_valid(client.clipped_fraction))
    return new_state, metrics

  def compiled(self, trained: Trained) -> Callable[..., tuple[ServerState, dict[str, Array]]]:
    """The jitted round for one trained-factor choice: (state, frozen_state, batches, client_ids, weights,
    round_key[, noise_multiplier]) -> (state, metrics); the state argument is donated. A noise multiplier passed
    as an array is traced (one compilation for every sigma); left out, `dp.noise_multiplier` is a constant."""
    if trained not in self._compiled:
      check_trained(trained)
      self._compiled[trained] = jax.jit(functools.partial(self._round, trained), donate_argnums=0)
    return self._compiled[trained]

  def __call__(self, state: ServerState, batches: Any, client_ids: Array, weights: Array, round_key: Array,
               round_index: int, *, noise_multiplier: float | None = None) -> tuple[ServerState, dict[str, Array]]:
    """Run round `round_index` (1-based) on the sampled clients.

    batches: leaves [K, S, capacity, ...] (`fedask_jax.data.Batch`); client_ids [K] int; weights [K]
    (`client_weights`; normalised inside); round_key: `fold_in(run_key, round_index)`. Returns the new
    state (the old one is donated) and the metrics: train_loss [] and clipped_fraction [] (unweighted means
    over the valid clients), client_loss [K], update_norm [K] (`ClientMetrics`), client_valid [K],
    invalid_clients [], skipped [] (`aggregate`), and the strategy's.

    noise_multiplier: sigma for this round instead of `dp.noise_multiplier` (DP rounds only). It is an argument
    of the compiled round, not a constant of it, so a sweep over epsilon (over sigma) compiles once.
    """
    trained = self.trained(round_index)
    if noise_multiplier is not None:
      if self.dp is None:
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} given to a round without DP: build it with dp=DPConfig(...).")
      if not isinstance(noise_multiplier, numbers.Real) or not 0 <= noise_multiplier < float("inf"):
        raise ValueError(f"noise_multiplier={noise_multiplier!r}: sigma must be a finite real >= 0.")
      noise_multiplier = jnp.float32(noise_multiplier)
    if not hasattr(batches, "example_mask"):
      raise ValueError(
          f"batches of type {type(batches).__name__} have no example_mask: pass a fedask_jax.data.Batch (or a "
          "NamedTuple with the per-example fields and example_mask [K, local_steps, capacity]).")
    k = jnp.shape(client_ids)[0] if jnp.ndim(client_ids) == 1 else None
    if k is None or any(jnp.shape(x)[0] != k for x in jax.tree.leaves(batches)) or jnp.shape(weights) != (k,):
      raise ValueError(
          f"client_ids {jnp.shape(client_ids)}, weights {jnp.shape(weights)} and batches "
          f"{[jnp.shape(x) for x in jax.tree.leaves(batches)]}: expected ids [K], weights [K] and batch leaves "
          "[K, local_steps, capacity, ...] for the same K.")
    if self.mesh is not None and self.mesh.size > 1:
      if k % self.mesh.size:
        raise ValueError(
            f"{k} clients per round cannot be split evenly over {self.mesh.size} devices: use a multiple of "
            f"{self.mesh.size} clients per round.")
      shard = NamedSharding(self.mesh, P(CLIENT_AXIS))
      batches, client_ids, weights = jax.device_put((batches, client_ids, weights), shard)
    args = (state, self.frozen_state, batches, client_ids, weights, round_key)
    return self.compiled(trained)(*args, *(() if noise_multiplier is None else (noise_multiplier,)))
