"""The limited-memory quasi-Newton preconditioner built from CG's own pairs, against dense float64 oracles."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import somax
from somax.models import mlp_apply, mlp_init
from somax.precond.limited_memory import CurvaturePairs, empty_pairs, lbfgs_inverse, pair_count
from somax.solvers.cg import CGSolver, conjugate_gradient
from somax.specs import SolverSpec


def _spd(n, cond, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


def _record(a, b, memory, **kw):
    mv = lambda v: {"w": jnp.asarray(a) @ v["w"]}  # noqa: E731
    return conjugate_gradient(mv, {"w": jnp.asarray(b)}, record=empty_pairs({"w": jnp.asarray(b)}, memory), **kw)


def _dense(op, n):
    return np.stack([np.asarray(op({"w": jnp.asarray(e)})["w"]) for e in np.eye(n)], axis=1)


def test_pairs_of_a_full_solve_invert_the_system():
    """``d`` A-conjugate pairs: the two-loop operator is ``A⁻¹`` (the hereditary property)."""
    n = 10
    a = _spd(n, 10.0, 0)
    res = _record(a, np.random.default_rng(1).normal(size=n), n, tol=0.0, maxiter=n)
    assert int(pair_count(res.pairs)) == n
    np.testing.assert_allclose(np.asarray(res.pairs.y["w"]), np.asarray(res.pairs.s["w"]) @ a.T, atol=1e-12)
    np.testing.assert_allclose(_dense(lbfgs_inverse(res.pairs, jnp.asarray(0.0)), n), np.linalg.inv(a), atol=1e-10)


def test_lambda_shift_is_exact():
    """Pairs recorded at λ₁ and used at λ₂ are the pairs ``(s, (A + λ₂I)s)``."""
    n, lam1, lam2 = 8, 0.3, 2.0
    a = _spd(n, 50.0, 2)
    res = _record(a + lam1 * np.eye(n), np.ones(n), 5, tol=0.0, maxiter=5)
    recorded = res.pairs._replace(lam=jnp.asarray(lam1))
    s = np.asarray(recorded.s["w"])
    direct = recorded._replace(y={"w": jnp.asarray(s @ (a + lam2 * np.eye(n)).T)}, lam=jnp.asarray(lam2))
    np.testing.assert_allclose(_dense(lbfgs_inverse(recorded, jnp.asarray(lam2)), n),
                               _dense(lbfgs_inverse(direct, jnp.asarray(lam2)), n), atol=1e-12)  # fmt: skip


def test_no_pairs_is_the_base_operator():
    like = {"w": jnp.ones(4)}
    v = {"w": jnp.arange(4.0)}
    assert np.array_equal(lbfgs_inverse(empty_pairs(like, 3), jnp.asarray(1.0))(v)["w"], v["w"])
    base = lambda q: {"w": 2.0 * q["w"]}  # noqa: E731
    np.testing.assert_allclose(lbfgs_inverse(empty_pairs(like, 3), jnp.asarray(1.0), base)(v)["w"], 2.0 * v["w"])


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 7),
    memory=st.integers(1, 6),
    log_cond=st.floats(0.0, 6.0),
    lam_rec=st.floats(0.0, 2.0),
    lam_use=st.floats(0.0, 2.0),
    diag_base=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_operator_is_symmetric_positive_definite(n, memory, log_cond, lam_rec, lam_use, diag_base, seed):
    """For any SPD system, memory, λ at recording and at use, and base: ``B`` is SPD (skipped pairs included)."""
    a = _spd(n, 10.0**log_cond, seed)
    b = np.random.default_rng(seed + 1).normal(size=n)
    res = _record(a + lam_rec * np.eye(n), b, memory, tol=0.0, maxiter=n)
    # lam_use < lam_rec can make a pair's sᵀy ≤ 0 only for an indefinite H; a = SPD keeps them all,
    # so also feed one pair of opposite curvature to check the skip.
    pairs = res.pairs._replace(lam=jnp.asarray(lam_rec))
    bad = CurvaturePairs({"w": pairs.s["w"].at[0].set(b)}, {"w": pairs.y["w"].at[0].set(-b)}, pairs.lam, pairs.valid)
    d = jnp.asarray(np.random.default_rng(seed + 2).uniform(0.5, 2.0, n))
    base = (lambda q: {"w": d * q["w"]}) if diag_base else None
    for p in (pairs, bad):
        m = _dense(lbfgs_inverse(p, jnp.asarray(lam_use), base), n)
        assert np.all(np.isfinite(m))
        np.testing.assert_allclose(m, m.T, atol=1e-8 * np.abs(m).max())
        assert np.linalg.eigvalsh(0.5 * (m + m.T)).min() > 0


def _lin(a):
    return types.SimpleNamespace(matvec=lambda v: {"w": jnp.asarray(a) @ v["w"]})


@pytest.mark.parametrize("unroll", [False, True])
def test_cg_solver_reuses_its_pairs(unroll):
    """A second solve of the same system takes fewer iterations and reaches the dense damped solution."""
    n, lam = 30, 1e-2
    a = _spd(n, 1e3, 3)
    g = {"w": jnp.asarray(np.random.default_rng(4).normal(size=n))}
    plain = CGSolver(maxiter=200, tol=1e-10, unroll=False)
    solver = CGSolver(maxiter=200 if not unroll else 60, tol=1e-10, memory=8, unroll=unroll)
    state = solver.init(g)
    assert int(pair_count(state.pairs)) == 0
    s0, _, st0 = plain.solve(_lin(a), g, jnp.asarray(lam), None, plain.init(g))
    s1, state, st1 = solver.solve(_lin(a), g, jnp.asarray(lam), None, state)
    s2, state, st2 = solver.solve(_lin(a), g, jnp.asarray(lam), None, state)
    want = np.linalg.solve(a + lam * np.eye(n), np.asarray(g["w"]))
    for s in (s0, s2):
        np.testing.assert_allclose(np.asarray(s["w"]), want, rtol=1e-6)
    assert int(st1["cg_iters"]) == int(st0["cg_iters"]) or unroll  # no pairs yet: plain CG
    assert int(st2["cg_iters"]) < 0.75 * int(st0["cg_iters"]), (int(st2["cg_iters"]), int(st0["cg_iters"]))
    assert int(pair_count(state.pairs)) == 8


def test_preset_option_and_validation():
    params = mlp_init(jax.random.PRNGKey(0), (4, 6, 3))
    batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (6, 4)), "y": jnp.arange(6) % 3}
    method = somax.make("sgn_ce", predict_fn=mlp_apply, qn_memory=2, maxiter=2, tol=1e-8)
    assert "memory=2" in str(method.plan)
    assert "memory" not in str(somax.make("sgn_ce", predict_fn=mlp_apply).plan)
    step, state = jax.jit(method.step), method.init(params)
    losses = []
    for _ in range(3):
        params, state, info = step(params, batch, state)
        losses.append(float(info["loss"]))
    assert losses[2] < losses[1] < losses[0]
    assert int(pair_count(state.solver.pairs)) == 2
    with pytest.raises(ValueError, match="memory"):
        somax.assemble(curvature=somax.CurvatureSpec("ggn_ce", kwargs={"predict_fn": mlp_apply}),
                       solver=SolverSpec("cg", kwargs={"memory": -1}))  # fmt: skip
