"""Diagonal-lane presets: AdaHessian [Yao et al. 2021] and Sophia-H/G/N [Liu et al. 2023; Somax §4.4].

Each preset is only a choice of specs (paper Table 2): a curvature operator, a
diagonal estimator on a refresh cadence, a diagonal preconditioner, the
gradient-side momentum (``grad_tx``) and the Optax chain after ``s = D⁻¹ m``.
Sophia-N (GGN curvature + Hutchinson estimator) is assembled from exactly the same
parts as Sophia-H and Sophia-G — no component exists for it alone.

References:
  Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic Second-order Optimizer
  for Language Model Pre-training", arXiv:2305.14342 / ICLR 2024 (Alg. 1–3, §3).
  Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: An Adaptive Second
  Order Optimizer for Machine Learning", AAAI 2021 (Alg. 1, §3.3).
  Korbit & Zanon, "Second-Order, First-Class" (Somax), §2.3 eq. (2.7), Table 2,
  §4.4, Appendix C.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from somax.assemble import assemble
from somax.curvature.losses import OutputLoss
from somax.method import SecondOrderMethod
from somax.presets._common import (
    BATCH_OPTIONS,
    DIAG_OPTIONS,
    HESSIAN_MODEL_OPTIONS,
    MODEL_OPTIONS,
    combine,
    diag_grad_tx,
    diag_outer_chain,
    model_kwargs,
    require,
)
from somax.presets.registry import Option, define_preset
from somax.specs import CurvatureSpec, DampingSpec, EstimatorSpec, PrecondSpec, SolverSpec

__all__ = ["adahessian", "sophia_h", "sophia_g", "sophia_n"]


def _positive(preset: str, name: str, value: Any, *, upper: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{preset}: {name} must be a number > 0, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{preset}: {name} must be <= {upper}, got {value!r}")


def _hessian_curvature(preset: str, o: Mapping[str, Any]) -> CurvatureSpec:
    kwargs = model_kwargs(preset, o, ("loss_fn", "predict_fn", "loss"))
    require(preset, kwargs, ("loss_fn",), ("predict_fn", "loss"))
    return CurvatureSpec("hessian", kwargs={**kwargs, "hvp": o["hvp"]})


#: the exact-Hessian diagonal presets make ``n_probes`` products per refresh: a fresh JVP each holds no
#: residuals between steps (``somax.curvature.hessian``)
_HVP = Option(
    "jvp",
    str,
    '``"jvp"`` (each Hessian-vector product a fresh forward-over-reverse JVP: less memory) or ``"linearize"`` '
    "(products from residuals kept for the step: less work per product).",
)


def _ggn_curvature(preset: str, o: Mapping[str, Any]) -> CurvatureSpec:
    loss = o["loss"]
    if isinstance(loss, OutputLoss):
        kind, extra = "ggn", {"loss": loss}
    elif loss in ("ce", "mse"):
        kind, extra = f"ggn_{loss}", None
    else:
        raise ValueError(f"{preset}: loss must be 'ce', 'mse' or an OutputLoss, got {loss!r}")
    kwargs = model_kwargs(preset, o, ("predict_fn",), extra)
    require(preset, kwargs, ("predict_fn",))
    return CurvatureSpec(kind, kwargs=kwargs)


def _cadence(o: Mapping[str, Any]) -> dict[str, Any]:
    """The estimator's ``eval_every_k`` and, when set, ``amortize`` from the preset options."""
    amortize = o["amortize_estimator"]  # validated by the estimator (True or False)
    return {"eval_every_k": o["eval_every_k"], **({} if amortize is False else {"amortize": amortize})}


def _sophia(preset: str, curvature, estimator: str, count_key: str):
    """Sophia (Alg. 3 of Liu et al.) from specs; ``curvature``/``estimator`` pick H, G or N."""

    def build(o: Mapping[str, Any]) -> SecondOrderMethod:
        _positive(preset, "gamma", o["gamma"])
        _positive(preset, "rho", o["rho"])
        _positive(preset, "eps", o["eps"])
        return assemble(
            curvature=curvature(preset, o),
            estimator=EstimatorSpec(estimator, kwargs={count_key: o[count_key], **_cadence(o)}),
            precondition=PrecondSpec(
                "diag_ema",
                kwargs={"beta": o["b2"], "gamma": o["gamma"], "eps": o["eps"], "bias_correction": False},
            ),
            solver=SolverSpec("diagonal"),
            damping=DampingSpec("constant", lam0=0.0),
            telemetry=o["telemetry"],
            reject_nonfinite=o["reject_nonfinite"],
            grad_tx=diag_grad_tx(o, debias=False),
            tx=diag_outer_chain(o, clip=o["rho"]),
        )

    return build


_SOPHIA_OPTIONS = combine(
    DIAG_OPTIONS,
    learning_rate=3e-4,
    b1=0.96,
    b2=0.99,
    eps=DIAG_OPTIONS["eps"].replace(default=1e-12, doc="floor ε of the denominator ``max(γ·h, ε)``."),
    rho=Option(1.0, float, "clip threshold: each coordinate of ``m / max(γ·h, ε)`` is clipped to ``±rho``."),
    weight_decay=0.2,
    eval_every_k=10,
)
_GAMMA = Option(0.05, float, "scale γ of the curvature estimate in the denominator ``max(γ·h, ε)``.")
_N_PROBES = Option(1, int, "Rademacher probes per refresh of the Hutchinson estimate.")
_N_SAMPLES = Option(1, int, "label samples per refresh of the Gauss-Newton-Bartlett estimate.")
_GGN_LOSS = Option(
    "ce",
    str | OutputLoss,
    'the output loss whose GGN is the curvature: ``"ce"`` (logits), ``"mse"`` or an ``OutputLoss``.',
)

_SOPHIA_DOC = """Sophia-{variant} [Liu et al. 2023{extra_ref}], diagonal lane: {what}.

    Update (Liu et al. Alg. 3, with the Somax spec that realises each line)::

        m_t = b1·m_{{t−1}} + (1 − b1)·g_t                       grad_tx = optax.ema(b1, debias=False)
        every eval_every_k steps (t = 0, k, 2k, …):
            ĥ_t = {estimate:<38} EstimatorSpec("{est_kind}")
            h_t = b2·h + (1 − b2)·ĥ_t  (no bias correction)   PrecondSpec("diag_ema", gamma=γ, eps=ε)
        s_t = m_t / max(γ·h_t, ε)                                SolverSpec("diagonal"), λ = 0
        w ← w − lr·(clip(s_t, ±rho) + weight_decay·w)            optax.clip → add_decayed_weights → lr

    Curvature: {curvature}. Between refreshes ``h`` is kept; before the first refresh
    (and on coordinates with ``h ≤ 0``) the clip saturates and the step is
    ``−lr·sign(m)``.

    Defaults and their sources:
      * ``b1 = 0.96``, ``b2 = 0.99``, ``eps = 1e-12``, ``eval_every_k = 10``: Liu et al.
        2023, experimental setup ("β1 = 0.96, β2 = 0.99, ε = 1e-12 and update diagonal
        Hessian every 10 steps"); the Somax paper App. C.3 also uses ``eval_every_k=10``.
      * ``gamma = {gamma}``: {gamma_src}.
      * ``{count_key} = 1``: one {sample} per refresh (Liu et al.; Somax App. C.3).
      * ``rho = 1``: clip threshold of the γ-form of the update in the published
        version (``clip(m/max(γh, ε), 1)``); the first arXiv version's
        ``clip(m/max(h, ε), ρ)`` is the same update with ``γ = ρ``, ``ε → ρε`` and
        the learning rate multiplied by ``ρ``.
      * ``learning_rate = 3e-4``, ``weight_decay = 0.2`` (decoupled): the authors'
        GPT-2 small (125M) configuration (official repository,
        ``config/train_gpt2_small_sophiag.py``). They were tuned for language-model
        pre-training with a cosine schedule and 2k warm-up steps; ``learning_rate``
        accepts an Optax schedule. The Somax paper (App. C.3) tunes the learning rate
        per configuration; small vision models need a larger one.
      * ``grad_clip_norm = None``: Liu et al. clip ``g`` at global norm 1.0 for every
        optimizer in their GPT-2 runs (a training-recipe choice, applied before the
        momentum when set).
    Model: {model}
    """

sophia_h = define_preset(
    "sophia_h",
    _sophia("sophia_h", _hessian_curvature, "hutchinson", "n_probes"),
    positional="loss_fn",
    options={
        **HESSIAN_MODEL_OPTIONS,
        **BATCH_OPTIONS,
        **_SOPHIA_OPTIONS,
        "hvp": _HVP,
        "gamma": _GAMMA.replace(default=0.01),
        "n_probes": _N_PROBES,
    },
    doc=_SOPHIA_DOC.format(
        variant="H",
        extra_ref="",
        what="Hutchinson estimate of the Hessian diagonal",
        estimate="z ⊙ (∇²L z),  z Rademacher",
        est_kind="hutchinson",
        curvature='exact Hessian, ``CurvatureSpec("hessian", kwargs={"hvp": "jvp"})`` (a fresh JVP per product)',
        gamma="0.01",
        gamma_src="Liu et al. 2023 experimental setup (Sophia-H) and Somax App. C.3",
        count_key="n_probes",
        sample="Rademacher probe",
        model='``loss_fn(params, batch)``, or ``predict_fn(params, x)`` with ``loss="ce"``/``"mse"``.',
    ),
)

sophia_g = define_preset(
    "sophia_g",
    _sophia("sophia_g", _ggn_curvature, "gnb", "n_samples"),
    positional="predict_fn",
    options={
        **MODEL_OPTIONS,
        "loss": _GGN_LOSS,
        **BATCH_OPTIONS,
        **_SOPHIA_OPTIONS,
        "gamma": _GAMMA,
        "n_samples": _N_SAMPLES,
    },
    doc=_SOPHIA_DOC.format(
        variant="G",
        extra_ref="",
        what="Gauss-Newton-Bartlett estimate of the GGN diagonal",
        estimate="N·ĝ⊙ĝ, ĝ = Jᵀ∇_z L(z, ŷ ~ p(·|z))",
        est_kind="gnb",
        curvature='GGN, ``CurvatureSpec("ggn_ce")`` (or ``"ggn_mse"``: labels sampled from ``N(z, I)``)',
        gamma="0.05",
        gamma_src="Liu et al. 2023 experimental setup (Sophia-G) and Somax App. C.3",
        count_key="n_samples",
        sample="label sample",
        model='``predict_fn(params, x)`` returning logits, ``loss="ce"`` (default) or ``"mse"``.',
    ),
)

sophia_n = define_preset(
    "sophia_n",
    _sophia("sophia_n", _ggn_curvature, "hutchinson", "n_probes"),
    positional="predict_fn",
    options={
        **MODEL_OPTIONS,
        "loss": _GGN_LOSS,
        **BATCH_OPTIONS,
        **_SOPHIA_OPTIONS,
        "gamma": _GAMMA,
        "n_probes": _N_PROBES,
    },
    doc=_SOPHIA_DOC.format(
        variant="N",
        extra_ref="; Somax paper §4.4",
        what="Hutchinson estimate of the GGN diagonal (a recombination, no new code)",
        estimate="z ⊙ (Jᵀ H_z J z),  z Rademacher",
        est_kind="hutchinson",
        curvature='GGN, ``CurvatureSpec("ggn_ce")`` (or ``"ggn_mse"``)',
        gamma="0.05",
        gamma_src="Somax paper App. C.3 (Sophia-N)",
        count_key="n_probes",
        sample="Rademacher probe",
        model='``predict_fn(params, x)`` returning logits, ``loss="ce"`` (default) or ``"mse"``.',
    ),
)


def _adahessian(o: Mapping[str, Any]) -> SecondOrderMethod:
    preset = "adahessian"
    _positive(preset, "hessian_power", o["hessian_power"], upper=1.0)
    if isinstance(o["eps"], bool) or not isinstance(o["eps"], (int, float)) or o["eps"] < 0:
        raise ValueError(f"{preset}: eps must be a number >= 0, got {o['eps']!r}")
    return assemble(
        curvature=_hessian_curvature(preset, o),
        estimator=EstimatorSpec("hutchinson", kwargs={"n_probes": o["n_probes"], **_cadence(o)}),
        precondition=PrecondSpec(
            "diag_ema",
            kwargs={
                "beta": o["b2"],
                "power": 0.5 * o["hessian_power"],
                "bias_correction": True,
                "square": True,
                "spatial_average": o["spatial_average"],
            },
        ),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=float(o["eps"])),
        telemetry=o["telemetry"],
        reject_nonfinite=o["reject_nonfinite"],
        grad_tx=diag_grad_tx(o, debias=True),
        tx=diag_outer_chain(o),
    )


adahessian = define_preset(
    "adahessian",
    _adahessian,
    positional="loss_fn",
    options={
        **HESSIAN_MODEL_OPTIONS,
        **BATCH_OPTIONS,
        "hvp": _HVP,
        **combine(
            DIAG_OPTIONS,
            learning_rate=0.15,
            b1=0.9,
            b2=0.999,
            eps=DIAG_OPTIONS["eps"].replace(
                default=1e-4, doc="additive ε of the denominator ``v̂^{k/2} + ε`` (the constant damping λ)."
            ),
            weight_decay=0.0,
            eval_every_k=1,
        ),
        "hessian_power": Option(1.0, float, "the power ``k`` (``0 < k ≤ 1``) of the denominator ``v̂^{k/2}``."),
        "spatial_average": Option(
            True, bool, "average each 4-D convolution kernel's estimate over its spatial axes (§3.3)."
        ),
        "n_probes": _N_PROBES,
    },
    doc="""AdaHessian [Yao et al. 2021], diagonal lane: Adam with the squared gradient
    replaced by the squared (spatially averaged) Hutchinson Hessian diagonal.

    Update (Yao et al. Alg. 1, with the Somax spec that realises each line)::

        m̂_t = EMA_{b1}(g)_t / (1 − b1^t)                 grad_tx = optax.ema(b1, debias=True)
        every eval_every_k steps (default: every step):
            D_s = A(|z ⊙ (∇²L z)|),  z Rademacher         EstimatorSpec("hutchinson")
            v_t = b2·v + (1 − b2)·D_s²,  v̂ = v/(1 − b2^n)  PrecondSpec("diag_ema", square=True,
                                                              spatial_average=True, power=k/2)
        s_t = m̂_t / (v̂_t^{k/2} + eps)                     SolverSpec("diagonal"), λ = eps
        w ← w − lr·(s_t + weight_decay·w)                  add_decayed_weights → lr

    ``A`` averages each 4-D convolution kernel in Flax layout ``(H, W, in, out)`` over
    ``H, W`` (never the channels; §3.3 "spatial averaging"); other leaves are not
    averaged. ``n`` counts Hessian refreshes. Curvature: exact Hessian,
    ``CurvatureSpec("hessian")``; the additive ``eps`` is the constant damping ``λ``
    of (2.7), so ``print(method.plan)`` shows it.

    Defaults and their sources (Yao et al. 2021 and their reference implementation):
      * ``learning_rate = 0.15``, ``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-4``,
        ``hessian_power = 1`` (``k``; ``0 < k ≤ 1``): the reference optimizer's defaults,
        also its CIFAR-10 ResNet setting (``lr = 0.15``).
      * ``weight_decay = 0``: the reference optimizer's default; decoupled (AdamW-style).
        Their CIFAR-10 script uses a per-step decay of 5e-4, i.e. ``weight_decay =
        5e-4 / learning_rate`` here.
      * ``eval_every_k = 1``, ``n_probes = 1``: one probe every step (Alg. 1).
      * ``spatial_average = True`` (§3.3).
    Model: ``loss_fn(params, batch)``, or ``predict_fn(params, x)`` with ``loss="ce"``/``"mse"``.
    """,
)
