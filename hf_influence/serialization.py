"""Typed metadata ↔ JSON: dataclasses written to config.json and read back strictly.

Reading checks every field against the dataclass: a missing field, an unknown one or a value of the wrong
type is refused with the field's path (`config.json: model.fingerprint ...`), so a corrupt or hand-edited
file never turns into a half-filled object. Older formats are migrated to the current one before reading
(see `Artifact.MIGRATIONS`), which is the only place where an absent field gets a value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_json(value: Any) -> Any:
    """A dataclass (or a structure of them) as plain JSON values; tuples become lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: to_json(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def from_json(cls: type[T], data: Any, where: str = "config.json") -> T:
    """`data` (parsed JSON) as an instance of the dataclass `cls`, every field checked against its type hint."""
    return _convert(cls, data, where)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (option for option in options if option is not type(None)):
            try:
                return _convert(option, value, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where} has an unexpected value {value!r}.")
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, where)
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        _expect(isinstance(value, dict), value, "an object", where)
        return {key: _convert(value_hint, item, f"{where}.{key}") for key, item in value.items()}
    if origin in (list, tuple):
        _expect(isinstance(value, list), value, "a list", where)
        arguments = typing.get_args(hint)
        if origin is tuple and arguments and arguments[-1] is not Ellipsis:
            _expect(len(value) == len(arguments), value, f"a list of {len(arguments)}", where)
            return tuple(
                _convert(item_hint, item, f"{where}[{i}]")
                for i, (item_hint, item) in enumerate(zip(arguments, value, strict=True))
            )
        item_hint = arguments[0] if arguments else Any
        items = [_convert(item_hint, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float:
        _expect(isinstance(value, (int, float)) and not isinstance(value, bool), value, "a number", where)
        return float(value)
    if hint in (int, str, bool):
        _expect(isinstance(value, hint) and not (hint is int and isinstance(value, bool)), value, hint.__name__, where)
        return value
    raise TypeError(f"{where}: cannot read a value of type {hint!r} from JSON.")


def _dataclass(cls: type[T], value: Any, where: str) -> T:
    _expect(isinstance(value, dict), value, "an object", where)
    hints = typing.get_type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls) if item.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}: it was not written by this version of hf_influence.")
    arguments = {}
    for name, item in fields.items():
        if name in value:
            arguments[name] = _convert(hints[name], value[name], f"{where}.{name}")
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where} lacks the field {name!r}: the file is incomplete or corrupt.")
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where} holds invalid settings: {error}") from error


def _expect(condition: bool, value: Any, expected: str, where: str) -> None:
    if not condition:
        raise ValueError(f"{where} should be {expected}, not {value!r}.")
