"""FedASK's two-stage sketch: exact aggregation of low-rank adapters without forming an m x n matrix.

Notation (docs/design.md, section 1.1; factor names: `fedask_jax.lora`). One layer's update is `lora_a @ lora_b`,
lora_a [m, r], lora_b [r, n], with m = in and n = out. K clients hold factors (lora_a_k, lora_b_k) stacked on a
leading axis [K, ...], with weights w_k, and the aggregate is `T = sum_k w_k lora_a_k lora_b_k`. The weights
are used as given: pass normalised ones (sum 1) for the weighted mean, as the round does
(`fedask_jax.numerics.normalise_weights`).

One round (docs/design.md, sections 1.3 and 1.4; paper Algorithm 1 and Theorem 2, applied to the kernel-layout product
lora_a @ lora_b: the algorithm and the theorem hold for any product of two factors), `w = r + p` the sketch width:

1. stage 1: client k sends `Y_k = lora_a_k (lora_b_k Omega)` [m, w], Omega [n, w] Gaussian shared by seed;
   server `Y = sum_k w_k Y_k`, `Q = orth(Y)` [m, w] (thin QR).
2. stage 2: client k sends `P_k = lora_b_k^T (lora_a_k^T Q)` [n, w]; server `P = sum_k w_k P_k`.
3. reconstruction: `P^T = U S V^T` and the rank-r truncation `(Q U_r) S_r V_r^T` of `Q Q^T T`, split into two
   factors by a gauge (`fedask_jax.sketch.gauges`); the paper's is the balanced split `lora_a = Q U_r S_r^{1/2}`,
   `lora_b = S_r^{1/2} V_r^T`. When the sketch covers the range of T (its rank <= w, e.g. any p >= 0 when one
   factor is shared by all clients), `Q Q^T` is the identity on it and the result is the Eckart-Young best
   rank-r approximation of T, which is T itself when its rank is <= r.

Gauge (`fedask_jax.sketch.gauges`): how the truncation is split into two factors, and why the split matters
under DP.

Precision (`fedask_jax.numerics`): all linear algebra (products, QR, SVD) runs in float32 or wider whatever the
factors' dtype, with `Precision.HIGHEST`. The stage functions return that compute dtype (the messages feed QR
and SVD); `aggregate_layer` casts its result back to the factors' dtype.

Sketch width. A width above min(m, n) adds nothing (T's rank is at most min(m, n)) and would make the thin QR /
SVD shapes ragged, so `aggregate_layer` keeps the first min(m, n) columns of Omega and `make_omegas` draws each
layer's Omega with width min(width, m, n).

The package's modules: `fedask_jax.sketch.aggregation` (the Omegas, the clients' stage messages, the
reconstruction, `aggregate_layer` and `aggregate_adapters`, the exactness certificate),
`fedask_jax.sketch.linalg` (the orthonormal basis, shifted Cholesky-QR, the tall SVD) and
`fedask_jax.sketch.gauges` (`split_factors`). Every public name is importable from `fedask_jax.sketch`.
"""

from fedask_jax.sketch.aggregation import (
  adapters_reconstruction_error,
  aggregate_adapters,
  aggregate_layer,
  batch_layers,
  make_omega,
  make_omegas,
  reconstruct,
  reconstruction_error,
  stage1_sketch,
  stage2_project,
)
from fedask_jax.sketch.gauges import FIXED, GAUGES, split_factors
from fedask_jax.sketch.linalg import FILL_SEED, METHODS, SHIFTED_PASSES, cholesky_qr, default_method, orthonormal_basis
