"""One client's local training (`client_update`), written for one client; the round maps it over clients.

`client_update` starts from `strategy.client_start`, then runs `lax.scan` over the S local steps of: the
gradient of the trained factors (without DP the mean per-example loss over the real examples; with DP the
B-space or W-space DP-SGD gradient of `fedask_jax.privacy`), plus the strategy's `gradient_correction`
(FedProx, SCAFFOLD: added after privatisation, post-processing), then an optax step. The optimiser (AdamW by
default, lr 5e-4, no weight decay, as the paper's Hugging Face trainer) starts from a fresh state every round:
each round the official code builds a new trainer, and carrying Adam moments across rounds would be per-client
state the method does not have.

Keys: the client's key is `fold_in(round_key, client_id)`, its step s key `fold_in(client_key, s)`, from which
the DP noise (`fold_in(step_key, 0)`) and per-example dropout keys (`split(fold_in(step_key, 1), capacity)`)
derive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedask_jax import privacy
from fedask_jax._checks import check_choice, check_int
from fedask_jax.adapters import Adapters, LoRAFactors, Trained, combine, select
from fedask_jax.lora import LoRALayer, from_adapters, path_name, set_wspace_probe, split_lora, to_adapters
from fedask_jax.objectives import causal_lm_loss, response_loss, response_positions
from fedask_jax.simulation.server import ServerState
from fedask_jax.strategies.base import ClientResult, Strategy

Array = jax.Array

MECHANISMS = ("b_space", "w_space")


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """DP-SGD of the local steps (`fedask_jax.privacy`; privacy semantics: docs/design.md, section 4).

  Attributes:
    clip_norm: C > 0, per-example L2 clipping norm (the paper: 1.0).
    noise_multiplier: sigma >= 0 (noise std sigma C on the clipped sum; `privacy.calibrate_noise`).
    expected_batch_size: the normaliser of the noisy sum, a public constant: the runner passes the configured
      batch size, the expected batch q_k n_k of every client at the rate q_k = batch_size / n_k (public client
      sizes), or of a client of batch_size / q examples at a public rate q (private client sizes).
    mechanism: "b_space" (default: clip and noise the trained factor's gradient, as the official code) or
      "w_space" (clip and noise dl/dW, project by the frozen factor, the paper's formula; needs a frozen
      factor, so strategies that train both factors cannot use it).
  """

  clip_norm: float
  noise_multiplier: float
  expected_batch_size: float
  mechanism: str = "b_space"

  def __post_init__(self):
    privacy.check_dp_arguments(self.clip_norm, self.noise_multiplier, self.expected_batch_size, prefix="dp.")
    check_choice("dp.mechanism", self.mechanism, MECHANISMS)


class ClientMetrics(NamedTuple):
  """One client's round, over the real (sampled) examples of all its local steps: loss (their mean loss, 0
  without any; NaN when one is not finite), examples (their number, int32), clipped_examples (those whose
  gradient was clipped, int32; 0 without DP), nonfinite_examples (those whose loss or gradient norm is not
  finite, int32; under DP the clipping zeroes their gradients), update_norm (global L2 norm of final minus
  start adapters). A step whose Poisson batch is empty adds nothing to any of them."""

  loss: Array
  examples: Array
  clipped_examples: Array
  nonfinite_examples: Array
  update_norm: Array


def causal_lm_example_loss(model: nnx.Module, example: Any) -> Array:
  """Default per-example loss: next-token cross-entropy on the example's target tokens (the response).

  example: input_ids, attention_mask, loss_mask [L] (a `fedask_jax.data.Batch` without its leading axes).
  The model sees a batch of one, `model(input_ids [1, L], attention_mask [1, L]) -> logits [1, L, V]`.
  """
  ids = example.input_ids[None]
  logits = model(ids, example.attention_mask[None])
  return causal_lm_loss(logits, ids, example.loss_mask[None]).per_example[0]


def response_example_loss(capacity: int) -> Callable[[nnx.Module, Any], Array]:
  """`causal_lm_example_loss` with the LM head at the example's target positions only, at most `capacity` of
  them (static; at least `fedask_jax.objectives.max_targets` of the data): the same loss, with the head's FLOPs
  and the logits' memory proportional to `capacity` instead of the sequence length L."""
  capacity = check_int("capacity", capacity, 1, what="the response capacity (target positions per example)")

  def loss(model: nnx.Module, example: Any) -> Array:
    ids = example.input_ids[None]
    positions, weights = response_positions(example.loss_mask[None], capacity)
    logits = model(ids, example.attention_mask[None], logit_positions=positions)
    return response_loss(logits, ids, positions, weights).per_example[0]

  return loss


def default_optimizer() -> optax.GradientTransformation:
  """AdamW, lr 5e-4, betas (0.9, 0.999), eps 1e-8, no weight decay: the paper's local optimiser (Hugging Face's
  AdamW defaults; the paper's 3 warm-up steps are a schedule the caller can pass instead)."""
  return optax.adamw(5e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


@dataclasses.dataclass(frozen=True, eq=False)
class LocalTraining:
  """What a client's local training needs besides the state and its data, fixed for a run (static under jit).

  Attributes:
    strategy: the federated strategy (`client_start`, `gradient_correction`).
    optimizer: the local optax optimiser, fresh state every round.
    dp: DP-SGD of the local steps, or None.
    per_example_loss: `(model, example) -> scalar`.
    graphdef: the model's graph, split once (`fedask_jax.lora.split_lora`).
    lora_template: a LoRA state of the model, the template `from_adapters` fills.
    layer_paths: {adapted layer name: its module path}, the keys under which `nnx.capture` reports the W-space
      probes.
    scalings: {adapted layer name: s = alpha / r}.
    has_dropout: whether the frozen state holds RNG streams (LoRA dropout) to key per example.
  """

  strategy: Strategy
  optimizer: optax.GradientTransformation
  dp: DPConfig | None
  per_example_loss: Callable[[nnx.Module, Any], Array]
  graphdef: nnx.GraphDef
  lora_template: nnx.State
  layer_paths: dict[str, tuple[Any, ...]]
  scalings: dict[str, float]
  has_dropout: bool


def local_training(
  model: nnx.Module,
  strategy: Strategy,
  optimizer: optax.GradientTransformation,
  dp: DPConfig | None,
  per_example_loss: Callable[[nnx.Module, Any], Array],
) -> tuple[LocalTraining, Adapters, nnx.State]:
  """Split `model` (adapted layers: `fedask_jax.lora.lora_layers`) once: (its `LocalTraining`, its adapters, its
  frozen (non-LoRA) state)."""
  layers = [
    (path_name(p), tuple(p), m.scaling)
    for p, m in nnx.iter_modules(model)
    if isinstance(m, LoRALayer) and m.lora_a is not None
  ]
  if not layers:
    raise ValueError("the model has no LoRA adapters: call fedask_jax.lora.inject_lora (or load it with lora=...).")
  # The probe is a static attribute: the graphdef keeps it, and the caller's model gets it switched off
  # again (outside nnx.capture a probing layer would sow attributes into the model).
  set_wspace_probe(model, dp is not None and dp.mechanism == "w_space")
  graphdef, lora_state, frozen_state = split_lora(model)
  set_wspace_probe(model, False)
  training = LocalTraining(
    strategy=strategy,
    optimizer=optimizer,
    dp=dp,
    per_example_loss=per_example_loss,
    graphdef=graphdef,
    lora_template=lora_state,
    layer_paths={name: path for name, path, _ in layers},
    scalings={name: float(scaling) for name, _, scaling in layers},
    has_dropout=any(isinstance(var, nnx.RngKey) for _, var in nnx.to_flat_state(frozen_state)),
  )
  return training, to_adapters(lora_state), frozen_state


def _local_model(
  training: LocalTraining, subset: Adapters, start: Adapters, frozen_state: Any, dropout_key: Array
) -> nnx.Module:
  """The model with the trained `subset` and the rest of `start` as adapters, its RNG streams (LoRA dropout)
  keyed by `dropout_key`."""
  lora_state = from_adapters(training.lora_template, combine(subset, start))
  if training.has_dropout:
    # A fresh key per dropout stream, fold_in(dropout_key, index): the stored keys would give every example,
    # step and client the same masks.
    flat = nnx.to_flat_state(frozen_state)
    frozen_state = nnx.from_flat_state(
      [
        (path, var.replace(jax.random.fold_in(dropout_key, i)) if isinstance(var, nnx.RngKey) else var)
        for i, (path, var) in enumerate(flat)
      ]
    )
  # copy: fresh Variables of this trace, which a dropout stream may mutate (it counts its calls).
  return nnx.merge(training.graphdef, lora_state, frozen_state, copy=True)


def _gradient(
  training: LocalTraining,
  trained: Trained,
  params: Adapters,
  start: Adapters,
  frozen_state: Any,
  batch: Any,
  key: Array,
  noise_multiplier: Array | None = None,
) -> tuple[Adapters, privacy.DPStats]:
  """(gradient of the trained subset `params`, its `DPStats`: without DP nothing is clipped) on one step's batch
  [capacity]; `noise_multiplier` (traced) overrides `dp.noise_multiplier`."""
  capacity = batch.example_mask.shape[0]
  examples = (batch, jax.random.split(jax.random.fold_in(key, 1), capacity))
  noise_key = jax.random.fold_in(key, 0)

  def example_loss(subset, example):
    one, dropout_key = example
    return training.per_example_loss(_local_model(training, subset, start, frozen_state, dropout_key), one)

  dp = training.dp
  if dp is None:
    mask = batch.example_mask

    def mean_loss(subset):
      losses = jax.vmap(example_loss, in_axes=(None, 0))(subset, examples)
      return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1), losses

    (loss, losses), grad = jax.value_and_grad(mean_loss, has_aux=True)(params)
    zero = jnp.zeros((), jnp.int32)
    nonfinite = jnp.sum(mask & ~jnp.isfinite(losses), dtype=jnp.int32)
    return grad, privacy.DPStats(loss, jnp.zeros((), jnp.float32), jnp.sum(mask, dtype=jnp.int32), zero, nonfinite)
  sigma = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
  kwargs: dict[str, Any] = dict(
    clip_norm=dp.clip_norm, noise_multiplier=sigma, expected_batch_size=dp.expected_batch_size
  )
  if dp.mechanism == "b_space":
    return privacy.dp_gradient(example_loss, params, examples, batch.example_mask, noise_key, **kwargs)
  frozen_side = "lora_a" if trained == "lora_b" else "lora_b"
  as_subset = lambda factors: {
    n: LoRAFactors(x, None) if trained == "lora_a" else LoRAFactors(None, x) for n, x in factors.items()
  }

  def per_example_fn(factors, perturbations, example):
    one, dropout_key = example
    model = _local_model(training, as_subset(factors), start, frozen_state, dropout_key)
    init = (
      None
      if perturbations is None
      else nnx.from_flat_state(
        [(training.layer_paths[n] + ("lora_output",), nnx.Perturbation(x)) for n, x in perturbations.items()]
      )
    )
    loss, sown = nnx.capture(training.per_example_loss, nnx.Intermediate, init=init)(model, one)
    flat = dict(nnx.to_flat_state(sown))
    inputs = {n: flat[path + ("lora_input",)].get_value() for n, path in training.layer_paths.items()}
    reused = sorted(n for n, calls in inputs.items() if len(calls) != 1)
    if reused:
      raise ValueError(
        f"adapted layers {reused} ran more than once per example: the W-space mechanism needs one input per "
        "layer (dl/dW = h^T G); use mechanism='b_space' for models that reuse a layer."
      )
    return loss, {n: calls[0] for n, calls in inputs.items()}

  grad, stats = privacy.wspace_dp_gradient(
    per_example_fn,
    {n: getattr(f, trained) for n, f in params.items()},
    examples,
    batch.example_mask,
    noise_key,
    frozen={n: getattr(f, frozen_side) for n, f in start.items()},
    scaling=training.scalings,
    frozen_side=frozen_side,
    **kwargs,
  )
  return as_subset(grad), stats


def client_update(
  training: LocalTraining,
  trained: Trained,
  state: ServerState,
  frozen_state: Any,
  batch: Any,
  client_id: Array,
  key: Array,
  noise_multiplier: Array | None = None,
) -> tuple[ClientResult, ClientMetrics]:
  """Local training of one client (no client axis), the unit that the round maps over clients.

  `lax.scan` over the S local steps of `batch` (leaves [S, capacity, ...], with example_mask [S, capacity])
  from `strategy.client_start(state.strategy_state, state.adapters, client_id)`, training the `trained`
  factor(s) only; `frozen_state` is the model's non-LoRA state (`FederatedRound.frozen_state`); `key` is
  fold_in(round_key, client_id); `noise_multiplier`, when given (a traced scalar), replaces
  `dp.noise_multiplier`. Returns the client's `ClientResult` and `ClientMetrics`.
  """
  start, context = training.strategy.client_start(state.strategy_state, state.adapters, client_id)
  params0 = select(start, trained)
  correction = training.strategy.gradient_correction
  optimizer = training.optimizer
  num_steps = batch.example_mask.shape[0]

  def step(carry, xs):
    params, opt_state, grad_sum = carry
    step_batch, index = xs
    grad, stats = _gradient(
      training, trained, params, start, frozen_state, step_batch, jax.random.fold_in(key, index), noise_multiplier
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, grad)
    if correction is not None:
      grad = jax.tree.map(jnp.add, grad, correction(context, params, params0))
    updates, opt_state = optimizer.update(grad, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, grad_sum), stats

  carry = (params0, optimizer.init(params0), jax.tree.map(jnp.zeros_like, params0))
  (params, _, grad_sum), stats = jax.lax.scan(step, carry, (batch, jnp.arange(num_steps)))
  result = ClientResult(combine(params, start), jax.tree.map(lambda g: g / num_steps, grad_sum))
  update_norm = optax.global_norm(jax.tree.map(jnp.subtract, params, params0))
  examples = jnp.sum(stats.num_examples)
  # Each step's mean loss times its count is its sum: the mean over the round's real examples, not over steps
  # (a step with an empty Poisson batch would count as loss 0).
  loss = jnp.sum(stats.loss * stats.num_examples) / jnp.maximum(examples, 1)
  return result, ClientMetrics(loss, examples, jnp.sum(stats.num_clipped), jnp.sum(stats.num_nonfinite), update_norm)
