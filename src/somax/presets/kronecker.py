"""Kronecker-factored presets: Shampoo, SOAP (diagonal lane), K-FAC (diagonal lane) and K-FAC-PCG.

Each is a choice of specs: a GGN curvature (it supplies the loss, the gradient and, for
K-FAC, the model's layers and the GGN square-root rows), a Kronecker-factored
preconditioner with its statistic, the diagonal lane's ``s = M⁻¹ g̃`` (or CG in the
parameter lane for ``kfac_cg``), gradient-side momentum and the Optax chain.

``muon`` is the first-order baseline of the same family: the unit preconditioner
(``PrecondSpec("unit")``, ``M⁻¹ = I``) makes the diagonal lane's direction the batch
gradient and ``tx=optax.contrib.muon(...)`` makes the update. Muon is also the Optax chain
of any other method (tested with every lane in ``tests/test_muon.py``).

References:
  Gupta, Koren & Singer 2018 (Shampoo); Vyas et al. 2024 (SOAP); Martens & Grosse 2015 (K-FAC);
  Jordan et al. 2024 (Muon).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax

from somax.assemble import assemble
from somax.estimators.kronecker import MAX_GGN_ROWS
from somax.method import SecondOrderMethod
from somax.presets._common import (
    BATCH_OPTIONS,
    CG_OPTIONS,
    DAMPING_OPTIONS,
    DIAG_OPTIONS,
    MODEL_OPTIONS,
    OUTER_OPTIONS,
    cg_spec,
    combine,
    damping_spec,
    diag_grad_tx,
    diag_outer_chain,
    outer_chain,
)
from somax.presets.diag_lane import _GGN_LOSS, _ggn_curvature
from somax.presets.registry import Option, define_preset
from somax.specs import DampingSpec, EstimatorSpec, PrecondSpec, SolverSpec

__all__ = ["shampoo", "soap", "kfac", "kfac_cg", "muon"]

_MODEL = {**MODEL_OPTIONS, "loss": _GGN_LOSS, **BATCH_OPTIONS}
_DIAG = {k: v for k, v in DIAG_OPTIONS.items() if k not in ("eval_every_k", "amortize_estimator")}
_REFRESH = Option(10, int, "recompute the eigendecompositions every this many steps (steps 0, k, 2k, …).")
_EIGH = Option("float32", str, 'dtype of the ``eigh``: ``"float32"`` or ``"float64"`` (needs ``jax_enable_x64``).')


def _explicit(name: str, o: Mapping[str, Any], precondition: PrecondSpec, **chains: Any) -> SecondOrderMethod:
    """The diagonal lane's ``s = M⁻¹ g`` at ``λ = 0`` with ``precondition``; the Optax chains are
    the diagonal presets' (``grad_tx`` momentum, decoupled weight decay → learning rate), or
    ``chains`` (``grad_tx=``, ``tx=``) when given."""
    if not chains:
        chains = {"grad_tx": diag_grad_tx(o, debias=True), "tx": diag_outer_chain(o)}
    return assemble(
        curvature=_ggn_curvature(name, o),
        precondition=precondition,
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=0.0),
        telemetry=o["telemetry"],
        reject_nonfinite=o["reject_nonfinite"],
        **chains,
    )


def _shampoo(o: Mapping[str, Any]) -> SecondOrderMethod:
    return _explicit(
        "shampoo",
        o,
        PrecondSpec(
            "shampoo",
            kwargs={
                "beta": o["beta"],
                "eps": o["eps"],
                "max_dim": o["max_dim"],
                "block_size": o["block_size"],
                "refresh_every_k": o["refresh_every_k"],
                "factor_every_k": o["factor_every_k"],
                "cache_roots": o["cache_roots"],
                "eigh_dtype": o["eigh_dtype"],
                "graft": o["graft"],
                "graft_beta": o["b2"],
                "graft_eps": o["graft_eps"],
            },
        ),  # fmt: skip
    )


shampoo = define_preset(
    "shampoo",
    _shampoo,
    positional="predict_fn",
    options={
        **_MODEL,
        **combine(
            _DIAG,
            learning_rate=1e-3,
            b1=0.9,
            b2=DIAG_OPTIONS["b2"].replace(default=0.999, doc="``β₂`` of the grafting second moment."),
            eps=DIAG_OPTIONS["eps"].replace(default=1e-6, doc="``ε`` added to the factors' eigenvalues."),
            weight_decay=0.0,
        ),
        "beta": Option(0.999, float, "decay ``β`` of the factors ``L = βL + GGᵀ``, ``R = βR + GᵀG``."),
        "max_dim": Option(2048, int, "a side longer than this keeps only its factor's diagonal."),
        "block_size": Option(
            None, int | None, "None, or cut sides longer than this into blocks, each block with its own factors."
        ),
        "refresh_every_k": _REFRESH,
        "factor_every_k": Option(
            1, int, "fold the gradient into the factors ``L``, ``R`` every this many steps (grafting: every step)."
        ),
        "cache_roots": Option(
            True,
            bool,
            "form the inverse roots at each refresh (two products per matrix and step instead of four; "
            "exact here, where λ = 0).",
        ),
        "eigh_dtype": _EIGH,
        "graft": Option("adam", str | None, 'grafting: ``"adam"``, ``"rmsprop"`` or None (raw Shampoo).'),
        "graft_eps": Option(1e-8, float, "``ε`` of the grafting direction ``m / (√ν̂ + ε)``."),
    },
    doc="""Shampoo [Gupta et al. 2018] with Adam grafting [Anil et al. 2020], diagonal lane.

    Update, per leaf as a matrix ``G`` (all axes but the last merged into rows)::

        m_t = EMA_{b1}(g)_t / (1 − b1^t)                  grad_tx = optax.ema(b1, debias=True)
        every factor_every_k steps: L = β L + G Gᵀ, R = β R + Gᵀ G   PrecondSpec("shampoo") + EstimatorSpec("gradient")
        every refresh_every_k steps: P_L = (L + εI)^{−1/4}, P_R = (R + εI)^{−1/4} by eigh
        s = P_L M P_R                                       SolverSpec("diagonal"), λ = 0
        s ← s · ‖m / (√ν̂ + graft_eps)‖ / ‖s‖  (grafting; ν̂ = bias-corrected EMA_{b2}(g²))
        w ← w − lr·(s + weight_decay·w)                      add_decayed_weights → lr

    Vectors and scalars use AdaGrad's ``m / √(h + ε)``, ``h = β h + g²``; sides longer than
    ``max_dim`` keep a diagonal factor; with ``block_size``, longer sides are cut into blocks
    that are preconditioned separately. Defaults: ``b1 = 0.9``, ``b2 = 0.999``, ``lr = 1e-3``
    (Adam's, which grafting makes transferable; Shi et al. 2023), ``refresh_every_k = 10``
    (Anil et al. 2020 refresh the roots every few steps), ``eps = 1e-6``.
    Model: ``predict_fn(params, x)`` with ``loss="ce"`` (default) or ``"mse"`` (the GGN
    curvature supplies the loss and gradient; no curvature product is used).
    """,
)


def _soap(o: Mapping[str, Any]) -> SecondOrderMethod:
    return _explicit(
        "soap",
        o,
        PrecondSpec(
            "soap",
            kwargs={
                "b2": o["b2"],
                "shampoo_beta": o["shampoo_beta"],
                "eps": o["eps"],
                "max_dim": o["max_dim"],
                "refresh_every_k": o["precondition_frequency"],
                "eigh_dtype": o["eigh_dtype"],
                "eigenbasis": o["eigenbasis"],
            },
        ),  # fmt: skip
    )


soap = define_preset(
    "soap",
    _soap,
    positional="predict_fn",
    options={
        **_MODEL,
        **combine(
            _DIAG,
            learning_rate=3e-3,
            b1=0.95,
            b2=DIAG_OPTIONS["b2"].replace(default=0.95, doc="``β₂`` of the rotated second moment."),
            eps=DIAG_OPTIONS["eps"].replace(default=1e-8, doc="``ε`` of the denominator ``√V̂ + ε``."),
            weight_decay=0.01,
        ),
        "shampoo_beta": Option(None, float | None, "decay of the factors ``L``, ``R``; None: ``b2``."),
        "precondition_frequency": Option(10, int, "recompute the eigenbases every this many steps (paper: 10)."),
        "max_dim": Option(10000, int, "a side longer than this is not rotated (one-sided SOAP)."),
        "eigh_dtype": _EIGH,
        "eigenbasis": Option(
            "power_qr",
            str,
            '``"power_qr"`` (``eigh`` at the first refresh, then one power-iteration step with QR per refresh, '
            'as the paper\'s Alg. 4) or ``"eigh"`` (an ``eigh`` at every refresh).',
        ),
    },
    doc="""SOAP [Vyas et al. 2024]: Adam in the eigenbasis of Shampoo's factors, diagonal lane.

    Update (Vyas et al. Alg. 3)::

        M̂_t = EMA_{b1}(g)_t / (1 − b1^t)                 grad_tx = optax.ema(b1, debias=True)
        G' = Q_Lᵀ G Q_R,  V = b2 V + (1 − b2) G'²           PrecondSpec("soap") + EstimatorSpec("gradient")
        L = β_s L + (1−β_s) G Gᵀ,  R likewise
        every precondition_frequency steps: Q_L, Q_R ← eigenvectors(L, R), used from the next step
            (eigenbasis="power_qr": Q ← qr(L Q[:, order]).Q after the first eigh, V permuted by order)
        s = Q_L [(Q_Lᵀ M̂ Q_R) / (√(V/(1−b2^t)) + eps)] Q_Rᵀ  SolverSpec("diagonal"), λ = 0
        w ← w − lr·(s + weight_decay·w)                      add_decayed_weights → lr

    Bases start as the identity (the first steps are Adam's); vectors are not rotated
    (Adam). Defaults from the reference implementation: ``lr = 3e-3``, ``b1 = b2 = 0.95``,
    ``eps = 1e-8``, ``weight_decay = 0.01``, ``precondition_frequency = 10``,
    ``max_dim = 10000``, ``shampoo_beta = b2``.
    Model: ``predict_fn(params, x)`` with ``loss="ce"`` (default) or ``"mse"``.
    """,
)

_KFAC_OPTIONS = {
    "beta": Option(0.95, float, "EMA decay of the factors ``A``, ``S`` (and of the fallback diagonal)."),
    "kfac_damping": Option("eigen", str, 'how λ enters: ``"eigen"`` (exact ``(A⊗S + λI)⁻¹``) or ``"pi"``.'),
    "kfac_damping_scale": Option(1.0, float, "``c``: K-FAC is damped with ``c·λ`` (the solve keeps ``λ``)."),
    "kfac_cache_inverse": Option(
        False,
        bool,
        'with ``kfac_damping="pi"``: cache the damped factor inverses at each refresh (two '
        "products per layer and step instead of four; λ reaches the blocks at refreshes only).",
    ),
    "refresh_every_k": _REFRESH,
    "eval_every_k": Option(1, int, "evaluate the factors every this many steps."),
    "fisher": Option(
        "ggn",
        str,
        '``"ggn"`` (GGN square-root rows), ``"empirical"`` (empirical Fisher), ``"mc"`` (Monte-Carlo Fisher: '
        'labels drawn from the model, one row per example; the step needs an rng) or ``"curvature_prop"`` '
        '(a Rademacher combination of the GGN rows, unbiased for ``"ggn"``, one row per example; the step '
        'needs an rng; for sequence models, where ``"ggn"`` has positions × classes rows per example).',
    ),
    "max_rows": Option(
        MAX_GGN_ROWS,
        int,
        'with ``fisher="ggn"``: refuse (``ValueError`` at the first trace) more GGN rows per example than this.',
    ),
    "eigh_dtype": _EIGH,
}


def _kfac_parts(o: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "precondition": PrecondSpec(
            "kfac",
            kwargs={
                "beta": o["beta"],
                "damping": o["kfac_damping"],
                "damping_scale": o["kfac_damping_scale"],
                "cache_inverse": o["kfac_cache_inverse"],
                "refresh_every_k": o["refresh_every_k"],
                "eigh_dtype": o["eigh_dtype"],
            },
        ),  # fmt: skip
        "estimator": EstimatorSpec(
            "kfac_factors", kwargs={"eval_every_k": o["eval_every_k"], "fisher": o["fisher"], "max_rows": o["max_rows"]}
        ),
        "damping": damping_spec(o),
        "telemetry": o["telemetry"],
        "reject_nonfinite": o["reject_nonfinite"],
        "tx": outer_chain(o),
    }


def _kfac(o: Mapping[str, Any]) -> SecondOrderMethod:
    return assemble(curvature=_ggn_curvature("kfac", o), solver=SolverSpec("diagonal"), **_kfac_parts(o))


kfac = define_preset(
    "kfac",
    _kfac,
    positional="predict_fn",
    options={
        **_MODEL,
        **combine(DAMPING_OPTIONS, OUTER_OPTIONS, lam0=0.1, learning_rate=0.1, momentum=0.9),
        **_KFAC_OPTIONS,
    },
    doc="""K-FAC [Martens & Grosse 2015] on the GGN, diagonal lane (explicit ``s = M⁻¹ g``).

    Per dense/conv layer (found in the model's jaxpr)::

        A = E[ā āᵀ],  S = E[δ δᵀ]  (δ: layer-output gradients of the GGN square-root rows)
                                                     EstimatorSpec("kfac_factors"), EMA β
        every refresh_every_k steps: eigh(A), eigh(S)         PrecondSpec("kfac")
        s = (A ⊗ S + λI)⁻¹ g   (kfac_damping="eigen"), or (A + π√λI)⁻¹ ⊗ (S + √λ/πI)⁻¹ g ("pi")
        w ← w − lr·(momentum-traced s + weight_decay·w)      Optax chain

    Every other leaf: ``s = g / (d̂ + λ)`` with ``d̂`` an EMA of ``n·g²``. λ is the damping
    policy's (``lam0``, ``damping="trust_region"`` adapts it). Defaults (``lr = 0.1``,
    ``momentum = 0.9``, ``lam0 = 0.1``, ``beta = 0.95``) are a starting point, not tuned
    (``lam0 = 1e-3`` with momentum diverged on a small MLP).
    Model: ``predict_fn(params, x)`` with ``loss="ce"`` (default) or ``"mse"``.
    """,
)


def _kfac_cg(o: Mapping[str, Any]) -> SecondOrderMethod:
    return assemble(curvature=_ggn_curvature("kfac_cg", o), solver=cg_spec(o), **_kfac_parts(o))


kfac_cg = define_preset(
    "kfac_cg",
    _kfac_cg,
    positional="predict_fn",
    options={
        **_MODEL,
        **combine(DAMPING_OPTIONS, {k: v for k, v in CG_OPTIONS.items() if k != "precondition"}, OUTER_OPTIONS),
        **_KFAC_OPTIONS,
    },
    doc="""GGN-CG (``sgn_ce``/``sgn_mse``) preconditioned by K-FAC, parameter lane.

    Solves ``(G + λI) s = g`` with PCG, ``M⁻¹ = (A ⊗ S + λI)⁻¹`` per dense/conv layer (see
    ``kfac``) and ``1/(d̂ + λ)`` elsewhere; K-FAC's factors and eigendecompositions follow
    their own cadences, λ is applied at every step. Then ``w ← w − lr·s`` through the
    Optax chain. Other options as in ``sgn_ce``.
    Model: ``predict_fn(params, x)`` with ``loss="ce"`` (default) or ``"mse"``.
    """,
)


def _muon(o: Mapping[str, Any]) -> SecondOrderMethod:
    return _explicit(
        "muon",
        o,
        PrecondSpec("unit"),
        grad_tx=None,
        tx=optax.contrib.muon(
            learning_rate=o["learning_rate"],
            beta=o["beta"],
            ns_steps=o["ns_steps"],
            nesterov=o["nesterov"],
            eps=o["eps"],
            weight_decay=o["weight_decay"],
            adam_b1=o["adam_b1"],
            adam_b2=o["adam_b2"],
            adam_learning_rate=o["adam_learning_rate"],
        ),  # fmt: skip
    )


muon = define_preset(
    "muon",
    _muon,
    positional="predict_fn",
    options={
        **_MODEL,
        "learning_rate": DIAG_OPTIONS["learning_rate"].replace(default=0.02),
        "beta": Option(0.95, float, "decay ``β`` of Muon's momentum ``m = β m + (1 − β) g`` (bias-corrected)."),
        "nesterov": Option(True, bool, "Nesterov momentum before the orthogonalisation."),
        "ns_steps": Option(5, int, "Newton–Schulz iterations (coefficients 3.4445, −4.7750, 2.0315)."),
        "eps": Option(1e-8, float, "``ε`` of the Newton–Schulz normalisation ``X / (‖X‖_F + ε)`` and of Adam."),
        "weight_decay": DIAG_OPTIONS["weight_decay"],
        "adam_b1": Option(0.9, float, "``β₁`` of the Adam that updates the leaves that are not matrices."),
        "adam_b2": Option(0.999, float, "``β₂`` of that Adam."),
        "adam_learning_rate": Option(None, float | None, "that Adam's learning rate; None: ``learning_rate``."),
        **{k: DIAG_OPTIONS[k] for k in ("telemetry", "curvature_kwargs", "reject_nonfinite")},
    },
    doc="""Muon [Jordan et al. 2024] as a method: the first-order baseline of the Kronecker family.

    Update (the Optax chain is ``optax.contrib.muon``; nothing of it is reimplemented)::

        s = g                                               PrecondSpec("unit") (M⁻¹ = I), SolverSpec("diagonal")
        matrices (2-D leaves):  m = β m + (1−β) g,  u = NS₅(β m̂ + (1−β) ĝ)  (Nesterov, bias-corrected)
                                w ← w − lr·(√max(1, d_out/d_in)·u + weight_decay·w)
        other leaves:           Adam(adam_b1, adam_b2, eps; Nesterov if ``nesterov``), ``adam_learning_rate``

    ``NS₅`` is five Newton–Schulz iterations with coefficients (3.4445, −4.7750, 2.0315),
    which push the singular values of ``X / ‖X‖_F`` towards 1 (an approximate
    orthogonalisation ``U Vᵀ`` of ``U Σ Vᵀ``). Defaults are the published ones (Jordan et
    al.'s reference code and ``optax.contrib.muon``): ``lr = 0.02``, ``beta = 0.95``,
    Nesterov, 5 steps; ``optax.contrib.muon`` has no default learning rate.
    The step's update equals ``optax.contrib.muon`` applied to the batch gradient (tested).
    Model: ``predict_fn(params, x)`` with ``loss="ce"`` (default) or ``"mse"`` (the GGN
    curvature supplies the loss and gradient; no curvature product is used).
    """,
)
