"""Client partitions: which examples each simulated client holds.

Three schemes, all reproducible under a seed (`numpy.random.default_rng(seed)`):

- IID (`iid_partition`), stratified by a category column (as FedASK's official code is reported to): each category's
  examples are shuffled and dealt round-robin to the clients, the deal continuing from one category to the
  next, so every client holds each category's share to within one example and sizes differ by at most one.
  Pass a constant column for unstratified IID.
- Dirichlet (`dirichlet_partition`, Hsu et al. 2019; the paper's non-IID setting): for each category c,
  client proportions p_c ~ Dir(alpha 1_K) and the category's shuffled examples are cut at the cumulative
  proportions. Small alpha concentrates each category on few clients. A draw that leaves a client with fewer
  than `min_client_size` examples is rejected and redrawn from the same generator (at most `max_draws`
  draws; then a ValueError says what to change). Rejection slightly conditions the distribution on
  non-empty clients, as NIID-Bench's `min_require_size` loop does.
- Natural (`natural_partition`): a column names the client (Tiny Shakespeare's speaker, as in LEAF).

A `Partition` holds each client's sorted example indices; `Partition.summary()` reports the sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from fedask_jax._checks import check_int
from fedask_jax.data.sources import Record


class Partition(NamedTuple):
  """client_indices[k]: the sorted int64 indices (into the dataset) of client k's examples.
  client_names: optional names (natural partitions: the column value), one per client."""

  client_indices: tuple[np.ndarray, ...]
  client_names: tuple[str, ...] | None = None

  @property
  def num_clients(self) -> int:
    return len(self.client_indices)

  @property
  def sizes(self) -> np.ndarray:
    """[num_clients] int64 examples per client."""
    return np.array([len(idx) for idx in self.client_indices], np.int64)

  def summary(self, categories: Sequence[Any] | None = None) -> str:
    """Client sizes: min / median / max, then one row per client (with per-category counts if given)."""
    sizes = self.sizes
    lines = [
      f"{self.num_clients} clients, {int(sizes.sum())} examples; size min {int(sizes.min())}, "
      f"median {float(np.median(sizes)):g}, max {int(sizes.max())}"
    ]
    labels, inverse = (None, None) if categories is None else np.unique(np.asarray(categories), return_inverse=True)
    header = "client  size" + ("".join(f"  {str(c):>10}" for c in labels) if labels is not None else "")
    lines.append(header)
    for k, idx in enumerate(self.client_indices):
      name = self.client_names[k] if self.client_names is not None else str(k)
      row = f"{name:>6}  {len(idx):>4}"
      if labels is not None and inverse is not None:
        counts = np.bincount(inverse[idx], minlength=len(labels))
        row += "".join(f"  {int(c):>10}" for c in counts)
      lines.append(row)
    return "\n".join(lines)


def _check_common(num_examples: int, num_clients: int) -> None:
  check_int("num_clients", num_clients, 1)
  if num_examples < num_clients:
    raise ValueError(
      f"num_clients={num_clients} exceeds the {num_examples} examples: every client needs at least one; "
      "use fewer clients or more data."
    )


def _from_assignment(assignment: np.ndarray, num_clients: int) -> Partition:
  order = np.argsort(assignment, kind="stable")
  counts = np.bincount(assignment, minlength=num_clients)
  return Partition(tuple(np.split(order, np.cumsum(counts)[:-1])))


def iid_partition(categories: npt.ArrayLike, num_clients: int, *, seed: int) -> Partition:
  """Stratified IID split of N examples over `num_clients` (module doc).

  Args:
    categories: [N] a category label per example (any hashable; a constant for unstratified IID).
    num_clients: K.
    seed: seeds the shuffles.

  Every client gets floor(N/K) or ceil(N/K) examples and, per category c with n_c examples, floor(n_c/K)
  or ceil(n_c/K) of them.
  """
  categories = np.asarray(categories)
  _check_common(len(categories), num_clients)
  rng = np.random.default_rng(seed)
  _, inverse = np.unique(categories, return_inverse=True)
  dealt = np.concatenate([rng.permutation(np.flatnonzero(inverse == c)) for c in range(inverse.max() + 1)])
  assignment = np.empty(len(categories), np.int64)
  assignment[dealt] = np.arange(len(categories)) % num_clients
  return _from_assignment(assignment, num_clients)


def dirichlet_partition(
  categories: npt.ArrayLike,
  num_clients: int,
  *,
  alpha: float,
  seed: int,
  min_client_size: int = 1,
  max_draws: int = 100,
) -> Partition:
  """Dirichlet(alpha) split over categories (module doc), redrawn until every client has min_client_size.

  Args:
    categories: [N] a category label per example.
    num_clients: K.
    alpha: the Dirichlet concentration (> 0); 0.1 is very skewed, 100 close to IID.
    seed: seeds the Dirichlet draws and the shuffles.
    min_client_size: the fewest examples a client may hold (>= 1).
    max_draws: how many draws to try before giving up.
  """
  categories = np.asarray(categories)
  _check_common(len(categories), num_clients)
  if not alpha > 0:
    raise ValueError(f"alpha={alpha!r}: the Dirichlet concentration must be > 0 (0.1 skewed, 100 near IID).")
  if min_client_size < 1 or min_client_size * num_clients > len(categories):
    raise ValueError(
      f"min_client_size={min_client_size}: must be >= 1 and at most N / num_clients = "
      f"{len(categories)} / {num_clients}."
    )
  rng = np.random.default_rng(seed)
  _, inverse = np.unique(categories, return_inverse=True)
  members = [np.flatnonzero(inverse == c) for c in range(inverse.max() + 1)]
  assignment = np.empty(len(categories), np.int64)
  for _ in range(max_draws):
    for idx in members:
      proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
      assignment[rng.permutation(idx)] = np.searchsorted(cuts, np.arange(len(idx)), side="right")
    if np.bincount(assignment, minlength=num_clients).min() >= min_client_size:
      return _from_assignment(assignment, num_clients)
  raise ValueError(
    f"dirichlet_partition: {max_draws} draws with alpha={alpha} over {len(members)} categories all left a "
    f"client with fewer than {min_client_size} examples: raise alpha, use fewer than {num_clients} clients, "
    "lower min_client_size, or raise max_draws."
  )


def natural_partition(client_column: Sequence[Any], *, min_client_size: int = 1) -> Partition:
  """One client per distinct value of `client_column` (e.g. the speaker), clients in sorted name order.

  Values with fewer than `min_client_size` examples are dropped (LEAF also drops small users), so the
  sizes then sum to less than N.
  """
  column = np.asarray(client_column)
  if column.size == 0:
    raise ValueError("natural_partition got an empty client column: pass one client name per example.")
  names, inverse = np.unique(column, return_inverse=True)
  counts = np.bincount(inverse, minlength=len(names))
  kept = np.flatnonzero(counts >= min_client_size)
  if kept.size == 0:
    raise ValueError(f"min_client_size={min_client_size} drops every client (largest has {counts.max()}): lower it.")
  order = np.argsort(inverse, kind="stable")
  groups = np.split(order, np.cumsum(counts)[:-1])
  return Partition(tuple(groups[k] for k in kept), tuple(str(names[k]) for k in kept))


def partition_records(
  records: Sequence[Record],
  scheme: str,
  *,
  num_clients: int | None = None,
  column: str | None = "category",
  alpha: float | None = None,
  seed: int = 0,
  min_client_size: int = 1,
) -> Partition:
  """A partition of `records` by name, for configs: scheme "iid" | "dirichlet" | "natural" (module doc).

  `column` is the category column (iid, dirichlet) or the client column (natural); None with "iid" means
  unstratified. `num_clients` is required for iid and dirichlet, `alpha` for dirichlet; `min_client_size`
  applies to dirichlet and natural (iid sizes are within one of N / num_clients).
  """
  if scheme not in ("iid", "dirichlet", "natural"):
    raise ValueError(f"partition scheme={scheme!r}: choose 'iid', 'dirichlet' or 'natural'.")
  if column is None and scheme != "iid":
    raise ValueError(f"partition scheme={scheme!r} needs a column (the category or client column); got None.")
  if column is not None and records and column not in records[0]:
    raise ValueError(
      f"partition column={column!r} is not a field of the records (fields: {sorted(records[0])}): name the "
      "category column (GSM8K: 'category') or, for 'natural', the client column (Shakespeare: 'speaker')."
    )
  values = [0] * len(records) if column is None else [r[column] for r in records]
  if scheme == "natural":
    return natural_partition(values, min_client_size=min_client_size)
  if num_clients is None:
    raise ValueError(f"partition scheme={scheme!r} needs num_clients.")
  if scheme == "iid":
    return iid_partition(values, num_clients, seed=seed)
  if alpha is None:
    raise ValueError("partition scheme='dirichlet' needs alpha (e.g. 0.1, 0.5 or 1.0 as in the paper).")
  return dirichlet_partition(values, num_clients, alpha=alpha, seed=seed, min_client_size=min_client_size)
