"""Empirical privacy auditing of the client DP-SGD mechanism: a high-confidence lower bound on epsilon.

The game (Jagielski et al. 2020, "Auditing Differentially Private Machine Learning: How Private is Private
SGD?"; Nasr et al. 2021, "Adversary Instantiation"; Nasr et al. 2023, "Tight Auditing of Differentially Private
Machine Learning"). A client holds D (n examples) or its add/remove neighbour D' = D + {canary}. It runs the
mechanism as implemented (`fedask_jax.privacy`: T local steps, each a Poisson-sampled batch, `dp_gradient` or
`wspace_dp_gradient`, an SGD step) and releases its final trained factor theta_T. We run it N times on D' ("in")
and N times on D ("out") with fresh randomness and score each release by s = <theta_T - theta_0, u>, u the
direction in which the canary moves the factor. For any threshold t, the test "s >= t" has true- and
false-positive rates TPR, FPR, and an (epsilon, delta)-DP mechanism forces TPR <= e^epsilon FPR + delta, so

    epsilon >= log((TPR - delta) / FPR).

With Clopper-Pearson bounds TPR_lb = 1 - FNR_ub and FPR_ub, each at level alpha / 2 (alpha = 1 - confidence),
eps_lb = log((TPR_lb - delta) / FPR_ub) is below the mechanism's true epsilon with probability >= 1 - alpha
(union bound). If eps_lb exceeds the epsilon we claim, the claim (or the code) is wrong.

Threshold choice: held out. The threshold maximising the bound on a random half of each side's runs is tested
once on the other half (`jax_privacy.auditing.Split`). It is valid for any law of the scores, atoms included (a
noise-free mechanism puts every "out" score at exactly 0), at the price of half the runs. jax_privacy's default
(`Bonferroni`) maximises over all thresholds on the whole sample but divides alpha by the number of thresholds
on the data-dependent ROC frontier, not by a family fixed in advance, so its guarantee is heuristic; we report
it beside ours as a cross-check only. Not used: `CanaryScoreAuditor.epsilon_from_gdp`, whose `abs` over
isf(FPR_ub) - ppf(FNR_ub) turns trivial (negative) evidence into a bound (it returns epsilon ~ 3 for identical
in/out score distributions; google-deepmind/jax_privacy PR #270).

Ceiling: with n evaluation runs per side even perfectly separated scores certify only
log(((alpha/2)^(1/n) - delta) / (1 - (alpha/2)^(1/n))) ~ log(n / log(2 / alpha)) (`max_certifiable_epsilon`):
a broken mechanism (epsilon = infinity) is reported at this ceiling, which grows with log N.

The sampled mechanism (`audit_dp_gradient` with `sampling`). Over R rounds the canary's client is drawn
K of N by the runner's sampler (q_c = K / N per round, independently) and, when drawn, runs its S local steps
from the last released factor and releases the result; the adversary sees every release and who took part, as
the `sampled` accounting assumes (`fedask_jax.privacy.accounting`). The score is the transcript's Gaussian log
likelihood ratio. The claim audited is the `sampled` epsilon at the q_c the accountant is told
(`privacy.epsilon_spent(privacy.DPSchedule(q, S, R, q_c), sigma, delta)`): the real mechanism must stay below
it, and a mechanism whose accountant is told a smaller q_c than K / N claims too little, which the audit shows
when the gap is wide enough for its runs.

The canary (`linear_canary_problem`) is a gradient canary (Nasr et al. 2023): a tiny LoRA-adapted
`fedask_jax.lora.Linear`, y = x @ (W0 + s lora_a lora_b) with lora_a [in, r] frozen and lora_b [r, out]
trained, whose frozen lora_a reserves its last column for an input coordinate that only the canary uses; with a
huge target the canary's gradient has norm >> C (clipped to exactly C) and lives in a coordinate of lora_b that
no other example's gradient touches. That coordinate
is u, and the audit is as strong as a white-box audit of the released factor can be: in the single-step,
q = 1 setting the in/out scores are N(C, sigma^2 C^2) vs N(0, sigma^2 C^2) (times lr / (q n), and s in
W-space), the Gaussian mechanism itself.

Client sizes (`canary_scores`' `client_sizes`, issue 13). D and D' = D + {canary} differ in size, and each side
samples as the runner's `privacy.client_sizes` mode would: "private", both at the public rate q; "public", each
at q_k = b / n_k (D at q, D' at q n / (n + 1)), which the accounting at q does not cover (it holds for
neighbours of equal sizes). With the `opposed` canary problem, every ordinary example the canary's mirror image
(the DP review's +C e / -C e construction), the lower rate on D' shifts the ordinary examples' sum in the
canary's direction, and `opposed_canary_epsilon` gives the exact epsilon of that pair: far above the claim for
public sizes, equal to it for private ones.

The modules: `bound` (the lower bound, the ceiling, `audit_scores`), `release` (the mechanism as run, the canary
scores and the `audit_dp_gradient` driver) and `canary` (the canary problems, their mechanisms and the opposed
pair's exact epsilon); every public name is importable from `fedask_jax.auditing`.
"""

from fedask_jax.auditing.bound import AuditResult, audit_scores, epsilon_lower_bound, max_certifiable_epsilon
from fedask_jax.auditing.canary import SPACES, CanaryProblem, linear_canary_problem, opposed_canary_epsilon
from fedask_jax.auditing.release import (
  CANARY_CLIENT,
  CLIENT_SIZES,
  ClientSampling,
  Mechanism,
  audit_dp_gradient,
  canary_scores,
  client_release,
  sampled_client_release,
)

__all__ = [
  "CANARY_CLIENT",
  "CLIENT_SIZES",
  "SPACES",
  "AuditResult",
  "CanaryProblem",
  "ClientSampling",
  "Mechanism",
  "audit_dp_gradient",
  "audit_scores",
  "canary_scores",
  "client_release",
  "epsilon_lower_bound",
  "linear_canary_problem",
  "max_certifiable_epsilon",
  "opposed_canary_epsilon",
  "sampled_client_release",
]
