"""Noise law (the paper's Lemma 1): the DP noise power of one round's aggregated LoRA product against sigma.

    python experiments/noise_law.py --quick    # reduced setting (batch 8, 2 local steps, 96 tokens): ~10 min, 2 cores
    python experiments/noise_law.py            # the quickstart's setting (batch 32, 4 steps, 192 tokens): a GPU
    python experiments/noise_law.py --report   # rebuild the .md and .png from the .json (with --quick: *_quick)

Writes noise_law.md (tables and findings), noise_law.json (every number, the configs, the command, versions)
and noise_law.png (log-log plot) into --out (default experiments/results); --quick writes noise_law_quick.*.

Notation (docs/design.md, section 1.1): Flax layout, a = lora_a [in, r] (the paper's A^T), b = lora_b [r, out] (B^T),
scaling s = alpha / r; an adapted layer adds s x a b, so its product in W-space is s a b [in, out].

What is measured. One federated round of the quickstart config (experiments/configs/quickstart.yaml: the
embedded base model, GSM8K split IID over 4 clients, 2 sampled, B-space DP-SGD with clip C = 1) from the
initial adapters (PEFT's init: a random, b = 0), for three strategies on identical data (the same sampled
clients and Poisson batches): (a) fedavg, DP-SGD on both factors then each factor averaged; (b) fedask, lora_b
only, then the two-stage sketch aggregation; (c) ffa-lora, lora_b only, a fixed, b averaged. The round's global
product change is dW = sum over adapted layers of s (a' b' - a b) (a', b' the new global adapters), and its
noise is dW_noise(sigma) = dW(sigma) - dW(0) with the same round key: the batches, client keys and FedASK's
Omega are the same, only the noise's scale differs (sigma multiplies the same standard normal draw, so the
curves of one seed are smooth in sigma). Noise power P(sigma) = E ||dW_noise||_F^2 (summed over layers), E
over noise seeds j (round key fold_in(round key, j)); sigma goes to the compiled round as its traced
`noise_multiplier=` argument, so each strategy compiles once.

The law (docs/design.md, section 1.2: Lemma 1), for SGD with learning rate eta over S local steps, K clients with
weights w_k, noise N(0, sigma^2 C^2) on the clipped sum normalised by the expected batch B_e: each trained factor's
aggregated noise has i.i.d. entries of variance V = eta^2 S sum_k w_k^2 C^2 sigma^2 / B_e^2, and with noise-free
aggregated factors (a0, b0),

    (b), (c)  P = s^2 V sum_layers out ||a0||_F^2                                           (slope 2)
    (a)       P = s^2 V sum_layers (out ||a0||_F^2 + in ||b0||_F^2) + s^2 V^2 sum_layers in r out

The last term is the product of the two factors' noises (the paper's xi_B xi_A cross term): P ~ c2 sigma^2 +
c4 sigma^4, slope 2 below sigma* = sqrt(c2 / c4) and 4 above. (The gradients' own dependence on the noisy
factors is left out: it is bounded by the clipping and the measurement shows what it adds.) With PEFT's init
(||a0||_F^2 ~ r / 3, b0 = 0) this gives sigma*^2 ~ B_e^2 / (3 eta^2 S sum_k w_k^2 C^2 in): sigma* falls with
the learning rate and the width, which is how we carry the measurement over to the paper's scale. Adam
normalises each coordinate's step, so with AdamW (the paper's and the quickstart's optimiser) the noise power
saturates once the noise dominates the gradient: each entry of a factor then moves lr f(z_1..z_S), f the Adam
map of pure noise, E f^2 = kappa_S (Monte Carlo here), and the law's V becomes lr^2 kappa_S sum_k w_k^2,
independent of sigma.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import _common  # experiments/_common.py
import jax
import numpy as np
import scipy.optimize
import scipy.stats
from _common import plt

from fedask_jax import privacy, runner
from fedask_jax.adapters import Adapters
from fedask_jax.config import Config, load_config, to_dict

NAME = "noise_law"
STRATEGIES = ("fedavg", "fedask", "ffa-lora")
LABELS = {
  "fedavg": "(a) fedavg: DP on both factors",
  "fedask": "(b) fedask: B only, sketch",
  "ffa-lora": "(c) ffa-lora: B only, A fixed",
}
COLORS = {"fedavg": "tab:red", "fedask": "tab:blue", "ffa-lora": "tab:green"}
# Local learning rates. AdamW: the quickstart's. SGD: with clipped per-example gradients (||g|| <= C = 1) an SGD
# step at lr 1 is at most about 1 in norm, the order of an AdamW step at lr 1e-2 (lr sqrt(#entries) ~ 1.2 here);
# the measured noise-free update norms of both are in the results.
LEARNING_RATES = {"sgd": 1.0, "adamw": 1e-2}
ADAM_BETAS = (0.9, 0.999)  # fedask_jax.runner.make_optimizer's
OPTIMIZER_NAMES = {"sgd": "SGD", "adamw": "AdamW"}
SIGMAS = tuple(float(s) for s in np.logspace(-3, 3, 13))
# The slope regimes: the 4 smallest and the 4 largest sigmas of the grid (1.5 decades each); the results give
# their distance from the crossover sigma*.
SMALL, LARGE = SIGMAS[:4], SIGMAS[-4:]
EPSILONS = (1.0, 3.0, 6.0)
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Mode:
  """A run's size: config overrides on the quickstart, and per local optimiser the noise seeds and the sigmas
  (AdamW's curve is flat above sigma ~ 1, so the quick mode gives it every other sigma)."""

  name: str
  overrides: tuple[str, ...]
  seeds: dict[str, int]
  sigmas: dict[str, tuple[float, ...]]


MODES = {
  # 96 tokens keep the answer (the loss's targets) in 78% of the examples (64 tokens: 37%); client_chunk=1 is
  # the fastest on a CPU (benchmarks/round_speed.py) and does not change the results.
  "quick": Mode(
    "quick",
    ("batch_size=8", "local_steps=2", "data.max_seq_len=96", "client_chunk=1"),
    {"sgd": 3, "adamw": 2},
    {"sgd": SIGMAS, "adamw": SIGMAS[::2]},
  ),
  "full": Mode("full", (), {"sgd": 8, "adamw": 4}, {"sgd": SIGMAS, "adamw": SIGMAS}),
}

# The paper's setting (docs/design.md, section 1.7): dolly-15k (15,011 records) split over 10 clients,
# 2 per round, 10 local steps of batch 6, 800 rounds, delta 1e-5; LoRA r = 16 on q_proj / v_proj of Llama-2-7B
# (in = out = 4096) and -13B (5120); AdamW lr 5e-4.
PAPER = dict(
  dataset_size=15011,
  num_clients=10,
  clients_per_round=2,
  local_steps=10,
  batch_size=6,
  rounds=800,
  delta=1e-5,
  clip_norm=1.0,
  rank=16,
  lr=5e-4,
  widths={"Llama-2-7B": 4096, "Llama-2-13B": 5120},
)


# ---------------------------------------------------------------------------------------------------------------
# The measurement.


def experiment_config(
  strategy: str, optimizer: str, overrides: tuple[str, ...] = (), base: str | Path = _common.QUICKSTART
) -> Config:
  """The config of one sweep: `base` with the strategy, the local optimiser at LEARNING_RATES[optimizer], and
  `overrides`. Nothing is written to its run_dir (a temporary path that `runner.prepare` finds empty)."""
  run_dir = Path(tempfile.gettempdir()) / f"{NAME}_unused_run_dir"
  return load_config(
    base,
    [
      f"strategy={strategy}",
      f"optimizer.name={optimizer}",
      f"lr={LEARNING_RATES[optimizer]}",
      f"run_dir={run_dir}",
      *overrides,
    ],
  )


def layer_products(adapters: Adapters, scaling: float) -> dict[str, np.ndarray]:
  """{layer: s a b [..., in, out]} in float64 (a: lora_a [..., in, r], b: lora_b [..., r, out])."""
  return {
    name: scaling * np.einsum("...ir,...ro->...io", np.asarray(f.lora_a, np.float64), np.asarray(f.lora_b, np.float64))
    for name, f in adapters.items()
  }


class Sweep(NamedTuple):
  """One strategy's noise powers; factors as numpy arrays.

  power: [seeds, sigmas] ||dW(sigma) - dW(0)||_F^2 summed over layers. invalid: [seeds, sigmas] clients whose
  local result was not finite (the round leaves them out; a point with any is dropped from the fits).
  start: the global adapters before the round. noise_free: the global adapters after it at sigma = 0 (seed 0).
  noise_free_change: ||dW(0)||_F^2. client_ids [K], weights [K]: the sampled clients and their weights.
  update_norm: [K] the clients' noise-free update norms (global L2 over the trained factors).
  """

  sigmas: np.ndarray
  power: np.ndarray
  invalid: np.ndarray
  start: Adapters
  noise_free: Adapters
  noise_free_change: float
  client_ids: np.ndarray
  weights: np.ndarray
  update_norm: np.ndarray
  seconds: float


def noise_power_sweep(
  experiment: runner.Experiment,
  sigmas: tuple[float, ...],
  num_seeds: int,
  *,
  round_index: int = 1,
  progress: bool = False,
) -> Sweep:
  """P(sigma) of round `round_index` from the experiment's initial adapters (module docstring).

  The round's clients and batches come from round key fold_in(run_key, round_index) as in `runner.train`;
  noise seed j runs the round with round key fold_in(that key, j), once at sigma = 0 and once per sigma.
  """
  from tqdm import tqdm

  config, rnd = experiment.config, experiment.round_fn
  if experiment.privacy is None or rnd is None:
    raise ValueError(
      f"config with privacy.enabled={config.privacy.enabled} and no compiled round: the noise law "
      "needs a DP round (privacy.enabled: true, runner.prepare(config))."
    )
  if num_seeds < 1 or not sigmas or min(sigmas) <= 0:
    raise ValueError(
      f"num_seeds={num_seeds}, sigmas={sigmas}: need >= 1 seed and positive sigmas (sigma = 0 "
      "is the reference every sigma is compared with)."
    )
  scaling = config.lora.alpha / config.lora.rank
  round_key = jax.random.fold_in(runner.run_key(config), round_index)
  ids, weights, batches = runner.round_sampler(config, experiment.capacity)(round_key, experiment.client_data)
  start = rnd.initial_adapters

  def run(key, sigma):
    state = rnd.init(config.num_clients)  # fresh copies of the initial adapters: the round donates its state
    new, metrics = rnd(state, batches, ids, weights, key, round_index, noise_multiplier=float(sigma))
    return jax.device_get((new.adapters, metrics))

  power = np.zeros((num_seeds, len(sigmas)))
  invalid = np.zeros((num_seeds, len(sigmas)), int)
  began = time.perf_counter()
  bar = tqdm(
    total=num_seeds * (len(sigmas) + 1),
    desc=f"{config.strategy} {config.optimizer.name}",
    unit="round",
    file=sys.stderr,
    disable=not progress,
  )
  for j in range(num_seeds):
    key = jax.random.fold_in(round_key, j)
    reference, metrics = run(key, 0.0)
    bar.update(1)
    if j == 0:
      noise_free, update_norm = reference, np.asarray(metrics["update_norm"])
    before = layer_products(reference, scaling)
    for i, sigma in enumerate(sigmas):
      adapters, metrics = run(key, sigma)
      after = layer_products(adapters, scaling)
      power[j, i] = sum(np.sum((after[n] - before[n]) ** 2) for n in after)
      invalid[j, i] = int(metrics.get("invalid_clients", 0))
      bar.update(1)
  bar.close()
  start_products, end_products = layer_products(start, scaling), layer_products(noise_free, scaling)
  change = sum(np.sum((end_products[n] - start_products[n]) ** 2) for n in start_products)
  return Sweep(
    np.asarray(sigmas, float),
    power,
    invalid,
    jax.device_get(start),
    noise_free,
    float(change),
    np.asarray(ids),
    np.asarray(weights, np.float64),
    update_norm,
    time.perf_counter() - began,
  )


# ---------------------------------------------------------------------------------------------------------------
# Fits and predictions.


def mean_ci(x: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(mean, half-width of the two-sided CONFIDENCE t-interval) over `axis`; half-width nan for one sample."""
  n = x.shape[axis]
  mean = np.mean(x, axis=axis)
  if n < 2:
    return mean, np.full_like(mean, np.nan)
  return mean, scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * np.std(x, axis=axis, ddof=1) / math.sqrt(n)


def loglog_slope(sigmas: np.ndarray, power: np.ndarray, chosen: tuple[float, ...]) -> tuple[float, float]:
  """Least-squares slope of log P against log sigma over the `chosen` sigmas: (slope of the seed-mean curve,
  CONFIDENCE half-width over the seeds' own slopes). power [seeds, sigmas]; non-finite points are dropped."""
  cols = np.isin(sigmas, chosen)
  x = np.log(sigmas[cols])
  mean = np.mean(power[:, cols], axis=0)
  ok = np.isfinite(mean) & (mean > 0)
  slope = float(np.polyfit(x[ok], np.log(mean[ok]), 1)[0])
  per_seed = np.array([np.polyfit(x[ok], np.log(p[cols][ok]), 1)[0] for p in power])
  return slope, float(mean_ci(per_seed)[1])


def two_term_fit(sigmas: np.ndarray, power: np.ndarray) -> tuple[float, float]:
  """(c2, c4) >= 0 of P ~ c2 sigma^2 + c4 sigma^4 on the points of `power` [sigmas], least squares in relative
  error (every decade counts alike): minimise sum ((c2 s^2 + c4 s^4) / P - 1)^2, by NNLS."""
  ok = np.isfinite(power) & (power > 0)
  s, p = sigmas[ok], power[ok]
  coef, _ = scipy.optimize.nnls(np.stack([s**2 / p, s**4 / p], axis=1), np.ones_like(p))
  return float(coef[0]), float(coef[1])


def crossover(c2: float, c4: float) -> float:
  """sigma* = sqrt(c2 / c4), where the sigma^4 term overtakes the sigma^2 term (inf without a sigma^4 term)."""
  return math.sqrt(c2 / c4) if c4 > 0 else math.inf


def adam_noise_gain(steps: int, samples: int = 1_000_000, seed: int = 0) -> float:
  """kappa_S = E (sum_s mhat_s / sqrt(vhat_s))^2 for Adam (betas ADAM_BETAS, eps ~ 0) fed i.i.d. N(0, 1)
  gradients for `steps` steps from a fresh state: the mean square of one coordinate's displacement in units of
  lr^2 when the noise dominates the gradient (scale-free, so sigma drops out). Monte Carlo, float64."""
  b1, b2 = ADAM_BETAS
  z = np.random.default_rng(seed).standard_normal((steps, samples))
  m, v, total = np.zeros(samples), np.zeros(samples), np.zeros(samples)
  for s in range(steps):
    m, v = b1 * m + (1 - b1) * z[s], b2 * v + (1 - b2) * z[s] ** 2
    total += (m / (1 - b1 ** (s + 1))) / np.sqrt(v / (1 - b2 ** (s + 1)))
  return float(np.mean(total**2))


def factor_terms(start: Adapters, noise_free: Adapters, both: bool) -> tuple[float, float]:
  """(sum_layers out ||a0||^2 + [both] in ||b0||^2, [both] sum_layers in r out): the law's two sums. Factors
  that the clients train are taken after the noise-free round (a0 + G_a, b0 + G_b); a frozen one at its start."""
  linear = cross = 0.0
  for name in start:
    a = np.asarray((noise_free if both else start)[name].lora_a, np.float64)
    b = np.asarray(noise_free[name].lora_b, np.float64)
    fan_in, rank, fan_out = a.shape[-2], a.shape[-1], b.shape[-1]
    layers = a.size // (fan_in * rank)  # stacked layers, if any
    linear += fan_out * np.sum(a**2) + (fan_in * np.sum(b**2) if both else 0.0)
    if both:
      cross += layers * fan_in * rank * fan_out
  return float(linear), float(cross)


def sgd_prediction(sweep: Sweep, config: Config) -> tuple[float, float]:
  """Lemma 1's (c2, c4) for SGD (module docstring), from the run's factors, weights and hyper-parameters."""
  scaling = config.lora.alpha / config.lora.rank
  p = config.privacy
  per_sigma2 = config.lr**2 * config.local_steps * np.sum(sweep.weights**2) * p.clip_norm**2 / config.batch_size**2
  linear, cross = factor_terms(sweep.start, sweep.noise_free, config.strategy == "fedavg")
  return float(scaling**2 * per_sigma2 * linear), float(scaling**2 * per_sigma2**2 * cross)


def adam_plateau(sweep: Sweep, config: Config, kappa: float) -> float:
  """P at sigma -> infinity with Adam: the law with V = lr^2 kappa_S sum w_k^2 (the displacement of pure noise,
  factors at their start since the signal is drowned), plus ||dW(0)||^2 (the drowned noise-free change)."""
  scaling = config.lora.alpha / config.lora.rank
  v = config.lr**2 * kappa * np.sum(sweep.weights**2)
  linear, cross = factor_terms(sweep.start, sweep.start, config.strategy == "fedavg")
  return float(scaling**2 * (v * linear + v**2 * cross) + sweep.noise_free_change)


# ---------------------------------------------------------------------------------------------------------------
# The privacy side: which sigmas epsilon needs.


def setting_sigmas(config: Config, sizes: np.ndarray) -> dict[float, float]:
  """{epsilon: sigma} that `runner.plan_privacy` calibrates for `config` with target epsilon in EPSILONS, under
  RDP and worst-case participation (the report's rows say so)."""
  out = {}
  for eps in EPSILONS:
    cfg = dataclasses.replace(
      config,
      privacy=dataclasses.replace(config.privacy, target_epsilon=eps, accountant="rdp", participation="worst_case"),
    )
    out[eps] = runner.plan_privacy(cfg, sizes)[0].noise_multiplier
  return out


def paper_sigmas() -> dict[str, Any]:
  """The paper's q, and {participation: {steps, sigma: {epsilon: sigma}}} (RDP, delta 1e-5); steps: the DP
  steps a client can take part in (R S; the "expected" heuristic's ceil(R S q_c))."""
  n = PAPER["dataset_size"] // PAPER["num_clients"]
  q = PAPER["batch_size"] / n
  out: dict[str, Any] = {"client_size": n, "sample_rate": q}
  for participation in privacy.PARTICIPATION:
    schedule = privacy.DPSchedule.from_federation(
      sample_rate=q,
      local_steps=PAPER["local_steps"],
      rounds=PAPER["rounds"],
      clients_per_round=PAPER["clients_per_round"],
      num_clients=PAPER["num_clients"],
      participation=participation,
    )
    steps, rounds, _ = schedule.composition
    out[participation] = {
      "steps": steps * rounds,
      "sigma": {eps: privacy.calibrate_noise(schedule, eps, PAPER["delta"], "rdp") for eps in EPSILONS},
    }
  return out


def init_crossover(batch: float, lr: float, steps: int, sum_w2: float, clip: float, width: int) -> float:
  """sigma* of fedavg with SGD in round 1 from PEFT's init (||a0||_F^2 = r / 3 per layer, b0 = 0, in = out =
  width): sqrt(B_e^2 / (3 eta^2 S sum w^2 C^2 in)) (module docstring)."""
  return batch / (lr * clip * math.sqrt(3 * steps * sum_w2 * width))


# ---------------------------------------------------------------------------------------------------------------
# Results.


def summarize(
  sweeps: dict[tuple[str, str], Sweep], configs: dict[tuple[str, str], Config], kappa: dict[int, float]
) -> dict[str, Any]:
  """Every number of the tables: per (optimiser, strategy) means, CIs, slopes, fits and predictions."""
  out: dict[str, Any] = {}
  for (opt, strategy), sw in sweeps.items():
    cfg = configs[(opt, strategy)]
    power = np.where(sw.invalid > 0, np.nan, sw.power)
    mean, half = mean_ci(power)
    c2, c4 = two_term_fit(sw.sigmas, mean)
    row = dict(
      sigmas=sw.sigmas.tolist(),
      power=sw.power.tolist(),
      invalid=sw.invalid.tolist(),
      mean=mean.tolist(),
      ci_half_width=half.tolist(),
      slope_small=loglog_slope(sw.sigmas, power, SMALL),
      slope_large=loglog_slope(sw.sigmas, power, LARGE),
      local_slopes=(np.diff(np.log(mean)) / np.diff(np.log(sw.sigmas))).tolist(),
      fit_c2=c2,
      fit_c4=c4,
      fit_crossover=crossover(c2, c4),
      client_ids=sw.client_ids.tolist(),
      weights=sw.weights.tolist(),
      noise_free_change=sw.noise_free_change,
      noise_free_update_norm=sw.update_norm.tolist(),
      seconds=sw.seconds,
    )
    if opt == "sgd":
      p2, p4 = sgd_prediction(sw, cfg)
      row.update(predicted_c2=p2, predicted_c4=p4, predicted_crossover=crossover(p2, p4))
    else:
      row.update(
        kappa=kappa[cfg.local_steps],
        predicted_plateau=adam_plateau(sw, cfg, kappa[cfg.local_steps]),
        measured_plateau=float(np.nanmean(mean[-3:])),
      )
    out[f"{opt}/{strategy}"] = row
  return out


def fmt(x: float, digits: int = 3) -> str:
  return "inf" if x == math.inf else f"{x:.{digits}g}"


def plot(saved: dict[str, Any], path: Path) -> None:
  """Noise power against sigma per optimiser panel, with the SGD fit or the AdamW plateaus and the epsilons'
  sigmas."""
  summary = saved["results"]
  optimizers = [o for o in LEARNING_RATES if f"{o}/fedavg" in summary]
  marks = {float(e): s for e, s in saved["meta"]["setting_sigmas"]["measured"]["sigma"].items()}
  fig, axes = plt.subplots(1, len(optimizers), figsize=(6.2 * len(optimizers), 4.6), squeeze=False)
  for ax, opt in zip(axes[0], optimizers):
    for strategy in STRATEGIES:
      row = summary[f"{opt}/{strategy}"]
      s, mean, half = np.asarray(row["sigmas"]), np.asarray(row["mean"]), np.asarray(row["ci_half_width"])
      style = dict(color=COLORS[strategy], label=LABELS[strategy])
      if strategy == "fedask":  # exactly on top of ffa-lora in round 1: drawn hollow so that both show
        ax.plot(s, mean, "o", mfc="none", ms=9, **style)
      else:
        ax.plot(s, mean, "o-" if strategy == "fedavg" else "s-", ms=4, **style)
      if np.all(np.isfinite(half)):
        ax.fill_between(s, np.maximum(mean - half, mean * 1e-3), mean + half, color=COLORS[strategy], alpha=0.2)
    fed = summary[f"{opt}/fedavg"]
    grid = np.logspace(math.log10(SIGMAS[0]), math.log10(SIGMAS[-1]), 200)
    if opt == "sgd":
      ax.plot(
        grid,
        fed["fit_c2"] * grid**2 + fed["fit_c4"] * grid**4,
        "k--",
        lw=1,
        label=f"fit c2 s^2 + c4 s^4, sigma* = {fmt(fed['fit_crossover'])}",
      )
      ax.axvline(fed["fit_crossover"], color="k", lw=0.8, ls=":")
    else:
      for strategy in ("fedavg", "ffa-lora"):
        ax.axhline(summary[f"{opt}/{strategy}"]["predicted_plateau"], color=COLORS[strategy], lw=0.8, ls="--")
    for eps, sigma in marks.items():
      ax.axvline(sigma, color="gray", lw=0.8, alpha=0.6)
      ax.text(sigma, 0.02, f" eps={eps:g}", rotation=90, fontsize=7, transform=ax.get_xaxis_transform(), color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise multiplier sigma")
    ax.set_ylabel("noise power E ||dW(sigma) - dW(0)||_F^2")
    ax.set_title(
      f"one round, local {OPTIMIZER_NAMES[opt]} (lr {LEARNING_RATES[opt]:g})"
      + ("" if opt == "sgd" else ": saturates (dashed: predicted plateaus)"),
      fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
  fig.suptitle("Noise law (Lemma 1): DP noise in the aggregated LoRA product, base model + GSM8K", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class Report(NamedTuple):
  """The results file's parts that the report's sections read: the summary rows by key ("sgd/fedavg", ...), the
  SGD rows of (a), (b), (c), the fitted crossover sigma* and the run's metadata."""

  summary: dict[str, Any]
  meta: dict[str, Any]
  fed: dict[str, Any]
  ask: dict[str, Any]
  ffa: dict[str, Any]
  star: float

  @property
  def adamw(self) -> bool:
    return "adamw/fedavg" in self.summary


def report_of(saved: dict[str, Any]) -> Report:
  summary = saved["results"]
  fed = summary["sgd/fedavg"]
  return Report(summary, saved["meta"], fed, summary["sgd/fedask"], summary["sgd/ffa-lora"], fed["fit_crossover"])


def setting_text(r: Report) -> str:
  """The provenance and the measured setting: config, federation, what dW and the noise power are."""
  meta, cfg = r.meta, r.meta["measured_setting"]
  overrides = " with " + ", ".join(meta["overrides"]) if meta["overrides"] else ""
  update_norms = ""
  if r.adamw:
    sgd_norms = ", ".join(f"{x:.3g}" for x in r.fed["noise_free_update_norm"])
    adamw_norms = ", ".join(f"{x:.3g}" for x in r.summary["adamw/fedavg"]["noise_free_update_norm"])
    update_norms = f" (noise-free update norm of (a)'s clients in this round: SGD {sgd_norms}, AdamW {adamw_norms})"
  return (
    _common.generated_by(meta["command"], meta["total_seconds"], meta["device"]) + " Setting: "
    f"experiments/configs/quickstart.yaml{overrides} (base model, GSM8K IID over {cfg['num_clients']} clients, "
    f"{cfg['clients_per_round']} per round, batch {cfg['batch_size']} expected (Poisson), {cfg['local_steps']} "
    f"local steps, LoRA r {cfg['rank']} alpha {cfg['alpha']:g} on q_proj/v_proj, clip C = {cfg['clip_norm']:g}, "
    "B-space DP); round 1 from the initial adapters (a random, b = 0); the same clients and batches for every "
    "strategy and sigma. dW = sum over layers of s (a'b' - ab); noise power = E ||dW(sigma) - dW(0)||_F^2 with "
    f"the same keys, E over {meta['seeds']['sgd']} noise seeds (SGD) / {meta['seeds'].get('adamw', 0)} (AdamW), "
    f"{CONFIDENCE:.0%} t-intervals over seeds. Local SGD at lr {LEARNING_RATES['sgd']:g} is the law's setting "
    f"(the main result); AdamW at lr {LEARNING_RATES['adamw']:g} (the quickstart's) is the secondary "
    f"panel{update_norms}."
  )


def power_table(r: Report) -> list[str]:
  """Noise power per sigma and strategy with local SGD (mean ± CI over seeds), and (a) / (c)."""
  sgd = {st: r.summary[f"sgd/{st}"] for st in STRATEGIES}
  rows = [
    [
      f"{s:.3g}",
      *(f"{sgd[st]['mean'][i]:.3g} ± {sgd[st]['ci_half_width'][i]:.2g}" for st in STRATEGIES),
      f"{r.fed['mean'][i] / r.ffa['mean'][i]:.3g}",
    ]
    for i, s in enumerate(r.fed["sigmas"])
  ]
  return _common.table(["sigma", *(LABELS[st] for st in STRATEGIES), "(a) / (c)"], rows, "r" * (len(STRATEGIES) + 2))


def slopes_text(r: Report) -> str:
  """How the slopes are fitted, and where the two regimes lie against sigma*."""
  return (
    f"Slopes of log P against log sigma (least squares on the seed-mean curve; ± {CONFIDENCE:.0%} t-interval of "
    f"the seeds' own slopes). Small regime sigma in [{SMALL[0]:.3g}, {SMALL[-1]:.3g}] (<= sigma* / "
    f"{r.star / SMALL[-1]:.0f}), large regime [{LARGE[0]:.3g}, {LARGE[-1]:.3g}] (>= {LARGE[0] / r.star:.0f} "
    "sigma*)."
  )


def slopes_table(r: Report) -> list[str]:
  """Per (strategy, optimiser): the slopes, the two-term fit and, for SGD, Lemma 1's prediction."""
  rows = []
  for key, row in r.summary.items():
    opt, st = key.split("/")
    predicted = (
      [fmt(row["predicted_c2"]), fmt(row["predicted_c4"]), fmt(row["predicted_crossover"])]
      if opt == "sgd"
      else ["-", "-", "-"]
    )
    rows.append(
      [
        st,
        opt,
        f"{row['slope_small'][0]:.3f} ± {row['slope_small'][1]:.2g}",
        f"{row['slope_large'][0]:.3f} ± {row['slope_large'][1]:.2g}",
        fmt(row["fit_c2"]),
        fmt(row["fit_c4"]),
        fmt(row["fit_crossover"]),
        *predicted,
      ]
    )
  header = [
    "strategy",
    "optimiser",
    "slope, small sigma",
    "slope, large sigma",
    "fit c2",
    "fit c4",
    "sigma* = sqrt(c2/c4)",
    "Lemma 1 c2",
    "Lemma 1 c4",
    "Lemma 1 sigma*",
  ]
  return _common.table(header, rows, "ll" + "r" * 8)


def adamw_section(r: Report) -> list[str]:
  """The AdamW panel's slopes and plateaus (measured against predicted), and Adam's noise gain kappa_S."""
  if not r.adamw:
    return []
  rows = []
  for st in STRATEGIES:
    row = r.summary[f"adamw/{st}"]
    rows.append(
      [
        st,
        f"{row['slope_small'][0]:.3f}",
        f"{row['slope_large'][0]:.3f}",
        f"{row['measured_plateau']:.4g}",
        f"{row['predicted_plateau']:.4g}",
        f"{row['measured_plateau'] / row['predicted_plateau']:.3f}",
      ]
    )
  header = [
    "strategy",
    "slope, small sigma",
    "slope, large sigma",
    "plateau, measured (mean of the 3 largest sigmas)",
    "plateau, predicted",
    "ratio",
  ]
  kappa = r.summary["adamw/fedavg"]["kappa"]
  return [
    "## AdamW (secondary)",
    "",
    *_common.table(header, rows, "l" + "r" * 5),
    "",
    f"kappa_S (Adam's mean-square displacement on pure noise, units of lr^2, S = "
    f"{r.meta['measured_setting']['local_steps']}): {kappa:.4f}.",
    "",
  ]


def participations(paper: dict[str, Any]) -> list[str]:
  """The participation models the paper's sigmas were calibrated under, in the library's order."""
  return [p for p in privacy.PARTICIPATION if p in paper]


def sigmas_table(r: Report) -> list[str]:
  """The sigmas that epsilon needs: this run's setting, the quickstart's, and the paper's."""
  setting, paper = r.meta["setting_sigmas"], r.meta["paper"]
  sigmas = lambda info: [f"{info['sigma'][str(e)]:.3f}" for e in EPSILONS]
  rows = [
    [f"{label} (RDP, worst case)", f"{info['sample_rate']:.4g}", info["steps"], *sigmas(info)]
    for label, info in (
      ("this run's setting", setting["measured"]),
      ("quickstart as configured", setting["quickstart"]),
    )
  ]
  rows += [
    [
      f"paper: dolly-15k / 10 clients, batch 6, 10 steps, 800 rounds (RDP, {p})",
      f"{paper['sample_rate']:.4g}",
      paper[p]["steps"],
      *sigmas(paper[p]),
    ]
    for p in participations(paper)
  ]
  header = ["setting", "q", "DP steps", *(f"sigma at eps={e:g}" for e in EPSILONS)]
  return _common.table(header, rows, "lrr" + "r" * len(EPSILONS))


def law_finding(r: Report) -> str:
  """The slopes: 2 for one noised factor, 2 then 4 for both."""
  fed, ffa, ask = r.fed, r.ffa, r.ask
  return (
    f"- **The law holds with local SGD.** One factor noised ((b), (c)): slope {ffa['slope_small'][0]:.3f} "
    f"(small sigma) and {ffa['slope_large'][0]:.3f} (large sigma) for ffa-lora, {ask['slope_small'][0]:.3f} and "
    f"{ask['slope_large'][0]:.3f} for fedask: sigma^2 throughout. Both factors noised ((a)): slope "
    f"{fed['slope_small'][0]:.3f} ± {fed['slope_small'][1]:.2g} below and {fed['slope_large'][0]:.3f} ± "
    f"{fed['slope_large'][1]:.2g} above the crossover, the sigma^4 regime of the xi_A xi_B cross term; at the "
    f"largest sigma (a) carries {fed['mean'][-1] / ffa['mean'][-1]:.3g}x the noise power of (c), at the smallest "
    f"{fed['mean'][0] / ffa['mean'][0]:.3g}x."
  )


def crossover_finding(r: Report) -> str:
  """The fitted crossover against Lemma 1's parameter-free prediction."""
  fed, ffa = r.fed, r.ffa
  low, high = r.meta["crossover_ci"]
  c2_ratio, c4_ratio = fed["fit_c2"] / fed["predicted_c2"], fed["fit_c4"] / fed["predicted_c4"]
  return (
    f"- **Crossover.** The fit P = c2 sigma^2 + c4 sigma^4 to (a) gives sigma* = {fmt(r.star)} ({CONFIDENCE:.0%} "
    f"t-interval over the seeds' own fits: {fmt(low)} to {fmt(high)}). Lemma 1 with no fitted parameter predicts "
    f"sigma* = {fmt(fed['predicted_crossover'])}: measured c2 = {c2_ratio:.3f} x and c4 = {c4_ratio:.3f} x the "
    f"prediction (c2 of (c): {ffa['fit_c2'] / ffa['predicted_c2']:.3f} x; the rest is the gradients' dependence "
    "on the noisy factors, which the law leaves out)."
  )


def same_noise_finding(r: Report) -> str:
  """(b) and (c) carry the same noise in round 1 (Theorem 2)."""
  same = max(abs(a / f - 1) for a, f in zip(r.ask["mean"], r.ffa["mean"]))
  return (
    f"- **(b) = (c) in round 1.** With the same frozen a, FedASK's sketch aggregation reproduces the average of "
    f"the clients' products exactly (Theorem 2), so its noise equals FFA-LoRA's: largest relative difference "
    f"{same:.1e} over the grid. They part only in later rounds, when FedASK's reconstructed a (||a||^2 = the "
    "nuclear norm of the aggregate) replaces the initial one."
  )


def own_sigmas_finding(r: Report) -> str:
  """Where the sigmas of this run's epsilons fall against sigma*, and what the fit gives (a) there."""
  eps_sigma = r.meta["setting_sigmas"]["measured"]["sigma"]
  sigmas = [eps_sigma[str(e)] for e in EPSILONS]
  ratios = [sigma / r.star for sigma in sigmas]
  # (a)'s noise power over (c)'s at sigma, from the two fits: (c2_a + c4_a sigma^2) / c2_c.
  fit_ratios = [(r.fed["fit_c2"] + r.fed["fit_c4"] * sigma**2) / r.ffa["fit_c2"] for sigma in sigmas]
  if min(ratios) > 1:
    regime = "the sigma^4 term dominates (a)'s noise at every one of them"
  elif max(ratios) < 1:
    regime = f"below the crossover, where the sigma^4 term adds at most {max(ratios) ** 2:.0%} of the sigma^2 one"
  else:
    regime = "the sigma^4 term dominates where sigma > sigma*"
  return (
    "- **At the sigmas privacy needs, here.** In this run's setting epsilon = "
    + ", ".join(f"{e:g}" for e in EPSILONS)
    + " needs sigma = "
    + ", ".join(f"{s:.3f}" for s in sigmas)
    + f", i.e. {min(ratios):.2g} to {max(ratios):.2g} x sigma*, where the fits give (a) "
    + ", ".join(f"{x:.3g}x" for x in fit_ratios)
    + f" the noise power of (c): {regime}. sigma* scales as 1/lr "
    f"(module docstring), and this run's SGD lr {LEARNING_RATES['sgd']:g} is large for a model of width "
    f"{r.meta['measured_setting']['width']} (the round-1 formula gives sigma* = "
    f"{r.meta['init_formula_crossover']:.3g} here, close to the fit)."
  )


def paper_sigma_range(r: Report) -> tuple[float, float, float]:
  """The paper's sigma at epsilon = 1 (worst case), and the smallest and largest over its epsilons and models."""
  paper = r.meta["paper"]
  models = participations(paper)
  return (
    paper["worst_case"]["sigma"][str(EPSILONS[0])],
    min(min(paper[p]["sigma"].values()) for p in models),
    max(max(paper[p]["sigma"].values()) for p in models),
  )


def paper_finding(r: Report) -> str:
  """Lemma 1's crossover carried to the paper's widths, batch, steps and sigmas."""
  paper_eps1, _, paper_hi = paper_sigma_range(r)
  sgd = r.meta["paper_crossover"]["sgd"]
  matched_lr = r.meta["paper_crossover"]["adam_matched_lr"]
  per_model = lambda field, spec: ", ".join(f"{spec(v[field])} ({k})" for k, v in sgd.items())
  smallest_at_paper_lr = min(v["at_paper_lr"] for v in sgd.values())
  return (
    f"- **At the paper's sigmas.** The paper's setting needs sigma = {paper_eps1:.3f} for epsilon = 1 (worst-case "
    f"participation; {paper_hi:.3f} at most over its epsilons and the {len(participations(r.meta['paper']))} "
    "participation models). Lemma 1's round-1 crossover, validated above, at the paper's widths with batch 6, 10 "
    "steps, 2 clients: sigma* = "
    + per_model("per_lr", lambda x: f"{x:.3g} / eta")
    + " for an SGD lr eta; the quadratic regime (sigma > sigma*) is reached at the paper's epsilon = 1 only for "
    + ", ".join(f"eta > {v['lr_to_reach_eps1']:.3g} ({k})" for k, v in sgd.items())
    + f". At the paper's own lr {PAPER['lr']:g} read as an SGD lr, sigma* = "
    + per_model("at_paper_lr", lambda x: f"{x:.1f}")
    + f", {smallest_at_paper_lr / paper_hi:.0f}x the largest sigma the paper uses; an SGD lr that moves a "
    "coordinate per step as far as the paper's AdamW does under dominant noise (eta = lr B_e / (sigma C) = "
    f"{matched_lr:.2g} at epsilon = 1) leaves sigma / sigma* = "
    + per_model("adam_matched_ratio", lambda x: f"{x:.2f}")
    + ": the paper's sigmas sit in the linear regime."
  )


def adamw_finding(r: Report) -> str | None:
  """With AdamW the noise power saturates: no sigma^4 regime."""
  if not r.adamw:
    return None
  fa, fc = r.summary["adamw/fedavg"], r.summary["adamw/ffa-lora"]
  ext = r.meta["paper_crossover"]
  shares = ", ".join(f"{v:.1%} ({k})" for k, v in ext["adamw_cross_share"].items())
  return (
    "- **With AdamW (what the paper and the quickstart run) there is no sigma^4 regime.** Adam normalises each "
    "coordinate's step, so once the noise dominates the gradient the displacement no longer grows with sigma: "
    f"slope {fa['slope_large'][0]:.3f} for (a), {fc['slope_large'][0]:.3f} for (c) at large sigma, plateaus "
    f"{fa['measured_plateau'] / fa['predicted_plateau']:.3f} and "
    f"{fc['measured_plateau'] / fc['predicted_plateau']:.3f} x the predicted ones; (a) stays within "
    f"{fa['measured_plateau'] / fc['measured_plateau']:.3g}x of (c). Below the plateau the growth is already slow "
    f"(slope {fa['slope_small'][0]:.2f} for (a), {fc['slope_small'][0]:.2f} for (c) at small sigma, not 2): "
    "Adam's first step is lr sign(g + noise), so a coordinate whose gradient is below the noise moves by about "
    "lr whatever sigma, and in round 1 every lora_a gradient of (a) is exactly 0 (b = 0). The cross term's "
    f"share at the plateau is 3 in kappa_S lr^2 sum w^2 (PEFT's init): {shares} in the paper's setting "
    f"(kappa_10 = {ext['kappa_paper']:.2f}, lr {PAPER['lr']:g})."
  )


def verdict(r: Report) -> str:
  """The paper's claim: the mechanism is real; whether it matters is a question of scale."""
  _, paper_lo, paper_hi = paper_sigma_range(r)
  return (
    "- **Verdict on the paper's claim.** The mechanism of Lemma 1 is real and measured here: noising both "
    "factors adds a xi_A xi_B term that grows as sigma^4 and overtakes the linear term above sigma*; freezing "
    "one factor (FFA-LoRA, FedASK under DP) removes it. Whether it matters is a question of scale: in one round "
    f"from PEFT's init, at the paper's sigmas ({paper_lo:.2f} to {paper_hi:.2f}) the crossover is far away unless "
    "the SGD lr is large (above), and with the paper's AdamW the term is bounded at a few percent. This measures "
    "one round; it does not cover the noise that accumulates in the global factors over rounds (Lemma 1's "
    "||B||^2 term grows with training), which the method comparison experiment measures end to end."
  )


def markdown(saved: dict[str, Any]) -> str:
  r = report_of(saved)
  findings = [
    law_finding(r),
    crossover_finding(r),
    same_noise_finding(r),
    own_sigmas_finding(r),
    paper_finding(r),
    adamw_finding(r),
    verdict(r),
  ]
  quick_note = (
    [
      "",
      "Quick mode: a reduced setting (see the overrides above) and few seeds; the full mode uses the "
      "quickstart's batch, steps and length.",
    ]
    if r.meta["mode"] == "quick"
    else []
  )
  return (
    "\n".join(
      [
        "# Noise law (Lemma 1): DP noise power of one round against sigma",
        "",
        setting_text(r),
        "",
        "## Noise power, local SGD",
        "",
        *power_table(r),
        "",
        slopes_text(r),
        "",
        *slopes_table(r),
        "",
        "'Lemma 1' columns: the law of the module docstring evaluated on this run's factors (the noise-free round's "
        "a and b for fedavg, the frozen a for the others), weights, lr, S, C and B_e, with no fitted parameter.",
        "",
        *adamw_section(r),
        "## Which sigmas epsilon needs",
        "",
        *sigmas_table(r),
        "",
        "## Findings",
        "",
        *(f for f in findings if f is not None),
        *quick_note,
      ]
    )
    + "\n"
  )


# ---------------------------------------------------------------------------------------------------------------
# The run.


def run_sweeps(mode: Mode, optimizers: list[str]) -> tuple[dict, dict, np.ndarray]:
  """Every (optimiser, strategy) sweep of `mode`: (sweeps, their configs, the clients' sizes)."""
  sweeps, configs = {}, {}
  for opt in optimizers:
    for strategy in STRATEGIES:
      config = experiment_config(strategy, opt, mode.overrides)
      experiment = runner.prepare(config)
      print(f"{strategy} / {opt}: " + "; ".join(experiment.notes[1:]), file=sys.stderr, flush=True)
      sweeps[(opt, strategy)] = noise_power_sweep(experiment, mode.sigmas[opt], mode.seeds[opt], progress=True)
      configs[(opt, strategy)] = config
      sizes = np.asarray(experiment.client_data.client_sizes)
  return sweeps, configs, sizes


def sigma_info(config: Config, sizes: np.ndarray) -> dict[str, Any]:
  """The smallest client's q, the DP steps R S and {epsilon: sigma} of `config` (the report's "Which sigmas" rows,
  RDP and worst-case participation)."""
  sig = setting_sigmas(config, sizes)
  return {
    "sample_rate": config.batch_size / int(sizes.min()),
    "steps": config.rounds * config.local_steps,
    "sigma": {str(e): s for e, s in sig.items()},
  }


def paper_crossover(paper: dict[str, Any]) -> dict[str, Any]:
  """Lemma 1's round-1 crossover at the paper's widths (per unit SGD lr, and at the paper's lr), the SGD lr it
  takes to reach it at epsilon = 1, and the AdamW cross term's share at the plateau."""
  kappa_paper = adam_noise_gain(PAPER["local_steps"])
  sum_w2 = PAPER["clients_per_round"] * (1 / PAPER["clients_per_round"]) ** 2
  paper_eps1 = paper["worst_case"]["sigma"][EPSILONS[0]]
  crossover_at = lambda lr, width: init_crossover(
    PAPER["batch_size"], lr, PAPER["local_steps"], sum_w2, PAPER["clip_norm"], width
  )
  out = {
    "sgd": {
      name: {"per_lr": crossover_at(1.0, width), "at_paper_lr": crossover_at(PAPER["lr"], width)}
      for name, width in PAPER["widths"].items()
    },
    "adamw_cross_share": {
      name: 3 * width * kappa_paper * PAPER["lr"] ** 2 * sum_w2 for name, width in PAPER["widths"].items()
    },
    "kappa_paper": kappa_paper,
    "sum_w2": sum_w2,
  }
  # The SGD lr whose noise step per coordinate, eta sigma C / B_e, equals AdamW's lr (Adam's step under dominant
  # noise): at it, (sigma / sigma*)^2 = 3 in S sum w^2 lr^2, the SGD twin of the AdamW cross share.
  out["adam_matched_lr"] = PAPER["lr"] * PAPER["batch_size"] / (paper_eps1 * PAPER["clip_norm"])
  for v in out["sgd"].values():
    v["lr_to_reach_eps1"] = v["per_lr"] / paper_eps1
    v["adam_matched_ratio"] = paper_eps1 / (v["per_lr"] / out["adam_matched_lr"])
  return out


def measure(mode: Mode, optimizers: list[str], command: str) -> dict[str, Any]:
  """The sweeps, their summary, the crossover's interval, and the privacy side (this setting's, the quickstart's
  and the paper's sigmas): the results file's content."""
  began = time.perf_counter()
  sweeps, configs, sizes = run_sweeps(mode, optimizers)
  kappa = {configs[k].local_steps: adam_noise_gain(configs[k].local_steps) for k in configs}
  summary = summarize(sweeps, configs, kappa)
  fed_sgd = sweeps[("sgd", "fedavg")]
  per_seed = [crossover(*two_term_fit(fed_sgd.sigmas, p)) for p in fed_sgd.power]
  log_mean, log_half = mean_ci(np.log(np.asarray(per_seed)))
  crossover_ci = [float(np.exp(log_mean - log_half)), float(np.exp(log_mean + log_half))]
  measured = configs[("sgd", "fedavg")]
  paper = paper_sigmas()
  paper_json = {
    k: ({"steps": v["steps"], "sigma": {str(e): s for e, s in v["sigma"].items()}} if isinstance(v, dict) else v)
    for k, v in paper.items()
  }
  width = int(np.asarray(next(iter(fed_sgd.start.values())).lora_a).shape[-2])
  # The round-1 formula of init_crossover against this run's fitted sigma*: the same law as the paper numbers.
  own_init = init_crossover(
    measured.batch_size,
    measured.lr,
    measured.local_steps,
    float(np.sum(fed_sgd.weights**2)),
    measured.privacy.clip_norm,
    width,
  )
  meta = dict(
    mode=mode.name,
    overrides=list(mode.overrides),
    seeds=mode.seeds,
    sigmas=mode.sigmas,
    small_regime=list(SMALL),
    large_regime=list(LARGE),
    learning_rates=LEARNING_RATES,
    command=command,
    crossover_ci=crossover_ci,
    per_seed_crossover=per_seed,
    measured_setting=dict(
      num_clients=measured.num_clients,
      clients_per_round=measured.clients_per_round,
      batch_size=measured.batch_size,
      local_steps=measured.local_steps,
      rank=measured.lora.rank,
      alpha=measured.lora.alpha,
      clip_norm=measured.privacy.clip_norm,
      width=width,
      max_seq_len=measured.data.max_seq_len,
    ),
    init_formula_crossover=own_init,
    setting_sigmas={
      "measured": sigma_info(measured, sizes),
      "quickstart": sigma_info(experiment_config("fedavg", "sgd"), sizes),
    },
    paper=paper_json,
    paper_settings=PAPER,
    paper_crossover=paper_crossover(paper),
    configs={f"{o}/{s}": to_dict(c) for (o, s), c in configs.items()},
    device=_common.device_report(),
    total_seconds=time.perf_counter() - began,
  )
  return dict(meta=meta, results=summary)


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, "reduced setting and seeds (~7 min on 2 CPU cores)")
  parser.add_argument("--no-adamw", action="store_true", help="skip the AdamW panel")
  args = parser.parse_args(argv)
  path = (args.out or _common.RESULTS) / f"{_common.stem(NAME, args.quick)}.json"
  if not args.report:
    _common.quiet_accounting()
    optimizers = ["sgd"] + ([] if args.no_adamw else ["adamw"])
    _common.save(path, measure(MODES["quick" if args.quick else "full"], optimizers, _common.command(NAME, argv)))
  _common.render(path, markdown, plot)


if __name__ == "__main__":
  main()
