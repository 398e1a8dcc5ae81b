"""The gradient canary: a tiny LoRA-adapted `fedask_jax.lora.Linear` whose canary example moves one coordinate
of the trained factor that no ordinary example touches, or that every ordinary example pushes the other way
(`linear_canary_problem`, `opposed`), with the real B-space and W-space DP gradients bound to it
(`CanaryProblem.mechanism`), and the exact epsilon of the opposed problem's release (`opposed_canary_epsilon`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from dp_accounting.pld import privacy_loss_distribution
from flax import nnx

from fedask_jax import privacy
from fedask_jax._checks import check_choice, check_int, check_real
from fedask_jax.auditing.release import CLIENT_SIZES, Mechanism
from fedask_jax.lora import Linear, LoRAConfig, split_lora

Array = jax.Array
SPACES = ("b_space", "w_space")


@dataclasses.dataclass(frozen=True)
class CanaryProblem:
  """A tiny LoRA-adapted linear layer with n ordinary examples and one gradient canary (`linear_canary_problem`).

  Layer: `fedask_jax.lora.Linear`, y = x @ kernel + s (x @ lora_a) @ lora_b, kernel W0 [in, out], lora_a
  [in, r] frozen, lora_b [r, out] trained (FedASK's local step), s = alpha / r; per-example loss
  0.5 ||y - target||^2 over one token.

  params: {"linear": lora_b [r, out]} (zeros, theta_0). frozen: lora_a [in, r]. kernel: W0 [in, out].
  scaling: s. data: {"x": [n + 1, 1, in], "target": [n + 1, 1, out]}, the canary in the last row.
  direction: {"linear": [r, out]}, u = e_{r-1} e_{out-1}^T, the canary's update direction.
  num_examples: n (without the canary).
  """

  params: dict[str, Array]
  frozen: Array
  kernel: Array
  scaling: float
  data: dict[str, Array]
  direction: dict[str, Array]
  num_examples: int

  def _layer(self, wspace_probe: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    in_features, out_features = self.kernel.shape
    rank = self.frozen.shape[1]
    layer = Linear(in_features, out_features)
    layer.kernel = nnx.Param(self.kernel)
    layer.add_lora(LoRAConfig(rank=rank, alpha=self.scaling * rank, target_modules=("linear",)), jax.random.key(0))
    layer.lora_a = nnx.LoRAParam(self.frozen)
    layer.wspace_probe = wspace_probe
    return split_lora(layer)

  def mechanism(
    self, space: str, *, clip_norm: float, noise_multiplier: float, expected_batch_size: float
  ) -> Mechanism:
    """The DP gradient of lora_b through the real layer: "b_space" (`privacy.dp_gradient`) or "w_space"
    (`privacy.wspace_dp_gradient`, W-space probe of `Linear`), with C, sigma and q n bound."""
    check_choice("space", space, SPACES)
    graphdef, lora_state, rest = self._layer(space == "w_space")

    def model(b):
      flat = [(path, var.replace(b) if path[-1] == "lora_b" else var) for path, var in nnx.to_flat_state(lora_state)]
      return nnx.merge(graphdef, nnx.from_flat_state(flat), rest, copy=True)

    def loss(layer, example):
      return 0.5 * jnp.sum((layer(example["x"]) - example["target"]) ** 2)

    kwargs: dict[str, Any] = dict(
      clip_norm=clip_norm, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size
    )
    if space == "b_space":
      return functools.partial(privacy.dp_gradient, lambda p, example: loss(model(p["linear"]), example), **kwargs)

    def per_example_fn(p, perturbations, example):
      init = (
        None
        if perturbations is None
        else nnx.from_flat_state([(("lora_output",), nnx.Perturbation(perturbations["linear"]))])
      )
      value, sown = nnx.capture(loss, nnx.Intermediate, init=init)(model(p["linear"]), example)
      return value, {"linear": dict(nnx.to_flat_state(sown))[("lora_input",)].get_value()[0]}

    return functools.partial(
      privacy.wspace_dp_gradient, per_example_fn, frozen={"linear": self.frozen}, scaling=self.scaling, **kwargs
    )

  def canary_step(
    self, space: str, *, clip_norm: float, expected_batch_size: float, learning_rate: float = 1.0
  ) -> float:
    """m: how far a step that samples the canary moves lora_b along u, lr C / (q n) in B-space and s lr C / (q n)
    in W-space (its W-space gradient, clipped to C, maps to s C u; `linear_canary_problem`), while the canary's
    gradient is far above C and its direction u."""
    check_choice("space", space, SPACES)
    return (1.0 if space == "b_space" else self.scaling) * learning_rate * clip_norm / expected_batch_size


def linear_canary_problem(
  key: Array,
  *,
  num_examples: int = 15,
  in_features: int = 8,
  out_features: int = 4,
  rank: int = 2,
  alpha: float = 4.0,
  canary_gradient_norm: float = 100.0,
  opposed: bool = False,
) -> CanaryProblem:
  """Build a `CanaryProblem`: n Gaussian examples and a gradient canary that no other example can mask, or n
  copies of the canary's mirror image (`opposed`).

  lora_a = [Q | e_{in-1}] with Q [in, r-1] orthonormal and zero in the last input coordinate, so
  lora_a^T lora_a = I (the W-space noise s lora_a^T N is isotropic in lora_b, as the B-space noise is) and
  lora_b's last row is driven by input coordinate in-1 alone. Ordinary examples have x_{in-1} = 0 (their
  gradients never touch that row); the canary is x = e_{in-1}, target = canary_gradient_norm e_{out-1}, and
  W0's last row is 0, so at theta_0 its gradients are dl/dW = -canary_gradient_norm e_{in-1} e_{out-1}^T and
  dl/dlora_b = -s canary_gradient_norm u:
  norms canary_gradient_norm (W-space) and s canary_gradient_norm (B-space), to exceed C (clipped to exactly C)
  or, with clipping off, to show it. The target is so far away that u stays the gradient's direction over a
  few local steps.

  `opposed` True: every ordinary example is the canary's mirror image, x = e_{in-1} and target
  -canary_gradient_norm e_{out-1}, whose gradient clips to +C along u (s C u in W-space) against the canary's
  -C: the DP review's construction (issue 13). A Poisson rate that depends on the dataset's size (the runner's
  `privacy.client_sizes` "public") then moves the ordinary examples' sum along u too, in the canary's direction
  (`canary_scores` with client_sizes "public"); the exact epsilon of the release: `opposed_canary_epsilon`.
  """
  for name, value, minimum in [
    ("num_examples", num_examples, 1),
    ("in_features", in_features, 2),
    ("out_features", out_features, 1),
    ("rank", rank, 1),
  ]:
    check_int(name, value, minimum)
  if rank > min(in_features, out_features):
    raise ValueError(
      f"rank={rank} with in_features={in_features}, out_features={out_features}: need rank <= min(in, out)."
    )
  check_real("canary_gradient_norm", canary_gradient_norm, 0, lo_open=True, hint=" (>= C to be clipped to C)")
  keys = jax.random.split(key, 4)
  kernel = jax.random.normal(keys[0], (in_features, out_features)) / math.sqrt(in_features)
  kernel = kernel.at[-1].set(0.0)
  basis, _ = jnp.linalg.qr(jax.random.normal(keys[1], (in_features - 1, rank)))
  frozen = jnp.zeros((in_features, rank)).at[:-1, :-1].set(basis[:, :-1]).at[-1, -1].set(1.0)
  canary_x = jnp.zeros((1, 1, in_features)).at[..., -1].set(1.0)
  canary_target = jnp.zeros((1, 1, out_features)).at[..., -1].set(canary_gradient_norm)
  if opposed:
    x = jnp.broadcast_to(canary_x, (num_examples, 1, in_features))
    target = jnp.broadcast_to(-canary_target, (num_examples, 1, out_features))
  else:
    x = jax.random.normal(keys[2], (num_examples, 1, in_features)).at[..., -1].set(0.0)
    target = jax.random.normal(keys[3], (num_examples, 1, out_features))
  data = {"x": jnp.concatenate([x, canary_x]), "target": jnp.concatenate([target, canary_target])}
  params = {"linear": jnp.zeros((rank, out_features))}
  direction = {"linear": jnp.zeros((rank, out_features)).at[-1, -1].set(1.0)}
  return CanaryProblem(params, frozen, kernel, alpha / rank, data, direction, num_examples)


def opposed_canary_epsilon(
  num_examples: int,
  sample_rate: float,
  steps: int,
  noise_multiplier: float,
  delta: float,
  *,
  client_sizes: str = "public",
  resolution: float = 0.02,
) -> float:
  """The exact epsilon at `delta` of the released factor of an `opposed` `linear_canary_problem` with n examples
  against its add-one neighbour: what a final-model audit (`canary_scores`) can at most certify.

  Every clipped gradient lies along u (the ordinary ones +C, the canary's -C), the noise is isotropic and the
  normaliser b = q n is the same on both sides, so the release carries the pair through its u coordinate alone,
  lr / b times the sum over the T steps; in units of C (sigma' = sigma sqrt(T)):

      out (D,  n examples):      Bin(n T, q)               + N(0, sigma'^2)
      in  (D', n + 1 examples):  Bin(n T, q') - Bin(T, q') + N(0, sigma'^2),

  q' = q n / (n + 1) with `client_sizes` "public" (the runner's q_k = b / n_k), q' = q with "private". The pair
  is binned at `resolution` sigma' (binning is post-processing: the result converges to the pair's epsilon
  from below as the bins shrink; 0.02 agrees with 0.01 and 0.005 to 1e-3 in the settings of
  tests/test_auditing.py and experiments/privacy_audit.py) and
  its privacy loss distribution built in both directions with `dp_accounting` (pessimistic rounding of the
  losses at 1e-3). The whole transcript of T steps (each step's release) has at least this epsilon, and the
  accountant's claim for public sizes, at q, is below it whenever the audit can refute that claim.
  """
  check_int("num_examples", num_examples, 1)
  check_int("steps", steps, 1, what="the number of local DP steps T")
  check_real("sample_rate", sample_rate, 0, 1, lo_open=True, what="the Poisson rate q of D")
  check_real("noise_multiplier", noise_multiplier, 0, lo_open=True, what="sigma")
  check_real("delta", delta, 0, 1, lo_open=True, hi_open=True)
  check_real("resolution", resolution, 0, 0.5, lo_open=True, what="the bin width in units of sigma sqrt(T)")
  check_choice("client_sizes", client_sizes, CLIENT_SIZES)
  n, rate = num_examples, sample_rate
  in_rate = rate * n / (n + 1) if client_sizes == "public" else rate
  out_law = scipy.stats.binom(n * steps, rate).pmf(np.arange(n * steps + 1))
  # Bin(n T, q') - Bin(T, q') on the values -T .. n T.
  in_law = np.convolve(
    scipy.stats.binom(n * steps, in_rate).pmf(np.arange(n * steps + 1)),
    scipy.stats.binom(steps, in_rate).pmf(np.arange(steps + 1))[::-1],
  )
  scale = noise_multiplier * math.sqrt(steps)
  # +-14 sigma' beyond the atoms: the Gaussian tails left out weigh < 1e-44.
  edges = np.arange(-steps - 14 * scale, n * steps + 14 * scale + resolution * scale, resolution * scale)

  def binned(law: np.ndarray, lowest: int) -> np.ndarray:
    atoms = np.arange(lowest, lowest + len(law))
    keep = law > 1e-300
    cdf = scipy.stats.norm.cdf((edges[None, :] - atoms[keep, None]) / scale)
    return law[keep] @ np.diff(cdf, axis=1)

  out_mass, in_mass = binned(out_law, 0), binned(in_law, -steps)
  both = np.nonzero((out_mass > 1e-300) & (in_mass > 1e-300))[0]
  pld = privacy_loss_distribution.from_two_probability_mass_functions(
    {int(i): math.log(out_mass[i]) for i in both},
    {int(i): math.log(in_mass[i]) for i in both},
    value_discretization_interval=1e-3,
    symmetric=False,
  )
  return float(pld.get_epsilon_for_delta(delta))
