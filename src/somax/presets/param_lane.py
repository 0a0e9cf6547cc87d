"""Parameter-space lane presets: SGN [Gargiani et al. 2020] and Newton-CG [Martens 2010]."""

from __future__ import annotations

from collections.abc import Mapping
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
    cg_spec,
    combine,
    damping_spec,
    model_kwargs,
    outer_chain,
    precond_spec,
    require,
)
from somax.presets.registry import define_preset
from somax.specs import CurvatureSpec

__all__ = ["sgn_mse", "sgn_ce", "newton_cg"]

_OPTIONS = combine(BATCH_OPTIONS, DAMPING_OPTIONS, CG_OPTIONS, OUTER_OPTIONS)


def _param_lane(curvature_kind: str, model_names: tuple[str, ...], preset: str):
    def build(o: Mapping[str, Any]) -> SecondOrderMethod:
        kwargs = model_kwargs(preset, o, model_names)
        if curvature_kind == "hessian":
            require(preset, kwargs, ("loss_fn",), ("predict_fn", "loss"))
        else:
            require(preset, kwargs, ("predict_fn",))
        return assemble(
            curvature=CurvatureSpec(curvature_kind, kwargs=kwargs),
            solver=cg_spec(o),
            damping=damping_spec(o),
            precondition=precond_spec(o),
            telemetry=o["telemetry"],
            reject_nonfinite=o["reject_nonfinite"],
            tx=outer_chain(o),
        )

    return build


_SGN_DOC = """Stochastic Gauss-Newton (SGN) for {what} [Gargiani et al. 2020], parameter lane.

    Solves ``(H_GGN + λI) s = g`` (2.4, 2.6) with warm-started CG (``maxiter``
    iterations, relative tolerance ``tol`` of (2.5)), then ``w ← w − lr·s`` through
    the Optax chain (optional ``clip_norm``, ``weight_decay``, direction ``momentum``).
    Damping is ``constant`` (``λ = lam0``) or ``trust_region`` (updated every
    ``tr_every_k`` steps). ``precondition`` may name a diagonal preconditioner
    (e.g. ``"diag_ema"`` on squared gradients) for PCG.
    Model: ``predict_fn(params, x)`` or ``model=somax.Model(...)`` (state, rng, aux; see
    ``somax.adapters`` for Flax); batch ``{{"x", "y"}}`` (other keys: ``x_key``, ``y_key``,
    ``weight_key``; functions of the batch via ``curvature_kwargs``: ``x_fn``, ``y_fn``, ``weight_fn``).
    Loss: {loss}.
    """

sgn_mse = define_preset(
    "sgn_mse",
    _param_lane("ggn_mse", ("predict_fn",), "sgn_mse"),
    positional="predict_fn",
    options={**MODEL_OPTIONS, **_OPTIONS},
    doc=_SGN_DOC.format(what="mean squared error", loss="``1/(2b) Σ_i ‖f(x_i) − y_i‖²``"),
)

sgn_ce = define_preset(
    "sgn_ce",
    _param_lane("ggn_ce", ("predict_fn",), "sgn_ce"),
    positional="predict_fn",
    options={**MODEL_OPTIONS, **_OPTIONS},
    doc=_SGN_DOC.format(what="softmax cross-entropy", loss="mean softmax cross-entropy, integer or one-hot labels"),
)

newton_cg = define_preset(
    "newton_cg",
    _param_lane("hessian", ("loss_fn", "predict_fn", "loss"), "newton_cg"),
    positional="loss_fn",
    options={**HESSIAN_MODEL_OPTIONS, **_OPTIONS},
    doc="""Newton-CG / Hessian-free [Martens 2010], parameter lane.

    Solves ``(∇²L + λI) s = g`` with CG on exact Hessian-vector products from one
    forward-over-reverse linearization. On negative curvature (``pᵀ(H+λI)p ≤ 0``)
    CG stops and returns its last descent iterate, or ``g`` (truncated Newton), so
    an indefinite Hessian never yields NaN. Model: ``loss_fn(params, batch)``, or
    ``predict_fn`` with ``loss="mse"``/``"ce"``. Other options as in ``sgn_mse``.
    """,
)
