"""``somax.assemble``: specs → components → validated static plan → method (paper §3.1, App. B).

Everything that can be wrong with a configuration is caught here, with an error
that names the offending spec(s): unknown kinds (with a did-you-mean), unknown
keyword arguments, and incompatible combinations (naming both parts). The traced
step therefore contains no compatibility logic.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from somax.method import SecondOrderMethod
from somax.plan import Plan, ProbeRequest
from somax.probes import spectral_fields, spectral_requests
from somax.registry import CURVATURES, DAMPINGS, ESTIMATORS, LINE_SEARCHES, PRECONDITIONERS, SOLVERS, build_component
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

__all__ = ["assemble", "IncompatibleSpecsError"]


class IncompatibleSpecsError(ValueError):
    """Two specs that cannot be combined; the message names both."""


def _expect(arg: str, value: Any, cls: type, *, required: bool = False) -> None:
    if value is None and not required:
        return
    if not isinstance(value, cls):
        got = "None" if value is None else type(value).__name__
        raise TypeError(f"assemble: {arg}= must be a {cls.__name__}, got {got}")


def assemble(
    *,
    curvature: CurvatureSpec,
    solver: SolverSpec | None = None,
    damping: DampingSpec | None = None,
    precondition: PrecondSpec | None = None,
    estimator: EstimatorSpec | None = None,
    telemetry: TelemetrySpec | None = None,
    tx: optax.GradientTransformation | None = None,
    grad_tx: optax.GradientTransformation | None = None,
    line_search: LineSearchSpec | None = None,
    solve_dtype: Any = None,
    reject_nonfinite: bool = True,
) -> SecondOrderMethod:
    """Assemble a second-order method from declarative specs.

    Args:
      curvature: curvature operator ``H_t`` (required).
      solver: solver of (2.4); fixes the lane. Default ``SolverSpec("cg")``.
      damping: damping policy for ``λ_t``. Default ``DampingSpec("constant", lam0=1.0)``.
      precondition: diagonal preconditioner (diagonal lane or PCG). Default identity.
      estimator: randomised curvature estimator feeding the preconditioner.
      telemetry: optional probes and their cadences.
      tx: Optax chain applied to the direction ``s_t``; it must turn ``s_t`` into a
        *descent* update (e.g. end in ``optax.scale(-lr)``). Default ``optax.scale(-1.0)``.
      grad_tx: Optax transform applied to ``g_t`` before the solve (e.g. momentum).
      line_search: step-size policy on the applied update (``"grid"`` or ``"armijo"``).
      solve_dtype: dtype of curvature products, solves and method state (e.g. ``"float32"``
        for bfloat16 parameters); the update is cast back to each parameter's dtype.
      reject_nonfinite: reject a step whose loss, gradient or update is not finite
        (parameters and state stay as they were; ``info["finite"]`` is False). With
        ``False`` no check is compiled (about 3 % less compile time, see
        ``docs/benchmarks.md``) and ``info["finite"]`` is always True.

    Returns:
      A :class:`~somax.method.SecondOrderMethod` with ``init``, ``step`` and ``plan``.
    """
    _expect("curvature", curvature, CurvatureSpec, required=True)
    _expect("solver", solver, SolverSpec)
    _expect("damping", damping, DampingSpec)
    _expect("precondition", precondition, PrecondSpec)
    _expect("estimator", estimator, EstimatorSpec)
    _expect("telemetry", telemetry, TelemetrySpec)
    _expect("line_search", line_search, LineSearchSpec)
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
    solver = solver or SolverSpec("cg")
    damping = damping or DampingSpec("constant", lam0=1.0)
    precondition = precondition or PrecondSpec("identity")
    telemetry = telemetry or TelemetrySpec()
    tx = tx if tx is not None else optax.scale(-1.0)

    curv = build_component(CURVATURES, curvature.kind, curvature.kwargs, where="CurvatureSpec")
    solv = build_component(SOLVERS, solver.kind, solver.kwargs, where="SolverSpec")
    prec = build_component(PRECONDITIONERS, precondition.kind, precondition.kwargs, where="PrecondSpec")
    damp = build_component(DAMPINGS, damping.kind, damping.kwargs, where="DampingSpec")
    search = None
    if line_search is not None:
        search = build_component(LINE_SEARCHES, line_search.kind, line_search.kwargs, where="LineSearchSpec")
    est = None
    if estimator is not None:
        est = build_component(ESTIMATORS, estimator.kind, estimator.kwargs, where="EstimatorSpec")

    lane = getattr(solv, "lane", None)
    if lane not in ("param", "row", "diag"):
        raise TypeError(
            f"SolverSpec({solver.kind!r}): a solver must declare lane 'param', 'row' or 'diag', got {lane!r}"
        )
    if lane == "row" and not getattr(curv, "has_rows", False):
        raise IncompatibleSpecsError(
            f"SolverSpec({solver.kind!r}) solves in row space, but CurvatureSpec({curvature.kind!r}) has no row "
            f"form (J Jᵀ); use a GGN curvature ('ggn_mse', 'ggn_ce') or a parameter-space solver such as 'cg'"
        )
    model = getattr(curv, "model", None)
    if getattr(solv, "per_example_model", False) and model is not None:
        reasons = {
            "couples_examples": "its examples interact (e.g. BatchNorm in training mode)",
            "uses_rng": "it draws randomness (dropout) that differs between single examples and the batch",
        }
        for flag, why in reasons.items():
            if getattr(model, flag, False):
                raise IncompatibleSpecsError(
                    f"SolverSpec({solver.kind!r}) forms its Gram from the model evaluated on single examples, "
                    f"which does not equal the batch Jacobian of CurvatureSpec({curvature.kind!r})'s model: {why}. "
                    f"Use 'row_cg' (batch JVP/VJP, exact for such models) or a parameter-space solver such as 'cg'"
                )
    if grad_tx is not None and getattr(solv, "needs_gradient_rhs", False):
        raise IncompatibleSpecsError(
            f"SolverSpec({solver.kind!r}) solves for the gradient itself (its row residual r has Ĵᵀr = n·g), "
            f"so grad_tx= would be ignored; drop grad_tx (put momentum on the direction via tx=) or use a "
            f"parameter-space solver such as 'cg'"
        )
    needs_diag = getattr(prec, "needs_diagonal", False)
    if lane == "diag" and not needs_diag:
        raise IncompatibleSpecsError(
            f"SolverSpec({solver.kind!r}) is the diagonal lane and needs a diagonal preconditioner, but "
            f"PrecondSpec({precondition.kind!r}) provides none; use 'diag_ema' or 'diag_direct'"
        )
    if needs_diag and not getattr(solv, "uses_precond", False):
        raise IncompatibleSpecsError(
            f"PrecondSpec({precondition.kind!r}) would be ignored: SolverSpec({solver.kind!r}) takes no preconditioner"
        )
    if est is not None and getattr(est, "produces_diagonal", True) and not needs_diag:
        raise IncompatibleSpecsError(
            f"EstimatorSpec({estimator.kind!r}) produces a diagonal estimate, but PrecondSpec({precondition.kind!r}) "
            f"does not use one; pair it with 'diag_ema' or 'diag_direct'"
        )
    if (
        est is not None
        and getattr(est, "needs_model_outputs", False)
        and not getattr(curv, "needs_model_outputs", False)
    ):
        raise IncompatibleSpecsError(
            f"EstimatorSpec({estimator.kind!r}) samples from the model's outputs, but "
            f"CurvatureSpec({curvature.kind!r}) "
            f"has no model-output linearization; use a GGN curvature"
        )

    requests = [
        ProbeRequest("rho", "telemetry", telemetry.rho_every_k),
        ProbeRequest("loss_after", "telemetry", telemetry.loss_after_every_k),
        ProbeRequest("norms", "telemetry", telemetry.norms_every_k),
    ]
    requests += [ProbeRequest(probe, "telemetry", k) for probe, k in spectral_requests(telemetry)]
    requests.append(ProbeRequest("damping", "damping", getattr(damp, "every_k", -1)))
    if getattr(damp, "needs_rho", False):
        requests.append(ProbeRequest("rho", "damping", damp.every_k))
    if getattr(damp, "needs_norms", False):
        requests.append(ProbeRequest("norms", "damping", damp.every_k))
    if est is not None and needs_diag:
        requests.append(ProbeRequest("estimator", "precondition", est.every_k))
    needs_rng = tuple(
        name
        for name, on in (
            ("the model (dropout)", getattr(curv, "uses_rng", False)),
            ("estimator", est is not None and needs_diag and est.every_k != -1),
            ("spectral telemetry", any(k != -1 for _, k in spectral_requests(telemetry))),
        )
        if on
    )

    schema: dict[str, InfoField] = {**CORE_FIELDS, **spectral_fields(telemetry)}
    for key in getattr(solv, "info_keys", ()):
        if key not in schema:
            extra = getattr(solv, "info_fields", {})
            if key not in extra:
                raise TypeError(f"SolverSpec({solver.kind!r}) reports info key {key!r} without an InfoField for it")
            schema[key] = extra[key]

    components = {
        "curvature": curvature.kind,
        "solver": solver.kind + _kwargs_summary(solver.kwargs),
        "precond": precondition.kind + _kwargs_summary(precondition.kwargs),
        "damping": f"{damping.kind} (λ0={damping.lam0})" + _kwargs_summary(damping.kwargs),
    }
    if estimator is not None:
        components["estimator"] = estimator.kind + _kwargs_summary(estimator.kwargs)
    if grad_tx is not None:
        components["grad_tx"] = "optax transform on g before the solve"
    if line_search is not None:
        components["line_search"] = line_search.kind + _kwargs_summary(line_search.kwargs)

    plan = Plan(lane=lane, components=components, requests=tuple(requests), info_schema=schema, needs_rng=needs_rng)
    return SecondOrderMethod(
        plan=plan,
        curvature=curv,
        solver=solv,
        precond=prec,
        damping=damp,
        estimator=est,
        tx=tx,
        grad_tx=grad_tx,
        lam0=float(damping.lam0),
        telemetry=telemetry,
        line_search=search,
        solve_dtype=solve_dtype,
        reject_nonfinite=bool(reject_nonfinite),
    )


def _kwargs_summary(kwargs) -> str:
    shown = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}
    if not shown:
        return ""
    return "(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
