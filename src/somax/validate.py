"""Validation of component keyword options, shared by every component and spec.

Each check takes ``where`` — the text that names the option in the error, e.g.
``"SolverSpec('cg'): maxiter"`` — and the value, and returns the normalised value
or raises :class:`InvalidOptionError` — both a ``TypeError`` and a ``ValueError``, so
callers may catch either — for a wrong type (a bool where a number is wanted is a
wrong type, never silently 0/1) or a value out of range::

    maxiter = validate.integer("SolverSpec('cg'): maxiter", maxiter, minimum=1)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["InvalidOptionError", "integer", "number", "boolean", "bool_or_auto", "choice", "cadence", "OFF"]

#: Cadence value meaning "never" (``every_k = -1`` compiles nothing).
OFF = -1


class InvalidOptionError(TypeError, ValueError):
    """A keyword option of the wrong type or out of range; the message names the option."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(where: str, value: Any, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An ``int`` (not a bool) ``>= minimum``; ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    bound = "" if minimum is None else f" >= {minimum}"
    none = "None or " if allow_none else ""
    if not _is_int(value):
        raise InvalidOptionError(f"{where} must be {none}an int{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidOptionError(f"{where} must be {none}an int{bound}, got {value!r}")
    return value


def number(
    where: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A real number (int or float, not a bool) in the given range; returned as ``float``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptionError(f"{where} must be a number, got {value!r}")
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    high_ok = maximum is None or (value < maximum if exclusive_maximum else value <= maximum)
    if not (low_ok and high_ok):  # also catches nan
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
        if maximum is not None:
            parts.append(f"{'<' if exclusive_maximum else '<='} {maximum}")
        raise InvalidOptionError(f"{where} must be {' and '.join(parts)}, got {value!r}")
    return float(value)


def boolean(where: str, value: Any) -> bool:
    """``True`` or ``False`` (not a truthy string or 0/1)."""
    if not isinstance(value, bool):
        raise InvalidOptionError(f"{where} must be True or False, got {value!r}")
    return value


def bool_or_auto(where: str, value: Any) -> bool | str:
    """``True``, ``False`` or the string ``"auto"`` (the component decides; not a truthy value or 0/1)."""
    if not (isinstance(value, bool) or value == "auto"):
        raise InvalidOptionError(f"{where} must be True, False or 'auto', got {value!r}")
    return value


def choice(where: str, value: Any, options: Collection[Any]) -> Any:
    """One of ``options``."""
    if value not in options:
        raise InvalidOptionError(f"{where} must be one of {tuple(options)}, got {value!r}")
    return value


def cadence(where: str, value: Any, *, allow_off: bool = True) -> int:
    """A cadence: ``k >= 1`` fires at steps ``0, k, 2k, …``; ``-1`` (off) when ``allow_off``."""
    if not _is_int(value):
        off = "-1 for off, " if allow_off else ""
        raise InvalidOptionError(f"{where} must be an int ({off}k >= 1 for every k steps), got {value!r}")
    if value == OFF and allow_off:
        return value
    if value < 1:
        raise InvalidOptionError(f"{where} must be {'-1 (off) or ' if allow_off else ''}>= 1, got {value}")
    return value
