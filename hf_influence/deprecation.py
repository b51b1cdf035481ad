"""Renamed arguments: the old name keeps working for a while, with a warning that names the new one."""

from __future__ import annotations

import warnings
from typing import Any


def renamed_argument(old_name: str, old_value: Any, new_name: str, new_value: Any, stacklevel: int = 3) -> Any:
    """`new_value`, or `old_value` (with a FutureWarning) when the caller used the deprecated `old_name`;
    `stacklevel` points the warning at the caller's line (3: the caller of the function calling this one)."""
    if old_value is None:
        return new_value
    warnings.warn(f"{old_name} is deprecated: use {new_name} (the same value).", FutureWarning, stacklevel=stacklevel)
    return old_value
