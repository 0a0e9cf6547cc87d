"""Kronecker-factored preconditioners: Shampoo, SOAP, K-FAC (float64 oracles from dense NumPy)."""

from __future__ import annotations

import jax
import jax.flatten_util
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


@settings(max_examples=5, deadline=None)
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


# ------------------------------------------------------------------------------------------ SOAP


def _soap_reference(batches, w0, b0, lr, b1, b2, eps, f):
    """NumPy transcription of SOAP (Vyas et al. 2024, Alg. 3) for ``z = x W + b`` with MSE.

    Assumptions (stated in somax.precond.soap): ``Q_L = Q_R = I`` before the first basis
    computation; ``M`` kept in the original space and rotated every step; Adam's bias
    correction ``M̂ = M/(1−β₁ᵗ)``, ``V̂ = V/(1−β₂ᵗ)`` with ``ε`` added to ``√V̂``; the factors
    ``L, R`` (decay ``β₂``) and the basis are updated after the parameter step, the basis on
    steps ``t`` with ``(t−1) mod f = 0``; ``V`` is not re-projected when the basis changes;
    the bias vector ``b`` is not rotated (plain Adam).
    """
    W, b = w0.copy(), b0.copy()
    M, V = np.zeros_like(W), np.zeros_like(W)
    mb, vb = np.zeros_like(b), np.zeros_like(b)
    L, R = np.zeros((W.shape[0],) * 2), np.zeros((W.shape[1],) * 2)
    QL, QR = np.eye(W.shape[0]), np.eye(W.shape[1])
    for t, batch in enumerate(batches, start=1):
        x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
        r = (x @ W + b - y) / x.shape[0]
        G, gb = x.T @ r, r.sum(0)
        Gr = QL.T @ G @ QR
        M = b1 * M + (1 - b1) * G
        V = b2 * V + (1 - b2) * Gr**2
        Mhat, Vhat = M / (1 - b1**t), V / (1 - b2**t)
        N = QL @ ((QL.T @ Mhat @ QR) / (np.sqrt(Vhat) + eps)) @ QR.T
        mb = b1 * mb + (1 - b1) * gb
        vb = b2 * vb + (1 - b2) * gb**2
        nb = (mb / (1 - b1**t)) / (np.sqrt(vb / (1 - b2**t)) + eps)
        W, b = W - lr * N, b - lr * nb
        L = b2 * L + (1 - b2) * G @ G.T
        R = b2 * R + (1 - b2) * G.T @ G
        if (t - 1) % f == 0:
            QL = np.linalg.eigh(L)[1][:, ::-1]
            QR = np.linalg.eigh(R)[1][:, ::-1]
    return W, b


def test_soap_matches_numpy_reference_10_steps():
    lr, b1, b2, eps, f = 0.05, 0.9, 0.95, 1e-8, 3
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
        precondition=PrecondSpec("soap", kwargs={"b2": b2, "eps": eps, "refresh_every_k": f,
                                                 "eigh_dtype": "float64"}),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=0.0),
        grad_tx=optax.ema(b1, debias=True),
        tx=optax.scale(-lr),
    )
    params = _lin_params()
    params = {"w": params["w"], "b": params["b"] + 0.3}
    batches = [_data(100 + t, n=5) for t in range(10)]
    state = method.init(params)
    step = jax.jit(method.step)
    p = params
    for batch in batches:
        p, state, _ = step(p, batch, state)
    W, b = _soap_reference(batches, np.asarray(params["w"]), np.asarray(params["b"]), lr, b1, b2, eps, f)
    np.testing.assert_allclose(np.asarray(p["w"]), W, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(p["b"]), b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------ K-FAC


def _mlp(params, x):
    h = jax.nn.tanh(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"] + params["l1"]["b"]


def _mlp_setup(n, seed=0, d=(3, 4, 3)):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = {
        "l0": {"w": jax.random.normal(ks[0], (d[0], d[1]), jnp.float64), "b": 0.1 * jnp.ones((d[1],), jnp.float64)},
        "l1": {"w": jax.random.normal(ks[1], (d[1], d[2]), jnp.float64), "b": jnp.zeros((d[2],), jnp.float64)},
    }
    batch = {"x": jax.random.normal(ks[2], (n, d[0]), jnp.float64), "y": jax.random.randint(ks[3], (n,), 0, d[2])}
    return params, batch


def _kfac_stats(params, batch):
    from somax.curvature import ggn_ce
    from somax.estimators.kronecker import KFACFactors

    @jax.jit
    def run(params, batch):
        lin = ggn_ce(predict_fn=_mlp).linearize(params, batch)
        return KFACFactors().estimate(lin, None, ())[0]["layers"]

    return jax.tree_util.tree_map(np.asarray, run(params, batch))


def _dense_ggn_ce(params, batch):
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    @jax.jit
    def dense(flat):
        J = jax.jacfwd(lambda f: _mlp(unravel(f), batch["x"]))(flat)  # (n, C, d)
        p = jax.nn.softmax(_mlp(unravel(flat), batch["x"]))
        H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p) / p.shape[0]
        return jnp.einsum("ncd,nce,nef->df", J, H, J)

    return np.asarray(dense(flat)), unravel


def _block_indices(params, layer):
    """Indices of [vec(W) row-major; b] of ``layer`` in ravel_pytree order, as the (d_in, d_out) matrix."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    idx = unravel(jnp.arange(flat.size, dtype=jnp.float64))
    mat = np.concatenate([np.asarray(idx[layer]["w"]), np.asarray(idx[layer]["b"])[None]], 0)
    return mat.reshape(-1).astype(int)


def test_kfac_blocks_equal_dense_ggn_blocks_batch_one():
    params, batch = _mlp_setup(1)
    stats = _kfac_stats(params, batch)
    G, _ = _dense_ggn_ce(params, batch)
    for layer in ("l0", "l1"):
        A, S = stats[f"['{layer}']['w']"]
        ix = _block_indices(params, layer)
        np.testing.assert_allclose(np.kron(A, S), G[np.ix_(ix, ix)], rtol=1e-10, atol=1e-12)


def test_kfac_factors_equal_per_example_definitions():
    params, batch = _mlp_setup(7, seed=1)
    stats = _kfac_stats(params, batch)
    x = np.asarray(batch["x"])
    n = x.shape[0]
    W0, b0, W1 = (np.asarray(params["l0"]["w"]), np.asarray(params["l0"]["b"]), np.asarray(params["l1"]["w"]))
    y0 = x @ W0 + b0
    h = np.tanh(y0)
    p = np.asarray(jax.nn.softmax(_mlp(params, batch["x"])))
    Hs = [np.diag(q) - np.outer(q, q) for q in p]
    a0 = np.concatenate([x, np.ones((n, 1))], 1)
    a1 = np.concatenate([h, np.ones((n, 1))], 1)
    J0 = [W1.T * (1 - h[i] ** 2)[None, :] for i in range(n)]  # ∂z/∂y0, (C, d1)
    want = {
        "['l0']['w']": (a0.T @ a0 / n, sum(J.T @ H @ J for J, H in zip(J0, Hs)) / n),
        "['l1']['w']": (a1.T @ a1 / n, sum(Hs) / n),
    }
    for name, (A, S) in want.items():
        np.testing.assert_allclose(stats[name][0], A, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(stats[name][1], S, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("damping", ["eigen", "pi"])
def test_kfac_single_dense_mse_equals_dense_damped_solve(damping):
    """z = x W + b with MSE: G = A ⊗ I exactly; eigen-damping gives (G + λI)⁻¹ g; π-damping
    gives (A + π√λ I)⁻¹ ⊗ (I + √λ/π I)⁻¹ g."""
    lam = 0.3
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
        precondition=PrecondSpec("kfac", kwargs={"eps": 0.0, "damping": damping, "eigh_dtype": "float64"}),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=lam),
        tx=optax.scale(-1.0),
    )
    params, batch = _lin_params(), _data(5, n=9)
    new, _, _ = jax.jit(method.step)(params, batch, method.init(params))
    s = -np.concatenate([np.asarray(new["w"] - params["w"]), np.asarray(new["b"] - params["b"])[None]], 0)
    g = _mse_grad(params, batch)
    gm = np.concatenate([np.asarray(g["w"]), np.asarray(g["b"])[None]], 0)
    x = np.concatenate([np.asarray(batch["x"]), np.ones((9, 1))], 1)
    A = x.T @ x / 9
    if damping == "eigen":
        G = np.kron(A, np.eye(3))
        want = np.linalg.solve(G + lam * np.eye(G.shape[0]), gm.ravel()).reshape(gm.shape)
    else:
        pi = np.sqrt(np.trace(A) / A.shape[0])
        want = np.linalg.solve(A + pi * np.sqrt(lam) * np.eye(5), gm) / (1 + np.sqrt(lam) / pi)
    np.testing.assert_allclose(s, want, rtol=1e-10, atol=1e-12)


def test_kfac_pcg_fewer_iterations_same_direction():
    """Ill-conditioned inputs: PCG with K-FAC reaches the damped GGN direction in fewer CG iterations."""
    params, batch = _mlp_setup(32, seed=2, d=(4, 5, 3))
    params = {**params, "l0": {**params["l0"], "w": 0.1 * params["l0"]["w"]}}  # tanh near-linear
    batch = {**batch, "x": batch["x"] * jnp.asarray([1.0, 20.0, 0.05, 3.0])}  # input scales: A ill-conditioned
    out = {}
    for name, pre in (("cg", None), ("pcg", PrecondSpec("kfac", kwargs={"eigh_dtype": "float64"}))):
        method = somax.assemble(
            curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": _mlp}),
            solver=SolverSpec("cg", kwargs={"maxiter": 300, "tol": 1e-10, "warm_start": False}),
            precondition=pre,
            damping=DampingSpec("constant", lam0=1e-4),
        )
        new, _, info = jax.jit(method.step)(params, batch, method.init(params))
        out[name] = (jax.flatten_util.ravel_pytree(new)[0], int(info["cg_iters"]))
    np.testing.assert_allclose(out["pcg"][0], out["cg"][0], rtol=1e-6, atol=1e-8)
    assert out["pcg"][1] < out["cg"][1], out


def test_kfac_describe_assignment():
    params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}, "scale": jnp.zeros((4,))}
    text = somax.precond.KFAC().describe(
        params, lambda p, x: (x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["scale"], jnp.zeros((2, 3))
    )
    assert "['dense']['kernel']  kfac A 4x4 ⊗ S 4x4" in text and "['scale']  diagonal" in text
