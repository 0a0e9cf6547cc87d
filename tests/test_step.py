"""The step contract: exact directions, rho semantics, cadences, one linearization, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import (
    classification_batch,
    damped_solve,
    dense_ggn,
    dense_grad,
    dense_hessian,
    flat,
    output_loss_fn,
    regression_batch,
    tiny_mlp,
)

import somax
from somax.specs import CurvatureSpec, DampingSpec, SolverSpec, TelemetrySpec

EXACT_CG = SolverSpec("cg", kwargs={"maxiter": 500, "tol": 1e-13})

#: the trust region without its mini-batch safeguards: the Levenberg–Marquardt mechanics alone
TEXTBOOK_TR = {"max_rel_update": None, "lam0_floor": None, "curvature_floor": None}


def _direction(method, params, batch):
    state = method.init(params)
    new, _, info = jax.jit(method.step)(params, batch, state, jax.random.PRNGKey(0))
    return flat(params) - flat(new), info


@pytest.mark.parametrize(
    "kind,make_batch,sizes",
    [
        ("ggn_mse", lambda: regression_batch(d_out=2), (3, 5, 2)),
        ("ggn_mse", lambda: regression_batch(d_out=1), (3, 5, 1)),
        ("ggn_ce", lambda: classification_batch(c=4), (3, 5, 4)),
        ("ggn_ce", lambda: classification_batch(c=4, one_hot=True), (3, 5, 4)),
    ],
)
@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_ggn_direction_equals_dense_damped_solve(kind, make_batch, sizes, lam):
    params, predict = tiny_mlp(sizes=sizes)
    batch = make_batch()
    method = somax.assemble(
        curvature=CurvatureSpec(kind, kwargs={"predict_fn": predict}),
        solver=EXACT_CG,
        damping=DampingSpec("constant", lam0=lam),
    )
    s, info = _direction(method, params, batch)
    loss = "mse" if kind == "ggn_mse" else "ce"
    G = dense_ggn(predict, params, batch, loss)
    g = dense_grad(output_loss_fn(predict, loss), params, batch)
    np.testing.assert_allclose(s, damped_solve(G, lam, g), rtol=1e-7, atol=1e-10)
    assert bool(info["cg_converged"]) and float(info["cg_residual"]) <= 1e-13


def test_hessian_direction_equals_dense_damped_solve():
    params, predict = tiny_mlp(sizes=(3, 4, 2))
    batch = regression_batch(d_out=2)
    lf = output_loss_fn(predict, "mse")
    H = dense_hessian(lf, params, batch)
    lam = float(-np.linalg.eigvalsh(H).min() + 0.5)  # makes H + λI positive definite
    method = somax.make("newton_cg", lf, lam0=lam, maxiter=500, tol=1e-13, warm_start=False)
    s, _ = _direction(method, params, batch)
    np.testing.assert_allclose(s, damped_solve(H, lam, dense_grad(lf, params, batch)), rtol=1e-7, atol=1e-10)


def test_newton_cg_indefinite_hessian_gives_finite_descent_direction():
    params, predict = tiny_mlp(sizes=(3, 4, 2))
    batch = regression_batch(d_out=2)
    lf = output_loss_fn(predict, "mse")
    assert np.linalg.eigvalsh(dense_hessian(lf, params, batch)).min() < -1e-3
    method = somax.make("newton_cg", lf, lam0=0.0, maxiter=200, tol=1e-12)
    s, info = _direction(method, params, batch)
    g = dense_grad(lf, params, batch)
    assert np.all(np.isfinite(s)) and s @ g > 0
    assert np.isfinite(float(info["cg_residual"]))


def _quadratic_problem():
    """Linear model + MSE: the loss is exactly quadratic and GGN = Hessian."""
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {"w": jax.random.normal(k[0], (4, 2)), "b": jnp.zeros(2)}
    batch = {"x": jax.random.normal(k[1], (16, 4)), "y": jax.random.normal(k[2], (16, 2))}
    return params, (lambda p, x: x @ p["w"] + p["b"]), batch


@pytest.mark.parametrize("lr,momentum", [(1.0, None), (0.5, None), (0.3, 0.9)])
def test_rho_is_one_on_a_quadratic_with_the_applied_update(lr, momentum):
    """rho uses u_t from the Optax chain: with lr ≠ 1 or momentum, the raw direction would give rho ≠ 1."""
    params, predict, batch = _quadratic_problem()
    method = somax.make(
        "sgn_mse", predict, learning_rate=lr, momentum=momentum, lam0=0.3, maxiter=3,
        telemetry=TelemetrySpec(rho_every_k=1),
    )  # fmt: skip
    state = method.init(params)
    for _ in range(3):
        params, state, info = method.step(params, batch, state, None)
        np.testing.assert_allclose(float(info["rho"]), 1.0, rtol=1e-9)
        actual = float(info["loss"]) - float(info["loss_after"])
        np.testing.assert_allclose(float(info["pred_decrease"]), actual, rtol=1e-9)


def test_cadences_are_kept_per_requester():
    """Trust region every 4 steps and rho logged every 3: rho at the union, λ updates only at 0, 4, 8."""
    params, predict, batch = _quadratic_problem()
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=SolverSpec("cg", kwargs={"maxiter": 2}),
        damping=DampingSpec("trust_region", lam0=1.0, kwargs={"every_k": 4, **TEXTBOOK_TR}),
        telemetry=TelemetrySpec(rho_every_k=3),
        tx=optax.scale(-0.5),
    )
    step = jax.jit(method.step)
    state = method.init(params)
    rho_steps, lams = [], []
    for t in range(13):
        params, state, info = step(params, batch, state, None)
        if np.isfinite(float(info["rho"])):
            rho_steps.append(t)
        lams.append(float(info["lam"]))
    assert rho_steps == [0, 3, 4, 6, 8, 9, 12]
    assert [method.plan.fires_at("rho", t) for t in range(13)] == [t in rho_steps for t in range(13)]
    # quadratic ⇒ rho = 1 > 0.75 ⇒ λ halves at every trust-region update (steps 0, 4, 8, 12)
    expected = [1.0] + [0.5] * 4 + [0.25] * 4 + [0.125] * 4
    np.testing.assert_allclose(lams, expected)
    np.testing.assert_allclose(float(state.damping.lam), 0.0625)


def test_trust_region_rejects_bad_steps_and_raises_lambda():
    params, predict = tiny_mlp(sizes=(3, 8, 2))
    batch = regression_batch(b=12, d_out=2)
    method = somax.make("sgn_mse", predict, learning_rate=50.0, lam0=1e-3,
                        damping=DampingSpec("trust_region", lam0=1e-3, kwargs=TEXTBOOK_TR))  # fmt: skip
    state = method.init(params)
    new, state2, info = jax.jit(method.step)(params, batch, state, None)
    assert float(info["rho"]) < 0 and not bool(info["step_accepted"])
    np.testing.assert_array_equal(flat(new), flat(params))
    assert float(state2.damping.lam) == pytest.approx(1.5e-3)
    assert int(state2.count) == 1
    # without rejection the (bad) step is applied
    keep = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        damping=DampingSpec("trust_region", lam0=1e-3, kwargs={"reject_below": None, **TEXTBOOK_TR}),
        tx=optax.scale(-50.0),
    )
    new, _, info = keep.step(params, batch, keep.init(params), None)
    assert bool(info["step_accepted"]) and not np.allclose(flat(new), flat(params))


def _counting(predict):
    calls = {"n": 0}

    def wrapped(p, x):
        calls["n"] += 1
        return predict(p, x)

    return wrapped, calls


@pytest.mark.parametrize("rho_every_k,expected", [(-1, 1), (1, 2), (5, 2)])
def test_one_model_evaluation_per_step(rho_every_k, expected):
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    counted, calls = _counting(predict)
    method = somax.make("sgn_mse", counted, maxiter=7, telemetry=TelemetrySpec(rho_every_k=rho_every_k))
    jax.jit(method.step).lower(params, regression_batch(d_out=2), method.init(params), None)
    assert calls["n"] == expected  # model traced once; the probe adds exactly one forward pass


def test_no_recompilation_over_50_steps_and_fixed_info():
    params, predict = tiny_mlp(sizes=(3, 5, 2), dtype=jnp.float32)
    traces = {"n": 0}
    method = somax.make(
        "sgn_mse", predict, damping="trust_region", tr_every_k=4, telemetry=TelemetrySpec(rho_every_k=3),
        learning_rate=optax.linear_schedule(1.0, 0.1, 50),
    )  # fmt: skip

    @jax.jit
    def step(p, b, s, r):
        traces["n"] += 1
        return method.step(p, b, s, r)

    state = method.init(params)
    keys, structure = None, None
    for t in range(50):
        batch = regression_batch(key=t, d_out=2, dtype=jnp.float32)
        params, state, info = step(params, batch, state, jax.random.PRNGKey(t))
        if keys is None:
            keys, structure = list(info), {k: (v.shape, v.dtype) for k, v in info.items()}
        assert list(info) == keys and {k: (v.shape, v.dtype) for k, v in info.items()} == structure
    assert traces["n"] == 1
    assert sorted(keys) == sorted(method.plan.info_schema)
    for key in ("loss", "grad_norm", "update_norm", "lam", "rho", "loss_after", "cg_iters", "cg_residual",
                "step_accepted"):  # fmt: skip
        assert key in keys
    assert info["loss"].dtype == jnp.float32 and info["lam"].dtype == jnp.float32


def test_sentinels_when_probes_are_off():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict)
    _, _, info = method.step(params, regression_batch(d_out=2), method.init(params), None)
    assert np.isnan(float(info["rho"])) and np.isnan(float(info["loss_after"]))
    assert bool(info["step_accepted"]) and int(info["cg_iters"]) > 0
    floats = somax.to_floats(info)
    # the keys are the same at every step: sentinels stay, as nan
    assert np.isnan(floats["rho"]) and np.isnan(floats["loss_after"]) and floats["step_accepted"] == 1.0
    assert floats["batch_valid"] == 1.0


def test_lax_scan_over_steps_matches_python_loop():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batches = [regression_batch(key=i, d_out=2) for i in range(6)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches)
    method = somax.make(
        "sgn_mse", predict, damping="trust_region", tr_every_k=3, telemetry=TelemetrySpec(rho_every_k=2)
    )

    def body(carry, batch):
        p, s = carry
        p, s, info = method.step(p, batch, s, None)
        return (p, s), info

    (p_scan, s_scan), infos = jax.lax.scan(body, (params, method.init(params)), stacked)
    p_loop, s_loop = params, method.init(params)
    step = jax.jit(method.step)
    for b in batches:
        p_loop, s_loop, _ = step(p_loop, b, s_loop, None)
    np.testing.assert_allclose(flat(p_scan), flat(p_loop), rtol=1e-7, atol=1e-10)
    assert infos["loss"].shape == (6,)
    assert np.isnan(np.asarray(infos["rho"])[1]) and np.isfinite(np.asarray(infos["rho"])[2])


def test_pcg_with_diag_ema_matches_dense_solve_when_converged():
    """PCG only changes the path, not the solution: the converged direction is still (G + λI)⁻¹ g."""
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batch = regression_batch(d_out=2)
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=EXACT_CG,
        precondition=somax.PrecondSpec("diag_ema", kwargs={"beta": 0.9}),
        damping=DampingSpec("constant", lam0=0.1),
    )
    s, _ = _direction(method, params, batch)
    G = dense_ggn(predict, params, batch, "mse")
    g = dense_grad(output_loss_fn(predict, "mse"), params, batch)
    np.testing.assert_allclose(s, damped_solve(G, 0.1, g), rtol=1e-7, atol=1e-10)
