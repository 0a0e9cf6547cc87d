"""Preconditioned CG against dense solves, with its exits and statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from somax.solvers.cg import conjugate_gradient


def _spd(n, cond, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


def _mv(a):
    a = jnp.asarray(a)
    return lambda v: a @ v


def test_converges_to_dense_solution_with_stats():
    a = _spd(30, 1e3)
    b = jnp.asarray(np.random.default_rng(1).normal(size=30))
    res = conjugate_gradient(_mv(a), b, tol=1e-10, maxiter=200)
    x_true = np.linalg.solve(a, np.asarray(b))
    np.testing.assert_allclose(np.asarray(res.x), x_true, rtol=1e-7)
    true_rel = np.linalg.norm(a @ np.asarray(res.x) - np.asarray(b)) / np.linalg.norm(b)
    assert true_rel <= 1e-9
    assert bool(res.converged) and not bool(res.negative_curvature)
    assert 0 < int(res.iters) <= 200
    assert float(res.residual) <= 1e-10


def test_maxiter_caps_iterations_and_reports_not_converged():
    a = _spd(30, 1e4)
    b = jnp.ones(30)
    res = conjugate_gradient(_mv(a), b, tol=1e-12, maxiter=3)
    assert int(res.iters) == 3 and not bool(res.converged)
    rel = np.linalg.norm(a @ np.asarray(res.x) - 1.0) / np.sqrt(30)
    np.testing.assert_allclose(float(res.residual), rel, rtol=1e-6)


def test_jacobi_preconditioner_reduces_iterations_same_solution():
    rng = np.random.default_rng(2)
    d = np.geomspace(1, 1e4, 40)
    a = np.diag(d) + 0.1 * _spd(40, 10.0, seed=3)
    b = jnp.asarray(rng.normal(size=40))
    plain = conjugate_gradient(_mv(a), b, tol=1e-10, maxiter=500)
    inv_diag = jnp.asarray(1.0 / np.diag(a))
    pcg = conjugate_gradient(_mv(a), b, tol=1e-10, maxiter=500, precond=lambda v: inv_diag * v)
    np.testing.assert_allclose(np.asarray(pcg.x), np.linalg.solve(a, np.asarray(b)), rtol=1e-6)
    assert int(pcg.iters) < int(plain.iters) // 2


def test_warm_start_at_solution_needs_no_iterations():
    a = _spd(10, 10.0)
    b = jnp.ones(10)
    x_true = jnp.asarray(np.linalg.solve(a, np.ones(10)))
    res = conjugate_gradient(_mv(a), b, x0=x_true, tol=1e-8, maxiter=50)
    assert int(res.iters) == 0
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(x_true))


def test_residual_refresh_keeps_search_direction():
    """Refreshing the true residual every 5 iterations does not slow convergence (a restart would)."""
    a = _spd(60, 1e4, seed=4)
    b = jnp.asarray(np.random.default_rng(5).normal(size=60))
    base = conjugate_gradient(_mv(a), b, tol=1e-8, maxiter=1000)
    refreshed = conjugate_gradient(_mv(a), b, tol=1e-8, maxiter=1000, stabilise_every=5)
    assert int(refreshed.iters) <= 1.25 * int(base.iters)
    true_rel = np.linalg.norm(a @ np.asarray(refreshed.x) - np.asarray(b)) / np.linalg.norm(b)
    assert true_rel <= 1e-8 * 1.01
    # a restart-every-5 CG is steepest-descent-like and needs far more than `base` iterations
    x = jnp.zeros(60)
    total = 0
    restart = jax.jit(lambda x0: conjugate_gradient(_mv(a), b, x0=x0, tol=1e-8, maxiter=5))
    for _ in range(int(refreshed.iters) // 5 + 1):
        r = restart(x)
        x, total = r.x, total + int(r.iters)
    assert np.linalg.norm(a @ np.asarray(x) - np.asarray(b)) / np.linalg.norm(b) > 1e-8


@pytest.mark.parametrize("x0", [None, "warm"])
def test_negative_curvature_exit_gives_finite_descent(x0):
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a = (q * np.array([-3.0, -1.0, 0.5, 1, 2, 3, 4, 5])) @ q.T
    b = jnp.asarray(rng.normal(size=8))
    start = None if x0 is None else 0.01 * b
    res = conjugate_gradient(_mv(a), b, x0=start, tol=1e-10, maxiter=50)
    assert bool(res.negative_curvature) and not bool(res.converged)
    assert np.all(np.isfinite(np.asarray(res.x)))
    assert float(jnp.vdot(res.x, b)) > 0  # -x is a descent direction for gradient b


def test_zero_rhs_and_pytrees():
    tree = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    res = conjugate_gradient(lambda v: jax.tree_util.tree_map(lambda x: 2.0 * x, v), tree, tol=1e-6, maxiter=5)
    assert int(res.iters) == 0 and float(res.residual) == 0.0
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(res.x))
    rhs = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    res = conjugate_gradient(lambda v: jax.tree_util.tree_map(lambda x: 2.0 * x, v), rhs, tol=1e-10, maxiter=5)
    np.testing.assert_allclose(np.asarray(res.x["b"]), 0.5)
    assert int(res.iters) == 1


@pytest.mark.parametrize("preconditioned", [False, True])
def test_negative_curvature_at_first_iteration_returns_preconditioned_gradient(preconditioned):
    # pᵀAp < 0 already for p₀ = M⁻¹b: the solve returns M⁻¹b (b without a preconditioner),
    # a descent direction since bᵀM⁻¹b > 0, with zero iterations counted.
    rng = np.random.default_rng(11)
    b = jnp.asarray(rng.normal(size=6))
    d = jnp.asarray(rng.uniform(0.5, 2.0, size=6))
    precond = (lambda v: d * v) if preconditioned else None
    res = conjugate_gradient(lambda v: -v, b, tol=1e-10, maxiter=5, precond=precond)
    expected = d * b if preconditioned else b
    assert bool(res.negative_curvature) and int(res.iters) == 0
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(expected), rtol=1e-12)


# --------------------------------------------------------------------------- unrolled (masked) loop = while_loop

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from somax import validate  # noqa: E402
from somax.curvature.conv_layout import canonical_convolutions, count_loop_slow_convolutions  # noqa: E402
from somax.solvers.cg import (  # noqa: E402
    AUTO_UNROLL_CONVOLUTIONS,
    AUTO_UNROLL_MAXITER,
    CGOptions,
    count_convolutions,
    has_convolution,
    resolve_unroll,
)


@functools.cache
def _jitted(unroll, maxiter, stabilise_every=0, wrap=None):
    """One compiled solve per loop form and static option; ``a``, ``b``, ``x0``, the Jacobi
    diagonal and ``tol`` are arguments (XLA constant-folds closed-over arrays, slowly)."""

    def solve(a, b, x0, diag, tol):
        mv = _mv(a) if wrap is None else wrap(_mv(a))
        precond = None if diag is None else (lambda v: diag * v)
        return conjugate_gradient(mv, b, x0=x0, precond=precond, tol=tol, maxiter=maxiter,
                                  stabilise_every=stabilise_every, unroll=unroll)  # fmt: skip

    return jax.jit(solve, compiler_options={"xla_backend_optimization_level": 0})  # compile time dominates


def _both(a, b, *, x0=None, diag=None, wrap=None, tol=1e-8, maxiter=16, stabilise_every=0):
    """The ``lax.while_loop`` and the unrolled solve of ``a x = b`` (``diag``: a Jacobi
    preconditioner ``v ↦ diag · v``; ``wrap(mv)``: the matvec on a pytree)."""
    args = (jnp.asarray(a), b, x0, diag, jnp.asarray(tol, jnp.float64))
    return tuple(_jitted(u, maxiter, stabilise_every, wrap)(*args) for u in (False, True))


def _assert_same(loop, flat):
    assert int(loop.iters) == int(flat.iters)
    assert bool(loop.converged) == bool(flat.converged)
    assert bool(loop.negative_curvature) == bool(flat.negative_curvature)
    for a, b in zip(jax.tree_util.tree_leaves(loop.x), jax.tree_util.tree_leaves(flat.x), strict=True):
        assert a.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(float(flat.residual), float(loop.residual), rtol=1e-10, atol=1e-15)


def _indefinite(n, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.linspace(-1.0, 3.0, n)) @ q.T


def _singular(n, rank, seed=0):
    rng = np.random.default_rng(seed)
    j = rng.normal(size=(rank, n))
    return j.T @ j / n


@pytest.mark.parametrize(
    "case",
    [
        "early_convergence",
        "maxiter_cap",
        "negative_curvature",
        "negative_first",
        "negligible_curvature",
        "preconditioned",
        "warm_start",
        "stabilised",
        "zero_rhs",
    ],  # fmt: skip
)
def test_unrolled_loop_matches_while_loop(case):
    n = 10
    b = jnp.asarray(np.random.default_rng(3).normal(size=n))
    kw = {"tol": 1e-8, "maxiter": 16}
    a = _spd(n, 10.0)
    if case == "maxiter_cap":
        a, kw = _spd(n, 1e4), {"tol": 0.0, "maxiter": 5}
    elif case == "negative_curvature":
        a = _indefinite(n) + 0.8 * np.eye(n)  # indefinite, positive along g: exits after k > 0
    elif case == "negative_first":
        a = -_spd(n, 10.0)
    elif case == "negligible_curvature":
        a, kw = _singular(n, 4), {"tol": 0.0, "maxiter": 16}
    elif case == "preconditioned":
        a = _spd(n, 1e3)
        kw["diag"] = jnp.asarray(1.0 / np.diag(a))
    elif case == "warm_start":
        kw["x0"] = 0.1 * b
    elif case == "stabilised":
        a, kw = _spd(n, 1e3), {"tol": 1e-10, "maxiter": 16, "stabilise_every": 3}
    elif case == "zero_rhs":
        b = jnp.zeros(n)
    loop, flat = _both(a, b, **kw)
    _assert_same(loop, flat)
    if case == "early_convergence":
        assert bool(loop.converged) and int(loop.iters) < kw["maxiter"]
    if case in ("negative_curvature", "negligible_curvature"):
        assert bool(loop.negative_curvature) and 0 < int(loop.iters) < kw["maxiter"]
    if case == "negative_first":
        assert bool(loop.negative_curvature) and int(loop.iters) == 0


def _tree_matvec(mv):
    def tree_mv(v):
        y = mv(jnp.concatenate([v["w"].ravel(), v["b"]]))
        return {"w": y[:6].reshape(2, 3), "b": y[6:]}

    return tree_mv


def test_unrolled_loop_on_pytrees():
    b = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(1)}
    _assert_same(*_both(_spd(7, 50.0), b, wrap=_tree_matvec, tol=1e-9, maxiter=10))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.sampled_from([1, 8]),  # few shapes and budgets: each pair is one more compile per loop form
    shift=st.floats(-1.5, 2.0),
    tol=st.sampled_from([0.0, 1e-12, 1e-6, 1e-2, 0.5]),
    maxiter=st.sampled_from([1, 12]),
    warm=st.booleans(),
)
def test_unrolled_loop_matches_while_loop_for_any_system(seed, n, shift, tol, maxiter, warm):
    """For every small symmetric system (definite, indefinite or singular) and every stopping
    rule, the unrolled loop returns the while_loop's iterate, iteration count and flags."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n, n))
    a = g @ g.T / n + shift * np.eye(n)
    b = jnp.asarray(rng.normal(size=n))
    x0 = jnp.asarray(rng.normal(size=n)) if warm else None
    _assert_same(*_both(a, b, tol=tol, maxiter=maxiter, x0=x0))


def test_unroll_option_is_validated():
    assert CGOptions().unroll == "auto"
    for ok in (True, False, "auto"):
        assert CGOptions(unroll=ok).unroll == ok
    for bad in ("yes", 1, 0, None, "Auto"):
        with pytest.raises(validate.InvalidOptionError, match="unroll must be True, False or 'auto'"):
            CGOptions(unroll=bad)


def test_auto_unroll_detects_convolutions():
    w = jnp.ones((3, 3, 2, 4))
    x = jnp.ones((1, 6, 6, 2))

    def conv(k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def conv_mv(v):  # a weight-gradient-like product, as in a CNN's GGN product
        return jax.vjp(conv, v)[1](conv(v))[0]

    def dense_mv(v):
        return 2.0 * v

    assert has_convolution(conv_mv, w) and not has_convolution(dense_mv, w)
    assert has_convolution(lambda v: jax.lax.cond(True, conv_mv, dense_mv, v), w)  # inside a sub-jaxpr
    assert resolve_unroll("auto", 10, conv_mv, w) and not resolve_unroll("auto", 10, dense_mv, w)
    assert not resolve_unroll("auto", AUTO_UNROLL_MAXITER + 1, conv_mv, w)
    assert resolve_unroll(True, 100, dense_mv, w) and not resolve_unroll(False, 3, conv_mv, w)
    # only loop-slow convolutions count: the canonical forward one does not, the weight gradient
    # does, and the same product in the canonical layout stays a loop
    assert count_convolutions(conv_mv, w) == 3 and count_loop_slow_convolutions(conv_mv, w) == 1  # conv(v) twice
    canonical_mv = canonical_convolutions(conv_mv)
    assert count_loop_slow_convolutions(canonical_mv, w) == 0 and not resolve_unroll("auto", 10, canonical_mv, w)
    # the unrolled convolutions stay within a budget: a deep product unrolls fewer iterations
    per_product = count_loop_slow_convolutions(conv_mv, w)
    deep = lambda v: jax.tree_util.tree_reduce(lambda a, b: a + b, [conv_mv(v) for _ in range(8)])  # noqa: E731
    assert count_loop_slow_convolutions(deep, w) == 8 * per_product
    k = AUTO_UNROLL_CONVOLUTIONS // (8 * per_product)
    assert resolve_unroll("auto", k, deep, w) and not resolve_unroll("auto", k + 1, deep, w)
