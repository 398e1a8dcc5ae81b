"""Federated strategies, one module each, registered by name (the interface: `fedask_jax.strategies.base`).

`STRATEGIES[name](**hyper_parameters)` builds a `Strategy`: "fedask" (oversample, certify_every, gauge),
"fedask-alt" (oversample, certify_every, gauge), "fedavg", "ffa-lora", "fedsa-lora", "fedprox" (mu), "scaffold".
`get_strategy` does the same with a readable error for unknown names or hyper-parameters. Strategy-specific
helpers stay in their module, e.g. `fedsa_lora.evaluation_adapters` (personalised and shared adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedask_jax._checks import check_choice
from fedask_jax.strategies import fedask, fedask_alt, fedavg, fedprox, fedsa_lora, ffa_lora, scaffold
from fedask_jax.strategies.base import ClientResult, Strategy, weighted_mean

STRATEGIES: dict[str, Callable[..., Strategy]] = {
  "fedask": fedask.fedask,
  "fedask-alt": fedask_alt.fedask_alt,
  "fedavg": fedavg.fedavg,
  "ffa-lora": ffa_lora.ffa_lora,
  "fedsa-lora": fedsa_lora.fedsa_lora,
  "fedprox": fedprox.fedprox,
  "scaffold": scaffold.scaffold,
}
"""The strategies by name: `STRATEGIES[name](**hyper_parameters)` builds one (module docstring)."""


def get_strategy(name: str, **hyper_parameters: Any) -> Strategy:
  """`STRATEGIES[name](**hyper_parameters)`, with ValueErrors that list the valid names and parameters."""
  check_choice("strategy", name, sorted(STRATEGIES), what="unknown strategy")
  try:
    return STRATEGIES[name](**hyper_parameters)
  except TypeError as error:
    raise ValueError(
      f"strategy {name!r} does not take hyper-parameters {sorted(hyper_parameters)} ({error}); see "
      f"help(fedask_jax.strategies.STRATEGIES[{name!r}])."
    ) from None


__all__ = ["STRATEGIES", "ClientResult", "Strategy", "get_strategy", "weighted_mean"]
