"""Preset registry: ``somax.make(name, ...)``, ``list_methods()``, ``describe(name)``.

A preset is a named function of keyword options that returns an assembled method.
:func:`define_preset` builds it from a table of options with defaults and a
``build(options)`` function of a few lines of specs, so presets share option
handling and never swallow a misspelled keyword.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from somax.method import SecondOrderMethod
from somax.registry import did_you_mean

__all__ = ["define_preset", "make", "list_methods", "describe", "PRESETS"]

PRESETS: dict[str, Callable[..., SecondOrderMethod]] = {}


def _unknown_keyword(preset: str, key: str, accepted: list[str]) -> TypeError:
    hint = did_you_mean(key, accepted)
    return TypeError(f"{preset}() got an unexpected keyword argument {key!r}.{hint} Accepted: {', '.join(accepted)}.")


def define_preset(
    name: str,
    build: Callable[[dict[str, Any]], SecondOrderMethod],
    *,
    positional: str | None,
    options: Mapping[str, Any],
    doc: str,
) -> Callable[..., SecondOrderMethod]:
    """Create and register the preset function ``name``.

    Args:
      name: preset name (``somax.make(name)``).
      build: maps the complete option dict to a method via :func:`somax.assemble`.
      positional: the one option that may be passed positionally (the model callable).
      options: every accepted keyword with its default.
      doc: the docstring (formula, defaults, reference).
    """
    accepted = list(options)

    def preset(*args: Any, **kwargs: Any) -> SecondOrderMethod:
        if len(args) > (1 if positional else 0):
            raise TypeError(f"{name}() takes at most {1 if positional else 0} positional argument(s)")
        if args:
            if positional in kwargs:
                raise TypeError(f"{name}() got multiple values for {positional!r}")
            kwargs[positional] = args[0]
        for key in kwargs:
            if key not in options:
                raise _unknown_keyword(name, key, accepted)
        complete = {**options, **kwargs}
        return dataclasses.replace(build(complete), preset=(name, complete))

    params = []
    for key, default in options.items():
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if key == positional else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(key, kind, default=default))
    params.sort(key=lambda p: p.kind)
    preset.__signature__ = inspect.Signature(params, return_annotation=SecondOrderMethod)  # type: ignore[attr-defined]
    preset.__name__ = preset.__qualname__ = name
    preset.__doc__ = doc
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already defined")
    PRESETS[name] = preset
    return preset


def _get(name: str) -> Callable[..., SecondOrderMethod]:
    if name not in PRESETS:
        hint = did_you_mean(name, list(PRESETS))
        raise ValueError(f"Unknown method {name!r}.{hint} Known: {', '.join(list_methods())}.")
    return PRESETS[name]


def make(name: str, *args: Any, **kwargs: Any) -> SecondOrderMethod:
    """Build the named preset: ``somax.make("sgn_mse", predict_fn=..., learning_rate=...)``."""
    return _get(name)(*args, **kwargs)


def list_methods() -> list[str]:
    """Names of all presets."""
    return sorted(PRESETS)


def describe(name: str) -> str:
    """The preset's documentation followed by its keyword options and defaults."""
    fn = _get(name)
    sig = inspect.signature(fn)
    opts = "\n".join(f"  {p.name} = {p.default!r}" for p in sig.parameters.values())
    return f"{name}: {inspect.cleandoc(fn.__doc__ or '')}\n\nOptions:\n{opts}"
