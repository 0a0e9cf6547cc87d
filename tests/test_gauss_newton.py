"""Full Gauss-Newton with an inner optimizer: float64 oracles on a tiny MLP.

Oracles are independent of the solver: ``J`` by ``jax.jacfwd`` of the flattened model, ``H_z`` and
``g_z`` by ``jax.hessian``/``jax.grad`` of the loss written out here, dense solves by NumPy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import somax
from somax.presets.gauss_newton import global_cosine, inner_cosine
from somax.solvers.gn_inner import GNInnerSolver, ggn_microbatches

#: Tiny programs run a few times: XLA's backend (LLVM) optimisation would cost more than it saves.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B = 6  # examples per micro-batch


def mlp(p, x):
    return jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "l1": {"w": jax.random.normal(k[0], (3, 3)), "b": 0.1 * jax.random.normal(k[1], (3,))},
        "l2": {"w": jax.random.normal(k[2], (3, 2)), "b": 0.1 * jax.random.normal(k[3], (2,))},
    }


def _batch(n, loss="ce", seed=1, n_val=2):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    if loss == "ce":
        y, yv = jax.random.randint(k[1], (n, B), 0, 2), jax.random.randint(k[3], (n_val, B), 0, 2)
    else:
        y, yv = jax.random.normal(k[1], (n, B, 2)), jax.random.normal(k[3], (n_val, B, 2))
    x, xv = jax.random.normal(k[0], (n, B, 3)), jax.random.normal(k[2], (n_val, B, 3))
    return {"x": x, "y": y, "x_val": xv, "y_val": yv}


def _loss(z, y, loss):
    if loss == "ce":
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))
    return 0.5 * jnp.sum((z - y) ** 2) / z.shape[0]


def _dense_gn(params, xs, ys, loss):
    """``(G, g)`` of the mean micro-batch loss at ``params``, flattened."""
    gs, grads = _dense_parts(params, xs, ys, loss)
    return np.asarray(gs), np.asarray(grads)


@functools.partial(_jit, static_argnums=3)
def _dense_parts(params, xs, ys, loss):
    flat, unravel = ravel_pytree(params)

    def per(x, y):
        zf = lambda f: mlp(unravel(f), x).reshape(-1)  # noqa: E731
        jac = jax.jacfwd(zf)(flat)
        lz = lambda z: _loss(z.reshape(B, 2), y, loss)  # noqa: E731
        z = zf(flat)
        return jac.T @ jax.hessian(lz)(z) @ jac, jac.T @ jax.grad(lz)(z)

    gs, grads = jax.vmap(per)(xs, ys)
    return gs.mean(0), grads.mean(0)


def _solve(solver, params, batch, lam, loss="ce"):
    curv = ggn_microbatches(predict_fn=mlp, loss=loss)

    @_jit
    def run(params, batch):
        lin = curv.linearize(params, batch)
        s, state, stats = solver.solve(lin, lin.grad, jnp.asarray(lam), None, solver.init(params))
        return ravel_pytree(state.delta_hat)[0], s, stats

    return run(params, batch)


def _repeat(batch, times):
    return {k: (jnp.tile(v, (times,) + (1,) * (v.ndim - 1)) if k in ("x", "y") else v) for k, v in batch.items()}


def test_inner_gradient_descent_on_one_micro_batch_reaches_the_damped_gn_step():
    params, one = _params(), _batch(1)
    g_mat, g = _dense_gn(params, one["x"], one["y"], "ce")
    top = np.linalg.eigvalsh(g_mat)[-1]
    lam = 0.1 * top  # κ = (top + λ)/λ = 11
    lr = 2.0 / (top + 2 * lam)  # 2/(L + μ): contraction (κ − 1)/(κ + 1) per step
    steps = 150
    solver = GNInnerSolver(micro_batches=steps, inner=optax.sgd(lr), mode="quadratic", line_search=0)
    delta, s, stats = _solve(solver, params, _repeat(one, steps), lam)
    want = -np.linalg.solve(g_mat + lam * np.eye(g.size), g)
    np.testing.assert_allclose(delta, want, rtol=0, atol=1e-6 * np.linalg.norm(want))
    np.testing.assert_allclose(ravel_pytree(s)[0], -delta, rtol=1e-15)  # α = 1 without a line search
    assert float(stats["ls_alpha"]) == 1.0 and np.isnan(float(stats["gn_heldout_loss"]))


def test_cycling_micro_batches_reaches_the_damped_gn_step_of_their_union():
    """``MultiSteps(sgd, N)`` sums the inner gradients of one cycle through the N micro-batches, i.e.
    the gradient of the union's model, so the cycles are gradient descent on it."""
    n, cycles = 3, 60
    params, batch = _params(), _batch(n, "mse")
    g_mat, g = _dense_gn(params, batch["x"], batch["y"], "mse")
    top = np.linalg.eigvalsh(g_mat)[-1]
    lam = 0.3 * top  # contraction (κ − 1)/(κ + 1) ≈ 0.62 per cycle
    inner = optax.MultiSteps(optax.sgd(2.0 / (top + 2 * lam)), every_k_schedule=n).gradient_transformation()
    solver = GNInnerSolver(micro_batches=n * cycles, inner=inner, line_search=0)
    delta, _, _ = _solve(solver, params, _repeat(batch, cycles), lam, "mse")
    want = -np.linalg.solve(g_mat + lam * np.eye(g.size), g)
    np.testing.assert_allclose(delta, want, rtol=0, atol=1e-8 * np.linalg.norm(want))


def test_prox_linear_equals_quadratic_gn_for_mse():
    params, batch = _params(), _batch(4, "mse")
    out = {}
    for mode in ("quadratic", "prox_linear"):
        solver = GNInnerSolver(micro_batches=4, inner=optax.adam(0.05), mode=mode, line_search=0)
        out[mode] = _solve(solver, params, batch, 0.3, "mse")
    np.testing.assert_allclose(out["prox_linear"][0], out["quadratic"][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["prox_linear"][2]["gn_inner_loss"], out["quadratic"][2]["gn_inner_loss"], rtol=1e-12)


def test_prox_linear_for_cross_entropy_solves_the_prox_linear_model():
    params, one = _params(), _batch(1)
    flat, unravel = ravel_pytree(params)
    x, y = one["x"][0], one["y"][0]
    jac, z0 = _jit(lambda f: (jax.jacfwd(lambda f: mlp(unravel(f), x).reshape(-1))(f), mlp(unravel(f), x)))(flat)
    top = float(np.linalg.eigvalsh(np.asarray(jac.T @ jac))[-1])
    lam = 0.5 * top / (2 * B)
    smooth = lam + 0.5 * top / B  # the softmax Hessian is ≤ I/2 per position (normalised by 1/b)
    steps = 260
    solver = GNInnerSolver(micro_batches=steps, inner=optax.sgd(1.0 / smooth), mode="prox_linear", line_search=0)
    delta, _, _ = _solve(solver, params, _repeat(one, steps), lam)

    def prox_linear(d):  # ℓ(f(θ_t) + JΔ) + ½λ‖Δ‖², J by jacfwd
        return _loss(z0 + (jac @ d).reshape(z0.shape), y, "ce") + 0.5 * lam * d @ d

    grad = _jit(jax.grad(prox_linear))(jnp.asarray(delta))
    assert float(jnp.linalg.norm(grad)) <= 1e-8
    # and it is not the quadratic model's minimiser (the test can tell the two apart)
    g_mat, g = _dense_gn(params, one["x"], one["y"], "ce")
    quad = -np.linalg.solve(g_mat + lam * np.eye(g.size), g)
    assert np.linalg.norm(delta - quad) > 1e-4 * np.linalg.norm(quad)


def test_layerwise_with_exact_inner_solves_is_the_block_diagonal_solve():
    params, one = _params(), _batch(1, seed=3)
    g_mat, g = _dense_gn(params, one["x"], one["y"], "ce")
    top = np.linalg.eigvalsh(g_mat)[-1]
    lam = 0.3 * top
    steps = 120
    solver = GNInnerSolver(micro_batches=steps, inner=optax.sgd(2.0 / (top + 2 * lam)), mode="layerwise", line_search=0)
    delta, _, _ = _solve(solver, params, _repeat(one, steps), lam)
    sizes = [ravel_pytree(params["l1"])[0].size, ravel_pytree(params["l2"])[0].size]  # ravel order: l1, then l2
    want, start = np.zeros_like(g), 0
    for size in sizes:
        sl = slice(start, start + size)
        want[sl] = -np.linalg.solve(g_mat[sl, sl] + lam * np.eye(size), g[sl])
        start += size
    np.testing.assert_allclose(delta, want, rtol=0, atol=1e-8 * np.linalg.norm(want))
    full = -np.linalg.solve(g_mat + lam * np.eye(g.size), g)
    assert np.linalg.norm(want - full) > 1e-3 * np.linalg.norm(full)  # the blocks differ from full GN here


def _by_hand_inner(theta, delta, state, inner, xs, ys, lam):
    """N inner steps on the quadratic GN models at θ, written from the formulas (autodiff of Q_k)."""
    for x, y in zip(xs, ys):

        def model(d, x=x, y=y):  # Q_k(Δ) = ℓ(z) + ∇ℓᵀJΔ + ½(JΔ)ᵀ∇²ℓ(JΔ) + ½λ‖Δ‖²
            z, jd = jax.jvp(lambda p: mlp(p, x), (theta,), (d,))
            lz = lambda zz: _loss(zz, y, "ce")  # noqa: E731
            hjd = jax.jvp(jax.grad(lz), (z,), (jd,))[1]
            return lz(z) + jnp.vdot(jax.grad(lz)(z), jd) + 0.5 * jnp.vdot(jd, hjd) + 0.5 * lam * optax.tree.vdot(d, d)

        grad = jax.grad(model)(delta)
        u, state = inner.update(grad, state, optax.apply_updates(theta, delta))
        delta = optax.apply_updates(delta, u)
    return delta, state


def _heldout(theta, batch):
    return jnp.mean(jax.vmap(lambda x, y: _loss(mlp(theta, x), y, "ce"))(batch["x_val"], batch["y_val"]))


def test_line_search_takes_the_grid_argmin_and_warm_start_carries_over_exactly():
    """Two outer steps of ``gn`` against the same two steps written out by hand."""
    n, lam = 3, 0.2
    params, batch = _params(), _batch(n, seed=5)
    inner = optax.adam(0.3)  # large enough that the held-out loss prefers a shorter step
    method = somax.make("gn", predict_fn=mlp, micro_batches=n, lam0=lam, inner=inner, line_search=5)
    assert "linearizations_per_step='3'" in str(method.plan)
    alphas = 2.0 ** (-np.arange(5) / 2)

    theta, delta, state = params, jax.tree.map(jnp.zeros_like, params), inner.init(params)
    by_hand = []
    hand = _jit(lambda th, d, st: _by_hand_inner(th, d, st, inner, batch["x"], batch["y"], lam))
    heldout = _jit(lambda th, d, a: _heldout(optax.apply_updates(th, optax.tree.scale(a, d)), batch))
    for _ in range(2):
        delta, state = hand(theta, delta, state)
        hat = optax.apply_updates(theta, delta)
        losses = [float(heldout(theta, delta, a)) for a in alphas]
        alpha = alphas[int(np.argmin(losses))]
        new_theta = optax.apply_updates(theta, optax.tree.scale(alpha, delta))
        by_hand.append((alpha, new_theta, min(losses)))
        delta = optax.tree.sub(hat, new_theta)  # warm start: Δ₀ = θ̂_t − θ_{t+1}
        theta = new_theta

    step = _jit(method.step)
    p, st = params, method.init(params)
    for alpha, want, heldout in by_hand:
        p, st, info = step(p, batch, st)
        assert float(info["ls_alpha"]) == alpha
        np.testing.assert_allclose(float(info["gn_heldout_loss"]), heldout, rtol=1e-12)
        np.testing.assert_allclose(ravel_pytree(p)[0], ravel_pytree(want)[0], rtol=1e-12, atol=1e-14)
    assert {a for a, _, _ in by_hand} != {1.0}  # the line search did cut the step


def test_default_muon_inner_and_schedules():
    n = 4
    params, batch = _params(), _batch(n, seed=7)
    method = somax.make("gn", predict_fn=mlp, micro_batches=n, lam0=0.1, inner_schedule="inner_cosine")
    p, st, info = _jit(method.step)(params, batch, method.init(params))
    assert bool(info["finite"]) and float(info["loss"]) > 0 and 0 < float(info["ls_alpha"]) <= 1
    layerwise = somax.make("gn_layerwise", predict_fn=mlp, micro_batches=n)
    assert len(layerwise.init(params).solver.inner) == 2  # one Muon state per group ('l1', 'l2')
    wrong = somax.make("gn", predict_fn=mlp, micro_batches=3)
    with pytest.raises(ValueError, match="micro_batches=3, but the batch holds 4"):
        jax.eval_shape(wrong.step, params, batch, wrong.init(params))  # traced, never run
    restart = inner_cosine(0.1, n)
    assert [float(restart(c)) for c in (0, n, 2 * n)] == [0.1, 0.1, 0.1] and float(restart(n - 1)) < 0.1
    glob = global_cosine(0.1, 3 * n)
    assert float(glob(0)) == 0.1 and float(glob(n)) < 0.1 and float(glob(3 * n)) == 0.0
