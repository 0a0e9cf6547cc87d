"""Preconditioned conjugate gradient on pytrees for the damped system (2.4).

Solves ``A s = g`` with ``A = H_t + λ_t I`` given only ``v ↦ A v``, stopping when
the relative residual (2.5) ``‖A s − g‖ ≤ τ‖g‖`` holds or after ``maxiter``
iterations. Two details that existing implementations get wrong:

* **Negative or negligible curvature.** ``pᵀAp ≤ 0`` (an indefinite Hessian with small
  λ) ends the solve instead of dividing by it (truncated Newton, Nocedal & Wright Alg.
  7.1), and so does curvature at the rounding level of ``A``:
  ``pᵀAp ≤ c·ε·max_k(p_kᵀAp_k/‖p_k‖²)·‖p‖²`` with ``ε`` the dtype's machine epsilon and
  ``c = 100`` (``CURVATURE_RTOL``). The maximum Rayleigh quotient seen so far stands in
  for ``‖A‖``. Without it, a singular ``A`` (a mini-batch GGN with ``λ ≈ 0``) and a
  tolerance below the dtype's precision let CG divide by rounding noise once it has
  solved the range of ``A``, and return a step many orders of magnitude too long.
  The last iterate is returned if it is a descent direction. An exit at the first
  iteration from ``x₀ = 0`` returns the preconditioned gradient ``M⁻¹g`` (``g``
  without a preconditioner); a warm-started iterate that is no descent direction
  is replaced by ``g``.
  No NaN can come out of a finite system.
* **Residual refresh.** Every ``stabilise_every`` iterations the recursive residual
  is replaced by the true ``g − A s`` *without* resetting the search direction, so
  rounding drift is removed and convergence is not destroyed (a restart would be).

**Unrolled loop.** ``unroll=True`` writes the ``maxiter`` iterations out as straight-line
code instead of a ``lax.while_loop``: every iteration is computed, and once the stopping
rule holds (converged, negative or negligible curvature) a select keeps the iterate and
the rest of the state unchanged, so the result and the iteration count are those of the
``while_loop`` (the same operations on the same values; only XLA's fusion may round
differently), without the early exit's saving. It exists because XLA:CPU (jax 0.10)
runs a convolution that is not in the canonical ``NHWC``/``HWIO`` layout (a weight
gradient, as autodiff writes it) inside any loop or conditional body in a slow generic
kernel, tens of times slower than the same product outside (``benchmarks/conv_loop_repro.py``;
jax-ml/jax#12868). The library's curvature products are written in the canonical layout
on the CPU (:mod:`somax.curvature.conv_layout`), so their loops run at the cost of their
products and stay loops. ``"auto"`` (the default of :class:`CGOptions`) unrolls only a
product that still has such convolutions (a user's own curvature, a grouped convolution:
:func:`~somax.curvature.conv_layout.count_loop_slow_convolutions`), on the CPU backend,
when ``maxiter ≤ AUTO_UNROLL_MAXITER`` and ``maxiter`` times the product's slow
convolutions is at most ``AUTO_UNROLL_CONVOLUTIONS``: compile time grows with every
unrolled convolution (ResNet-20, batch 32, 3 iterations without the canonical layout:
58 s against 29 s for the loop; 10 iterations compiled for over ten minutes). Set
``unroll=True`` or ``False`` to choose.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from somax import validate
from somax._tree import tree_axpy, tree_norm, tree_sub, tree_vdot, tree_where, tree_zeros_like
from somax.contracts import Solver
from somax.curvature.conv_layout import count_convolution_equations, count_loop_slow_convolutions
from somax.precond.limited_memory import CurvaturePairs, empty_pairs, lbfgs_inverse, record_pair
from somax.registry import SOLVERS

PyTree = Any

__all__ = [
    "CGResult",
    "conjugate_gradient",
    "CGOptions",
    "CGSolver",
    "QuasiNewtonCGState",
    "cg",
    "CURVATURE_RTOL",
    "AUTO_UNROLL_MAXITER",
    "has_convolution",
    "resolve_unroll",
    "auto_unroll",
    "count_convolutions",
    "AUTO_UNROLL_CONVOLUTIONS",
]


class CGResult(NamedTuple):
    """Solution and statistics of one CG solve."""

    x: PyTree
    iters: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array
    pairs: Any = ()  # the recorded curvature pairs when ``record`` was given


class _Carry(NamedTuple):
    i: jax.Array
    x: PyTree
    r: PyTree
    p: PyTree
    rz: jax.Array
    rnorm: jax.Array
    neg: jax.Array
    stay: jax.Array  # α taken on pᵀAp ≤ 0: 1 at k = 0 from x₀ = 0, else 0
    pp: jax.Array  # ‖p‖² (tracked by recursion without a preconditioner)
    rq_max: jax.Array  # largest Rayleigh quotient pᵀAp/‖p‖² so far: the scale of A
    flat: jax.Array  # rtol · rq_max · ‖p‖²: pᵀAp at or below it ends the solve
    pairs: Any = ()  # CurvaturePairs being recorded (``record``), else ()


#: Curvature ``pᵀAp`` below ``CURVATURE_RTOL · ε · ‖A‖ · ‖p‖²`` ends CG like negative curvature.
CURVATURE_RTOL = 100.0

#: ``unroll="auto"`` unrolls a CG loop whose product contains a loop-slow convolution up to this ``maxiter``
#: (compile time grows with every unrolled product; beyond it the ``while_loop`` is kept)
AUTO_UNROLL_MAXITER = 32

#: ... and while ``maxiter`` times the loop-slow convolutions in one product stays within this budget
#: (a 6-convolution CNN product unrolls 32 iterations; ResNet-20's 82 unroll 3, which compile
#: in about twice the loop's time, where 10 took over ten minutes)
AUTO_UNROLL_CONVOLUTIONS = 256


def count_convolutions(fn: Callable[..., Any], *args: Any) -> int:
    """How many convolutions ``fn(*args)`` traces to (at any depth); one trace, no computation."""
    return count_convolution_equations(jax.make_jaxpr(fn)(*args).jaxpr, lambda params: True)


def has_convolution(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` traces to a convolution (at any depth); one trace, no computation."""
    return count_convolutions(fn, *args) > 0


def resolve_unroll(unroll: bool | str, maxiter: int, matvec: Callable[[PyTree], PyTree], b: PyTree) -> bool:
    """``unroll`` as a bool: ``"auto"`` is True iff JAX's default backend is the CPU, ``matvec(b)``
    has ``c > 0`` loop-slow convolutions (:func:`~somax.curvature.conv_layout.is_loop_slow`),
    ``maxiter ≤ AUTO_UNROLL_MAXITER`` and ``maxiter · c ≤ AUTO_UNROLL_CONVOLUTIONS`` (see the
    module docstring)."""
    if unroll != "auto":
        return bool(unroll)
    if jax.default_backend() != "cpu" or maxiter > AUTO_UNROLL_MAXITER:
        return False
    return auto_unroll(maxiter, count_loop_slow_convolutions(matvec, b))


def auto_unroll(maxiter: int, convolutions: int) -> bool:
    """The ``"auto"`` rule for a loop of ``maxiter`` products with ``convolutions`` loop-slow convolutions
    each (counted once by the caller with
    :func:`~somax.curvature.conv_layout.count_loop_slow_convolutions`)."""
    if jax.default_backend() != "cpu" or maxiter > AUTO_UNROLL_MAXITER:
        return False
    return 0 < maxiter * convolutions <= AUTO_UNROLL_CONVOLUTIONS


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    x0: PyTree | None = None,
    tol: float = 1e-5,
    maxiter: int = 10,
    stabilise_every: int = 0,
    precond: Callable[[PyTree], PyTree] | None = None,
    unroll: bool = False,
    record: CurvaturePairs | None = None,
) -> CGResult:
    """(P)CG for ``matvec(x) = b`` on pytrees; see the module docstring for the exits.

    ``unroll=True``: ``maxiter`` masked iterations as straight-line code instead of a
    ``lax.while_loop`` (same result and iteration count; see the module docstring).
    ``record``: slots for curvature pairs; the first ``m`` iterations' ``(p_k, A p_k)``
    (with positive curvature) are written to slots ``0 … m−1`` and returned as
    ``CGResult.pairs`` (:mod:`somax.precond.limited_memory`).
    """
    # Every reduction here is a pass over the parameters (and HLO to compile): with no
    # preconditioner ‖r‖² = rᵀz, and from x₀ = 0 the initial residual is b itself.
    bb = tree_vdot(b, b)
    bnorm = jnp.sqrt(bb)
    if x0 is None:
        x, r, rnorm = tree_zeros_like(b), b, bnorm
    else:
        x, r = x0, tree_sub(b, matvec(x0))
        rnorm = tree_norm(r)
    apply_m = precond if precond is not None else (lambda v: v)
    z = apply_m(r)
    rz = bb if (precond is None and x0 is None) else tree_vdot(r, z)
    threshold = tol * bnorm

    def cond(c: _Carry) -> jax.Array:
        return (c.i < maxiter) & (c.rnorm > threshold) & (c.rnorm > 0) & ~c.neg

    def body(c: _Carry, k: int | None = None) -> _Carry:
        # k: the iteration's index when the loop is unrolled (then c.i == k while it runs)
        if precond is None:
            pp, flat = c.pp, c.flat
        else:
            pp = tree_vdot(c.p, c.p)
            flat = rtol * c.rq_max * pp
        ap = matvec(c.p)
        pap = tree_vdot(c.p, ap)
        # `flat` is carried, not computed here: XLA copies the scalar logic that decides α into
        # every leaf's update kernel, so the test must stay one comparison.
        neg = ~(pap > flat)  # also true for pᵀAp ≤ 0 and NaN (flat ≥ 0)
        pairs = c.pairs
        if record is not None and (k is None or k < memory):
            slot = jnp.minimum(c.i, memory - 1) if k is None else k
            pairs = record_pair(pairs, slot, c.p, ap, ~neg & (c.i < memory))
        rq_max = jnp.maximum(c.rq_max, pap / jnp.where(pp > 0, pp, 1.0))
        # On pᵀAp ≤ 0 the iterate stays where it is, except at k = 0 from x₀ = 0, where x = 0
        # would be no direction at all: step α = 1 along p₀ = M⁻¹b instead (bᵀM⁻¹b > 0). That
        # α is carried in the loop state, not computed from k: XLA copies this scalar logic
        # into every leaf's update kernel.
        alpha = jnp.where(neg, c.stay, c.rz / jnp.where(neg, 1.0, pap)).astype(c.rz.dtype)
        x = tree_axpy(alpha, c.p, c.x)
        r = tree_axpy(-alpha, ap, c.r)
        if stabilise_every > 0 and k is not None:
            if (k + 1) % stabilise_every == 0:  # unrolled: a static refresh (a masked iteration discards it)
                r = tree_sub(b, matvec(x))
        elif stabilise_every > 0:
            r = jax.lax.cond((c.i + 1) % stabilise_every == 0, lambda: tree_sub(b, matvec(x)), lambda: r)
        z = apply_m(r)
        rz = tree_vdot(r, z)
        beta = rz / jnp.where(c.rz == 0, 1.0, c.rz)
        p = tree_axpy(beta, c.p, z)
        rnorm = jnp.sqrt(jnp.maximum(rz, 0)) if precond is None else tree_norm(r)
        # p_{k+1} = r_{k+1} + β p_k with r_{k+1} ⊥ p_k: ‖p_{k+1}‖² = ‖r_{k+1}‖² + β²‖p_k‖² (no extra pass)
        pp_next = (rz + beta * beta * pp).astype(pp.dtype) if precond is None else pp
        flat_next = (rtol * rq_max * pp_next).astype(pp.dtype)
        i = jnp.where(neg, c.i, c.i + 1)
        return _Carry(i, x, r, p, rz, rnorm, neg, jnp.zeros_like(c.stay), pp_next, rq_max, flat_next, pairs)

    rtol = CURVATURE_RTOL * jnp.finfo(rz.dtype).eps
    memory = 0 if record is None else int(record.valid.shape[0])
    stay = jnp.asarray(1.0 if x0 is None else 0.0, rz.dtype)
    zero = jnp.zeros((), rz.dtype)
    pp0 = rz if precond is None else zero  # p₀ = r₀ without a preconditioner
    init = _Carry(jnp.zeros((), jnp.int32), x, r, z, rz, rnorm, jnp.zeros((), bool), stay, pp0, zero, zero,
                  () if record is None else record)  # fmt: skip
    if unroll:
        # No loop body for XLA to compile apart (see the module docstring): every iteration runs,
        # and after the stopping rule holds the select keeps the whole state as it was.
        c = init
        for k in range(maxiter):
            c = tree_where(cond(c), body(c, k), c)
    else:
        c = jax.lax.while_loop(cond, body, init)
    # From x₀ = 0, every iterate before the first pᵀAp ≤ 0 lies in a Krylov space on which A
    # is positive definite, so bᵀx_k > ½x_kᵀAx_k > 0 for k ≥ 1, and an exit at k = 0 took
    # x = M⁻¹b inside the loop: the result is a descent direction with no check compiled.
    x = c.x
    if x0 is not None:
        # A warm start carries no such guarantee, whichever exit was taken (on an indefinite
        # system a converged solve may be the exact solution and an ascent direction): check
        # descent explicitly and fall back to b.
        x = tree_where(~(tree_vdot(c.x, b) > 0), b, x)
    rel = jnp.where(bnorm > 0, c.rnorm / jnp.where(bnorm > 0, bnorm, 1.0), 0.0)
    return CGResult(x, c.i, rel, (c.rnorm <= threshold) & ~c.neg, c.neg, c.pairs)


@dataclass(frozen=True, kw_only=True)
class CGOptions:
    """Options shared by the CG solvers of both lanes, validated in one place.

    Args:
      maxiter: iteration cap.
      tol: relative residual tolerance ``τ`` of (2.5).
      warm_start: start from the previous step's solution (kept in solver state).
      stabilise_every: refresh the true residual every k iterations (0 = never).
      unroll: ``True``: the ``maxiter`` iterations as straight-line code with a masked
        early exit (same result and iteration count as the loop, but every iteration is
        computed); ``False``: a ``lax.while_loop`` that stops at the exit; ``"auto"``:
        unroll on the CPU backend when the curvature product contains convolutions outside
        the canonical layout (XLA:CPU runs those inside a loop body tens of times slower;
        somax's own products have none), ``maxiter ≤ AUTO_UNROLL_MAXITER`` and ``maxiter``
        times those convolutions is at most ``AUTO_UNROLL_CONVOLUTIONS`` (compile time).
    """

    maxiter: int = 10
    tol: float = 1e-5
    warm_start: bool = False
    stabilise_every: int = 0
    unroll: bool | str = "auto"

    kind: ClassVar[str] = "cg"

    def __post_init__(self) -> None:
        where = f"SolverSpec({self.kind!r})"
        validate.integer(f"{where}: maxiter", self.maxiter, minimum=1)
        validate.number(f"{where}: tol", self.tol, minimum=0.0)
        validate.boolean(f"{where}: warm_start", self.warm_start)
        validate.integer(f"{where}: stabilise_every", self.stabilise_every, minimum=0)
        validate.bool_or_auto(f"{where}: unroll", self.unroll)

    def init(self, params: PyTree) -> PyTree:
        return tree_zeros_like(params) if self.warm_start else ()


class QuasiNewtonCGState(NamedTuple):
    """State of :class:`CGSolver` with ``memory > 0``: the warm start (or ``()``) and the pairs."""

    warm: PyTree
    pairs: CurvaturePairs


@dataclass(frozen=True, kw_only=True)
class CGSolver(CGOptions, Solver):
    """Parameter-space (P)CG on ``(H_t + λ_t I) s = g_t`` (lane ``"param"``); options as :class:`CGOptions`.

    The warm start is the last solution ``s_{t−1}``; it is kept after a rejected step
    (``on_reject = "keep"``: the next solve is at the same point with a larger ``λ``).

    Args:
      memory: ``m > 0`` keeps the first ``m`` pairs ``(p_k, A p_k)`` of each solve and
        preconditions the next solve with the L-BFGS inverse they define, on top of the
        method's own preconditioner if it has one (:mod:`somax.precond.limited_memory`;
        ``2m`` parameter-sized buffers in the solver state, no extra curvature products).
        ``0`` (default) turns it off.
    """

    memory: int = 0

    lane = "param"
    uses_precond = True
    info_keys = ("cg_iters", "cg_residual", "cg_converged")

    def __post_init__(self) -> None:
        super().__post_init__()
        validate.integer(f"SolverSpec({self.kind!r}): memory", self.memory, minimum=0)

    def init(self, params: PyTree) -> PyTree:
        warm = super().init(params)
        return QuasiNewtonCGState(warm, empty_pairs(params, self.memory)) if self.memory else warm

    def solve(self, lin, rhs: PyTree, lam: jax.Array, precond, state: PyTree):
        def damped(v: PyTree) -> PyTree:
            return tree_axpy(lam, v, lin.matvec(v))

        warm, record = state, None
        if self.memory:
            warm, pairs = state
            precond = lbfgs_inverse(pairs, lam, precond)
            record = pairs._replace(lam=jnp.asarray(lam, pairs.lam.dtype), valid=jnp.zeros_like(pairs.valid))
        res = conjugate_gradient(
            damped,
            rhs,
            x0=warm if self.warm_start else None,
            tol=self.tol,
            maxiter=self.maxiter,
            stabilise_every=self.stabilise_every,
            precond=precond,
            unroll=resolve_unroll(self.unroll, self.maxiter, damped, rhs),
            record=record,
        )
        stats = {"cg_iters": res.iters, "cg_residual": res.residual, "cg_converged": res.converged}
        new_warm = res.x if self.warm_start else ()
        return res.x, (QuasiNewtonCGState(new_warm, res.pairs) if self.memory else new_warm), stats


#: the registered factory of ``"cg"`` (keyword options as :class:`CGOptions`)
cg = CGSolver


SOLVERS.register("cg", CGSolver)
