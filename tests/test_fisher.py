"""Natural-gradient curvatures: the Monte-Carlo Fisher's mean is the GGN; the empirical Fisher operator."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import somax
from somax.specs import CurvatureSpec, SolverSpec

#: Tiny programs run a few times: XLA's backend (LLVM) optimisation would cost more than it saves.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _problem(seed=0, b=6, d_in=3, hidden=4, classes=3):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    params = {
        "w1": jax.random.normal(k[0], (d_in, hidden)),
        "b1": 0.1 * jax.random.normal(k[1], (hidden,)),
        "w2": jax.random.normal(k[2], (hidden, classes)),
        "b2": 0.1 * jax.random.normal(k[3], (classes,)),
    }
    batch = {"x": jax.random.normal(k[4], (b, d_in)), "y": jax.random.randint(k[5], (b,), 0, classes)}
    return params, batch


def _dense(lin, params):
    flat, unravel = ravel_pytree(params)
    mv = lambda v: ravel_pytree(lin.matvec(unravel(v)))[0]  # noqa: E731
    return jax.vmap(mv)(jnp.eye(flat.size))


def test_mc_fisher_mean_is_the_ggn_for_softmax_ce():
    """Average of M independent MC Fisher matrices vs the dense GGN, entry by entry.

    Each F̂_m is an unbiased estimate of G (one label per example from softmax(z)), and the
    F̂_m are independent, so by the CLT ``Z_ij = (F̄_ij − G_ij)/SE_ij`` (SE from the sample
    standard deviation over m) is approximately N(0, 1). The test requires
    ``max |Z_ij| ≤ 5.5`` over the 31·32/2 = 496 distinct entries: under the null each exceeds it
    with probability 3.8e-8, so the family-wise false-alarm rate is ≤ 2e-5 (Bonferroni; M = 3000).
    Seeds are fixed, so the outcome is deterministic. Power: the same statistic for a
    Fisher off by 5% exceeds the bound.
    """
    params, batch = _problem()
    ggn = somax.curvature.ggn_ce(predict_fn=mlp)
    fisher = somax.curvature.fisher(predict_fn=mlp, loss="ce")
    m = 3000

    @_jit
    def compute(keys):
        mats = jax.vmap(lambda key: _dense(fisher.linearize(params, batch, rng=key), params))(keys)
        lin_g, lin_f = ggn.linearize(params, batch), fisher.linearize(params, batch, rng=keys[0])
        return mats, _dense(lin_g, params), (lin_g.loss, lin_f.loss), (lin_g.grad, lin_f.grad)

    mats, g, losses, grads = compute(jax.random.split(jax.random.PRNGKey(7), m))
    mean, se = mats.mean(0), mats.std(0, ddof=1) / np.sqrt(m)
    iu = np.triu_indices(g.shape[0])

    def zmax(estimate):
        diff = np.asarray(estimate - g)[iu]
        s = np.asarray(se)[iu]
        assert np.all(np.abs(diff[s == 0]) <= 1e-12)  # entries the sampling never moves
        return np.max(np.abs(diff[s > 0]) / s[s > 0])

    assert zmax(mean) <= 5.5
    assert zmax(1.05 * mean) > 5.5  # the test can tell a 5% error
    # each sample is symmetric PSD of rank ≤ b (one rank-1 term per example)
    np.testing.assert_allclose(mats[0], mats[0].T, atol=1e-12)
    assert np.linalg.matrix_rank(np.asarray(mats[0]), tol=1e-9) <= batch["x"].shape[0]
    # the batch loss and gradient are the true-label ones
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-14)
    np.testing.assert_allclose(ravel_pytree(grads[0])[0], ravel_pytree(grads[1])[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weighted", [False, True])
def test_empirical_fisher_matvec_equals_per_example_outer_products(weighted):
    params, batch = _problem(seed=1, b=5)
    w = jnp.array([1.0, 0.0, 2.0, 0.5, 1.0]) if weighted else None
    if weighted:
        batch = {**batch, "w": w}
    curv = somax.curvature.empirical_fisher(predict_fn=mlp, loss="ce", weight_key="w" if weighted else None)

    def per_example_loss(p, x, y, wi):  # Σ_t w_it ℓ_it for one example (here one position)
        z = mlp(p, x[None])
        return wi * -jax.nn.log_softmax(z)[0, y]

    ws = w if weighted else jnp.ones(5)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.PRNGKey(3), flat.shape)

    @_jit
    def compute(params, batch, v):
        lin = curv.linearize(params, batch)
        grads = jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0, 0, 0))(params, batch["x"], batch["y"], ws)
        gmat = jax.vmap(lambda i: ravel_pytree(jax.tree.map(lambda a: a[i], grads))[0])(jnp.arange(5))
        n = ws.sum()
        got = ravel_pytree(lin.matvec(unravel(v)))[0]
        return got, gmat.T @ (gmat @ v) / n, ravel_pytree(lin.grad)[0], gmat.sum(0) / n

    got, expected, grad, mean_grad = compute(params, batch, v)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # the gradient is the batch gradient (1/n) Σ g_i
    np.testing.assert_allclose(grad, mean_grad, rtol=1e-10, atol=1e-12)


def test_fisher_kinds_run_in_the_parameter_lane_with_cg_and_refuse_row_solvers():
    params, batch = _problem(seed=2)
    method = somax.assemble(
        curvature=CurvatureSpec("fisher", kwargs={"predict_fn": mlp, "loss": "ce"}),
        solver=SolverSpec("cg", kwargs={"maxiter": 5}),
        damping=somax.DampingSpec("constant", lam0=0.1),
    )
    state = method.init(params)
    new, state, info = _jit(method.step)(params, batch, state, jax.random.PRNGKey(0))
    assert bool(info["finite"]) and float(info["loss"]) > 0
    assert not np.allclose(ravel_pytree(new)[0], ravel_pytree(params)[0])
    for kind in ("fisher", "empirical_fisher"):
        with pytest.raises(somax.IncompatibleSpecsError, match="row"):
            somax.assemble(curvature=CurvatureSpec(kind, kwargs={"predict_fn": mlp}), solver=SolverSpec("row_cholesky"))
    assert (
        "the model (dropout)"
        in somax.assemble(curvature=CurvatureSpec("fisher", kwargs={"predict_fn": mlp})).plan.needs_rng
    )
