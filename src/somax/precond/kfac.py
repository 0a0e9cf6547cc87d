"""K-FAC [Martens & Grosse 2015]: Kronecker-factored approximation of the GGN, per dense/conv layer.

For a dense or convolution kernel ``W`` with bias ``b`` write the layer's parameters as the
``(d_in, d_out)`` matrix ``W̄ = [kernel_matrix(W); bᵀ]`` (``d_in = n_in + 1`` with a bias).
The GGN's diagonal block of ``vec(W̄)`` (row-major) is approximated by

    G_W̄ ≈ A ⊗ S,    A = E[ā āᵀ]  (d_in × d_in),    S = E[δ δᵀ]  (d_out × d_out),

from the ``"kfac_factors"`` statistic (:class:`somax.estimators.kronecker.KFACFactors`): ``ā``
the layer input with a trailing 1, ``δ`` the layer-output gradients of the rows of the
GGN square-root factor ``R`` (``H_z = RᵀR/n``), so ``A ⊗ S`` approximates the GGN the
method solves with (exact for one example and one position). Each update folds in
``A ← β A + (1−β) A_t``, ``S ← β S + (1−β) S_t`` (bias-corrected by ``1 − β^t``); every
refresh caches the eigendecompositions ``A = Q_A Λ_A Q_Aᵀ``, ``S = Q_S Λ_S Q_Sᵀ``, and at
every step the current ``λ`` (plus the floor ``eps``) is applied without a refresh, with
``V`` the direction's block as a ``(d_in, d_out)`` matrix (``(A ⊗ S) vec V = vec(A V S)``):

* ``damping="eigen"`` (exact eigen-damping): ``(A ⊗ S + λI)⁻¹``,

      M⁻¹ V = Q_A [ (Q_Aᵀ V Q_S) / (λ_A λ_Sᵀ + λ) ] Q_Sᵀ;

* ``damping="pi"`` (factored Tikhonov, Martens & Grosse §6.3):
  ``(A + π√λ I)⁻¹ ⊗ (S + √λ/π I)⁻¹`` with ``π = √((tr A / d_in) / (tr S / d_out))``,

      M⁻¹ V = Q_A [ (Q_Aᵀ V Q_S) / ((λ_A + π√λ)(λ_S + √λ/π)ᵀ) ] Q_Sᵀ.

With ``cache_inverse=True`` (``damping="pi"`` only; kfac-jax's default form) each refresh
caches the two damped inverses ``(A + π√μ I)⁻¹`` and ``(S + √μ/π I)⁻¹`` themselves (Cholesky,
``μ`` from the refresh step's ``λ``), and a step applies ``M⁻¹ V = (A + π√μ I)⁻¹ V (S + √μ/π I)⁻¹``:
two matrix products per layer instead of four, and a Cholesky instead of an ``eigh`` per
factor at refresh. The price: a ``λ`` that changes between refreshes (an adaptive damping
policy) reaches the Kronecker blocks only at the next refresh (the diagonal fallback uses the
current ``λ``).

Both are symmetric positive definite and linear, so K-FAC preconditions CG (``kfac_cg``)
as well as the diagonal lane (``s = M⁻¹ g̃``, preset ``kfac``). ``damping_scale = c`` uses
``μ = c·λ`` in place of ``λ`` in both formulas (the solve keeps ``λ``). As CG's preconditioner
K-FAC is block-diagonal over layers and, on a mini-batch, ``A ⊗ S`` has far larger rank than
the GGN block it approximates (``rank(A)·rank(S)`` against at most ``n·C'``); in a direction
the GGN does not curve, PCG then sees ``λ / (k + λ) ≪ 1``, which adds iterations. ``c > 1``
bounds that effect (``c → ∞`` is plain CG); see ``docs/kronecker.md``.

Which leaves: at ``init`` every leaf with two or more axes is a *candidate* kernel,
``(Π shape[:-1], shape[-1])``, and its bias is its unique one-axis sibling (same parent
in the parameter tree) of length ``shape[-1]``, if any. At trace time the estimator
discovers the model's layers (:func:`somax.curvature.discover_layers`); a candidate is
*active* when it is a dense or conv kernel used directly whose factors have the
candidate's sizes (``d_in = n_in + 1`` exactly when the sibling bias is its bias) — a
Flax ``Dense``/``Conv`` (KFC for convolutions, Grosse & Martens 2016: the positions
are output pixels, ``A = Σ_t ā_t ā_tᵀ / (nT)``) or a ``x @ W + b`` layer. Every other
leaf, and every leaf of an inactive candidate, falls back to the diagonal rule
``M⁻¹ v = v / (d̂ + λ)`` with ``d̂`` the bias-corrected EMA of the statistic's ``n·g⊙g``.
:meth:`KFAC.describe` lists the assignment (with the model and an input, the final one).

Cost per step: per layer four products ``O(d_in² d_out + d_in d_out²)`` for ``M⁻¹`` (two with
``cache_inverse``); per statistic one batched pass over the model with ``m/b`` rows per example;
per refresh one ``eigh`` (or Cholesky) of each factor ``O(d_in³ + d_out³)``. Memory
``2(d_in² + d_out²)`` per layer.

References:
  Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
  Curvature", ICML 2015. Grosse & Martens, "A Kronecker-factored approximate Fisher
  matrix for convolution layers", ICML 2016. George et al., "Fast Approximate Natural
  Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018 (eigenbasis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from somax import validate
from somax.contracts import Preconditioner
from somax.estimators.kronecker import KFAC_FACTORS
from somax.precond.shampoo import eig_factor, stat_dtype
from somax.registry import PRECONDITIONERS

PyTree = Any

__all__ = ["KFAC", "KFACState", "KFACBlock", "kfac_blocks", "kfac"]


@dataclass(frozen=True)
class KFACBlock:
    """A candidate K-FAC block: the kernel leaf (index, path), its bias leaf (or ``None``) and sizes."""

    kernel: int
    path: str
    bias: int | None
    n_in: int
    n_out: int

    @property
    def d_in(self) -> int:
        """Rows of ``A``: ``n_in`` plus one for the bias."""
        return self.n_in + (self.bias is not None)


def kfac_blocks(params: PyTree) -> list[KFACBlock]:
    """Candidate blocks of ``params``: every leaf with ``≥ 2`` axes, paired with its unique
    one-axis sibling of length ``shape[-1]`` as its bias."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = []
    for i, (path, x) in enumerate(flat):
        if x.ndim < 2:
            continue
        sib = [
            j
            for j, (p, y) in enumerate(flat)
            if j != i and p[:-1] == path[:-1] and y.ndim == 1 and y.shape[0] == x.shape[-1]
        ]
        out.append(
            KFACBlock(i, jax.tree_util.keystr(path), sib[0] if len(sib) == 1 else None,
                      math.prod(x.shape[:-1]), x.shape[-1])
        )  # fmt: skip
    return out


class KFACState(NamedTuple):
    """``blocks``: per candidate block ``{"A", "S", "QA", "lamA", "QS", "lamS", "active"}``
    (factors as EMAs, eigendecompositions cached at the last refresh, ``active`` 1 when the
    layer was confirmed by the statistic; with ``cache_inverse`` the damped inverses
    ``"Ainv"``, ``"Sinv"`` replace the eigendecompositions); ``diag``: the fallback EMA
    (params-shaped); ``count``: updates folded in."""

    blocks: list
    diag: PyTree
    count: jax.Array


@dataclass(frozen=True, kw_only=True)
class KFAC(Preconditioner):
    """K-FAC: ``M⁻¹ = (A ⊗ S + λI)⁻¹`` (eigen-damping) or ``(A + π√λI)⁻¹ ⊗ (S + √λ/π I)⁻¹`` per layer.

    See the module docstring for the factors, the damping variants and the diagonal
    fallback [Martens & Grosse 2015].

    Args:
      beta: EMA decay of the factors and of the fallback diagonal.
      damping: ``"eigen"`` (exact ``(A⊗S + λI)⁻¹``) or ``"pi"`` (factored Tikhonov).
      eps: a floor added to ``λ`` (keeps ``M⁻¹`` finite at ``λ = 0``).
      damping_scale: ``c``: the preconditioner is damped with ``μ = c·λ + eps`` instead of
        ``λ + eps`` (``c > 1`` trusts the Kronecker curvature less; see the module docstring).
      refresh_every_k: recompute the eigendecompositions on steps ``0, k, 2k, …``.
      eigh_dtype: ``"float32"`` or ``"float64"``: the dtype of the refresh's decompositions.
      cache_inverse: with ``damping="pi"``, cache the damped factor inverses at each refresh
        (for that step's ``λ``) instead of eigendecompositions (module docstring).
    """

    beta: float = 0.95
    damping: str = "eigen"
    eps: float = 1e-8
    damping_scale: float = 1.0
    refresh_every_k: int = 1
    eigh_dtype: str = "float32"
    cache_inverse: bool = False

    consumes = (KFAC_FACTORS,)
    default_estimator = "kfac_factors"
    state_sharding = "replicated"

    def __post_init__(self) -> None:
        where = "PrecondSpec('kfac')"
        validate.number(f"{where}: beta", self.beta, minimum=0.0, maximum=1.0, exclusive_maximum=True)
        validate.choice(f"{where}: damping", self.damping, ("eigen", "pi"))
        validate.number(f"{where}: eps", self.eps, minimum=0.0)
        validate.number(f"{where}: damping_scale", self.damping_scale, minimum=0.0)
        validate.cadence(f"{where}: refresh_every_k", self.refresh_every_k)
        validate.choice(f"{where}: eigh_dtype", self.eigh_dtype, ("float32", "float64"))
        validate.boolean(f"{where}: cache_inverse", self.cache_inverse)
        if self.cache_inverse and self.damping != "pi":
            raise ValueError(
                f"{where}: cache_inverse=True needs damping='pi' (got {self.damping!r}): the exact "
                "eigen-damped (A⊗S + λI)⁻¹ does not factor into two cached inverses"
            )

    @property
    def refresh_uses_lam(self) -> bool:  # type: ignore[override]
        return self.cache_inverse

    def describe(self, params: PyTree, predict_fn: Any = None, inputs: Any = None) -> str:
        """One line per leaf: ``kfac A d_in×d_in ⊗ S d_out×d_out`` (with its bias) or ``diagonal``.

        Without ``predict_fn`` and ``inputs`` the candidates (by the parameter tree); with them,
        the final assignment after layer discovery.
        """
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        rule = ["diagonal"] * len(flat)
        layers = None
        if predict_fn is not None and inputs is not None:
            from somax.curvature.layers import discover_layers

            layers = discover_layers(predict_fn, params, inputs)
        for blk in kfac_blocks(params):
            if layers is not None and not _confirmed(blk, layers):
                continue
            rule[blk.kernel] = f"kfac A {blk.d_in}x{blk.d_in} ⊗ S {blk.n_out}x{blk.n_out}"
            if blk.bias is not None:
                rule[blk.kernel] += f" (bias {jax.tree_util.keystr(flat[blk.bias][0])})"
                rule[blk.bias] = f"kfac, bias row of {blk.path}"
        return "\n".join(f"{jax.tree_util.keystr(p)}  {r}" for (p, _), r in zip(flat, rule))

    def init(self, params: PyTree) -> KFACState:
        leaves = jax.tree_util.tree_leaves(params)
        blocks = []
        for blk in kfac_blocks(params):
            dt = stat_dtype(leaves[blk.kernel].dtype)
            factors = {"A": jnp.zeros((blk.d_in, blk.d_in), dt), "S": jnp.zeros((blk.n_out, blk.n_out), dt),
                       "active": jnp.zeros((), dt)}  # fmt: skip
            if self.cache_inverse:
                cached = {"Ainv": jnp.eye(blk.d_in, dtype=dt), "Sinv": jnp.eye(blk.n_out, dtype=dt)}
            else:
                cached = {"QA": jnp.eye(blk.d_in, dtype=dt), "lamA": jnp.zeros((blk.d_in,), dt),
                          "QS": jnp.eye(blk.n_out, dtype=dt), "lamS": jnp.zeros((blk.n_out,), dt)}  # fmt: skip
            blocks.append({**factors, **cached})
        diag = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, stat_dtype(x.dtype)), params)
        return KFACState(blocks, diag, jnp.zeros((), jnp.int32))

    def update(self, state: KFACState, statistic: PyTree, lin: Any = None) -> KFACState:
        b = self.beta
        params_like = state.diag
        layers = statistic["layers"]
        blocks = []
        for blk, st in zip(kfac_blocks(params_like), state.blocks):
            got = layers.get(blk.path)
            if got is None or got.A.shape != st["A"].shape or got.S.shape != st["S"].shape:
                blocks.append({**st, "active": jnp.zeros_like(st["active"])})
                continue
            A = b * st["A"] + (1.0 - b) * got.A.astype(st["A"].dtype)
            S = b * st["S"] + (1.0 - b) * got.S.astype(st["S"].dtype)
            blocks.append({**st, "A": A, "S": S, "active": jnp.ones_like(st["active"])})
        diag = jax.tree_util.tree_map(
            lambda m, x: b * m + (1.0 - b) * x.astype(m.dtype), state.diag, statistic["diagonal"]
        )
        return KFACState(blocks, diag, state.count + 1)

    def _correction(self, count: jax.Array, dtype: Any) -> jax.Array:
        return 1.0 - jnp.asarray(self.beta, dtype) ** jnp.maximum(count, 1).astype(dtype)

    def refresh(self, state: KFACState, lam: jax.Array | None = None) -> KFACState:
        blocks = []
        for st in state.blocks:
            dt = st["A"].dtype
            corr = self._correction(state.count, dt)
            A, S = st["A"] / corr, st["S"] / corr
            if self.cache_inverse:
                pi, sq = _pi_damping(jnp.trace(A) / A.shape[0], jnp.trace(S) / S.shape[0], self._mu(lam, dt))
                blocks.append({**st, "Ainv": _damped_inverse(A, pi * sq, self.eigh_dtype),
                               "Sinv": _damped_inverse(S, sq / pi, self.eigh_dtype)})  # fmt: skip
                continue
            QA, lamA = eig_factor(A, self.eigh_dtype)
            QS, lamS = eig_factor(S, self.eigh_dtype)
            blocks.append({**st, "QA": QA, "lamA": lamA, "QS": QS, "lamS": lamS})
        return KFACState(blocks, state.diag, state.count)

    def _mu(self, lam: jax.Array, dtype: Any) -> jax.Array:
        """``μ = c·λ + eps``, the damping of the preconditioner."""
        return self.damping_scale * lam.astype(dtype) + self.eps

    def inverse(self, state: KFACState, lam: jax.Array):
        def apply(v: PyTree) -> PyTree:
            leaves, treedef = jax.tree_util.tree_flatten(v)
            diag = jax.tree_util.tree_leaves(state.diag)
            out = []
            for x, d in zip(leaves, diag):
                den = d / self._correction(state.count, d.dtype) + self._mu(lam, d.dtype)
                out.append((x.astype(d.dtype) / den).astype(x.dtype))
            for blk, st in zip(kfac_blocks(v), state.blocks):
                dt = st["A"].dtype
                kern = leaves[blk.kernel]
                mat = kern.reshape(blk.n_in, blk.n_out).astype(dt)
                if blk.bias is not None:
                    mat = jnp.concatenate([mat, leaves[blk.bias].astype(dt)[None, :]], axis=0)
                if self.cache_inverse:
                    sol = st["Ainv"] @ mat @ st["Sinv"]
                else:
                    sol = self._eigen_solve(st, mat, self._mu(lam, dt))
                on = st["active"] > 0
                out[blk.kernel] = jnp.where(on, sol[: blk.n_in].reshape(kern.shape).astype(kern.dtype),
                                            out[blk.kernel])  # fmt: skip
                if blk.bias is not None:
                    out[blk.bias] = jnp.where(on, sol[blk.n_in].astype(out[blk.bias].dtype), out[blk.bias])
            return jax.tree_util.tree_unflatten(treedef, out)

        return apply

    def _eigen_solve(self, st: dict, mat: jax.Array, damp: jax.Array) -> jax.Array:
        """``M⁻¹ V`` in the cached eigenbases (module docstring's two formulas)."""
        rot = st["QA"].T @ mat @ st["QS"]
        if self.damping == "eigen":
            den = st["lamA"][:, None] * st["lamS"][None, :] + damp
        else:
            pi, sq = _pi_damping(jnp.mean(st["lamA"]), jnp.mean(st["lamS"]), damp)
            den = (st["lamA"] + pi * sq)[:, None] * (st["lamS"] + sq / pi)[None, :]
        return st["QA"] @ (rot / den) @ st["QS"].T


def _pi_damping(mean_a: jax.Array, mean_s: jax.Array, mu: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(π, √μ)`` with ``π = √((tr A / d_in) / (tr S / d_out))`` [Martens & Grosse 2015, §6.3]."""
    tiny = jnp.finfo(mu.dtype).tiny
    return jnp.sqrt(jnp.maximum(mean_a, tiny) / jnp.maximum(mean_s, tiny)), jnp.sqrt(mu)


def _damped_inverse(mat: jax.Array, shift: jax.Array, dtype: str) -> jax.Array:
    """``(sym(mat) + shift·I)⁻¹`` by Cholesky in ``dtype``, symmetrised, cast back (``shift > 0``).

    A factor whose rounding left an eigenvalue below ``−shift`` (Cholesky fails: non-finite
    entries) gets ``Q diag(1/(max(λ, 0) + shift)) Qᵀ`` from ``eigh`` instead, as the eigenbasis
    form would have used.
    """
    work = mat.astype(jnp.float64 if dtype == "float64" else jnp.float32)
    work = 0.5 * (work + work.T)
    eye = jnp.eye(work.shape[0], dtype=work.dtype)
    shift = shift.astype(work.dtype)
    inv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(work + shift * eye, lower=True), eye)

    def clipped() -> jax.Array:
        lam, q = jnp.linalg.eigh(work)
        return (q / (jnp.maximum(lam, 0.0) + shift)) @ q.T

    inv = jax.lax.cond(jnp.all(jnp.isfinite(inv)), lambda: inv, clipped)
    return (0.5 * (inv + inv.T)).astype(mat.dtype)


def _confirmed(blk: KFACBlock, layers: Any) -> bool:
    """The discovered layer of ``blk.path`` is a direct dense/conv kernel with the block's sizes."""
    layer = layers.get(blk.path)
    if layer is None or layer.kind not in ("dense", "conv") or not layer.direct:
        return False
    return layer.n_in == blk.n_in and layer.n_out == blk.n_out and layer.d_in == blk.d_in


#: the registered factory of ``"kfac"`` (keyword options as :class:`KFAC`'s fields)
kfac = KFAC

PRECONDITIONERS.register("kfac", KFAC)
