"""Preset registry: ``somax.make(name, ...)``, ``list_methods()``, ``describe(name)``.

A preset is a named function of keyword options that returns an assembled method.
:func:`define_preset` builds it from a table of :class:`Option` entries (default,
type, one-line description) and a ``build(options)`` function of a few lines of
specs, so presets share option handling, document every option in one place and
never swallow a misspelled keyword. The table gives the preset its typed
signature (``inspect.signature(somax.presets.sgn_mse)``) and the ``Args:`` section
of its docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

from somax.method import SecondOrderMethod
from somax.registry import did_you_mean

__all__ = ["Option", "Options", "Description", "ALIASES", "define_preset", "make", "list_methods", "describe",
           "PRESETS"]  # fmt: skip

PRESETS: dict[str, Callable[..., SecondOrderMethod]] = {}
#: For each preset: its option table (name → :class:`Option`) and its docstring without ``Args:``.
_TABLES: dict[str, dict[str, Option]] = {}
_BODIES: dict[str, str] = {}

#: Keywords from other optimizers and papers → the preset options they usually mean, in order
#: of preference; a misspelled keyword suggests the first one the preset accepts.
ALIASES: Mapping[str, tuple[str, ...]] = {
    "lr": ("learning_rate",),
    "learning_rate_fn": ("learning_rate",),
    "lr_schedule": ("learning_rate",),
    "schedule": ("learning_rate",),
    "step_size": ("learning_rate",),
    "lam": ("lam0",),
    "lambda": ("lam0",),
    "lambda_": ("lam0",),
    "lambda0": ("lam0",),
    "lam_0": ("lam0",),
    "init_lambda": ("lam0",),
    "damping": ("eps",),  # presets without a damping policy: AdaHessian's additive ε is its λ
    "damping_every_k": ("tr_every_k",),
    "every_k": ("tr_every_k", "eval_every_k"),
    "update_every": ("eval_every_k",),
    "hessian_update_interval": ("eval_every_k",),
    "update_period": ("eval_every_k",),
    "max_iter": ("maxiter",),
    "max_iters": ("maxiter",),
    "cg_iters": ("maxiter",),
    "cg_maxiter": ("maxiter",),
    "num_iters": ("maxiter",),
    "tolerance": ("tol",),
    "cg_tol": ("tol",),
    "rtol": ("tol",),
    "preconditioner": ("precondition",),
    "precond": ("precondition",),
    "beta1": ("b1",),
    "beta2": ("b2",),
    "epsilon": ("eps",),
    "wd": ("weight_decay",),
    "max_grad_norm": ("clip_norm", "grad_clip_norm"),
    "grad_clip": ("clip_norm", "grad_clip_norm"),
    "clip": ("clip_norm", "rho"),
    "clip_threshold": ("rho",),
    "num_probes": ("n_probes", "n_samples"),
    "n_samples": ("n_probes",),
    "n_probes": ("n_samples",),
    "num_samples": ("n_samples", "n_probes"),
    "power": ("hessian_power",),
    "dtype": ("solve_dtype",),
    "apply_fn": ("predict_fn",),
    "model_fn": ("predict_fn",),
    "forward": ("predict_fn",),
    "loss_function": ("loss_fn", "loss"),
    "objective": ("loss_fn",),
    "input_key": ("x_key",),
    "inputs_key": ("x_key",),
    "label_key": ("y_key",),
    "labels_key": ("y_key",),
    "target_key": ("y_key",),
    "targets_key": ("y_key",),
    "mask_key": ("weight_key",),
    "weights_key": ("weight_key",),
    "sample_weight_key": ("weight_key",),
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One preset keyword: its default, its type (shown in the signature) and a description.

    ``doc`` is one or two sentences; it becomes the option's line in the preset's
    ``Args:`` section and in :func:`describe`. :meth:`replace` derives a preset's
    variant (another default, a preset-specific description) from a shared table.
    """

    default: Any
    type: Any = Any
    doc: str = ""

    def replace(self, **changes: Any) -> Option:
        return dataclasses.replace(self, **changes)


class Options(dict):
    """The complete option dict a preset's ``build`` receives; ``given`` names the keywords the caller passed."""

    def __init__(self, values: Mapping[str, Any], given: frozenset[str] = frozenset()) -> None:
        super().__init__(values)
        self.given = frozenset(given)


class Description(str):
    """:func:`describe`'s text; a ``str`` that the REPL (and IPython) shows as the text itself."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def _as_option(value: Any) -> Option:
    if isinstance(value, Option):
        return value
    inferred = type(value) if isinstance(value, (bool, int, float, str)) else Any
    return Option(value, inferred)


def suggestion(key: str, accepted: list[str]) -> str:
    """`` Did you mean 'x'?``: the option ``key`` is a known alias of, else the closest accepted name."""
    for target in ALIASES.get(key, ()):
        if target in accepted:
            return f" Did you mean {target!r}?"
    return did_you_mean(key, accepted)


def _unknown_keyword(preset: str, key: str, accepted: list[str]) -> TypeError:
    hint = suggestion(key, accepted)
    return TypeError(f"{preset}() got an unexpected keyword argument {key!r}.{hint} Accepted: {', '.join(accepted)}.")


_MODULES = re.compile(r"\b(?:typing|collections\.abc|somax(?:\.[a-z_]+)*)\.")


def format_type(annotation: Any) -> str:
    """A type as the signature shows it, without module prefixes (``Optional[Callable[..., Any]]``)."""
    if annotation is Any:
        return "Any"
    return _MODULES.sub("", inspect.formatannotation(annotation))


def _args_section(table: Mapping[str, Option], order: list[str]) -> str:
    lines = ["Args:"]
    for key in order:
        text = f"{key}: {table[key].doc or '(no description)'}"
        lines += textwrap.wrap(text, width=96, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def define_preset(
    name: str,
    build: Callable[[Options], SecondOrderMethod],
    *,
    positional: str | None,
    options: Mapping[str, Option | Any],
    doc: str,
) -> Callable[..., SecondOrderMethod]:
    """Create and register the preset function ``name``.

    Args:
      name: preset name (``somax.make(name)``).
      build: maps the complete :class:`Options` (every option, ``given`` naming those the
        caller passed) to a method via :func:`somax.assemble`.
      positional: the one option that may be passed positionally (the model callable).
      options: every accepted keyword, as an :class:`Option` or a bare default (whose
        type is then inferred from the value).
      doc: the docstring (formula, defaults, reference); an ``Args:`` section built from
        the options' descriptions is appended.
    """
    table = {key: _as_option(value) for key, value in options.items()}
    defaults = {key: opt.default for key, opt in table.items()}
    accepted = list(table)

    def preset(*args: Any, **kwargs: Any) -> SecondOrderMethod:
        if len(args) > (1 if positional else 0):
            raise TypeError(f"{name}() takes at most {1 if positional else 0} positional argument(s)")
        if args:
            if positional in kwargs:
                raise TypeError(f"{name}() got multiple values for {positional!r}")
            kwargs[positional] = args[0]
        for key in kwargs:
            if key not in table:
                raise _unknown_keyword(name, key, accepted)
        complete = Options({**defaults, **kwargs}, given=frozenset(kwargs))
        return dataclasses.replace(build(complete), preset=(name, dict(complete)))

    params = []
    for key, opt in table.items():
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if key == positional else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(key, kind, default=opt.default, annotation=opt.type))
    params.sort(key=lambda p: p.kind)
    body = inspect.cleandoc(doc)
    preset.__signature__ = inspect.Signature(params, return_annotation=SecondOrderMethod)  # type: ignore[attr-defined]
    preset.__name__ = preset.__qualname__ = name
    preset.__module__ = "somax.presets"
    preset.__doc__ = f"{body}\n\n{_args_section(table, [p.name for p in params])}\n"
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already defined")
    PRESETS[name] = preset
    _TABLES[name] = table
    _BODIES[name] = body
    return preset


def _get(name: str) -> Callable[..., SecondOrderMethod]:
    if name not in PRESETS:
        hint = did_you_mean(name, list(PRESETS))
        raise ValueError(f"Unknown method {name!r}.{hint} Known: {', '.join(list_methods())}.")
    return PRESETS[name]


def make(name: str, *args: Any, **kwargs: Any) -> SecondOrderMethod:
    """Build the named preset: ``somax.make("sgn_mse", predict_fn=..., learning_rate=...)``.

    ``somax.make(name, ...)`` is ``somax.presets.<name>(...)``: the model callable may be
    given positionally, every other option by keyword. ``somax.list_methods()`` lists the
    presets; a preset's options, with types, defaults and descriptions, are printed by
    ``somax.describe(name)`` and listed by ``inspect.signature(somax.presets.<name>)``
    (or ``help(somax.presets.<name>)``). Presets that read a batch take its keys directly
    (``x_key="image", y_key="label"``, ``weight_key=``). An unknown keyword raises
    ``TypeError`` naming it and suggesting the option meant (``lr`` → ``learning_rate``).
    """
    return _get(name)(*args, **kwargs)


def list_methods() -> list[str]:
    """Names of all presets, sorted (``somax.make(name)`` builds one, ``somax.describe(name)`` documents it)."""
    return sorted(PRESETS)


def describe(name: str) -> Description:
    """The preset's documentation followed by its options: ``name = default  (type)`` and a description.

    Returns a :class:`Description`, a ``str`` whose ``repr`` is the text itself, so at a
    REPL prompt ``somax.describe("sgn_ce")`` prints readably; ``print(...)`` shows the
    same, and string operations (``in``, ``splitlines``) work as on any ``str``.
    """
    fn = _get(name)
    table = _TABLES[name]
    lines = []
    for p in inspect.signature(fn).parameters.values():
        opt = table[p.name]
        lines.append(f"  {p.name} = {p.default!r}  ({format_type(opt.type)})")
        if opt.doc:
            lines += textwrap.wrap(opt.doc, width=92, initial_indent="      ", subsequent_indent="      ")
    return Description(f"{name}: {_BODIES[name]}\n\nOptions:\n" + "\n".join(lines))
