"""Row-space lane presets (EGN [Korbit et al. 2025]) and dense direct-solve presets.

* ``egn_mse`` / ``egn_ce``: GGN + ``row_cholesky`` (dense row Gram, structured for dense kernels).
* ``egn_mse_cg`` / ``egn_ce_cg``: GGN + matrix-free ``row_cg``.
* ``ggn_direct_mse`` / ``ggn_direct_ce``: GGN materialised in parameter space + ``dense_cholesky``.
* ``newton_direct``: exact Hessian materialised + ``dense_eigh`` (``|Λ|`` or ``max(Λ, 0)``).

Each is a few lines of specs; options are shared with the parameter-lane presets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from somax.assemble import assemble
from somax.method import SecondOrderMethod
from somax.presets._common import (
    BATCH_OPTIONS,
    CG_OPTIONS,
    DAMPING_OPTIONS,
    HESSIAN_MODEL_OPTIONS,
    MODEL_OPTIONS,
    OUTER_OPTIONS,
    damping_spec,
    model_kwargs,
    outer_chain,
    require,
)
from somax.presets.registry import Option, define_preset
from somax.specs import CurvatureSpec, SolverSpec

__all__ = ["egn_mse", "egn_ce", "egn_mse_cg", "egn_ce_cg", "ggn_direct_mse", "ggn_direct_ce", "newton_direct"]

#: Row-space CG: the parameter-lane CG options without a preconditioner (row CG takes none).
ROW_CG_OPTIONS: dict[str, Option] = {
    **{k: v for k, v in CG_OPTIONS.items() if k not in ("precondition", "qn_memory")},
    "warm_start": CG_OPTIONS["warm_start"].replace(
        doc="start row CG from the previous direction mapped into this batch's rows."
    ),
}
_SOLVE_DTYPE = Option(
    None,
    str | None,
    'dtype of the factorisation: None (the model\'s, at least float32), ``"float32"`` or ``"float64"`` (needs x64).',
)
#: Row-Cholesky.
ROW_CHOLESKY_OPTIONS: dict[str, Option] = {
    "solve_dtype": _SOLVE_DTYPE,
    "gram": Option(
        "auto",
        str,
        'how the row Gram is formed: ``"auto"`` (structured for dense kernels where '
        'cheaper), ``"structured"`` or ``"per_example"`` (per-example Jacobians of every leaf).',
    ),
}
#: Dense parameter-space solves.
DENSE_OPTIONS: dict[str, Option] = {
    "solve_dtype": _SOLVE_DTYPE,
    "max_params": Option(
        20_000, int, "refuse models with more parameters than this (the curvature is a dense ``d×d`` matrix)."
    ),
}
_NEGATIVE = Option(
    "abs",
    str,
    'how eigenvalues below zero enter: ``"abs"`` (``|Λ|``, saddle-free Newton) or ``"clip"`` (``max(Λ, 0)``).',
)


def _solver(kind: str, table: Mapping[str, Option]) -> Callable[[Mapping[str, Any]], SolverSpec]:
    return lambda o: SolverSpec(kind, kwargs={k: o[k] for k in table})


def _define(
    name: str,
    curvature_kind: str,
    solver_kind: str,
    solver_options: Mapping[str, Option],
    doc: str,
) -> Callable[..., SecondOrderMethod]:
    model = HESSIAN_MODEL_OPTIONS if curvature_kind == "hessian" else MODEL_OPTIONS
    make_solver = _solver(solver_kind, solver_options)

    def build(o: Mapping[str, Any]) -> SecondOrderMethod:
        kwargs = model_kwargs(name, o, tuple(model))
        if curvature_kind == "hessian":
            require(name, kwargs, ("loss_fn",), ("predict_fn", "loss"))
        else:
            require(name, kwargs, ("predict_fn",))
        return assemble(
            curvature=CurvatureSpec(curvature_kind, kwargs=kwargs),
            solver=make_solver(o),
            damping=damping_spec(o),
            telemetry=o["telemetry"],
            reject_nonfinite=o["reject_nonfinite"],
            tx=outer_chain(o),
        )

    return define_preset(
        name,
        build,
        positional="loss_fn" if curvature_kind == "hessian" else "predict_fn",
        options={**model, **BATCH_OPTIONS, **solver_options, **DAMPING_OPTIONS, **OUTER_OPTIONS},
        doc=doc,
    )


_EGN_DOC = """Exact Gauss-Newton (EGN) for {what} [Korbit et al. 2025], row-space lane ({solver}).

    Solves the damped GGN system (2.4) in row space (2.8): ``(Ĵ Ĵᵀ + μI) v = r``,
    ``s = Ĵᵀ v`` with ``Ĵ = R J`` (``RᵀR = n·H_z``, {factor}) and ``μ = nλ`` (``n`` = batch
    size, or number of positions for sequence CE), so ``s = (H_GGN + λI)⁻¹ g`` exactly —
    the same direction as ``{twin}`` with an exact inner solve. Then ``w ← w − lr·s``
    through the Optax chain (optional ``clip_norm``, ``weight_decay``, direction ``momentum``).
    Damping is ``constant`` (``λ = lam0``) or ``trust_region`` (every ``tr_every_k`` steps).
    {solver_doc}
    Model: ``predict_fn(params, x)``; batch ``{{"x", "y"}}`` (other keys: ``x_key``, ``y_key``, ``weight_key``).
    """
_CHOLESKY_DOC = (
    "Row-Cholesky: the dense ``m×m`` Gram is formed on single examples (vmap), structured for\n"
    "    dense kernels (``gram='auto'``; ``'per_example'``: per-example Jacobians of every leaf),\n"
    "    factorised in ``solve_dtype`` (None: the model's dtype; 'float64' needs x64)."
)
_CG_DOC = (
    "Row-CG: matrix-free CG (one VJP + one JVP per iteration, no Gram), ``maxiter``, relative\n"
    "    tolerance ``tol``; ``warm_start`` maps the previous direction into this batch's rows."
)
_MSE = {"what": "mean squared error", "factor": "``R = I``", "twin": "sgn_mse"}
_CE = {
    "what": "softmax cross-entropy (integer or one-hot labels)",
    "factor": "closed-form rank-(C−1) square root of ``diag(p) − ppᵀ``",
    "twin": "sgn_ce",
}

egn_mse = _define(
    "egn_mse", "ggn_mse", "row_cholesky", ROW_CHOLESKY_OPTIONS,
    _EGN_DOC.format(solver="row-Cholesky", solver_doc=_CHOLESKY_DOC, **_MSE),
)  # fmt: skip
egn_ce = _define(
    "egn_ce", "ggn_ce", "row_cholesky", ROW_CHOLESKY_OPTIONS,
    _EGN_DOC.format(solver="row-Cholesky", solver_doc=_CHOLESKY_DOC, **_CE),
)  # fmt: skip
egn_mse_cg = _define(
    "egn_mse_cg", "ggn_mse", "row_cg", ROW_CG_OPTIONS,
    _EGN_DOC.format(solver="row-CG", solver_doc=_CG_DOC, **_MSE),
)  # fmt: skip
egn_ce_cg = _define(
    "egn_ce_cg", "ggn_ce", "row_cg", ROW_CG_OPTIONS,
    _EGN_DOC.format(solver="row-CG", solver_doc=_CG_DOC, **_CE),
)  # fmt: skip

_DIRECT_DOC = """Gauss-Newton with a dense direct solve for {what}, parameter lane (small models).

    Materialises ``H_GGN`` (``d`` GGN-vector products from the step's linearization) and
    solves ``(H_GGN + λI) s = g`` by Cholesky in ``solve_dtype``; refuses models with more
    than ``max_params`` parameters. Exact, and a reference for ``sgn_*`` / ``egn_*``.
    Damping and the Optax chain as in ``sgn_mse``. Model: ``predict_fn(params, x)``.
    """

ggn_direct_mse = _define(
    "ggn_direct_mse", "ggn_mse", "dense_cholesky", DENSE_OPTIONS, _DIRECT_DOC.format(what="mean squared error")
)
ggn_direct_ce = _define(
    "ggn_direct_ce", "ggn_ce", "dense_cholesky", DENSE_OPTIONS, _DIRECT_DOC.format(what="softmax cross-entropy")
)
newton_direct = _define(
    "newton_direct",
    "hessian",
    "dense_eigh",
    {**DENSE_OPTIONS, "negative": _NEGATIVE},
    """Newton's method with a dense eigendecomposition, parameter lane (small models).

    Materialises the exact Hessian ``∇²L`` (``d`` Hessian-vector products) and returns
    ``s = Q diag(1/(f(Λ) + λ)) Qᵀ g`` with ``f = |·|`` (``negative="abs"``, saddle-free
    Newton) or ``f = max(·, 0)`` (``negative="clip"``), so an indefinite Hessian gives a
    finite descent direction; reports ``eig_min``. Model: ``loss_fn(params, batch)``, or
    ``predict_fn`` with ``loss="mse"``/``"ce"``. Other options as in ``ggn_direct_mse``.
    """,
)
