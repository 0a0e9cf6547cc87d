"""The assembly rules: every combination of components that cannot work, with an error naming both.

Each rule is a function of the resolved parts that returns an error message or ``None``;
:data:`RULES` lists them in the order :func:`somax.assemble` applies them. Rules read only
the declarations of :mod:`somax.contracts`, so a new component kind needs no new rule
unless it brings a new capability.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from somax.contracts import LANES, POLICIES
from somax.registry import ESTIMATORS, build_component

__all__ = ["RULES", "IncompatibleSpecsError", "Part", "Parts", "with_default_estimator", "check_declarations"]


class IncompatibleSpecsError(ValueError):
    """Two specs (or components) that cannot be combined; the message names both."""


@dataclass(frozen=True)
class Part:
    """One resolved component, with the text that names it in errors and in the plan."""

    obj: Any
    name: str  # "SolverSpec('cg')" or "solver CGSolver"
    summary: str


@dataclass(frozen=True)
class Parts:
    """Every resolved component of one method, the input of each assembly rule."""

    curvature: Part
    solver: Part
    precond: Part
    damping: Part
    estimator: Part | None
    line_search: Part | None
    grad_tx: Any

    def components(self) -> dict[str, Part]:
        out = {"curvature": self.curvature, "solver": self.solver, "precond": self.precond, "damping": self.damping}
        if self.estimator is not None:
            out["estimator"] = self.estimator
        if self.line_search is not None:
            out["line_search"] = self.line_search
        return out


def _rule(check: Callable[[Parts], str | None]) -> Callable[[Parts], str | None]:
    RULES.append(check)
    return check


#: The assembly rules, in order: each returns an error message naming both parts, or ``None``.
RULES: list[Callable[[Parts], str | None]] = []


@_rule
def _lane_declared(p: Parts) -> str | None:
    lane = getattr(p.solver.obj, "lane", None)  # the one declaration without a default
    if lane not in LANES:
        return f"{p.solver.name}: a solver must declare lane 'param', 'row' or 'diag', got {lane!r}"
    return None


@_rule
def _row_lane_needs_rows(p: Parts) -> str | None:
    if p.solver.obj.lane == "row" and not p.curvature.obj.has_rows:
        return (
            f"{p.solver.name} solves in row space, but {p.curvature.name} has no row form (J Jᵀ); use a GGN "
            f"curvature ('ggn_mse', 'ggn_ce') or a parameter-space solver such as 'cg'"
        )
    return None


@_rule
def _per_example_model(p: Parts) -> str | None:
    if not p.solver.obj.per_example_model:
        return None
    curv = p.curvature.obj
    for why, on in (
        ("its examples interact (e.g. BatchNorm in training mode)", curv.couples_examples),
        ("it draws randomness (dropout) that differs between single examples and the batch", curv.uses_rng),
    ):
        if on:
            return (
                f"{p.solver.name} forms its Gram from the model evaluated on single examples, which does not "
                f"equal the batch Jacobian of {p.curvature.name}'s model: {why}. Use 'row_cg' (batch JVP/VJP, "
                f"exact for such models) or a parameter-space solver such as 'cg'"
            )
    return None


@_rule
def _gradient_rhs(p: Parts) -> str | None:
    if p.grad_tx is not None and p.solver.obj.needs_gradient_rhs:
        return (
            f"{p.solver.name} solves for the gradient itself (its row residual r has Ĵᵀr = n·g), so grad_tx= "
            f"would be ignored; drop grad_tx (put momentum on the direction via tx=) or use a parameter-space "
            f"solver such as 'cg'"
        )
    return None


@_rule
def _precond_required(p: Parts) -> str | None:
    if p.solver.obj.requires_precond and not p.precond.obj.provides_inverse:
        return (
            f"{p.solver.name} is the diagonal lane and needs a preconditioner, but {p.precond.name} provides "
            f"none; use 'diag_ema' or 'diag_direct'"
        )
    return None


@_rule
def _precond_used(p: Parts) -> str | None:
    if p.precond.obj.provides_inverse and not p.solver.obj.uses_precond:
        return f"{p.precond.name} would be ignored: {p.solver.name} takes no preconditioner"
    return None


@_rule
def _statistic_consumed(p: Parts) -> str | None:
    if p.estimator is None:
        return None
    produces, consumes = p.estimator.obj.produces, p.precond.obj.consumes
    if produces not in consumes:
        wants = f"consumes {', '.join(map(repr, consumes))}" if consumes else "consumes no statistic"
        return (
            f"{p.estimator.name} produces the statistic {produces!r}, but {p.precond.name} {wants}; pair it with "
            f"a preconditioner that uses it (e.g. 'diag_ema' or 'diag_direct' for 'diagonal')"
        )
    return None


@_rule
def _model_outputs(p: Parts) -> str | None:
    if p.estimator is not None and p.estimator.obj.needs_model_outputs and not p.curvature.obj.has_model_outputs:
        return (
            f"{p.estimator.name} samples from the model's outputs, but {p.curvature.name} has no model-output "
            f"linearization; use a GGN curvature"
        )
    return None


def with_default_estimator(p: Parts) -> Parts:
    """A preconditioner that consumes a statistic gets its ``default_estimator`` when none is named."""
    prec = p.precond.obj
    if p.estimator is not None or not prec.consumes:
        return p
    if prec.default_estimator is None:
        raise IncompatibleSpecsError(
            f"{p.precond.name} consumes {', '.join(map(repr, prec.consumes))} and declares no default estimator; "
            f"name one with estimator="
        )
    kind = prec.default_estimator
    est = build_component(ESTIMATORS, kind, {}, where=f"{p.precond.name}'s default estimator")
    return Parts(**{**p.__dict__, "estimator": Part(est, f"EstimatorSpec({kind!r})", f"{kind} (default)")})


def check_declarations(p: Parts) -> None:
    """Declared policies are ones the step knows."""
    for role, part in p.components().items():
        for name in ("on_reject", "on_nonfinite"):
            value = getattr(part.obj, name)
            if value not in POLICIES:
                raise TypeError(f"{part.name} ({role}): {name} must be one of {POLICIES}, got {value!r}")
