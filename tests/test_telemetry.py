"""Spectral telemetry, diagnostics, step-norm damping and line search against dense float64 oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import classification_batch, dense_ggn, dense_hessian, flat, output_loss_fn, regression_batch, tiny_mlp

import somax
from somax.estimators import spectral
from somax.specs import CurvatureSpec, DampingSpec, LineSearchSpec, SolverSpec, TelemetrySpec


def _one_step(method, params, batch, key=0):
    return jax.jit(method.step)(params, batch, method.init(params), jax.random.PRNGKey(key))


@pytest.mark.parametrize("kind", ["ggn_ce", "hessian"])
def test_top_k_eigenvalues_match_eigvalsh(kind):
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    batch = classification_batch(c=4)
    d = flat(params).size
    kwargs = {"predict_fn": predict} if kind == "ggn_ce" else {"predict_fn": predict, "loss": "ce"}
    method = somax.assemble(
        curvature=CurvatureSpec(kind, kwargs=kwargs),
        telemetry=TelemetrySpec(eig_every_k=1, eig_k=3, eig_iters=d),
    )
    _, _, info = _one_step(method, params, batch)
    dense = (
        dense_ggn(predict, params, batch, "ce")
        if kind == "ggn_ce"
        else dense_hessian(output_loss_fn(predict, "ce"), params, batch)
    )
    expected = np.sort(np.linalg.eigvalsh(dense))[::-1][:3]
    np.testing.assert_allclose(np.asarray(info["top_eigs"]), expected, rtol=1e-3)


def test_top_eigenvalue_with_few_lanczos_steps_is_accurate():
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    batch = classification_batch(c=4)
    method = somax.make("sgn_ce", predict, telemetry=TelemetrySpec(eig_every_k=1, eig_k=1, eig_iters=12))
    _, _, info = _one_step(method, params, batch)
    top = np.linalg.eigvalsh(dense_ggn(predict, params, batch, "ce")).max()
    np.testing.assert_allclose(float(info["top_eigs"][0]), top, rtol=1e-3)


def _dense_matvec(matrix):
    a = jnp.asarray(matrix)
    return lambda v: a @ v


@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
def test_trace_estimators_are_unbiased(estimator):
    """Mean of 400 independent estimates lies within 4 standard errors of tr(H) (≈ 99.99% two-sided)."""
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batch = regression_batch(d_out=2)
    H = dense_hessian(output_loss_fn(predict, "mse"), params, batch)
    fn = spectral.hutchinson_trace if estimator == "hutchinson" else spectral.hutchpp_trace
    keys = jax.random.split(jax.random.PRNGKey(11), 400)
    est = np.asarray(jax.vmap(lambda k: fn(_dense_matvec(H), H.shape[0], k, 6, jnp.float64))(keys))
    stderr = est.std(ddof=1) / np.sqrt(est.size)
    assert abs(est.mean() - np.trace(H)) <= 4 * stderr + 1e-12
    assert est.std() > 0  # a genuinely random estimator (the check above can fail)


def test_trace_probe_in_step_matches_dense_on_average():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batch = regression_batch(d_out=2)
    method = somax.make("sgn_mse", predict, telemetry=TelemetrySpec(trace_every_k=1, trace_probes=200))
    step, state = jax.jit(method.step), method.init(params)
    traces = [float(step(params, batch, state, jax.random.PRNGKey(k))[2]["trace"]) for k in range(5)]
    G = dense_ggn(predict, params, batch, "mse")
    np.testing.assert_allclose(np.mean(traces), np.trace(G), rtol=0.1)


def test_slq_moments_are_exact_per_probe_and_match_spectrum():
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    batch = classification_batch(c=4)
    G = dense_ggn(predict, params, batch, "ce")
    d = G.shape[0]
    key = jax.random.PRNGKey(5)
    nodes, weights = spectral.slq_density(_dense_matvec(G), d, key, 64, 6, jnp.float64)
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    v = np.stack([np.asarray(spectral.rademacher_probe(key, i, d, jnp.float64)) for i in range(64)])
    q = v / np.linalg.norm(v, axis=1, keepdims=True)
    for p in range(4):  # Gauss quadrature with m = 6 nodes is exact up to degree 2m − 1
        quad = (weights * nodes**p).sum(axis=1)
        exact = np.einsum("pi,ij,pj->p", q, np.linalg.matrix_power(G, p), q)
        np.testing.assert_allclose(quad, exact, rtol=1e-8, atol=1e-12)
    # and the probe average estimates the normalised moments tr(G^p)/d (statistical, 4 std errors)
    for p in (1, 2):
        per_probe = (weights * nodes**p).sum(axis=1)
        target = np.trace(np.linalg.matrix_power(G, p)) / d
        assert abs(per_probe.mean() - target) <= 4 * per_probe.std(ddof=1) / np.sqrt(64)


def test_block_top_eigenvalues_match_dense_blocks():
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    batch = classification_batch(c=4)
    method = somax.make("sgn_ce", predict, telemetry=TelemetrySpec(block_eig_every_k=1, block_eig_iters=30))
    _, _, info = _one_step(method, params, batch)
    G = dense_ggn(predict, params, batch, "ce")
    for layer in ("layer0", "layer1"):
        marker = jax.tree_util.tree_map(jnp.zeros_like, params)
        marker[layer] = jax.tree_util.tree_map(jnp.ones_like, params[layer])
        idx = np.flatnonzero(flat(marker))
        expected = np.linalg.eigvalsh(G[np.ix_(idx, idx)]).max()
        np.testing.assert_allclose(float(info["block_top_eig"][f"['{layer}']"]), expected, rtol=1e-6)
    logged = somax.to_floats(info)
    assert "block_top_eig/['layer0']" in logged


def test_unrolled_spectral_loops_equal_the_loops_and_blocks_by_id_equal_masks():
    """``unroll=True`` (straight-line code) computes what the fori_loop / lax.map versions do,
    and the blocks given as one id array give what (n_blocks, dim) masks give."""
    rs = np.random.default_rng(0)
    a = rs.standard_normal((9, 9))
    matvec = _dense_matvec(a @ a.T)
    key = jax.random.PRNGKey(2)
    f64 = jnp.float64
    ids = jnp.asarray([0, 0, 1, 2, 2, 2, 1, 0, 2])
    masks = (ids[None, :] == jnp.arange(3)[:, None]).astype(f64)

    @jax.jit
    def both(key):  # one compiled program for every case
        out = {
            u: (
                spectral.top_eigenvalues(matvec, 9, key, 2, 5, f64, unroll=u),
                spectral.hutchinson_trace(matvec, 9, key, 4, f64, unroll=u),
            )
            for u in (False, True)
        }
        blocks = spectral.block_top_eigenvalues_by_id(matvec, ids, 3, key, 4, f64)
        return out, blocks, spectral.block_top_eigenvalues(matvec, masks, key, 4, f64)

    out, by_id, by_mask = both(key)
    for x, y in zip(out[True], out[False], strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(by_id), np.asarray(by_mask), rtol=1e-10)
    dense = np.asarray(a @ a.T)
    for b in range(3):  # 4 Lanczos steps are exact on blocks of at most 4 entries
        idx = np.flatnonzero(np.asarray(ids) == b)
        np.testing.assert_allclose(float(by_mask[b]), np.linalg.eigvalsh(dense[np.ix_(idx, idx)]).max(), rtol=1e-8)


def test_each_probe_fires_exactly_on_its_cadence_and_compiles_once():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    counted = {"model": 0, "trace": 0}

    def model(p, x):
        counted["model"] += 1
        return predict(p, x)

    tele = TelemetrySpec(trace_every_k=3, eig_every_k=2, density_every_k=5, block_eig_every_k=4, eig_iters=5,
                         density_iters=4, block_eig_iters=4, rho_every_k=6)  # fmt: skip
    method = somax.make("sgn_mse", model, telemetry=tele)

    @jax.jit
    def step(p, b, s, r):
        counted["trace"] += 1
        return method.step(p, b, s, r)

    state = method.init(params)
    fired = {k: [] for k in ("trace", "top_eigs", "density_nodes", "block_top_eig", "rho")}
    for t in range(13):
        params, state, info = step(params, regression_batch(key=t, d_out=2), state, jax.random.PRNGKey(t))
        for key in fired:
            value = info[key]
            arr = np.asarray(list(value.values()) if isinstance(value, dict) else value)
            if np.all(np.isfinite(arr)):
                fired[key].append(t)
            else:
                assert np.all(np.isnan(arr))
    assert fired == {
        "trace": [0, 3, 6, 9, 12],
        "top_eigs": [0, 2, 4, 6, 8, 10, 12],
        "density_nodes": [0, 5, 10],
        "block_top_eig": [0, 4, 8, 12],
        "rho": [0, 6, 12],
    }
    assert counted["trace"] == 1
    assert counted["model"] == 2  # one linearization + the rho probe's forward pass; spectral probes add none


def test_rng_is_required_by_random_probes():
    params, predict = tiny_mlp()
    method = somax.make("sgn_mse", predict, telemetry=TelemetrySpec(trace_every_k=1))
    with pytest.raises(ValueError, match="rng=None.*spectral telemetry"):
        method.step(params, regression_batch(), method.init(params), None)


def _quadratic():
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {"w": jax.random.normal(k[0], (4, 2))}
    batch = {"x": jax.random.normal(k[1], (16, 4)), "y": jax.random.normal(k[2], (16, 2))}
    return params, (lambda p, x: x @ p["w"]), batch


def test_grid_line_search_picks_the_grid_minimiser_on_a_quadratic():
    params, predict, batch = _quadratic()
    # an over-long update (5× the Gauss-Newton step) so the best grid point is interior
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=SolverSpec("cg", kwargs={"maxiter": 50, "tol": 1e-12}),
        damping=DampingSpec("constant", lam0=0.0),
        tx=optax.scale(-5.0),
        line_search=LineSearchSpec("grid", kwargs={"n": 10}),
        telemetry=TelemetrySpec(rho_every_k=1),
    )
    new, _, info = method.step(params, batch, method.init(params), None)
    lf = output_loss_fn(predict, "mse")
    s = jax.tree_util.tree_map(lambda a, b: (a - b) / float(info["ls_alpha"]), new, params)  # the update u
    alphas = 2.0 ** (-np.arange(10) / 2)
    losses = [float(lf(jax.tree_util.tree_map(lambda w, u, a=a: w + a * u, params, s), batch)) for a in alphas]
    assert float(info["ls_alpha"]) == pytest.approx(alphas[int(np.argmin(losses))])
    assert float(info["loss_after"]) == pytest.approx(min(losses), rel=1e-10)
    np.testing.assert_allclose(float(info["rho"]), 1.0, rtol=1e-8)  # exact quadratic model, applied update


def test_armijo_backtracks_to_sufficient_decrease():
    params, predict, batch = _quadratic()
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=SolverSpec("cg", kwargs={"maxiter": 50, "tol": 1e-12}),
        damping=DampingSpec("constant", lam0=0.0),
        tx=optax.scale(-8.0),
        line_search=LineSearchSpec("armijo", kwargs={"c": 0.25, "shrink": 0.5}),
    )
    new, _, info = method.step(params, batch, method.init(params), None)
    # On a quadratic with the exact Newton step s: L(w − 8αs) is minimised at α = 1/8, and Armijo with c = 1/4
    # holds iff 8α ≤ 1.5; backtracking from 1 by halves stops at α = 1/8.
    assert float(info["ls_alpha"]) == pytest.approx(0.125)
    assert float(info["loss_after"]) < float(info["loss"])


def test_step_norm_damping_keeps_update_norm_in_band():
    params, predict = tiny_mlp(sizes=(3, 8, 2))
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        damping=DampingSpec("step_norm", lam0=1e-4, kwargs={"low": 0.02, "high": 0.05}),
        tx=optax.scale(-1.0),
    )
    state = method.init(params)
    step = jax.jit(method.step)
    norms, actions = [], []
    for t in range(60):
        params, state, info = step(params, regression_batch(key=t, b=16, d_out=2), state, None)
        norms.append(float(info["update_norm"]))
        actions.append(int(info["tr_action"]))
    late = np.asarray(norms[30:])
    # the band is kept up to one adjustment factor (λ moves by ×2 / ×0.5 per step)
    assert np.mean((late >= 0.02 / 2) & (late <= 0.05 * 2)) >= 0.9
    assert norms[0] > 0.05 and actions[0] == 1  # started far too long: λ increased


def test_diagnostics_are_consistent():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    telemetry = TelemetrySpec(loss_after_every_k=1, norms_every_k=1)
    method = somax.make("sgn_mse", predict, learning_rate=0.5, telemetry=telemetry)
    new, _, info = _one_step(method, params, regression_batch(d_out=2))
    du = flat(new) - flat(params)
    np.testing.assert_allclose(float(info["update_norm"]), np.linalg.norm(du), rtol=1e-10)
    np.testing.assert_allclose(float(info["rel_update"]), np.linalg.norm(du) / np.linalg.norm(flat(params)), rtol=1e-10)
    g = flat(jax.grad(output_loss_fn(predict, "mse"))(params, regression_batch(d_out=2)))
    np.testing.assert_allclose(float(info["g_dot_s"]), g @ (-du / 0.5), rtol=1e-8)
    np.testing.assert_allclose(float(info["actual_decrease"]), float(info["loss"]) - float(info["loss_after"]))
    assert int(info["tr_action"]) == -1 and np.isnan(float(info["ls_alpha"]))
