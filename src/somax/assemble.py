"""``somax.assemble``: specs or components → validated static plan → method (paper §3.1, App. B).

Assembly runs in named phases: :func:`_arguments` (types of the arguments),
:func:`_resolve` (each spec built through its registry, or a component taken as given),
the rule table :data:`~somax.assembly_rules.RULES` (every incompatible combination, with
an error naming both parts), :func:`_requests` (probes and cadences per requester), :func:`_schema` (the
``StepInfo`` fields every component declares) and :func:`_summary` (the printable plan).
Everything that can be wrong with a configuration is caught here, so the traced step
contains no compatibility logic.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import jax.numpy as jnp
import optax

from somax import validate
from somax.assembly_rules import (
    RULES,
    IncompatibleSpecsError,
    Part,
    Parts,
    check_declarations,
    with_default_estimator,
)
from somax.contracts import (
    Component,
    Curvature,
    Damping,
    Estimator,
    LineSearch,
    Preconditioner,
    Solver,
)
from somax.method import SecondOrderMethod
from somax.plan import Plan, ProbeRequest
from somax.probes import spectral_fields, spectral_requests
from somax.registry import (
    CURVATURES,
    DAMPINGS,
    ESTIMATORS,
    LINE_SEARCHES,
    PRECONDITIONERS,
    SOLVERS,
    Registry,
    build_component,
    check_component,
)
from somax.specs import (
    CurvatureSpec,
    DampingSpec,
    EstimatorSpec,
    LineSearchSpec,
    PrecondSpec,
    SolverSpec,
    TelemetrySpec,
)
from somax.telemetry import CORE_FIELDS, InfoField

__all__ = ["assemble", "IncompatibleSpecsError", "RULES"]


# (role, spec class, registry, default spec)
_ROLES: dict[str, tuple[type, Registry, Any]] = {
    "curvature": (CurvatureSpec, CURVATURES, None),
    "solver": (SolverSpec, SOLVERS, SolverSpec("cg")),
    "precondition": (PrecondSpec, PRECONDITIONERS, PrecondSpec("identity")),
    "damping": (DampingSpec, DAMPINGS, DampingSpec("constant", lam0=1.0)),
    "estimator": (EstimatorSpec, ESTIMATORS, None),
    "line_search": (LineSearchSpec, LINE_SEARCHES, None),
}


def assemble(
    *,
    curvature: CurvatureSpec | Curvature,
    solver: SolverSpec | Solver | None = None,
    damping: DampingSpec | Damping | None = None,
    precondition: PrecondSpec | Preconditioner | None = None,
    estimator: EstimatorSpec | Estimator | None = None,
    telemetry: TelemetrySpec | None = None,
    tx: optax.GradientTransformation | None = None,
    grad_tx: optax.GradientTransformation | None = None,
    line_search: LineSearchSpec | LineSearch | None = None,
    solve_dtype: Any = None,
    reject_nonfinite: bool = True,
    lam0: float | None = None,
) -> SecondOrderMethod:
    """Assemble a second-order method from declarative specs or components.

    Each component argument takes a spec (resolved through its registry) or a component
    object (an instance of its family's base class in :mod:`somax.contracts`, taken as is).

    Args:
      curvature: curvature operator ``H_t`` (required).
      solver: solver of (2.4); fixes the lane. Default ``SolverSpec("cg")``.
      damping: damping policy for ``λ_t``. Default ``DampingSpec("constant", lam0=1.0)``.
      precondition: preconditioner ``M⁻¹`` (diagonal lane or PCG). Default identity.
      estimator: estimator of the statistic the preconditioner consumes; default the
        preconditioner's own ``default_estimator`` (the squared gradient for the diagonal ones).
      telemetry: optional probes and their cadences.
      tx: Optax chain applied to the direction ``s_t``; it must turn ``s_t`` into a
        *descent* update (e.g. end in ``optax.scale(-lr)``). Default ``optax.scale(-1.0)``.
      grad_tx: Optax transform applied to ``g_t`` before the solve (e.g. momentum).
      line_search: step-size policy on the applied update (``"grid"`` or ``"armijo"``).
      solve_dtype: dtype of curvature products, solves and method state (e.g. ``"float32"``
        for bfloat16 parameters); the update is cast back to each parameter's dtype.
      reject_nonfinite: reject a step whose loss, gradient or update is not finite
        (each component's state follows its ``on_nonfinite`` declaration, parameters stay
        as they were; ``info["finite"]`` is False). With ``False`` no check is compiled
        and ``info["finite"]`` is always True.
      lam0: ``λ_0`` when ``damping`` is a component object (a ``DampingSpec`` carries its own).

    Returns:
      A :class:`~somax.method.SecondOrderMethod` with ``init``, ``step`` and ``plan``.
    """
    given = dict(locals())
    solve_dtype, lam0 = _arguments(
        given, tx=tx, grad_tx=grad_tx, reject_nonfinite=reject_nonfinite, solve_dtype=solve_dtype, lam0=lam0
    )
    telemetry = telemetry or TelemetrySpec()
    parts = _resolve(grad_tx=grad_tx, **{role: given[role] for role in _ROLES})
    for rule in RULES:
        message = rule(parts)
        if message:
            raise IncompatibleSpecsError(message)
    parts = with_default_estimator(parts)
    check_declarations(parts)
    requests = _requests(parts, telemetry)
    plan = Plan(
        lane=parts.solver.obj.lane,
        components=_summary(parts),
        requests=requests,
        info_schema=_schema(parts, telemetry),
        needs_rng=_needs_rng(parts, telemetry),
    )
    return SecondOrderMethod(
        plan=plan,
        curvature=parts.curvature.obj,
        solver=parts.solver.obj,
        precond=parts.precond.obj,
        damping=parts.damping.obj,
        estimator=parts.estimator.obj if parts.estimator is not None else None,
        tx=tx if tx is not None else optax.scale(-1.0),
        grad_tx=grad_tx,
        lam0=lam0,
        telemetry=telemetry,
        line_search=parts.line_search.obj if parts.line_search is not None else None,
        solve_dtype=solve_dtype,
        reject_nonfinite=reject_nonfinite,
        assembly=given,
    )


# ---------------------------------------------------------------------------------------- phases


def _arguments(args: dict[str, Any], *, tx, grad_tx, reject_nonfinite, solve_dtype, lam0) -> tuple[Any, float]:
    """Check every argument's type; return the normalised ``solve_dtype`` and ``λ_0``."""
    for role, (spec_cls, reg, _) in _ROLES.items():
        value = args[role]
        if value is None and role != "curvature":
            continue
        if not isinstance(value, (spec_cls, reg.base)):
            got = "None" if value is None else type(value).__name__
            raise TypeError(
                f"assemble: {role}= must be a {spec_cls.__name__} or a somax.contracts.{reg.base.__name__}, got {got}"
            )
    if args["telemetry"] is not None and not isinstance(args["telemetry"], TelemetrySpec):
        raise TypeError(f"assemble: telemetry= must be a TelemetrySpec, got {type(args['telemetry']).__name__}")
    for name, t in (("tx", tx), ("grad_tx", grad_tx)):
        if t is not None and not (callable(getattr(t, "init", None)) and callable(getattr(t, "update", None))):
            raise TypeError(f"assemble: {name}= must be an optax.GradientTransformation, got {type(t).__name__}")
    if not isinstance(reject_nonfinite, bool):
        raise TypeError(f"assemble: reject_nonfinite must be True or False, got {reject_nonfinite!r}")
    if solve_dtype is not None:
        try:
            solve_dtype = jnp.dtype(solve_dtype)
        except TypeError as err:
            raise TypeError(f"assemble: solve_dtype={solve_dtype!r} is not a dtype") from err
        if not jnp.issubdtype(solve_dtype, jnp.floating):
            raise TypeError(f"assemble: solve_dtype must be a floating dtype, got {solve_dtype}")
    damping = args["damping"]
    if isinstance(damping, DampingSpec):
        if lam0 is not None:
            raise TypeError(f"assemble: lam0={lam0!r} given both directly and in DampingSpec(lam0={damping.lam0!r})")
        return solve_dtype, float(damping.lam0)
    if lam0 is None:
        return solve_dtype, 1.0
    return solve_dtype, validate.number("assemble: lam0", lam0, minimum=0.0)


def _resolve(**given: Any) -> Parts:
    """Each role's component: built from its spec through the registry, or taken as given."""
    parts: dict[str, Part | None] = {}
    for role, (spec_cls, reg, default) in _ROLES.items():
        value = given[role] if given[role] is not None else default
        if value is None:
            parts[role] = None
        elif isinstance(value, spec_cls):
            obj = build_component(reg, value.kind, value.kwargs, where=spec_cls.__name__)
            extra = f" (λ0={value.lam0})" if isinstance(value, DampingSpec) else ""
            shown = "" if role == "curvature" else _kwargs(value.kwargs)  # the model is no option to print
            parts[role] = Part(obj, f"{spec_cls.__name__}({value.kind!r})", value.kind + extra + shown)
        else:
            check_component(reg, value, f"assemble: {role}=")
            parts[role] = Part(value, f"{role} {type(value).__name__}", _describe(value))
    return Parts(
        curvature=parts["curvature"],
        solver=parts["solver"],
        precond=parts["precondition"],
        damping=parts["damping"],
        estimator=parts["estimator"],
        line_search=parts["line_search"],
        grad_tx=given["grad_tx"],
    )


def _requests(p: Parts, telemetry: TelemetrySpec) -> tuple[ProbeRequest, ...]:
    """Probes with their cadences, per requester."""
    damp, est, prec = p.damping.obj, p.estimator, p.precond.obj
    requests = [
        ProbeRequest("rho", "telemetry", telemetry.rho_every_k),
        ProbeRequest("loss_after", "telemetry", telemetry.loss_after_every_k),
        ProbeRequest("norms", "telemetry", telemetry.norms_every_k),
    ]
    requests += [ProbeRequest(probe, "telemetry", k) for probe, k in spectral_requests(telemetry)]
    requests.append(ProbeRequest("damping", "damping", damp.every_k))
    if damp.needs_rho:
        requests.append(ProbeRequest("rho", "damping", damp.every_k))
    if damp.needs_norms:
        requests.append(ProbeRequest("norms", "damping", damp.every_k))
    if est is not None:
        requests.append(ProbeRequest("estimator", "precondition", est.obj.every_k))
    requests.append(ProbeRequest("refresh", "precondition", prec.refresh_every_k))
    return tuple(requests)


def _needs_rng(p: Parts, telemetry: TelemetrySpec) -> tuple[str, ...]:
    est = p.estimator.obj if p.estimator is not None else None
    users = (
        ("the model (dropout)", p.curvature.obj.uses_rng),
        ("estimator", est is not None and est.uses_rng and est.every_k != -1),
        ("spectral telemetry", any(k != -1 for _, k in spectral_requests(telemetry))),
    )
    return tuple(name for name, on in users if on)


def _schema(p: Parts, telemetry: TelemetrySpec) -> dict[str, InfoField]:
    """Core fields, spectral fields, then each component's declared keys (own fields need an InfoField)."""
    schema: dict[str, InfoField] = {**CORE_FIELDS, **spectral_fields(telemetry)}
    owner: dict[str, str] = {}
    for part in p.components().values():
        comp: Component = part.obj
        for key in comp.info_keys:
            if key in CORE_FIELDS:
                continue
            if key not in comp.info_fields:
                raise TypeError(f"{part.name} reports info key {key!r} without an InfoField for it (info_fields)")
            if key in schema:
                first = owner.get(key, "the core schema or telemetry")
                raise TypeError(f"{part.name} declares info key {key!r}, which {first} declares already")
            schema[key], owner[key] = comp.info_fields[key], part.name
    return schema


def _summary(p: Parts) -> dict[str, str]:
    out = {role: part.summary for role, part in p.components().items()}
    out["precond"] = out.pop("precond")
    if p.precond.obj.refresh_every_k != -1:
        out["precond"] += f"; refresh every {p.precond.obj.refresh_every_k}"
    ordered = {k: out[k] for k in ("curvature", "solver", "precond", "damping", "estimator", "line_search") if k in out}
    if p.grad_tx is not None:
        ordered["grad_tx"] = "optax transform on g before the solve"
    return ordered


def _kwargs(kwargs) -> str:
    shown = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
    if not shown:
        return ""
    return "(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _describe(obj: Any) -> str:
    """A component object in the plan: its class and its simple dataclass fields."""
    if not is_dataclass(obj):
        return type(obj).__name__
    return type(obj).__name__ + _kwargs({f.name: getattr(obj, f.name) for f in fields(obj)})
