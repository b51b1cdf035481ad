"""Checks of values a person typed (a form field, a request, a command-line option): each turns the value
into what the library takes, or raises a ValueError that names the field and what it accepts, so the
message can be shown as it is."""

from __future__ import annotations

import math
from typing import Any


def check_integer(name: str, value: Any, low: int, high: int) -> int:
    """`value` as an int in [low, high], or a ValueError that names the field and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    return int(number)


def check_damping(value: Any) -> float:
    """`value` as a damping λ: a finite number ≥ 0 (it is added to the curvature's eigenvalues)."""
    try:
        damping = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Damping must be a number ≥ 0, got {value!r}.") from None
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"Damping must be a finite number ≥ 0, got {value!r}.")
    return damping
