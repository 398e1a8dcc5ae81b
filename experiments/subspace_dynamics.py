"""Subspace dynamics: does the paper's A leave its initial subspace? Principal angles between A's row space at
round t and at round 0, for FedASK (DP and non-DP), fedask-alt (DP) and FFA-LoRA (DP, A fixed); and per round,
for FedASK's reconstruction gauges under DP (balanced, orthonormal, norm: `fedask_jax.sketch.split_factors`) and
FFA-LoRA at two learning rates, the clipped fraction, A's scale ||lora_a_t||_F / ||lora_a_0||_F and the sketch's
exactness certificate (issue 14: the mechanism by which the gauge acts under DP, measured).

    python experiments/subspace_dynamics.py            # full: 30 rounds per run, 10 runs (~17 min of CPU: 2.5x the
                                                       # 400 s that its first 4 runs took, estimated)
    python experiments/subspace_dynamics.py --quick    # 6 rounds per run, 10 runs (5.5 min of CPU, 13 min wall at
                                                       # load 9 on 2 cores; each run's compilation dominates)
    python experiments/subspace_dynamics.py --report   # rebuild the .md and .png from the .json (with --quick: *_quick)

Writes subspace_dynamics.md (tables and findings), subspace_dynamics.json (every number, the configs, the
command, versions), subspace_dynamics.png (angles, the change and the scale of A vs round) and
subspace_dynamics_gauges.png (the gauges: clipped fraction, A's scale, certificate and train loss vs round) into
--out (default experiments/results); --quick writes subspace_dynamics_quick.*.

Notation (docs/design.md, section 1.1): the paper's A [r x n] (y = W x, W = W0 + s B A) is lora_a^T, with lora_a [in, r]
in Flax layout, so A's row space is the column space of lora_a. The principal angles theta_1 <= ... <= theta_r
between col(lora_a at round t) and col(lora_a at round 0) are 0 when the subspace has not moved and pi/2 for a
direction orthogonal to the whole initial subspace.

Each method's round is compiled once (`FederatedRound`; fedask-alt compiles one round for lora_b and one for
lora_a) by `fedask_jax.runner.prepare` on experiments/configs/quickstart.yaml with a few overrides; the rounds are
looped on the host with the runner's sampler and keys (so the trajectory is the one `runner.train` would take),
and the global adapters are read after every round. The sketch strategies run with `sketch.certify_every=1`, so
the certificate `reconstruction_error` (max over layers of ||lora_a lora_b - sum_k w_k lora_a_k lora_b_k||_F /
||sum_k w_k lora_a_k lora_b_k||_F) is measured in every round; it only adds metrics, the trajectory is the same.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import _common  # experiments/_common.py
import numpy as np
from _common import plt

NAME = "subspace_dynamics"
# Angles below this (radians) are float32 round-off of the reconstruction (lora_a = Q U_r S_r^{1/2} from a float32
# QR and SVD each round), not motion: eps32 = 1.2e-7 times the conditioning of the r columns, over rounds.
ROUNDOFF_ANGLE = 1e-4
# Certificates below this are float32 round-off of the sketch: exact_aggregation.md measures at most 8.8e-5 in DP
# mode over every oversampling, p = 0 included (6.3e-6 for p >= 1).
ROUNDOFF_CERTIFICATE = 1e-4


@dataclasses.dataclass(frozen=True)
class Method:
  """One run: the strategy, DP on or off, the reconstruction gauge (sketch strategies only) and the learning rate
  (None: the quickstart's 1e-2)."""

  name: str
  strategy: str
  private: bool
  label: str
  gauge: str | None = None
  lr: float | None = None


# The gauges' second learning rate: the best rate of the cpu-mode tuning slice of method_comparison.py (IID,
# epsilon 3, 20 rounds, seed 100, lattice 6.25e-3 / 1.25e-2 / 2.5e-2) for FFA-LoRA, fedask:balanced and fedask:norm
# alike, each on that lattice's upper edge; fedask:orthonormal was not in the slice.
TUNED_LR = 2.5e-2
GAUGES = ("balanced", "orthonormal", "norm")
# The angle figure and the per-layer table: the four runs that answer the subspace question.
ANGLE_METHODS = ("fedask-dp", "fedask", "fedask-alt-dp", "ffa-lora-dp")


def gauge_runs() -> tuple[Method, ...]:
  """FedASK under DP in each gauge (balanced at the quickstart's lr is "fedask-dp" above) and FFA-LoRA, the
  reference with A fixed, at `TUNED_LR`."""
  at_quickstart = tuple(
    Method(f"fedask-dp-{g}", "fedask", True, f"FedASK, DP, {g} gauge", gauge=g) for g in GAUGES if g != "balanced"
  )
  at_tuned = tuple(
    Method(f"fedask-dp-{g}-lr{TUNED_LR:g}", "fedask", True, f"FedASK, DP, {g} gauge, lr {TUNED_LR:g}", g, TUNED_LR)
    for g in GAUGES
  )
  return (
    *at_quickstart,
    *at_tuned,
    Method(f"ffa-lora-dp-lr{TUNED_LR:g}", "ffa-lora", True, f"FFA-LoRA, DP, lr {TUNED_LR:g}", lr=TUNED_LR),
  )


METHODS = (
  Method("fedask-dp", "fedask", True, "FedASK, DP (B trained, A frozen locally)", gauge="balanced"),
  Method("fedask", "fedask", False, "FedASK, no DP (A and B trained)", gauge="balanced"),
  Method("fedask-alt-dp", "fedask-alt", True, "fedask-alt, DP (B and A trained in alternate rounds)", gauge="balanced"),
  Method("ffa-lora-dp", "ffa-lora", True, "FFA-LoRA, DP (A fixed: the baseline)"),
  *gauge_runs(),
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """One mode's sizes; the rest is quickstart.yaml's (4 clients, 2 per round, lr 1e-2, r = 8, (3, 1e-5)-DP)."""

  rounds: int
  local_steps: int
  batch_size: int
  max_train_examples: int | None
  max_seq_len: int


SETTINGS = {
  True: Settings(rounds=6, local_steps=2, batch_size=8, max_train_examples=800, max_seq_len=128),
  False: Settings(rounds=30, local_steps=4, batch_size=16, max_train_examples=None, max_seq_len=128),
}


def overrides(method: Method, settings: Settings) -> list[str]:
  """quickstart.yaml overrides for one method: the sketch strategies with their gauge and the certificate in
  every round."""
  s = settings
  sketch = {} if method.gauge is None else {"sketch.gauge": method.gauge, "sketch.certify_every": 1}
  lr = {} if method.lr is None else {"lr": repr(float(method.lr))}
  return _common.overrides(
    {
      "strategy": method.strategy,
      **sketch,
      **lr,
      "privacy.enabled": method.private,
      "rounds": s.rounds,
      "local_steps": s.local_steps,
      "batch_size": s.batch_size,
      "data.max_train_examples": s.max_train_examples,
      "data.max_seq_len": s.max_seq_len,
      "eval.max_examples": 10,
      "client_chunk": _common.cpu_client_chunk(),
    }
  )


# ---------------------------------------------------------------------------------------------------------------
# The measured quantities (float64 numpy).


def principal_angles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Principal angles [min(kx, ky)] in radians, ascending, between col(x) and col(y); x [n, kx], y [n, ky] of full
  column rank (Bjorck and Golub 1973; Knyazev and Argentati 2002).

  With orthonormal bases Qx, Qy (ky <= kx), the cosines are the singular values of Qx^T Qy and the sines those of
  Qy - Qx Qx^T Qy; theta = arctan2(sin, cos) pairs them (descending cosines with ascending sines), which keeps
  full relative accuracy for small angles, where arccos(cos) would lose half the digits (cos theta = 1 - theta^2 / 2).
  """
  qx, _ = np.linalg.qr(np.asarray(x, np.float64))
  qy, _ = np.linalg.qr(np.asarray(y, np.float64))
  if qy.shape[1] > qx.shape[1]:
    qx, qy = qy, qx
  overlap = qx.T @ qy
  cosines = np.linalg.svd(overlap, compute_uv=False)
  sines = np.linalg.svd(qy - qx @ overlap, compute_uv=False)[::-1]
  return np.arctan2(sines, np.minimum(cosines, 1.0))


def angle_summary(initial: dict[str, np.ndarray], current: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Per layer {largest, mean} principal angle (radians) between col(current lora_a) and col(initial lora_a),
  the relative change ||a_t - a_0||_F / ||a_0||_F and the scale ||a_t||_F / ||a_0||_F; a [in, r]."""
  out = {}
  for name, a0 in initial.items():
    angles = principal_angles(a0, current[name])
    a0 = np.asarray(a0, np.float64)
    at = np.asarray(current[name], np.float64)
    change = np.linalg.norm(at - a0) / np.linalg.norm(a0)
    scale = np.linalg.norm(at) / np.linalg.norm(a0)
    out[name] = dict(largest=float(angles.max()), mean=float(angles.mean()), change=float(change), scale=float(scale))
  return out


# ---------------------------------------------------------------------------------------------------------------
# The runs.


def lora_a(adapters) -> dict[str, np.ndarray]:
  """{name: lora_a [in, r]} copied to the host (np.array copies: the next round donates the device buffers)."""
  return {name: np.array(f.lora_a) for name, f in adapters.items()}


def run_method(method: Method, settings: Settings) -> dict[str, Any]:
  """Prepare the method's run and loop its compiled rounds, measuring lora_a after each."""
  began = time.perf_counter()
  experiment = _common.prepare(overrides(method, settings))
  config, round_fn = experiment.config, experiment.round_fn
  state = round_fn.init(config.num_clients)
  initial = lora_a(state.adapters)
  rounds = []
  for t, round_key, ids, weights, batches in _common.host_rounds(experiment):
    state, metrics = round_fn(state, batches, ids, weights, round_key, t)
    # Read before the next round: its call donates this state's buffers.
    current = lora_a(state.adapters)
    layers = angle_summary(initial, current)
    rounds.append(
      dict(
        round=t,
        trained=round_fn.trained(t),
        train_loss=float(metrics["train_loss"]),
        clipped_fraction=float(metrics["clipped_fraction"]) if method.private else None,
        reconstruction_error=float(metrics["reconstruction_error"]) if "reconstruction_error" in metrics else None,
        a_unchanged=all(np.array_equal(current[n], a0) for n, a0 in initial.items()),
        layers=layers,
      )
    )
    largest = max(v["largest"] for v in layers.values())
    print(
      f"{method.name} round {t}/{config.rounds}: trained {rounds[-1]['trained']}, largest angle "
      f"{largest:.3g} rad, train loss {rounds[-1]['train_loss']:.4f} "
      f"({time.perf_counter() - began:.0f} s)",
      flush=True,
    )
  plan = experiment.privacy
  return dict(
    method=method.name,
    strategy=method.strategy,
    private=method.private,
    label=method.label,
    gauge=method.gauge,
    lr=config.lr,
    rounds=rounds,
    seconds=time.perf_counter() - began,
    overrides=overrides(method, settings),
    notes=experiment.notes,
    noise_multiplier=None if plan is None else plan.noise_multiplier,
    rank=config.lora.rank,
  )


def summarize(result: dict[str, Any]) -> dict[str, Any]:
  """Per round: over layers, the mean and max of the largest angle, the mean of the mean angles and of the
  relative change and of the scale ||A_t|| / ||A_0||, the clipped fraction (None without DP), the certificate
  (None without the sketch) and the train loss; and the final round's per-layer figures."""
  per_round = []
  for r in result["rounds"]:
    largest = np.array([v["largest"] for v in r["layers"].values()])
    per_round.append(
      dict(
        round=r["round"],
        largest_mean=float(largest.mean()),
        largest_max=float(largest.max()),
        largest_min=float(largest.min()),
        mean_angle=float(np.mean([v["mean"] for v in r["layers"].values()])),
        change=float(np.mean([v["change"] for v in r["layers"].values()])),
        scale=float(np.mean([v["scale"] for v in r["layers"].values()])),
        clipped_fraction=r.get("clipped_fraction"),
        reconstruction_error=r.get("reconstruction_error"),
        train_loss=r.get("train_loss"),
      )
    )
  return dict(
    per_round=per_round,
    final_layers=result["rounds"][-1]["layers"],
    max_largest=max(p["largest_max"] for p in per_round),
    a_never_changed=all(r["a_unchanged"] for r in result["rounds"]),
  )


# ---------------------------------------------------------------------------------------------------------------
# The plot and the report, from the results file alone.


COLORS = {"fedask-dp": "tab:blue", "fedask": "tab:green", "fedask-alt-dp": "tab:red", "ffa-lora-dp": "tab:gray"}


def angle_results(report: dict[str, Any]) -> list[dict[str, Any]]:
  """The results of `ANGLE_METHODS`, in that order."""
  by_name = {r["method"]: r for r in report["results"]}
  return [by_name[name] for name in ANGLE_METHODS]


def plot(report: dict[str, Any], path: Path) -> None:
  """The angle figure (`path`) and, when the report holds the gauge runs, the gauge figure (`<stem>_gauges.png`
  beside it)."""
  plot_angles(report, path)
  if has_gauges(report):
    plot_gauges(report, path.with_name(f"{report['stem']}_gauges.png"))


def plot_angles(report: dict[str, Any], path: Path) -> None:
  """Per method of `ANGLE_METHODS` against the round: the angles, A's change and A's scale."""
  results = angle_results(report)
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
  for result in results:
    summary, color = result["summary"], COLORS[result["method"]]
    rounds = [0] + [p["round"] for p in summary["per_round"]]

    def degrees(key, per_round=summary["per_round"]):
      return [0.0] + [np.degrees(p[key]) for p in per_round]

    axes[0].plot(rounds, degrees("largest_mean"), "-", color=color, label=result["label"])
    axes[0].fill_between(rounds, degrees("largest_min"), degrees("largest_max"), color=color, alpha=0.15)
    axes[0].plot(rounds, degrees("mean_angle"), "--", color=color)
    axes[1].plot(
      [p["round"] for p in summary["per_round"]],
      [p["largest_max"] for p in summary["per_round"]],
      "o-",
      ms=3,
      color=color,
    )
    axes[2].plot(rounds, [0.0] + [p["change"] for p in summary["per_round"]], "-", color=color)
    axes[3].plot(rounds, [1.0] + [p["scale"] for p in summary["per_round"]], "-", color=color)
  axes[0].set_title(
    "Largest principal angle (solid; band: min-max over layers)\nand mean angle (dashed), mean over layers", fontsize=9
  )
  axes[0].set_ylabel("angle between row(A_t) and row(A_0) (degrees)")
  axes[1].set_title("Largest principal angle, max over layers (log scale)", fontsize=9)
  axes[1].set_ylabel("angle (radians)")
  axes[1].set_yscale("log")
  axes[1].axhline(ROUNDOFF_ANGLE, color="k", ls=":", lw=1)
  axes[1].annotate(
    f"float32 round-off level ({ROUNDOFF_ANGLE:g} rad)",
    (0.02, ROUNDOFF_ANGLE * 2),
    xycoords=("axes fraction", "data"),
    fontsize=7,
  )
  axes[2].set_title("Change of A as a matrix, mean over layers", fontsize=9)
  axes[2].set_ylabel("||A_t - A_0||_F / ||A_0||_F")
  axes[3].set_title("Scale of A, mean over layers (log scale)", fontsize=9)
  axes[3].set_ylabel("||A_t||_F / ||A_0||_F")
  axes[3].set_yscale("log")
  for ax in axes:
    ax.set_xlabel("round")
    ax.grid(alpha=0.3, which="both")
  fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(results), fontsize=8)
  fig.suptitle(
    f"Does the paper's A leave its initial row space? (base model + GSM8K, LoRA r = {results[0]['rank']})", fontsize=10
  )
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


GAUGE_COLORS = {"balanced": "tab:blue", "orthonormal": "tab:orange", "norm": "tab:green", None: "tab:gray"}


def gauge_results(report: dict[str, Any]) -> dict[float, list[dict[str, Any]]]:
  """{lr: the DP runs of FedASK's gauges (balanced, orthonormal, norm), then FFA-LoRA's}, lrs ascending."""
  out: dict[float, list[dict[str, Any]]] = {}
  for r in report["results"]:
    if r["private"] and (r["strategy"] == "fedask" or r["strategy"] == "ffa-lora"):
      out.setdefault(r["lr"], []).append(r)
  order = lambda r: GAUGES.index(r["gauge"]) if r["gauge"] else len(GAUGES)
  return {lr: sorted(out[lr], key=order) for lr in sorted(out)}


def gauge_name(result: dict[str, Any]) -> str:
  return f"FedASK {result['gauge']}" if result["gauge"] else "FFA-LoRA"


def plot_gauges(report: dict[str, Any], path: Path) -> None:
  """Per DP run of FedASK's gauges and FFA-LoRA against the round, one line style per learning rate: the clipped
  fraction, A's scale, the certificate and the train loss."""
  runs = gauge_results(report)
  styles = dict(zip(runs, ("-", "--", ":", "-.")))
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
  for lr, results in runs.items():
    for r in results:
      per_round, color = r["summary"]["per_round"], GAUGE_COLORS[r["gauge"]]
      rounds = [p["round"] for p in per_round]
      style = dict(ls=styles[lr], color=color, label=f"{gauge_name(r)}, lr {lr:g}")
      axes[0].plot(rounds, [p["clipped_fraction"] for p in per_round], **style)
      axes[1].plot([0, *rounds], [1.0] + [p["scale"] for p in per_round], **style)
      if r["gauge"]:
        axes[2].plot(rounds, [p["reconstruction_error"] for p in per_round], marker="o", ms=2, **style)
      axes[3].plot(rounds, [p["train_loss"] for p in per_round], **style)
  axes[0].set_title("Fraction of per-example gradients clipped", fontsize=9)
  axes[0].set_ylim(0, 1)
  axes[1].set_title("Scale of the frozen factor, mean over layers (log scale)", fontsize=9)
  axes[1].set_ylabel("||lora_a_t||_F / ||lora_a_0||_F")
  axes[1].set_yscale("log")
  axes[2].set_title("Exactness certificate, max over layers (log scale)", fontsize=9)
  axes[2].set_ylabel("||A B - T||_F / ||T||_F, T = sum_k w_k A_k B_k")
  axes[2].set_yscale("log")
  axes[3].set_title("Train loss of the round (the sampled clients' mean)", fontsize=9)
  for ax in axes:
    ax.set_xlabel("round")
    ax.grid(alpha=0.3, which="both")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=(len(labels) + 1) // 2, fontsize=8)
  sigma = next(r["noise_multiplier"] for r in report["results"] if r["private"])
  fig.suptitle(
    f"FedASK's reconstruction gauges under DP (noise multiplier {sigma:.3f}) against FFA-LoRA: the frozen factor's "
    "scale sets the clipping",
    fontsize=10,
  )
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def round_two(per_round: list[dict[str, Any]]) -> dict[str, Any]:
  """Round 2's summary (round 1's for a one-round run): the first round that starts from a reconstructed A."""
  return per_round[min(1, len(per_round) - 1)]


def setup_text(report: dict[str, Any]) -> str:
  """The setting and what is measured per round and layer."""
  s, rank = report["config"]["settings"], report["results"][0]["rank"]
  return (
    "**Setup.** The embedded base model and GSM8K with quickstart.yaml (4 clients, 2 per round, LoRA r = "
    f"{rank} on q_proj and v_proj, lr 1e-2, (3, 1e-5)-DP when private), {s['rounds']} rounds of "
    f"{s['local_steps']} local steps of batch {s['batch_size']}, sequences of {s['max_seq_len']} tokens. The "
    "paper's A [r x n] is lora_a^T (docs/design.md, section 1.1), so its row space is col(lora_a). Per round "
    "and layer: the principal angles between col(lora_a^t) and col(lora_a^0) (float64; checked against "
    "scipy.linalg.subspace_angles in the test), their largest and their mean, ||A_t - A_0||_F / ||A_0||_F and "
    "||A_t||_F / ||A_0||_F; with DP, the fraction of per-example gradients clipped in the round. "
    f"Angles below {ROUNDOFF_ANGLE:g} rad count as float32 round-off."
    + (
      " For the sketch strategies, the exactness certificate `reconstruction_error` in every round "
      f"(sketch.certify_every = 1). FedASK's gauges under DP and FFA-LoRA also run at lr {TUNED_LR:g} (section "
      "'Gauges'). Each run is one seed."
      if has_gauges(report)
      else ""
    )
  )


def has_gauges(report: dict[str, Any]) -> bool:
  """Whether the report holds the gauge runs (a results file written before they were added holds none)."""
  return any(r.get("gauge") for r in report["results"])


def method_table(report: dict[str, Any]) -> list[str]:
  """One row per method: sigma, the final and largest angles, A's change and scale, clipping, train loss."""
  rows = []
  for r in report["results"]:
    per_round = r["summary"]["per_round"]
    first, last = per_round[0], per_round[-1]
    sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
    certificates = [p["reconstruction_error"] for p in per_round if p.get("reconstruction_error") is not None]
    clipped = (
      "-"
      if first["clipped_fraction"] is None
      else " / ".join(f"{p['clipped_fraction']:.2f}" for p in (first, round_two(per_round), last))
    )
    rows.append(
      [
        r["label"],
        sigma,
        f"{np.degrees(last['largest_mean']):.3g}",
        f"{r['summary']['max_largest']:.3g}",
        f"{np.degrees(last['mean_angle']):.3g}",
        f"{last['change']:.3g}",
        f"{first['scale']:.3g} / {last['scale']:.3g}",
        clipped,
        f"{max(certificates):.2g}" if certificates else "-",
        f"{r['rounds'][-1]['train_loss']:.4f}",
      ]
    )
  header = [
    "method",
    "noise multiplier",
    "final largest angle, mean over layers (deg)",
    "max over layers and rounds (rad)",
    "final mean angle (deg)",
    "final ‖A_t - A_0‖ / ‖A_0‖",
    "‖A_t‖ / ‖A_0‖ after round 1 / last",
    "clipped fraction in round 1 / 2 / last",
    "certificate, max over rounds",
    "final train loss",
  ]
  return _common.table(header, rows, "l" + "r" * 9)


def layer_table(report: dict[str, Any]) -> list[str]:
  """One row per layer: each of `ANGLE_METHODS`' largest / mean angle after the last round, in degrees."""
  results = angle_results(report)

  def angles(r: dict[str, Any], name: str) -> str:
    final = r["summary"]["final_layers"][name]
    return f"{np.degrees(final['largest']):.3g} / {np.degrees(final['mean']):.3g}"

  rows = [[name, *(angles(r, name) for r in results)] for name in results[0]["summary"]["final_layers"]]
  return _common.table(["layer", *(r["method"] for r in results)], rows, "l" + "r" * len(results))


def dp_finding(dp: dict[str, Any], rounds: int) -> str:
  """FedASK under DP: A changes as a matrix; does its row space move beyond round-off?"""
  still = dp["max_largest"] < ROUNDOFF_ANGLE
  change_last, change_first = dp["per_round"][-1]["change"], dp["per_round"][0]["change"]
  movement = (
    "float32 round-off: A does not leave its initial row space. "
    if still
    else f"above the {ROUNDOFF_ANGLE:g} rad round-off level: A moves. "
  )
  claim = (
    "So in DP mode FedASK updates A, but only within the random subspace it started from, the subspace "
    "that FFA-LoRA fixes; the paper's 'beyond fixed-matrix' claim holds for A's values, not for its "
    "subspace."
    if still
    else "The paper's 'beyond fixed-matrix' claim holds here for the subspace too."
  )
  return (
    f"- FedASK under DP: the largest principal angle stays at most {dp['max_largest']:.2g} rad over all layers "
    f"and rounds, {movement}Yet A changes as a matrix (||A_t - A_0|| / ||A_0|| = {change_last:.3g} after round "
    f"{rounds}, {change_first:.3g} already after round 1, where the balanced factors replace PEFT's initial "
    "scale): each reconstruction (the paper's A^t = S_r^{1/2} V_r^T; in our layout lora_a = Q U_r S_r^{1/2}) "
    "rescales and rotates it inside row(A^{t-1}), because with A frozen locally sum_k w_k B_k A has its row "
    f"space inside row(A) (docs/design.md, section 1.5). {claim}"
  )


def free_finding(free: dict[str, Any], rounds: int) -> str:
  """FedASK without DP: clients train A, and its subspace moves."""
  last = free["per_round"][-1]
  return (
    f"- FedASK without DP (both factors trained): the largest angle reaches "
    f"{np.degrees(last['largest_mean']):.3g} degrees (mean over layers) after round {rounds}, the mean angle "
    f"{np.degrees(last['mean_angle']):.3g} degrees: A's subspace moves when clients train A."
  )


def alt_finding(alt: dict[str, Any]) -> str:
  """fedask-alt under DP: alternating the frozen factor moves A's subspace."""
  last = alt["per_round"][-1]
  return (
    "- fedask-alt under DP (ours: A trained in even rounds, with noise on one factor per round): the largest "
    f"angle reaches {np.degrees(last['largest_mean']):.3g} degrees, the mean angle "
    f"{np.degrees(last['mean_angle']):.3g} degrees: alternating the frozen factor does move A's subspace under "
    "DP, while keeping the noise linear and the aggregation exact. Whether that improves the model is a "
    "separate experiment; the train losses above are single noisy runs, not a comparison."
  )


def ffa_finding(ffa: dict[str, Any]) -> str:
  """FFA-LoRA: A must never change."""
  if ffa["a_never_changed"]:
    return (
      "- FFA-LoRA (the baseline): A is bit-identical to A_0 after every round; the angles computed, at most "
      f"{ffa['max_largest']:.2g} rad, are the float64 round-off of the angle computation itself."
    )
  return (
    f"- FFA-LoRA (the baseline): A CHANGED (largest angle {ffa['max_largest']:.2g} rad), which FFA-LoRA "
    "should never do."
  )


def scale_finding(dp: dict[str, Any], ffa: dict[str, Any], rounds: int) -> str:
  """A sentence on FedASK's rescaling of A under DP and what it does to clipping, against FFA-LoRA (A fixed)."""
  first, second, last = dp["per_round"][0], round_two(dp["per_round"]), dp["per_round"][-1]
  ffa_second, ffa_last = round_two(ffa["per_round"]), ffa["per_round"][-1]
  word = lambda x: "smaller" if x < 1 else "larger"
  return (
    f"- Scale of A under DP, and clipping: the balanced reconstruction makes FedASK's A {first['scale']:.3g}x "
    f"as large as A_0 after round 1 ({word(first['scale'])}) and {last['scale']:.3g}x after round {rounds}. "
    "The clients' per-example gradients of B are proportional to A (dL/dlora_b = (x lora_a)^T dL/dy), while "
    "the clip norm C and the noise sigma C stay fixed, so A's scale sets the signal-to-noise ratio of DP-SGD "
    f"on B: the fraction of per-example gradients clipped is {second['clipped_fraction']:.2f} in round 2 and "
    f"{last['clipped_fraction']:.2f} in round {rounds} for FedASK, against {ffa_second['clipped_fraction']:.2f} "
    f"and {ffa_last['clipped_fraction']:.2f} for FFA-LoRA. With A {word(first['scale'])} than A_0 in the first "
    "rounds, FedASK's early DP rounds have " + ("less" if first["scale"] < 1 else "more") + " signal under the "
    "same noise than FFA-LoRA's (method_comparison_cpu.md: it matters in short runs)."
  )


def gauge_table(results: list[dict[str, Any]]) -> list[str]:
  """One row per round for the runs of one learning rate: each run's clipped fraction, the FedASK gauges' scale
  of A and certificate."""
  fedask = [r for r in results if r["gauge"]]
  per_round = [r["summary"]["per_round"] for r in results]
  rows = []
  for t, points in enumerate(zip(*per_round)):
    gauges = [p for r, p in zip(results, points) if r["gauge"]]
    rows.append(
      [
        t + 1,
        *(f"{p['clipped_fraction']:.2f}" for p in points),
        *(f"{p['scale']:.3f}" for p in gauges),
        *(f"{p['reconstruction_error']:.1e}" for p in gauges),
      ]
    )
  header = [
    "round",
    *(f"clipped: {gauge_name(r)}" for r in results),
    *(f"‖A_t‖ / ‖A_0‖: {r['gauge']}" for r in fedask),
    *(f"certificate: {r['gauge']}" for r in fedask),
  ]
  return _common.table(header, rows, "r" * len(header))


def gauge_finding(lr: float, results: list[dict[str, Any]]) -> str:
  """What one learning rate's gauge runs show: A's scale and the clipping, against FFA-LoRA's."""
  summaries = {gauge_name(r): r["summary"]["per_round"] for r in results}
  parts = []
  for name, per_round in summaries.items():
    scales = [p["scale"] for p in per_round]
    clipped = [p["clipped_fraction"] for p in per_round]
    scale = f"A at {scales[0]:.2f}x its initial norm after round 1, {min(scales):.2f}x-{max(scales):.2f}x over the run"
    scale = "" if name == "FFA-LoRA" else f"{scale}, "  # FFA-LoRA's A never changes
    parts.append(
      f"{name}: {scale}clipped fraction {clipped[0]:.2f} in round 1, {round_two(per_round)['clipped_fraction']:.2f} "
      f"in round 2, {np.mean(clipped):.2f} on average over the rounds, final train loss "
      f"{per_round[-1]['train_loss']:.4f}"
    )
  return f"- lr {lr:g}: " + "; ".join(parts) + "."


def gauge_section(report: dict[str, Any]) -> list[str]:
  """The gauges under DP: per learning rate a finding and the per-round table; the certificate and the angles over
  all gauge runs."""
  runs = gauge_results(report)
  fedask = [r for results in runs.values() for r in results if r["gauge"]]
  certificate = max(p["reconstruction_error"] for r in fedask for p in r["summary"]["per_round"])
  angle = max(r["summary"]["max_largest"] for r in fedask)
  lines = [
    "## Gauges: the frozen factor's scale and the clipping under DP",
    "",
    "FedASK under DP in each reconstruction gauge (`fedask_jax.sketch.split_factors`: balanced, the paper's, sets "
    "||lora_a||_F^2 = sum_i S_i from the aggregate; orthonormal and norm hold lora_a at the Frobenius norm of the "
    "previous global lora_a, i.e. the initial one), with FFA-LoRA (A never changes) as the reference, at the "
    f"quickstart's lr 1e-2 and at lr {TUNED_LR:g} (the best rate of method_comparison.py's cpu-mode tuning slice "
    "for FFA-LoRA, fedask:balanced and fedask:norm at IID, epsilon 3, seed 100, on its lattice's upper edge; "
    "orthonormal was not in that slice). One seed per run: the train losses are single noisy runs, not a "
    "comparison of the gauges (method_comparison.py's tuned grid is).",
    "",
    *(gauge_finding(lr, results) for lr, results in runs.items()),
    f"- The certificate is at most {certificate:.2g} in every round of every gauge: "
    + (
      "float32 round-off, exact as Theorem 2 says whatever the gauge (every gauge gives the same product)"
      if certificate < ROUNDOFF_CERTIFICATE
      else f"ABOVE the {ROUNDOFF_CERTIFICATE:g} round-off level: some gauge is not exact"
    )
    + "; "
    + (
      f"no gauge moves A out of its initial subspace (largest angle at most {angle:.2g} rad)."
      if angle < ROUNDOFF_ANGLE
      else f"a gauge MOVES A out of its initial subspace (largest angle {angle:.2g} rad)."
    ),
    "",
    f"![gauges vs round]({report['stem']}_gauges.png)",
  ]
  for lr, results in runs.items():
    lines += ["", f"Per round at lr {lr:g}:", "", *gauge_table(results)]
  return lines


def markdown(report: dict[str, Any]) -> str:
  config = report["config"]
  rounds = config["settings"]["rounds"]
  by_name = {r["method"]: r["summary"] for r in report["results"]}
  dp, free, alt, ffa = (by_name[name] for name in ANGLE_METHODS)
  lines = [
    "# Subspace dynamics: principal angles between the row space of A at round t and at round 0",
    "",
    _common.generated_by(config["command"], config["total_seconds"], config["device"]),
    "",
    setup_text(report),
    "",
    *method_table(report),
    "",
    f"Per layer, after round {rounds}: largest / mean principal angle (degrees).",
    "",
    *layer_table(report),
    "",
    "## Findings",
    "",
    dp_finding(dp, rounds),
    free_finding(free, rounds),
    alt_finding(alt),
    ffa_finding(ffa),
    scale_finding(dp, ffa, rounds),
    "",
    f"![angles vs round]({report['stem']}.png)",
    "",
    *(gauge_section(report) + [""] if has_gauges(report) else []),
  ]
  return "\n".join(lines)


def measure(quick: bool, stem: str, command: str) -> dict[str, Any]:
  """Every method's run and summary, with the settings and provenance: the results file's content."""
  start = time.perf_counter()
  settings = SETTINGS[quick]
  results = []
  for method in METHODS:
    result = run_method(method, settings)
    result["summary"] = summarize(result)
    results.append(result)
  config = dict(
    command=command,
    quick=quick,
    base_config=str(_common.QUICKSTART.relative_to(_common.REPO)),
    settings=dataclasses.asdict(settings),
    methods=[dataclasses.asdict(m) for m in METHODS],
    device=_common.device_report(),
    total_seconds=time.perf_counter() - start,
  )
  return dict(stem=stem, config=config, results=results)


def main(argv: list[str] | None = None) -> None:
  args = _common.parser(__doc__, "6 rounds per run (~5.5 min of CPU)").parse_args(argv)
  stem = _common.stem(NAME, args.quick)
  path = (args.out or _common.RESULTS) / f"{stem}.json"
  if not args.report:
    _common.quiet_accounting()
    _common.save(path, measure(args.quick, stem, _common.command(NAME, argv)))
  _common.render(path, markdown, plot)


if __name__ == "__main__":
  main()
