"""Argument checks for the package's public entry points, one helper per kind of check.

Each raises a ValueError that names the argument and its value, states the rule, and ends with `hint` (the fix,
or why the rule holds). Public functions check their arguments once; the functions they call trust them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp


def _fail(name: str, value: Any, what: str, rule: str, hint: str) -> None:
  raise ValueError(f"{name}={value!r}: {what + ' ' if what else ''}must be {rule}{hint}.")


def check_int(name: str, value: Any, minimum: int, *, what: str = "", hint: str = "") -> int:
  """`value` as an int; ValueError unless it is an integer (a bool is not) >= `minimum`."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
    _fail(name, value, what, f"an integer >= {minimum}", hint)
  return int(value)


def check_real(
  name: str,
  value: Any,
  lo: float = -math.inf,
  hi: float = math.inf,
  *,
  lo_open: bool = False,
  hi_open: bool = False,
  what: str = "",
  hint: str = "",
  traced_ok: bool = False,
) -> Any:
  """`value` unchanged; ValueError unless it is a finite real number (a bool is not) within the bounds.

  The interval is [lo, hi], each end open when `lo_open` / `hi_open`. With `traced_ok`, an array (a traced or
  device value) is passed through unchecked: under jit its value is not known before the computation runs.
  """
  if traced_ok and hasattr(value, "dtype") and not isinstance(value, numbers.Real):
    return value
  number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if not number or (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
    if math.isinf(hi):
      rule = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    elif math.isinf(lo):
      rule = f"a finite number {'<' if hi_open else '<='} {hi:g}"
    else:
      rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    _fail(name, value, what, rule, hint)
  return value


def check_choice(name: str, value: Any, choices: Sequence[Any], *, what: str = "") -> Any:
  """`value` unchanged; ValueError listing `choices` unless it is one of them."""
  if value not in choices:
    raise ValueError(f"{name}={value!r}: {what + '; ' if what else ''}choose one of {choices!r}.")
  return value


def check_ndim(name: str, x: Any, ndim: int, layout: str) -> None:
  """ValueError unless array `x` has `ndim` axes; `layout` names them, e.g. "[K, m, r] (clients, rows, rank)"."""
  if jnp.ndim(x) != ndim:
    raise ValueError(f"{name} has shape {jnp.shape(x)}: expected {ndim} axes {layout}.")
