"""Option tables and spec builders shared by presets.

Each table maps an option name to an :class:`~somax.presets.registry.Option` (default,
type, description); a preset's options are a union of tables, with
``Option.replace`` for a preset's own default or wording, so every shared option is
described once.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Any

import optax

from somax.curvature.losses import OutputLoss
from somax.curvature.model import Model
from somax.presets.registry import Option
from somax.specs import DampingSpec, PrecondSpec, SolverSpec, TelemetrySpec

__all__ = ["MODEL_OPTIONS", "HESSIAN_MODEL_OPTIONS", "BATCH_OPTIONS", "OUTER_OPTIONS", "DAMPING_OPTIONS",
           "CG_OPTIONS", "DIAG_OPTIONS", "combine", "outer_chain", "damping_spec", "precond_spec", "cg_spec",
           "model_kwargs", "require", "diag_grad_tx", "diag_outer_chain"]  # fmt: skip

# Types as the signatures show them (``typing`` spellings print without module prefixes).
Fn = typing.Callable[..., typing.Any] | None
Schedule = float | typing.Callable[[int], float]
Kwargs = typing.Mapping[str, typing.Any] | None

#: The model of a GGN preset.
MODEL_OPTIONS: dict[str, Option] = {
    "predict_fn": Option(
        None, Fn, "the model, ``predict_fn(params, x) -> outputs`` (logits for CE); may be passed positionally."
    ),
    "model": Option(
        None,
        Model | None,
        "a ``somax.Model`` in place of ``predict_fn``: model state, rng and aux "
        "(``somax.adapters`` wraps Flax modules).",
    ),
}
#: The model of an exact-Hessian preset: a loss of the batch, or a model with an output loss.
HESSIAN_MODEL_OPTIONS: dict[str, Option] = {
    "loss_fn": Option(
        None,
        Fn,
        "``loss_fn(params, batch) -> scalar``, whose exact Hessian is the curvature; "
        "may be passed positionally. Alternative to ``predict_fn`` with ``loss``.",
    ),
    "predict_fn": MODEL_OPTIONS["predict_fn"].replace(
        doc="the model ``predict_fn(params, x) -> outputs``, used with ``loss`` in place of ``loss_fn``."
    ),
    "model": MODEL_OPTIONS["model"],
    "loss": Option(
        None,
        str | OutputLoss | None,
        'the output loss of ``predict_fn``/``model``: ``"mse"``, ``"ce"`` or an ``OutputLoss``.',
    ),
}
#: Where the curvature reads its inputs, targets and weights in a mapping batch.
BATCH_OPTIONS: dict[str, Option] = {
    "x_key": Option("x", str, "the batch entry holding the model inputs ``x``."),
    "y_key": Option("y", str, "the batch entry holding the targets ``y``."),
    "weight_key": Option(
        None,
        str | None,
        "the batch entry holding per-example weights (``(B,)``, or ``(B, T)`` "
        "for sequences; a 0/1 mask is a weight): the loss becomes ``Σ w ℓ / Σ w``. None: unweighted.",
    ),
}
_COMMON_TAIL: dict[str, Option] = {
    "telemetry": Option(
        None,
        TelemetrySpec | None,
        "in-step probes and their cadences (rho, loss after, trace, eigenvalues, norms); None: none.",
    ),
    "curvature_kwargs": Option(
        None,
        Kwargs,
        "further keyword arguments of the curvature spec (``x_fn``, ``y_fn``, "
        "``weight_fn``, or any key above); an option given both here and directly with "
        "another value raises.",
    ),
    "reject_nonfinite": Option(
        True,
        bool,
        "reject a step whose loss, gradient or update is not finite (the "
        "parameters and state are kept); False compiles no guard.",
    ),
}
#: The Optax chain on the direction (solver-based presets).
OUTER_OPTIONS: dict[str, Option] = {
    "learning_rate": Option(1.0, Schedule, "the step size ``lr`` (``w ← w − lr·s``): a float or an Optax schedule."),
    "clip_norm": Option(None, float | None, "clip the direction to this global norm before the step; None: no clip."),
    "weight_decay": Option(
        None, float | None, "add ``weight_decay·w`` to the direction (before momentum); None: no decay."
    ),
    "momentum": Option(None, float | None, "decay of a momentum (``optax.trace``) on the direction; None: none."),
    **_COMMON_TAIL,
}
#: Damping (solver-based presets).
DAMPING_OPTIONS: dict[str, Option] = {
    "lam0": Option(
        1.0, float, "the damping ``λ`` of ``(H + λI) s = g``: constant, or the initial value of an adaptive policy."
    ),
    "damping": Option(
        "constant",
        str | DampingSpec,
        'the damping policy: ``"constant"``, ``"trust_region"``, ``"step_norm"``, or a ``DampingSpec``.',
    ),
    "tr_every_k": Option(1, int, 'with ``damping="trust_region"``: update λ every this many steps.'),
}
#: Parameter-space CG.
CG_OPTIONS: dict[str, Option] = {
    "maxiter": Option(10, int, "maximum CG iterations per step."),
    "tol": Option(1e-5, float, "CG stops when the relative residual ``‖As − g‖ ≤ tol·‖g‖``."),
    "warm_start": Option(True, bool, "start CG from the previous step's direction."),
    "stabilise_every": Option(
        0, int, "replace CG's recursive residual by the true one every this many iterations; 0: never."
    ),
    "qn_memory": Option(
        0,
        int,
        "keep the first this many CG pairs ``(p, Ap)`` of each solve and precondition the next solve "
        "with their L-BFGS inverse (helps when consecutive systems are close, e.g. full batches); 0: off.",
    ),
    "precondition": Option(
        None,
        str | PrecondSpec | None,
        "a diagonal preconditioner for PCG, by kind "
        '(``"diag_ema"``, ``"diag_direct"``) or as a ``PrecondSpec``; None: plain CG.',
    ),
}


def combine(*tables: Mapping[str, Option], **changes: Any) -> dict[str, Option]:
    """The union of option tables, in order; ``changes`` set a default (a value) or replace an entry (an ``Option``)."""
    out: dict[str, Option] = {}
    for table in tables:
        out.update(table)
    for key, change in changes.items():
        if isinstance(change, Option):
            out[key] = change
        elif key in out:
            out[key] = out[key].replace(default=change)
        else:
            raise KeyError(f"combine: {key!r} is in none of the tables; give an Option to add it")
    return out


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
    memory = {"memory": o["qn_memory"]} if o["qn_memory"] else {}  # the plan shows it only when on
    return SolverSpec("cg", kwargs={**{k: o[k] for k in keys}, **memory})


def model_kwargs(
    preset: str, o: Mapping[str, Any], names: tuple[str, ...], extra: Mapping[str, Any] | None = None
) -> dict:
    """Curvature kwargs: the model options ``names``, the batch keys and ``curvature_kwargs``.

    A ``model=`` option (a :class:`somax.Model`) is taken wherever ``predict_fn`` is. A model
    option given both directly and in ``curvature_kwargs`` raises; a batch key
    (``x_key``, ``y_key``, ``weight_key``) may be given both ways only with the same value.
    A batch key is passed on when the caller gave it (``o.given`` of
    :class:`~somax.presets.registry.Options`; for a plain dict, when it is not the default).
    """
    if "predict_fn" in names and "model" not in names:
        names = (*names, "model")
    out = {k: o[k] for k in names if o.get(k) is not None}
    out.update(extra or {})
    given = getattr(o, "given", None)
    batch = {
        key: o[key]
        for key, opt in BATCH_OPTIONS.items()
        if key in o and (key in given if given is not None else o[key] != opt.default)
    }
    if batch and o.get("loss_fn") is not None:
        raise TypeError(
            f"{preset}: {', '.join(batch)} name(s) batch entries read for predict_fn/model with loss; "
            "loss_fn(params, batch) reads the batch itself"
        )
    for key, value in (o["curvature_kwargs"] or {}).items():
        if key in batch:
            if value != batch[key]:
                raise TypeError(
                    f"{preset}: {key}={batch[key]!r} given directly but {key}={value!r} in curvature_kwargs; "
                    f"give {key} once"
                )
        elif key in out:
            raise TypeError(f"{preset}: {key!r} given both directly and in curvature_kwargs")
        out[key] = value
    out.update(batch)
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
DIAG_OPTIONS: dict[str, Option] = {
    "learning_rate": OUTER_OPTIONS["learning_rate"].replace(default=3e-4),
    "b1": Option(0.96, float, "EMA decay of the gradient momentum ``m``."),
    "b2": Option(0.99, float, "EMA decay of the diagonal curvature estimate."),
    "eps": Option(1e-12, float, "the ε of the update's denominator (see the update above)."),
    "weight_decay": Option(0.0, float, "decoupled weight decay, ``w ← w − lr·weight_decay·w`` (AdamW-style); 0: none."),
    "eval_every_k": Option(
        10,
        int,
        "refresh the diagonal curvature estimate every this many steps (steps 0, k, "
        "2k, …); the estimate is kept in between.",
    ),
    "amortize_estimator": Option(
        False,
        bool,
        "estimate on one of ``eval_every_k`` slices of the batch at every step and hand the mean over on "
        "the cadence, instead of the whole batch every ``eval_every_k`` steps: nothing in the step is "
        "conditional (on a CPU a convolution network's refresh inside a conditional is many times slower).",
    ),
    "grad_clip_norm": Option(
        None, float | None, "clip the gradient to this global norm before the momentum; None: no clip."
    ),
    **_COMMON_TAIL,
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
