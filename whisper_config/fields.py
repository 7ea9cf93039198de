"""Type checks of dataclass settings against their declared types, with the field's name.

Config files and flags arrive as JSON/TOML values: `"no"` where a bool belongs, `true` where an
int belongs, `8.7` for a layer count, `NaN` for a rate. Python would accept most of them quietly
(`bool("no")` is True, `True + 1` is 2, `int(8.7)` is 8), so every field is checked against its
annotation before any range check runs.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def describe_problem(value: Any, hint: Any) -> str | None:
    """None if `value` fits the annotation `hint`, else what was expected ("an integer", ...)."""
    if hint is Any:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        problems = [describe_problem(value, arm) for arm in arms]
        if any(p is None for p in problems):
            return None
        return " or ".join(problems) + (" (or null)" if type(None) in args else "")
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(value, tuple) and all(describe_problem(v, item) is None for v in value):
            return None
        return f"a list of {_plural(item)}"
    if origin is dict:
        key, item = args if args else (Any, Any)
        if isinstance(value, dict) and all(
            describe_problem(k, key) is None and describe_problem(v, item) is None for k, v in value.items()
        ):
            return None
        return "a table of settings"
    raise TypeError(f"no type check for annotation {hint!r}")


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, "values")


def check_field_types(instance: Any, error: type[Exception]) -> None:
    """Raise `error` naming the first field of the dataclass `instance` whose value has the wrong type."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        expected = describe_problem(value, hints[field.name])
        if expected is not None:
            raise error(f"{field.name} must be {expected}, got {value!r} ({type(value).__name__})")
