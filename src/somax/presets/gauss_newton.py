"""Full Gauss-Newton with an inner optimizer [Abreu et al. 2025]: presets ``gn``, ``gn_prox_linear``,
``gn_layerwise`` and the inner learning-rate schedules.

Each preset is ``CurvatureSpec("ggn_microbatches")`` + :class:`~somax.solvers.gn_inner.GNInnerSolver`
+ a constant damping whose ``λ`` is the proximal weight of the inner problem + the outer Optax
chain ``−lr·s`` (``lr = 1``: the step is ``α (θ̂ − θ_t)``). The batch holds ``N`` training
micro-batches and the held-out micro-batches of the line search, stacked on a leading axis
(``docs/gauss_newton.md``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Any

import optax

from somax import validate
from somax.assemble import assemble
from somax.method import SecondOrderMethod
from somax.presets._common import BATCH_OPTIONS, MODEL_OPTIONS, OUTER_OPTIONS, combine, model_kwargs, require
from somax.presets.registry import Option, define_preset
from somax.solvers.gn_inner import GNInnerSolver
from somax.specs import CurvatureSpec, DampingSpec

__all__ = ["gn", "gn_prox_linear", "gn_layerwise", "inner_cosine", "global_cosine", "inner_optimizer"]

Schedule = float | typing.Callable[[int], float]


def global_cosine(learning_rate: float, total_inner_steps: int, alpha: float = 0.0) -> optax.Schedule:
    """ "Global cosine": one cosine decay over all inner steps of the run (``outer steps × N``).

    The inner optimizer's state (and so its step count) is carried from one outer step to the
    next, so an Optax schedule of the inner count spans the whole run.
    """
    validate.integer("global_cosine: total_inner_steps", total_inner_steps, minimum=1)
    return optax.cosine_decay_schedule(learning_rate, total_inner_steps, alpha=alpha)


def inner_cosine(learning_rate: float, micro_batches: int, alpha: float = 0.0, warmup: int = 0) -> optax.Schedule:
    """ "Constant + inner cosine": a cosine over the ``N`` inner steps of each outer step, restarted each step.

    The schedule of the inner count ``c`` is ``cos_N(c mod N)`` (with ``warmup`` linear warm-up
    steps at the start of each inner loop), which restarts at every outer step because each
    outer step makes exactly ``N = micro_batches`` inner steps.
    """
    validate.integer("inner_cosine: micro_batches", micro_batches, minimum=1)
    validate.integer("inner_cosine: warmup", warmup, minimum=0)
    if warmup:
        inner = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(micro_batches, warmup + 1), alpha)
    else:
        inner = optax.cosine_decay_schedule(learning_rate, micro_batches, alpha=alpha)
    return lambda count: inner(count % micro_batches)


def inner_optimizer(
    name: str | optax.GradientTransformation, learning_rate: Schedule, momentum: float = 0.95
) -> optax.GradientTransformation:
    """The inner optimizer by name: ``"muon"`` (``optax.contrib.muon``, momentum ``β``), ``"adam"``
    (``β₁`` = momentum) or ``"sgd"`` (heavy-ball momentum; 0: plain gradient descent), or any Optax
    transformation as given."""
    if not isinstance(name, str):
        return name
    validate.choice("inner_optimizer", name, ("muon", "adam", "sgd"))
    if name == "muon":
        return optax.contrib.muon(learning_rate, beta=momentum)
    if name == "adam":
        return optax.adam(learning_rate, b1=momentum)
    return optax.sgd(learning_rate, momentum=momentum or None)


_OPTIONS = combine(
    MODEL_OPTIONS,
    {
        "loss": Option("ce", str | Any, 'the output loss: ``"ce"`` (default), ``"mse"``, … or an ``OutputLoss``.'),
    },
    BATCH_OPTIONS,
    {
        "x_val_key": Option("x_val", str, "the batch entry of the held-out micro-batches' inputs ``(M, b, ...)``."),
        "y_val_key": Option("y_val", str, "the batch entry of the held-out micro-batches' targets."),
        "val_weight_key": Option(None, str | None, "the batch entry of the held-out micro-batches' weights."),
        "micro_batches": Option(
            None,
            int | None,
            "``N``: the training micro-batches per step (leading axis of ``x``), checked against the batch; "
            "None: read from the batch (the inner schedules need it given).",
        ),
        "lam0": Option(0.0, float, "the proximal weight ``λ`` of ``½λ‖Δ‖²`` in the inner problem."),
        "inner": Option(
            "muon",
            str | optax.GradientTransformation,
            '``"muon"``, ``"adam"``, ``"sgd"`` or any Optax transformation (then the inner options are unused).',
        ),
        "inner_learning_rate": Option(0.02, Schedule, "the inner optimizer's learning rate, or a schedule."),
        "inner_momentum": Option(0.95, float, "Muon's momentum ``β`` / Adam's ``β₁`` / SGD's momentum."),
        "inner_schedule": Option(
            "constant",
            str,
            '``"constant"``, ``"global_cosine"`` (needs ``total_steps``) or ``"inner_cosine"`` (restarted each step).',
        ),
        "total_steps": Option(None, int | None, 'with ``inner_schedule="global_cosine"``: the outer steps of the run.'),
        "line_search": Option(5, int, "grid size of the line search ``α = 2^(−i/2)``, ``i < line_search``; 0: α = 1."),
        "warm_start": Option(True, bool, "start the inner loop from the previous pre-line-search point ``θ̂``."),
        "carry_state": Option(True, bool, "keep the inner optimizer's state from one outer step to the next."),
        "learning_rate": OUTER_OPTIONS["learning_rate"].replace(
            doc="the outer step size (``θ ← θ + lr·α(θ̂ − θ)``); 1 in the paper."
        ),
    },
    telemetry=OUTER_OPTIONS["telemetry"],
    curvature_kwargs=OUTER_OPTIONS["curvature_kwargs"],
    reject_nonfinite=OUTER_OPTIONS["reject_nonfinite"],
)

_LAYERWISE_OPTIONS = combine(
    _OPTIONS,
    line_search=_OPTIONS["line_search"].replace(default=10),
    groups=Option(
        None,
        typing.Callable[..., typing.Any] | None,
        "``groups(params) → labels`` (a pytree of hashable labels like params); None: the top-level keys.",
    ),
)


def _schedule(preset: str, o: Mapping[str, Any]) -> Schedule:
    kind, lr = o["inner_schedule"], o["inner_learning_rate"]
    validate.choice(f"{preset}: inner_schedule", kind, ("constant", "global_cosine", "inner_cosine"))
    if kind == "constant":
        return lr
    if callable(lr):
        raise TypeError(f"{preset}: inner_schedule={kind!r} builds the schedule from a float inner_learning_rate")
    if o["micro_batches"] is None:
        raise TypeError(f"{preset}: inner_schedule={kind!r} needs micro_batches= (N, the inner steps per outer step)")
    if kind == "inner_cosine":
        return inner_cosine(lr, o["micro_batches"])
    if o["total_steps"] is None:
        raise TypeError(f"{preset}: inner_schedule='global_cosine' needs total_steps= (the outer steps of the run)")
    return global_cosine(lr, o["total_steps"] * o["micro_batches"])


def _gn(mode: str, preset: str) -> Callable[[Mapping[str, Any]], SecondOrderMethod]:
    def build(o: Mapping[str, Any]) -> SecondOrderMethod:
        validate.integer(f"{preset}: micro_batches", o["micro_batches"], minimum=1, allow_none=True)
        extra = {k: o[k] for k in ("loss",)}
        extra.update({k: o[k] for k in ("x_val_key", "y_val_key", "val_weight_key") if o[k] is not None})
        kwargs = model_kwargs(preset, o, ("predict_fn",), extra)
        require(preset, kwargs, ("predict_fn",))
        inner = inner_optimizer(o["inner"], _schedule(preset, o), o["inner_momentum"])
        solver = GNInnerSolver(
            micro_batches=o["micro_batches"],
            inner=inner,
            mode=mode,
            line_search=o["line_search"],
            warm_start=o["warm_start"],
            carry_state=o["carry_state"],
            groups=o.get("groups"),
        )
        return assemble(
            curvature=CurvatureSpec("ggn_microbatches", kwargs=kwargs),
            solver=solver,
            damping=DampingSpec("constant", lam0=o["lam0"]),
            telemetry=o["telemetry"],
            reject_nonfinite=o["reject_nonfinite"],
            tx=optax.scale_by_learning_rate(o["learning_rate"]),
        )

    return build


_DOC = """{title} [Abreu et al. 2025], parameter lane.

    At ``θ_t``, ``micro_batches = N`` steps of the inner optimizer (default Muon) minimise
    {model}
    over ``Δ``, one micro-batch per step, each linearizing the model at ``θ_t`` on its micro-batch
    (``N`` linearizations per step, one ``lax.scan``). The inner loop starts from the previous
    pre-line-search point (warm start) with the inner optimizer's state carried over. Then
    ``θ_{{t+1}} = θ_t + α(θ̂ − θ_t)`` with ``α = 2^(−i/2)``, ``i < line_search``, the argmin of the
    loss on the held-out micro-batches. Batch: ``{{"x": (N, b, ...), "y": (N, b, ...), "x_val": (M,
    b', ...), "y_val": ...}}``. Inner schedules: constant, ``"global_cosine"`` (over all inner
    steps), ``"inner_cosine"`` (restarted each outer step). ``docs/gauss_newton.md``.
    """

gn = define_preset(
    "gn",
    _gn("quadratic", "gn"),
    positional="predict_fn",
    options=_OPTIONS,
    doc=_DOC.format(
        title="Full Gauss-Newton with an inner optimizer",
        model="``Q_k(Δ) = ℓ(z) + g_zᵀJ_kΔ + ½(J_kΔ)ᵀH_z(J_kΔ) + ½λ‖Δ‖²`` (inner gradient "
        "``J_kᵀ(g_z + H_zJ_kΔ) + λΔ``: one JVP and one VJP),",
    ),
)

gn_prox_linear = define_preset(
    "gn_prox_linear",
    _gn("prox_linear", "gn_prox_linear"),
    positional="predict_fn",
    options=_OPTIONS,
    doc=_DOC.format(
        title="GN-prox-linear: the loss of the linearized model, with an inner optimizer",
        model="``P_k(Δ) = ℓ(f(θ_t) + J_kΔ) + ½λ‖Δ‖²`` (inner gradient ``J_kᵀ∇ℓ(z + J_kΔ) + λΔ``),",
    ),
)

gn_layerwise = define_preset(
    "gn_layerwise",
    _gn("layerwise", "gn_layerwise"),
    positional="predict_fn",
    options=_LAYERWISE_OPTIONS,
    doc=_DOC.format(
        title="Layerwise (block-diagonal) Gauss-Newton with an inner optimizer",
        model="for each parameter group ``l`` (top-level keys, or ``groups``) the GN model in its own "
        "parameters, ``Q_{k,l}(Δ_l)`` with ``J_{k,l}`` (own inner optimizer state per group; updates merged),",
    ),
)
