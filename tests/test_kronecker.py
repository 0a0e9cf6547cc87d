"""Kronecker-factored preconditioners: Shampoo, SOAP, K-FAC (float64 oracles from dense NumPy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import somax
from somax.precond.shampoo import Shampoo, leaf_layout
from somax.specs import CurvatureSpec, DampingSpec, EstimatorSpec, PrecondSpec, SolverSpec


def _inv_root(mat: np.ndarray, eps: float, p: float = 0.25) -> np.ndarray:
    w, q = np.linalg.eigh(mat)
    return (q * (np.maximum(w, 0.0) + eps) ** -p) @ q.T


def _linear_model(params, x):
    return jnp.einsum("bi,io->bo", x, params["w"]) + params["b"]


@jax.jit
def _mse_grad(params, batch):
    return jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((_linear_model(p, batch["x"]) - batch["y"]) ** 2, -1)))(params)


def _data(key, n=6, d_in=4, d_out=3):
    kx, ky = jax.random.split(jax.random.PRNGKey(key))
    x = jax.random.normal(kx, (n, d_in), jnp.float64)
    y = jax.random.normal(ky, (n, d_out), jnp.float64)
    return {"x": x, "y": y}


def _lin_params(d_in=4, d_out=3, seed=0):
    k = jax.random.PRNGKey(seed)
    return {"w": jax.random.normal(k, (d_in, d_out), jnp.float64) * 0.5, "b": jnp.zeros((d_out,), jnp.float64)}


# ------------------------------------------------------------------------------------------ Shampoo


def test_leaf_layout_merging_rule():
    assert leaf_layout((4, 3), 2048).describe() == "matrix 4x3 (L full, R full)"
    assert leaf_layout((3, 3, 2, 5), 2048).rows == 18
    assert leaf_layout((3, 3, 2, 5), 2048).cols == 5
    assert leaf_layout((2, 1, 4, 5), 2048).rows == 8  # unit axes dropped
    assert not leaf_layout((7,), 2048).matrix and not leaf_layout((), 2048).matrix
    assert not leaf_layout((1, 7), 2048).matrix  # a row vector is a vector
    lay = leaf_layout((3000, 5), 2048)
    assert (lay.left_full, lay.right_full) == (False, True)


def _shampoo_method(pre, grad_tx=None):
    return somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
        precondition=pre,
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=0.0),
        grad_tx=grad_tx,
        tx=optax.scale(-0.1),
    )


def test_shampoo_direction_matches_dense_inverse_roots():
    """Three steps, refresh every step: s = (L + εI)^{-1/4} G (R + εI)^{-1/4}, L = Σ β^k G Gᵀ; bias: diagonal rule."""
    eps, beta = 1e-3, 0.9
    pre = Shampoo(beta=beta, eps=eps, eigh_dtype="float64")
    method = _shampoo_method(pre)
    params = _lin_params()
    state = method.init(params)
    step = jax.jit(method.step)
    L = np.zeros((4, 4))
    R = np.zeros((3, 3))
    h = np.zeros(3)
    for t in range(3):
        batch = _data(t)
        g = _mse_grad(params, batch)
        G, gb = np.asarray(g["w"]), np.asarray(g["b"])
        L, R, h = beta * L + G @ G.T, beta * R + G.T @ G, beta * h + gb**2
        new, state, _ = step(params, batch, state)
        s_w = -(np.asarray(new["w"]) - np.asarray(params["w"])) / 0.1
        s_b = -(np.asarray(new["b"]) - np.asarray(params["b"])) / 0.1
        np.testing.assert_allclose(s_w, _inv_root(L, eps) @ G @ _inv_root(R, eps), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s_b, gb / np.sqrt(h + eps), rtol=1e-10, atol=1e-12)
        params = new


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from([(2, 3, 4), (3, 2, 2, 3), (1, 4, 3), (2, 1, 3, 1)]), seed=st.integers(0, 2**16))
def test_shampoo_reshaping_rule_rank3_rank4(shape, seed):
    """A rank-3/4 leaf is the matrix (Π shape[:-1], shape[-1]) after dropping unit axes."""
    eps = 1e-2
    pre = Shampoo(eps=eps, eigh_dtype="float64")
    g = np.random.default_rng(seed).normal(size=shape)
    params = {"k": jnp.zeros(shape, jnp.float64)}
    state = pre.refresh(pre.update(pre.init(params), {"k": jnp.asarray(g)}))
    v = np.random.default_rng(seed + 1).normal(size=shape)
    got = np.asarray(pre.inverse(state, jnp.asarray(0.0))({"k": jnp.asarray(v)})["k"])
    dims = [d for d in shape if d != 1]
    G = g.reshape(int(np.prod(dims[:-1])), dims[-1])
    V = v.reshape(G.shape)
    want = _inv_root(G @ G.T, eps) @ V @ _inv_root(G.T @ G, eps)
    np.testing.assert_allclose(got, want.reshape(shape), rtol=1e-9, atol=1e-12)


def test_shampoo_vectors_and_large_dims_use_diagonal_rule():
    eps = 1e-2
    pre = Shampoo(eps=eps, max_dim=3, eigh_dtype="float64")
    rng = np.random.default_rng(0)
    g = {"v": rng.normal(size=(5,)), "s": np.asarray(1.5), "m": rng.normal(size=(4, 3))}
    params = jax.tree_util.tree_map(lambda a: jnp.zeros(np.shape(a), jnp.float64), g)
    state = pre.refresh(pre.update(pre.init(params), jax.tree_util.tree_map(jnp.asarray, g)))
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=np.shape(a))), g)
    out = pre.inverse(state, jnp.asarray(0.0))(v)
    np.testing.assert_allclose(out["v"], np.asarray(v["v"]) / np.sqrt(g["v"] ** 2 + eps), rtol=1e-12)
    np.testing.assert_allclose(out["s"], np.asarray(v["s"]) / np.sqrt(g["s"] ** 2 + eps), rtol=1e-12)
    G = g["m"]  # rows 4 > max_dim: diagonal left factor; cols 3: full right factor
    dl = (np.sum(G * G, axis=1) + eps) ** -0.25
    want = dl[:, None] * np.asarray(v["m"]) @ _inv_root(G.T @ G, eps)
    np.testing.assert_allclose(out["m"], want, rtol=1e-10)


def test_shampoo_refresh_cadence_roots_stale_between_refreshes():
    """refresh_every_k=3: the roots used at steps 1, 2 are exactly those of step 0's factors."""
    eps = 1e-2
    pre = Shampoo(eps=eps, refresh_every_k=3, eigh_dtype="float64")
    method = _shampoo_method(pre)
    params = _lin_params()
    state = method.init(params)
    step = jax.jit(method.step)
    Ls, Rs = [], []
    L, R = np.zeros((4, 4)), np.zeros((3, 3))
    for t in range(5):
        batch = _data(10 + t)
        g = _mse_grad(params, batch)
        G = np.asarray(g["w"])
        L, R = L + G @ G.T, R + G.T @ G
        Ls.append(L)
        Rs.append(R)
        new, state, _ = step(params, batch, state)
        fresh = 3 * (t // 3)  # the last refresh step
        s_w = -(np.asarray(new["w"]) - np.asarray(params["w"])) / 0.1
        want = _inv_root(Ls[fresh], eps) @ G @ _inv_root(Rs[fresh], eps)
        np.testing.assert_allclose(s_w, want, rtol=1e-10, atol=1e-12)
        params = new


def test_shampoo_grafting_norms():
    """Per leaf ‖s‖ = ‖v / (√ν̂ + ε_g)‖ (adam: ν̂ bias-corrected; rmsprop: not)."""
    rng = np.random.default_rng(3)
    g = {"m": jnp.asarray(rng.normal(size=(4, 3))), "v": jnp.asarray(rng.normal(size=(3,)))}
    params = jax.tree_util.tree_map(jnp.zeros_like, g)
    for graft, corr in (("adam", 1 - 0.9), ("rmsprop", 1.0)):
        pre = Shampoo(graft=graft, graft_beta=0.9, graft_eps=1e-8, eigh_dtype="float64")
        state = pre.refresh(pre.update(pre.init(params), g))
        out = pre.inverse(state, jnp.asarray(0.0))(g)
        for k in g:
            nu = 0.1 * np.asarray(g[k]) ** 2 / corr
            target = np.linalg.norm(np.asarray(g[k]) / (np.sqrt(nu) + 1e-8))
            np.testing.assert_allclose(np.linalg.norm(np.asarray(out[k])), target, rtol=1e-10)


def test_shampoo_assembles_with_explicit_estimator_and_rejects_wrong_statistic():
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
        precondition=PrecondSpec("shampoo", kwargs={"refresh_every_k": 5}),
        estimator=EstimatorSpec("gradient", kwargs={"eval_every_k": 2}),
        solver=SolverSpec("diagonal"),
    )
    assert "shampoo" in str(method.plan)
    with pytest.raises(somax.IncompatibleSpecsError, match="gradient"):
        somax.assemble(
            curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
            precondition=PrecondSpec("shampoo"),
            estimator=EstimatorSpec("squared_gradient"),
            solver=SolverSpec("diagonal"),
        )
