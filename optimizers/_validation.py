"""Argument checks shared by every optimizer here: one place, one message format (what, the value, the range)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import Tensor

__all__ = ["check_number"]


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError naming ``name`` and ``value`` unless ``value`` is a real number inside the interval."""
    if isinstance(value, Tensor):
        raise ValueError(f"{name} must be a Python number (a tensor would force host syncs); got a tensor: {value}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    v = float(value)
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        lo = lo or "(-inf"
        hi = hi or "inf)"
        raise ValueError(f"invalid {name}: {value!r}; expected a value in {lo}, {hi}")
