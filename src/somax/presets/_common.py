"""Option tables and spec builders shared by presets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from somax.specs import DampingSpec, PrecondSpec, SolverSpec

__all__ = ["OUTER_OPTIONS", "DAMPING_OPTIONS", "CG_OPTIONS", "outer_chain", "damping_spec", "precond_spec",
           "cg_spec", "model_kwargs", "DIAG_OPTIONS", "diag_grad_tx", "diag_outer_chain"]  # fmt: skip

#: The Optax chain on the direction (every preset).
OUTER_OPTIONS: dict[str, Any] = {
    "learning_rate": 1.0,
    "clip_norm": None,
    "weight_decay": None,
    "momentum": None,
    "telemetry": None,
    "curvature_kwargs": None,
    "reject_nonfinite": True,
}
#: Damping (solver-based presets).
DAMPING_OPTIONS: dict[str, Any] = {"lam0": 1.0, "damping": "constant", "tr_every_k": 1}
#: Parameter-space CG.
CG_OPTIONS: dict[str, Any] = {
    "maxiter": 10,
    "tol": 1e-5,
    "warm_start": True,
    "stabilise_every": 0,
    "precondition": None,
}


def outer_chain(o: Mapping[str, Any]) -> optax.GradientTransformation:
    """Optax chain on the direction: clip ‖s‖ → add ``wd·w`` → direction momentum → ``−lr``."""
    parts = []
    if o["clip_norm"] is not None:
        parts.append(optax.clip_by_global_norm(o["clip_norm"]))
    if o["weight_decay"]:
        parts.append(optax.add_decayed_weights(o["weight_decay"]))
    if o["momentum"]:
        parts.append(optax.trace(decay=o["momentum"]))
    parts.append(optax.scale_by_learning_rate(o["learning_rate"]))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def damping_spec(o: Mapping[str, Any]) -> DampingSpec:
    damping = o["damping"]
    if isinstance(damping, DampingSpec):
        return damping
    if damping == "trust_region":
        return DampingSpec("trust_region", lam0=o["lam0"], kwargs={"every_k": o["tr_every_k"]})
    return DampingSpec(damping, lam0=o["lam0"])


def precond_spec(o: Mapping[str, Any]) -> PrecondSpec | None:
    p = o["precondition"]
    if p is None or isinstance(p, PrecondSpec):
        return p
    return PrecondSpec(p)


def cg_spec(o: Mapping[str, Any]) -> SolverSpec:
    keys = ("maxiter", "tol", "warm_start", "stabilise_every")
    return SolverSpec("cg", kwargs={k: o[k] for k in keys})


def model_kwargs(
    preset: str, o: Mapping[str, Any], names: tuple[str, ...], extra: Mapping[str, Any] | None = None
) -> dict:
    """Curvature kwargs from the model options ``names`` plus ``curvature_kwargs``; duplicates raise.

    A ``model=`` option (a :class:`somax.Model`) is taken wherever ``predict_fn`` is.
    """
    if "predict_fn" in names and "model" not in names:
        names = (*names, "model")
    out = {k: o[k] for k in names if o.get(k) is not None}
    out.update(extra or {})
    for key, value in (o["curvature_kwargs"] or {}).items():
        if key in out:
            raise TypeError(f"{preset}: {key!r} given both directly and in curvature_kwargs")
        out[key] = value
    return out


def require(preset: str, kwargs: Mapping[str, Any], *alternatives: tuple[str, ...]) -> None:
    """Raise unless one keyword group is fully present in ``kwargs`` (``model`` may stand for ``predict_fn``)."""
    alternatives = alternatives + tuple(
        tuple("model" if k == "predict_fn" else k for k in group) for group in alternatives if "predict_fn" in group
    )
    if any(all(kwargs.get(k) is not None for k in group) for group in alternatives):
        return
    wanted = " or ".join("+".join(group) for group in alternatives)
    raise TypeError(f"{preset}: missing model callable: pass {wanted}")


#: Diagonal-lane presets (AdaHessian, Sophia-*): gradient momentum → ``D⁻¹`` → Optax chain.
#: Every preset overrides the defaults with its paper's values (see ``presets/diag_lane.py``).
DIAG_OPTIONS: dict[str, Any] = {
    "learning_rate": 3e-4,
    "b1": 0.96,
    "b2": 0.99,
    "eps": 1e-12,
    "weight_decay": 0.0,
    "eval_every_k": 10,
    "grad_clip_norm": None,
    "telemetry": None,
    "curvature_kwargs": None,
    "reject_nonfinite": True,
}


def diag_grad_tx(o: Mapping[str, Any], *, debias: bool) -> optax.GradientTransformation:
    """Gradient side, before the solve: optional ``clip_by_global_norm`` then ``m_t = EMA_{b1}(g)``."""
    parts = []
    if o["grad_clip_norm"] is not None:
        parts.append(optax.clip_by_global_norm(o["grad_clip_norm"]))
    parts.append(optax.ema(decay=o["b1"], debias=debias))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def diag_outer_chain(o: Mapping[str, Any], *, clip: float | None = None) -> optax.GradientTransformation:
    """Direction side, after ``s = D⁻¹ m``: optional element-wise ``clip(s, ±clip)`` → ``+ wd·w`` → ``−lr``.

    The decoupled weight decay enters as ``u = −lr (clip(s) + wd·w)``, which is the
    ``w ← w − lr·wd·w`` of AdamW-style optimizers (Sophia Alg. 3, AdaHessian's code).
    """
    parts = []
    if clip is not None:
        parts.append(optax.clip(clip))
    if o["weight_decay"]:
        parts.append(optax.add_decayed_weights(o["weight_decay"]))
    parts.append(optax.scale_by_learning_rate(o["learning_rate"]))
    return optax.chain(*parts) if len(parts) > 1 else parts[0]
