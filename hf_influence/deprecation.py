"""Renamed names: the old name keeps working for a while, with a FutureWarning that names the new one."""

from __future__ import annotations

import functools
import warnings
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def renamed_argument(old_name: str, old_value: Any, new_name: str, new_value: Any, stacklevel: int = 3) -> Any:
    """`new_value`, or `old_value` (with a FutureWarning) when the caller used the deprecated `old_name`;
    `stacklevel` points the warning at the caller's line (3: the caller of the function calling this one)."""
    if old_value is None:
        return new_value
    warnings.warn(f"{old_name} is deprecated: use {new_name} (the same value).", FutureWarning, stacklevel=stacklevel)
    return old_value


def renamed_fields(**renames: str):
    """Class decorator for a dataclass whose fields were renamed (`old="new"`): the old keywords still work,
    with a warning. `cls.RENAMED_FIELDS` lists them, so the command line can offer the old options too."""

    def decorate(cls: T) -> T:
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: give {new} only, not also its old name {old}.")
                    warnings.warn(
                        f"{cls.__name__}({old}=...) is deprecated: use {new}=... (the same value).",
                        FutureWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            original(self, *args, **kwargs)

        cls.__init__ = __init__
        cls.RENAMED_FIELDS = dict(renames)
        return cls

    return decorate
