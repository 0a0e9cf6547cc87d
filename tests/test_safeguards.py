"""Safeguards: solves near λ = 0, damping after failed steps, bad batches, the step counter.

Every reproducer here ran away or passed silently before the safeguard it tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from oracles import classification_batch, dense_ggn_array, tiny_mlp

import somax
from somax.models import mlp_apply, mlp_init
from somax.solvers.cg import conjugate_gradient
from somax.solvers.dense import dense_solve
from somax.specs import CurvatureSpec, DampingSpec, SolverSpec

# ---------------------------------------------------------------------------- solves near λ = 0


def _min_norm_step(predict, params, batch, lam):
    g = np.asarray(ravel_pytree(jax.jit(jax.grad(_mse(predict, batch)))(params))[0], np.float64)
    p64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
    b64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), batch)
    G = np.asarray(jax.jit(lambda p, b: dense_ggn_array(predict, p, b, "mse"))(p64, b64))
    return np.linalg.pinv(G + lam * np.eye(g.size)) @ g


def _mse(predict, batch):
    return lambda p: 0.5 * jnp.mean(jnp.sum((predict(p, batch["x"]) - batch["y"]) ** 2, -1))


def _float32_problem(n=16, sizes=(8, 16, 8, 1)):
    params = mlp_init(jax.random.PRNGKey(0), sizes, jnp.float32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    batch = {"x": jax.random.normal(k1, (n, sizes[0]), jnp.float32),
             "y": jax.random.normal(k2, (n, sizes[-1]), jnp.float32)}  # fmt: skip
    return params, (lambda p, x: mlp_apply(p, x, activation=jnp.tanh)), batch


@pytest.mark.parametrize("solver", [("cg", {"maxiter": 60, "tol": 1e-8}), ("dense_eigh", {}), ("dense_cholesky", {})])
def test_lambda_zero_on_a_singular_minibatch_ggn_gives_a_bounded_step(solver):
    """float32, λ = 0, 16 examples, 289 parameters, one output (GGN rank ≤ 16): the step is at
    most the minimum-norm step (CG's iterates grow monotonically towards it), up to float32
    rounding. Without the negligible-curvature exit, CG divided by rounding noise: ‖u‖ ≈ 1e8."""
    params, predict, batch = _float32_problem()
    kind, kwargs = solver
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=SolverSpec(kind, kwargs=kwargs),
        damping=DampingSpec("constant", lam0=0.0),
    )
    new, _, info = jax.jit(method.step)(params, batch, method.init(params))
    step = np.asarray(ravel_pytree(new)[0] - ravel_pytree(params)[0], np.float64)
    s_min = _min_norm_step(predict, params, batch, 0.0)
    assert np.linalg.norm(step) <= 1.05 * np.linalg.norm(s_min) + 1e-3, (np.linalg.norm(step), np.linalg.norm(s_min))
    g = np.asarray(ravel_pytree(jax.grad(_mse(predict, batch))(params))[0], np.float64)
    assert g @ step < 0  # downhill
    assert bool(info["finite"])


def _cg_property(dtype):
    @jax.jit
    def run(jac, r, lam, tol):
        m = jac.shape[0]
        a = jac.T @ jac / m
        b = jac.T @ r / m
        res = conjugate_gradient(lambda v: a @ v + lam * v, b, tol=tol, maxiter=3 * jac.shape[1])
        return res.x, b

    return run


_CG = {np.float32: _cg_property(jnp.float32), np.float64: _cg_property(jnp.float64)}


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lam=st.sampled_from([0.0, 1e-30, 1e-12, 1e-6, 1e-2, 1.0]),
    tol=st.sampled_from([0.0, 1e-12, 1e-8, 1e-4]),
    dtype=st.sampled_from([np.float32, np.float64]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_cg_is_a_bounded_descent_direction_for_every_lambda_and_tolerance(seed, lam, tol, dtype, scale):
    """A = JᵀJ/m + λI with m = 3 < d = 10 (singular at λ = 0) and b = Jᵀr/m ∈ range(A): CG from 0
    returns a finite x with bᵀx > 0 and ‖x‖ ≤ ‖(A + λI)⁺ b‖ (1 % slack for rounding)."""
    rng = np.random.default_rng(seed)
    jac = (scale * rng.standard_normal((3, 10))).astype(dtype)
    r = rng.standard_normal(3).astype(dtype)
    x, b = _CG[dtype](jac, r, dtype(lam), dtype(tol))
    x, b = np.asarray(x, np.float64), np.asarray(b, np.float64)
    j64 = jac.astype(np.float64)
    exact = np.linalg.pinv(j64.T @ j64 / 3 + lam * np.eye(10)) @ (j64.T @ r.astype(np.float64) / 3)
    assert np.all(np.isfinite(x))
    assert b @ x > 0
    assert np.linalg.norm(x) <= 1.01 * np.linalg.norm(exact) + 1e-6 * np.linalg.norm(exact)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    lam=st.sampled_from([0.0, 1e-12, 1e-4, 1.0]),
    method=st.sampled_from(["eigh", "cholesky"]),
)
def test_dense_solves_are_bounded_by_the_pseudo_inverse(seed, lam, method):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((3, 10)).astype(np.float32)
    a = jac.T @ jac / 3
    b = jac.T @ rng.standard_normal(3).astype(np.float32) / 3
    s, _ = dense_solve(jnp.asarray(a), jnp.float32(lam), jnp.asarray(b), method=method)
    s = np.asarray(s, np.float64)
    exact = np.linalg.pinv(a.astype(np.float64) + lam * np.eye(10)) @ b.astype(np.float64)
    assert np.all(np.isfinite(s)) and b @ s > 0
    assert np.linalg.norm(s) <= 1.01 * np.linalg.norm(exact) + 1e-4


# ---------------------------------------------------------------------------- damping after failed steps


def test_a_non_finite_step_raises_lambda_and_training_resumes():
    """λ₀ = 1e-30 on saturated logits: the first steps are non-finite; λ must rise, not stay frozen."""
    params = {"w": jnp.asarray([[0.0, 60.0], [0.0, 60.0]], jnp.float32)}
    batch = {"x": jnp.ones((4, 2), jnp.float32), "y": jnp.zeros((4,), jnp.int32)}
    method = somax.make("sgn_ce", predict_fn=lambda p, x: x @ p["w"],
                        damping=DampingSpec("trust_region", lam0=1e-30))  # fmt: skip
    state = method.init(params)
    step = jax.jit(method.step)
    finite, lams, losses = [], [], []
    for _ in range(60):
        params, state, info = step(params, batch, state)
        finite.append(bool(info["finite"]))
        lams.append(float(info["lam"]))
        losses.append(float(info["loss"]))
    assert all(finite[-10:]), finite
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", ["trust_region", "step_norm"])
def test_every_adaptive_policy_raises_lambda_after_a_non_finite_step(kind):
    params, predict = tiny_mlp()
    batch = classification_batch()
    bad = {**batch, "x": batch["x"].at[0, 0].set(jnp.nan)}
    method = somax.make("sgn_ce", predict_fn=predict, damping=DampingSpec(kind, lam0=1.0, kwargs={"every_k": 4}))
    step = jax.jit(method.step)
    state = method.init(params)
    _, state, _ = step(params, batch, state)  # step 0: a damping step
    new_params, new_state, info = step(params, bad, state)  # step 1: off the cadence, non-finite
    assert not bool(info["finite"]) and not bool(info["step_accepted"])
    assert float(new_state.damping.lam) == pytest.approx(float(state.damping.lam) * method.damping.increase)
    assert int(info["tr_action"]) == somax.damping.INCREASED
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_zero_predicted_decrease_keeps_lambda_and_the_step():
    """At an exact minimum the update is 0: rho is undetermined (nan), λ stays, the step is accepted."""
    w = jnp.asarray([[1.0], [-2.0], [0.5]], jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3), jnp.float64)
    method = somax.make("sgn_mse", predict_fn=lambda p, x: x @ p["w"], damping="trust_region", lam0=0.3)
    _, state, info = jax.jit(method.step)({"w": w}, {"x": x, "y": x @ w}, method.init({"w": w}))
    assert np.isnan(float(info["rho"])) and bool(info["step_accepted"])
    assert float(state.damping.lam) == 0.3 and int(info["tr_action"]) == somax.damping.KEEP


# ---------------------------------------------------------------------------- trust-region floors

_SIGNALS = st.lists(
    st.tuples(st.sampled_from([-1.0, 0.0, 0.1, 0.5, 0.9, 1.0, 3.0, float("nan")]), st.booleans(), st.booleans()),
    min_size=1,
    max_size=40,
)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(_SIGNALS, st.sampled_from([1e-3, 1.0, 10.0]), st.sampled_from([None, 0.5, 1.0]))
def test_trust_region_never_lowers_lambda_below_its_lam0_floor(signals, lam0, lam0_floor):
    """For every sequence of (rho, finite, capped) signals: ``λ ≥ lam0_floor·λ₀`` after each update (and
    ``λ ≥ lam_min`` without that floor), ``λ ≤ lam_max``; λ moves by the policy's factors otherwise."""
    policy = somax.damping.TrustRegion(lam0_floor=lam0_floor, curvature_floor=None, lam_max=1e3)
    state = policy.init({"w": jnp.zeros(3)}, lam0)
    floor = policy.lam_min if lam0_floor is None else lam0_floor * lam0
    for rho, finite, capped in signals:
        before = float(state.lam)
        sig = {"rho": jnp.asarray(rho), "finite": jnp.asarray(finite), "capped": jnp.asarray(capped)}
        state, _, action = policy.update(state, sig)
        lam = float(state.lam)
        assert floor * (1 - 1e-6) <= lam <= policy.lam_max * (1 + 1e-6), (lam, floor)
        factor = {0: 1.0, 1: policy.increase, 2: policy.decrease}[int(action)]
        expected = min(max(before * factor, floor, policy.lam_min), policy.lam_max)
        assert lam == pytest.approx(expected, rel=1e-6)


def test_curvature_floor_tracks_the_top_eigenvalue():
    """``curvature_floor=f``: one power-iteration product per check; on ``H = diag(h)`` the estimate
    converges to ``max(h)`` and every check leaves ``λ ≥ f·λ̂_max``, even when rho says lower it."""
    h = jnp.asarray([0.5, 2.0, 8.0, 1.0])

    class Lin:
        matvec = staticmethod(lambda v: jax.tree_util.tree_map(lambda x: h * x, v))

    policy = somax.damping.TrustRegion(curvature_floor=0.5, lam0_floor=None)
    state = policy.init({"w": jnp.zeros(4)}, 1.0)
    sig = {"rho": jnp.asarray(1.0), "finite": jnp.asarray(True), "capped": jnp.asarray(False), "lin": Lin()}
    for _ in range(30):
        state, _, _ = policy.update(state, sig)
        assert float(state.lam) >= 0.5 * float(state.top) * (1 - 1e-6)
    assert float(state.top) == pytest.approx(8.0, rel=1e-3)
    assert float(state.lam) == pytest.approx(4.0, rel=1e-3)


def test_lam0_floor_keeps_lambda_at_lam0_on_a_quadratic():
    """rho = 1 on a quadratic says "lower λ" at every check; the λ₀ floor keeps ``λ = λ₀``, the
    textbook policy (``lam0_floor=None``) halves it (no step bound or curvature floor in either)."""
    w = jnp.asarray([[1.0], [-2.0], [0.5]], jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3), jnp.float64)
    batch = {"x": x, "y": x @ w + 0.1}
    lams = {}
    for name, kwargs in (
        ("default", {"max_rel_update": None, "curvature_floor": None}),
        ("textbook", {"lam0_floor": None, "max_rel_update": None, "curvature_floor": None}),
    ):
        method = somax.make("sgn_mse", predict_fn=lambda p, x: x @ p["w"],
                            damping=DampingSpec("trust_region", lam0=0.3, kwargs=kwargs))  # fmt: skip
        p, state, step = {"w": jnp.zeros_like(w)}, method.init({"w": jnp.zeros_like(w)}), jax.jit(method.step)
        for _ in range(3):
            p, state, _ = step(p, batch, state)
        lams[name] = float(state.damping.lam)
    assert lams == {"default": pytest.approx(0.3), "textbook": pytest.approx(0.3 * 0.5**3)}


# ---------------------------------------------------------------------------- bad batches, parameters, counter


@pytest.mark.parametrize(
    "labels",
    [np.array([0, 1, 10, 2, 3, 1]), np.array([0, 1, -1, 2, 3, 1]), np.random.default_rng(0).standard_normal((6, 4))],
    ids=["label_10_of_4_classes", "label_minus_1", "regression_targets"],
)
def test_inadmissible_targets_reject_the_step_and_say_why(labels):
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    batch = {**classification_batch(c=4), "y": jnp.asarray(labels)}
    method = somax.make("sgn_ce", predict_fn=predict)
    state = method.init(params)
    new, new_state, info = jax.jit(method.step)(params, batch, state)
    assert not bool(info["batch_valid"]) and not bool(info["step_accepted"]) and bool(info["finite"])
    before = jax.tree_util.tree_leaves((params, state.solver))
    after = jax.tree_util.tree_leaves((new, new_state.solver))
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.nonfinite_count) == 0


def test_admissible_targets_pass():
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    method = somax.make("sgn_ce", predict_fn=predict)
    for batch in (classification_batch(c=4), classification_batch(c=4, one_hot=True)):
        _, _, info = jax.jit(method.step)(params, batch, method.init(params))
        assert bool(info["batch_valid"]) and bool(info["step_accepted"])


def test_empty_batch_and_non_array_parameters_are_named():
    params, predict = tiny_mlp()
    method = somax.make("sgn_mse", predict_fn=predict)
    empty = {"x": jnp.zeros((0, 3)), "y": jnp.zeros((0, 2))}
    with pytest.raises(ValueError, match=r"batch\['x'\] is empty"):
        method.step(params, empty, method.init(params))
    with pytest.raises(TypeError, match=r"params\['b'\] is a float, not an array"):
        method.init({**params, "b": 1.0})


def test_the_step_counter_wraps_at_a_multiple_of_every_cadence():
    params, predict = tiny_mlp()
    batch = classification_batch()
    method = somax.make("sgn_ce", predict_fn=predict, damping="trust_region", tr_every_k=3,
                        telemetry=somax.TelemetrySpec(norms_every_k=4))  # fmt: skip
    period = method.plan.count_period
    assert period % 12 == 0 and period <= 2**31 - 1 and period > 2**31 - 13
    step = jax.jit(method.step)
    state = method.init(params)._replace(count=jnp.asarray(period - 1, jnp.int32))
    _, state, info = step(params, batch, state)
    assert int(state.count) == 0 and int(info["step"]) == period - 1
    _, _, info = step(params, batch, state)
    assert int(info["tr_action"]) != -1 and not np.isnan(float(info["rel_update"]))  # both fire at 0 again
    # a restored count at the int32 limit (beyond the period) wraps to 0 instead of overflowing
    _, wrapped, _ = step(params, batch, state._replace(count=jnp.asarray(2**31 - 1, jnp.int32)))
    assert int(wrapped.count) == 0


def test_sgd_style_tx_still_works():
    params, predict = tiny_mlp()
    method = somax.assemble(curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}), tx=optax.sgd(0.1))
    assert method.plan.lane == "param"
