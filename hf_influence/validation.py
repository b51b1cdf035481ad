"""Checks at the boundary: every public function and config refuses a bad argument with a message that names
the argument, the value given and what is accepted, before any work is done.

`check_int` and `check_float` are for arguments of the API (an int must be an int). `check_integer` and
`check_damping` are for values a person typed (a form field, a request): "3", 3.0 and 3 are all the number 3.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int (Python or numpy integers; not bools or floats) within [minimum, maximum]."""
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be a whole number{_range(minimum, maximum)}, got {value!r}.")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a whole number{_range(minimum, maximum)}, got {value!r}.") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be a whole number{_range(minimum, maximum)}, got {number}.")
    return number


def check_float(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a finite float (ints accepted; not bools or strings) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number{_range(minimum, maximum)}, got {value!r}.")
    number = float(value)
    outside = (minimum is not None and number < minimum) or (maximum is not None and number > maximum)
    if not math.isfinite(number) or outside:
        raise ValueError(f"{name} must be a finite number{_range(minimum, maximum)}, got {value!r}.")
    return number


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """`value` if it is one of `choices`."""
    choices = tuple(choices)
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def check_type(name: str, value: Any, expected: type | tuple[type, ...], call: str | None = None) -> Any:
    """`value` if it is an `expected`; else a TypeError naming the argument and, for a value that belongs to
    another argument of `call`, the order the arguments go in."""
    if isinstance(value, expected):
        return value
    names = " or ".join(_article(kind.__name__) for kind in (expected if isinstance(expected, tuple) else (expected,)))
    order = f" (the arguments are {call}: are two of them swapped?)" if call else ""
    raise TypeError(f"{name} must be {names}, got {_article(type(value).__name__)}{order}.")


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}.")
    return value


def check_regex(name: str, value: Any) -> Any:
    """A regular expression string (compiled to check it), a callable filter, or None."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a regular expression (a str), a callable or None, got {value!r}.")
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"{name}={value!r} is not a valid regular expression: {error}.") from None
    return value


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" between {minimum} and {maximum}"
    if minimum is not None:
        return f" ≥ {minimum}"
    if maximum is not None:
        return f" ≤ {maximum}"
    return ""


def check_integer(name: str, value: Any, low: int, high: int) -> int:
    """A typed `value` as an int in [low, high] (whole-valued floats and numeric strings accepted), or a
    ValueError that names the field and the range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    return int(number)


def check_damping(value: Any) -> float:
    """A typed `value` as a damping λ: a finite number ≥ 0 (it is added to the curvature's eigenvalues)."""
    try:
        damping = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Damping must be a number ≥ 0, got {value!r}.") from None
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"Damping must be a finite number ≥ 0, got {value!r}.")
    return damping
