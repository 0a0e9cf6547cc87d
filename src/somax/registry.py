"""Registries through which spec ``kind`` names are resolved to component factories.

A registry maps a kind name (``"cg"``, ``"trust_region"`` …) to a factory that
takes the spec's keyword arguments and returns a frozen component object. Users
add their own components with :func:`register`::

    @somax.register("solver", "my_solver")
    class MySolver: ...

and then name them in a spec: ``SolverSpec("my_solver", kwargs={...})``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from somax.contracts import Curvature, Damping, Estimator, LineSearch, Preconditioner, Solver

__all__ = [
    "Registry",
    "UnknownKindError",
    "did_you_mean",
    "CURVATURES",
    "SOLVERS",
    "PRECONDITIONERS",
    "DAMPINGS",
    "ESTIMATORS",
    "LINE_SEARCHES",
    "register",
    "registry_for",
    "build_component",
    "check_component",
]


def did_you_mean(name: object, known: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest known name (typos, swapped letters), else ``""``."""
    text = str(name)
    close = difflib.get_close_matches(text, known, n=1)
    if not close:
        close = [k for k in known if sorted(k) == sorted(text)]
    if not close:
        close = difflib.get_close_matches(text, known, n=1, cutoff=0.4)
    return f" Did you mean {close[0]!r}?" if close else ""


class UnknownKindError(ValueError):
    """Raised when a spec names a kind that no registry holds."""


class Registry:
    """A named table ``kind name -> factory``; every factory returns an instance of ``base``."""

    def __init__(self, what: str, base: type) -> None:
        self.what = what
        self.base = base
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any] | None = None, *, overwrite: bool = False):
        """Register ``factory`` under ``name``; usable as a decorator when ``factory`` is omitted."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.what} name must be a non-empty string, got {name!r}")

        def _do(f: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories and not overwrite and self._factories[name] is not f:
                raise ValueError(f"{self.what} kind {name!r} is already registered; pass overwrite=True to replace it")
            self._factories[name] = f
            return f

        return _do if factory is None else _do(factory)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            known = sorted(self._factories)
            hint = did_you_mean(name, known)
            raise UnknownKindError(f"Unknown {self.what} kind {name!r}.{hint} Known kinds: {', '.join(known)}.")
        return self._factories[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories


#: Curvature kinds (``CurvatureSpec``): name → factory of a :class:`Curvature`.
CURVATURES = Registry("curvature", Curvature)
#: Solver kinds (``SolverSpec``): name → factory of a :class:`Solver`.
SOLVERS = Registry("solver", Solver)
#: Preconditioner kinds (``PrecondSpec``): name → factory of a :class:`Preconditioner`.
PRECONDITIONERS = Registry("preconditioner", Preconditioner)
#: Damping kinds (``DampingSpec``): name → factory of a :class:`Damping`.
DAMPINGS = Registry("damping", Damping)
#: Estimator kinds (``EstimatorSpec``): name → factory of an :class:`Estimator`.
ESTIMATORS = Registry("estimator", Estimator)
#: Line-search kinds (``LineSearchSpec``): name → factory of a :class:`LineSearch`.
LINE_SEARCHES = Registry("line search", LineSearch)

_BY_KIND: Mapping[str, Registry] = {
    "curvature": CURVATURES,
    "solver": SOLVERS,
    "precond": PRECONDITIONERS,
    "preconditioner": PRECONDITIONERS,
    "damping": DAMPINGS,
    "estimator": ESTIMATORS,
    "line_search": LINE_SEARCHES,
}


def registry_for(component: str) -> Registry:
    """The registry for a component family: curvature, solver, precond, damping, estimator."""
    try:
        return _BY_KIND[component]
    except KeyError:
        hint = did_you_mean(component, list(_BY_KIND))
        raise UnknownKindError(f"Unknown component family {component!r}.{hint}") from None


def register(component: str, name: str, factory: Callable[..., Any] | None = None, *, overwrite: bool = False):
    """Register a user component factory under ``name`` in the ``component`` family."""
    return registry_for(component).register(name, factory, overwrite=overwrite)


def build_component(reg: Registry, name: str, kwargs: Mapping[str, Any], *, where: str) -> Any:
    """Instantiate ``name`` from ``reg`` with ``kwargs``, naming the spec on a bad keyword or a wrong type."""
    factory = reg.get(name)
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        params = sig.parameters
        takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_var_kw:
            accepted = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            for key in kwargs:
                if key not in accepted:
                    hint = did_you_mean(key, accepted)
                    raise TypeError(
                        f"{where}: {reg.what} kind {name!r} got an unexpected keyword {key!r}.{hint} "
                        f"Accepted: {', '.join(accepted) or '(none)'}."
                    )
            missing = [
                n
                for n, p in params.items()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and n not in kwargs
            ]
            if missing:
                raise TypeError(
                    f"{where}: {reg.what} kind {name!r} requires keyword(s) {', '.join(map(repr, missing))}."
                )
    component = factory(**dict(kwargs))
    check_component(reg, component, f"{where}: {reg.what} kind {name!r}")
    return component


def check_component(reg: Registry, component: Any, where: str) -> None:
    """Raise ``TypeError`` unless ``component`` is an instance of the family's base class."""
    if not isinstance(component, reg.base):
        base = f"somax.contracts.{reg.base.__name__}"
        raise TypeError(
            f"{where} built a {type(component).__name__}, which is not a {base}; subclass {base} "
            f"(it declares the family's capabilities and their defaults in one place)"
        )
