"""Kronecker-factored preconditioners: Shampoo, SOAP, K-FAC (float64 oracles from dense NumPy).

Compile time dominates this file: data and parameters are made with NumPy (an eager
``jax.random`` call compiles a small program per shape), helper functions are jitted once
at module level, and a test that needs a method's step compiles it once for all its checks.
"""

from __future__ import annotations

import functools

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

#: These programs are tiny and run a few times: XLA's backend (LLVM) optimisation would only
#: add compile time, which dominates this file. HLO-level passes and the arithmetic are unchanged.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inv_root(mat: np.ndarray, eps: float, p: float = 0.25) -> np.ndarray:
    w, q = np.linalg.eigh(mat)
    return (q * (np.maximum(w, 0.0) + eps) ** -p) @ q.T


def _linear_model(params, x):
    return jnp.einsum("bi,io->bo", x, params["w"]) + params["b"]


@_jit
def _mse_grad(params, batch):
    return jax.grad(lambda p: 0.5 * jnp.mean(jnp.sum((_linear_model(p, batch["x"]) - batch["y"]) ** 2, -1)))(params)


def _data(key, n=6, d_in=4, d_out=3):
    rng = np.random.default_rng(key)
    return {"x": jnp.asarray(rng.normal(size=(n, d_in))), "y": jnp.asarray(rng.normal(size=(n, d_out)))}


def _lin_params(d_in=4, d_out=3, seed=0):
    w = np.random.default_rng(1000 + seed).normal(size=(d_in, d_out)) * 0.5
    return {"w": jnp.asarray(w), "b": jnp.asarray(np.zeros((d_out,)))}


def _direction(new, old, lr):
    """``s`` of ``w ← w − lr·s``, per leaf, in NumPy."""
    return {k: -(np.asarray(new[k]) - np.asarray(old[k])) / lr for k in old}


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


def test_shampoo_direction_matches_dense_inverse_roots_with_stale_refresh():
    """Five steps, refresh every 3: s = (L + εI)^{-1/4} G (R + εI)^{-1/4} with L = Σ β^k G Gᵀ (R alike)
    *as of the last refresh step* (steps 1, 2, 4 use the roots of steps 0, 0, 3); bias: the diagonal
    rule g / √(h + ε), h = Σ β^k g², also as of the last refresh."""
    eps, beta, k = 1e-3, 0.9, 3
    method = _shampoo_method(Shampoo(beta=beta, eps=eps, refresh_every_k=k, eigh_dtype="float64"))
    params = _lin_params()
    state = _jit(method.init)(params)
    step = _jit(method.step)
    L, R, h = np.zeros((4, 4)), np.zeros((3, 3)), np.zeros(3)
    hist = []
    for t in range(5):
        batch = _data(t)
        g = _mse_grad(params, batch)
        G, gb = np.asarray(g["w"]), np.asarray(g["b"])
        L, R, h = beta * L + G @ G.T, beta * R + G.T @ G, beta * h + gb**2
        hist.append((L, R, h))
        new, state, _ = step(params, batch, state)
        s = _direction(new, params, 0.1)
        Lf, Rf, hf = hist[k * (t // k)]  # the factors of the last refresh step
        np.testing.assert_allclose(s["w"], _inv_root(Lf, eps) @ G @ _inv_root(Rf, eps), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s["b"], gb / np.sqrt(hf + eps), rtol=1e-10, atol=1e-12)
        params = new


_RESHAPE_SHAPES = ((2, 3, 4), (3, 2, 2, 3), (1, 4, 3), (2, 1, 3, 1))


@_jit
def _shampoo_once(g, v):
    """One update + refresh of ``Shampoo(eps=1e-2)`` from zero factors, then ``M⁻¹ v`` at λ = 0."""
    pre = Shampoo(eps=1e-2, eigh_dtype="float64")
    state = pre.refresh(pre.update(pre.init(g), g))
    return pre.inverse(state, jnp.asarray(0.0))(v)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_shampoo_reshaping_rule_rank3_rank4(seed):
    """A rank-3/4 leaf is the matrix (Π shape[:-1], shape[-1]) after dropping unit axes (every
    shape of ``_RESHAPE_SHAPES`` is a leaf of one tree, so all examples share one compile)."""
    eps = 1e-2
    rng = np.random.default_rng(seed)
    g = {str(i): rng.normal(size=shape) for i, shape in enumerate(_RESHAPE_SHAPES)}
    v = {str(i): rng.normal(size=shape) for i, shape in enumerate(_RESHAPE_SHAPES)}
    got = _shampoo_once(jax.tree_util.tree_map(jnp.asarray, g), jax.tree_util.tree_map(jnp.asarray, v))
    for key, shape in zip(g, _RESHAPE_SHAPES):
        dims = [d for d in shape if d != 1]
        G = g[key].reshape(int(np.prod(dims[:-1])), dims[-1])
        V = v[key].reshape(G.shape)
        want = _inv_root(G @ G.T, eps) @ V @ _inv_root(G.T @ G, eps)
        np.testing.assert_allclose(np.asarray(got[key]), want.reshape(shape), rtol=1e-9, atol=1e-12)


def test_shampoo_vectors_and_large_dims_use_diagonal_rule():
    eps = 1e-2
    pre = Shampoo(eps=eps, max_dim=3, eigh_dtype="float64")
    rng = np.random.default_rng(0)
    g = {"v": rng.normal(size=(5,)), "s": np.asarray(1.5), "m": rng.normal(size=(4, 3))}
    v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=np.shape(a))), g)

    @_jit
    def once(g, v):
        return pre.inverse(pre.refresh(pre.update(pre.init(g), g)), jnp.asarray(0.0))(v)

    out = once(jax.tree_util.tree_map(jnp.asarray, g), v)
    np.testing.assert_allclose(out["v"], np.asarray(v["v"]) / np.sqrt(g["v"] ** 2 + eps), rtol=1e-12)
    np.testing.assert_allclose(out["s"], np.asarray(v["s"]) / np.sqrt(g["s"] ** 2 + eps), rtol=1e-12)
    G = g["m"]  # rows 4 > max_dim: diagonal left factor; cols 3: full right factor
    dl = (np.sum(G * G, axis=1) + eps) ** -0.25
    want = dl[:, None] * np.asarray(v["m"]) @ _inv_root(G.T @ G, eps)
    np.testing.assert_allclose(out["m"], want, rtol=1e-10)


def test_shampoo_blocks_large_sides_dense_oracle_per_block():
    """block_size=3: each block G_ij of the (merged) matrix is preconditioned on its own,
    (G_ij G_ijᵀ + εI)^{-1/4} V_ij (G_ijᵀ G_ij + εI)^{-1/4} (ragged last blocks); a side longer
    than max_dim stays unblocked and diagonal, per row block."""
    eps, bs = 1e-2, 3
    pre = Shampoo(eps=eps, max_dim=6, block_size=bs, eigh_dtype="float64")
    rng = np.random.default_rng(4)
    g = {"m": rng.normal(size=(6, 5)), "t": rng.normal(size=(2, 2, 4)), "wide": rng.normal(size=(5, 7))}
    v = {k: rng.normal(size=x.shape) for k, x in g.items()}
    assert pre.layouts(g)[0].describe() == "matrix 6x5 in 2x2 blocks of 3x3 (L full, R full)"
    assert pre.layouts(g)[1].describe() == "matrix 4x4 in 2x2 blocks of 3x3 (L full, R full)"
    assert pre.layouts(g)[2].describe() == "matrix 5x7 in 2x1 blocks of 3x7 (L full, R diag)"

    @_jit
    def once(g, v):
        return pre.inverse(pre.refresh(pre.update(pre.init(g), g)), jnp.asarray(0.0))(v)

    out = once(_dev(g), _dev(v))
    for k in g:
        G = g[k].reshape(-1, g[k].shape[-1])
        V = v[k].reshape(G.shape)
        want = np.zeros_like(G)
        col_step = bs if G.shape[1] <= 6 else G.shape[1]
        for i in range(0, G.shape[0], bs):
            for j in range(0, G.shape[1], col_step):
                Gb, Vb = G[i : i + bs, j : j + col_step], V[i : i + bs, j : j + col_step]
                if col_step == bs:
                    right = _inv_root(Gb.T @ Gb, eps)
                else:
                    right = np.diag((np.sum(Gb * Gb, axis=0) + eps) ** -0.25)
                want[i : i + bs, j : j + col_step] = _inv_root(Gb @ Gb.T, eps) @ Vb @ right
        np.testing.assert_allclose(np.asarray(out[k]).reshape(G.shape), want, rtol=1e-10, atol=1e-13)


_CACHED = Shampoo(eps=1e-2, max_dim=6, block_size=3, cache_roots=True, eigh_dtype="float64")


@_jit
def _cached_once(g, v, lam_refresh, lam_now):
    """One update + refresh at ``lam_refresh`` of the cached-roots Shampoo, then ``M⁻¹ v`` at ``lam_now``."""
    state = _CACHED.refresh(_CACHED.update(_CACHED.init(g), g), lam_refresh)
    return _CACHED.inverse(state, lam_now)(v)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), lam_refresh=st.floats(0.0, 2.0), lam_now=st.floats(0.0, 2.0))
def test_shampoo_cached_roots_dense_oracle(seed, lam_refresh, lam_now):
    """``cache_roots``: per block ``(L + (ε+λ_r)I)^{-1/4} V (R + (ε+λ_r)I)^{-1/4}`` with the refresh
    step's λ_r, whatever λ the step has; a diagonal side (longer than ``max_dim``) scales by
    ``(diag L + ε + λ)^{-1/4}`` with the step's λ; the diagonal rule of a vector likewise."""
    eps, bs = 1e-2, 3
    rng = np.random.default_rng(seed)
    g = {"m": rng.normal(size=(6, 5)), "wide": rng.normal(size=(5, 7)), "v": rng.normal(size=(4,))}
    v = {k: rng.normal(size=x.shape) for k, x in g.items()}
    assert _CACHED.refresh_uses_lam
    out = _cached_once(_dev(g), _dev(v), jnp.asarray(lam_refresh), jnp.asarray(lam_now))
    shift_r, shift = eps + lam_refresh, eps + lam_now
    want = np.zeros((6, 5))
    for i in range(0, 6, bs):
        for j in range(0, 5, bs):
            Gb, Vb = g["m"][i : i + bs, j : j + bs], v["m"][i : i + bs, j : j + bs]
            want[i : i + bs, j : j + bs] = _inv_root(Gb @ Gb.T, shift_r) @ Vb @ _inv_root(Gb.T @ Gb, shift_r)
    np.testing.assert_allclose(np.asarray(out["m"]), want, rtol=1e-9, atol=1e-12)
    want = np.zeros((5, 7))  # 7 > max_dim: a diagonal right side with the step's λ, rows in blocks of 3
    for i in range(0, 5, bs):
        Gb, Vb = g["wide"][i : i + bs], v["wide"][i : i + bs]
        want[i : i + bs] = _inv_root(Gb @ Gb.T, shift_r) @ Vb * (np.sum(Gb * Gb, axis=0) + shift) ** -0.25
    np.testing.assert_allclose(np.asarray(out["wide"]), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out["v"]), v["v"] / np.sqrt(g["v"] ** 2 + shift), rtol=1e-12)


def test_shampoo_factor_cadence_keeps_grafting_and_diagonal_every_step():
    """``factor_every_k=2``, refresh every step: the matrix roots come from the factors of steps
    0, 2, 4 only, while the bias's diagonal rule and the grafting moment fold in every step."""
    eps, beta, k = 1e-3, 0.9, 2
    pre = Shampoo(beta=beta, eps=eps, factor_every_k=k, eigh_dtype="float64")
    method = _shampoo_method(pre)
    params = _lin_params()
    state = _jit(method.init)(params)
    step = _jit(method.step)
    L, R, h = np.zeros((4, 4)), np.zeros((3, 3)), np.zeros(3)
    for t in range(5):
        batch = _data(10 + t)
        g = _mse_grad(params, batch)
        G, gb = np.asarray(g["w"]), np.asarray(g["b"])
        if t % k == 0:
            L, R = beta * L + G @ G.T, beta * R + G.T @ G
        h = beta * h + gb**2
        new, state, _ = step(params, batch, state)
        s = _direction(new, params, 0.1)
        np.testing.assert_allclose(s["w"], _inv_root(L, eps) @ G @ _inv_root(R, eps), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s["b"], gb / np.sqrt(h + eps), rtol=1e-10, atol=1e-12)
        params = new

    graft = Shampoo(factor_every_k=3, graft="rmsprop", graft_beta=0.5, eigh_dtype="float64")
    gs = [{"m": jnp.asarray(np.random.default_rng(i).normal(size=(3, 2)))} for i in range(3)]

    @_jit
    def three_updates(gs):
        state = graft.init(gs[0])
        for g in gs:
            state = graft.update(state, g)
        return state.graft["m"]

    nu = np.zeros((3, 2))
    for g in gs:
        nu = 0.5 * nu + 0.5 * np.asarray(g["m"]) ** 2
    np.testing.assert_allclose(np.asarray(three_updates(gs)), nu, rtol=1e-12)


def test_shampoo_preset_cached_roots_match_eigenbases():
    """The preset's default (cached roots, λ = 0) takes the same steps as the eigenbasis form."""
    rng = np.random.default_rng(5)
    params = {"w1": jnp.asarray(rng.normal(size=(5, 8)) * 0.5), "w2": jnp.asarray(rng.normal(size=(8, 3)) * 0.5)}
    batch = {"x": jnp.asarray(rng.normal(size=(16, 5))), "y": jnp.asarray(rng.integers(0, 3, 16))}

    def predict(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    @_jit
    def run(params):
        out = []
        for cached in (True, False):
            m = somax.make("shampoo", predict, cache_roots=cached, refresh_every_k=2, eigh_dtype="float64")
            p, s = params, m.init(params)
            for _ in range(4):
                p, s, _ = m.step(p, batch, s)
            out.append(p)
        return out

    cached, eig = run(params)
    for key in params:
        np.testing.assert_allclose(np.asarray(cached[key]), np.asarray(eig[key]), rtol=1e-10, atol=1e-12)


def test_shampoo_grafting_norms():
    """Per leaf ‖s‖ = ‖v / (√ν̂ + ε_g)‖ (adam: ν̂ bias-corrected; rmsprop: not)."""
    rng = np.random.default_rng(3)
    g = {"m": jnp.asarray(rng.normal(size=(4, 3))), "v": jnp.asarray(rng.normal(size=(3,)))}

    @_jit
    def both(g):
        out = {}
        for graft in ("adam", "rmsprop"):
            pre = Shampoo(graft=graft, graft_beta=0.9, graft_eps=1e-8, eigh_dtype="float64")
            out[graft] = pre.inverse(pre.refresh(pre.update(pre.init(g), g)), jnp.asarray(0.0))(g)
        return out

    outs = both(g)
    for graft, corr in (("adam", 1 - 0.9), ("rmsprop", 1.0)):
        out = outs[graft]
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


def _soap_reference(batches, w0, b0, lr, b1, b2, eps, f, eigenbasis="eigh"):
    """NumPy transcription of SOAP (Vyas et al. 2024, Alg. 3) for ``z = x W + b`` with MSE.

    Assumptions (stated in somax.precond.soap): ``Q_L = Q_R = I`` before the first basis
    computation; ``M`` kept in the original space and rotated every step; Adam's bias
    correction ``M̂ = M/(1−β₁ᵗ)``, ``V̂ = V/(1−β₂ᵗ)`` with ``ε`` added to ``√V̂``; the factors
    ``L, R`` (decay ``β₂``) and the basis are updated after the parameter step, the basis on
    steps ``t`` with ``(t−1) mod f = 0``; ``V`` is not re-projected when the basis changes;
    the bias vector ``b`` is not rotated (plain Adam). ``eigenbasis="power_qr"``: after the first
    ``eigh``, each basis computation is the reference code's ``get_orthogonal_matrix_QR`` (Alg. 4):
    columns sorted by ``diag(Qᵀ L Q)`` (decreasing), ``V``'s rows (columns for ``R``) permuted alike,
    ``Q = qr(L Q)``.
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
        if (t - 1) % f == 0 and (eigenbasis == "eigh" or t == 1):
            QL = np.linalg.eigh(L)[1][:, ::-1]
            QR = np.linalg.eigh(R)[1][:, ::-1]
        elif (t - 1) % f == 0:
            order = np.argsort(-np.diag(QL.T @ L @ QL), kind="stable")
            V, QL = V[order, :], np.linalg.qr(L @ QL[:, order])[0]
            order = np.argsort(-np.diag(QR.T @ R @ QR), kind="stable")
            V, QR = V[:, order], np.linalg.qr(R @ QR[:, order])[0]
    return W, b


@pytest.mark.parametrize("eigenbasis", ["eigh", "power_qr"])
def test_soap_matches_numpy_reference_10_steps(eigenbasis):
    lr, b1, b2, eps, f = 0.05, 0.9, 0.95, 1e-8, 3
    kwargs = {"b2": b2, "eps": eps, "refresh_every_k": f, "eigh_dtype": "float64", "eigenbasis": eigenbasis}
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
        precondition=PrecondSpec("soap", kwargs=kwargs),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=0.0),
        grad_tx=optax.ema(b1, debias=True),
        tx=optax.scale(-lr),
    )
    params = _lin_params()
    params = {"w": params["w"], "b": jnp.asarray(np.full((3,), 0.3))}
    batches = [_data(100 + t, n=5) for t in range(10)]
    state = _jit(method.init)(params)
    step = _jit(method.step)
    p = params
    for batch in batches:
        p, state, _ = step(p, batch, state)
    W, b = _soap_reference(batches, np.asarray(params["w"]), np.asarray(params["b"]), lr, b1, b2, eps, f, eigenbasis)
    np.testing.assert_allclose(np.asarray(p["w"]), W, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(p["b"]), b, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------ K-FAC


def _mlp(params, x):
    h = jax.nn.tanh(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"] + params["l1"]["b"]


def _mlp_setup(n, seed=0, d=(3, 4, 3)):
    rng = np.random.default_rng(seed)
    params = {
        "l0": {"w": rng.normal(size=(d[0], d[1])), "b": np.full((d[1],), 0.1)},
        "l1": {"w": rng.normal(size=(d[1], d[2])), "b": np.zeros((d[2],))},
    }
    batch = {"x": rng.normal(size=(n, d[0])), "y": rng.integers(0, d[2], size=(n,))}
    return params, batch


def _dev(tree):
    """NumPy leaves onto the device (a transfer; eager ``jnp`` arithmetic would compile a program per op)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _flat(tree) -> np.ndarray:
    """The leaves in ``ravel_pytree`` order, concatenated in NumPy."""
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


@_jit
def _kfac_run(params, batch):
    from somax.curvature import ggn_ce
    from somax.estimators.kronecker import KFACFactors

    lin = ggn_ce(predict_fn=_mlp).linearize(params, batch)
    return KFACFactors().estimate(lin, None, ())[0]["layers"]


def _kfac_stats(params, batch):
    return jax.tree_util.tree_map(np.asarray, _kfac_run(_dev(params), _dev(batch)))


@_jit
def _dense_ggn_ce(params, batch):
    """The dense GGN ``Σ_i J_iᵀ H_i J_i / n`` and the gradient ``Σ_i J_iᵀ (p_i − e_{y_i}) / n`` (flat)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    J = jax.jacfwd(lambda f: _mlp(unravel(f), batch["x"]))(flat)  # (n, C, d)
    p = jax.nn.softmax(_mlp(params, batch["x"]))
    n = p.shape[0]
    H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p) / n
    r = (p - jax.nn.one_hot(batch["y"], p.shape[-1], dtype=p.dtype)) / n
    return jnp.einsum("ncd,nce,nef->df", J, H, J), jnp.einsum("ncd,nc->d", J, r)


def _block_indices(params, layer):
    """Indices of [vec(W) row-major; b] of ``layer`` in ravel_pytree order, as the (d_in, d_out) matrix."""
    sizes = jax.tree_util.tree_map(np.size, params)
    offsets, start = {}, 0
    for path, size in jax.tree_util.tree_flatten_with_path(sizes)[0]:
        offsets[jax.tree_util.keystr(path)] = np.arange(start, start + size)
        start += size
    w = offsets[f"['{layer}']['w']"].reshape(params[layer]["w"].shape)
    return np.concatenate([w, offsets[f"['{layer}']['b']"][None]], 0).reshape(-1)


def test_kfac_blocks_equal_dense_ggn_blocks_batch_one():
    params, batch = _mlp_setup(1)
    stats = _kfac_stats(params, batch)
    G = np.asarray(_dense_ggn_ce(_dev(params), _dev(batch))[0])
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
    z = h @ W1 + np.asarray(params["l1"]["b"])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
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


@functools.partial(jax.jit, static_argnums=3)
def _kfac_random_draws(params, batch, keys, fisher):
    """``fisher`` ("mc" or "curvature_prop") factors for each key (vmapped), and the GGN rows' factors, at one
    linearization."""
    from somax.curvature import ggn_ce
    from somax.estimators.kronecker import KFACFactors

    lin = ggn_ce(predict_fn=_mlp).linearize(params, batch)
    est = KFACFactors(fisher=fisher)
    draws = jax.vmap(lambda k: est.estimate(lin, k, est.init(params))[0]["layers"])(keys)
    return draws, KFACFactors().estimate(lin, None, ())[0]["layers"]


@pytest.mark.parametrize("fisher", ["mc", "curvature_prop"])
def test_kfac_random_factors_are_unbiased_for_the_ggn_rows(fisher):
    """``fisher="mc"`` (labels drawn from the model) and ``"curvature_prop"`` (Rademacher combinations of
    the GGN rows): ``A`` equals the GGN-rows ``A``; the mean of ``S`` over 4,000 independent draws
    equals the GGN-rows ``S`` within 5 standard errors per entry (CE, hard labels). A 5σ bound fails
    a correct estimator with probability ≈ 6e-7 per entry, < 1e-4 for the 50 entries here
    (fixed seeds: the outcome is deterministic)."""
    params, batch = _mlp_setup(5, seed=2)
    keys = jax.random.split(jax.random.PRNGKey(11), 4000)
    draws, ggn = _kfac_random_draws(_dev(params), _dev(batch), keys, fisher)
    for name, (A, S) in ggn.items():
        A_mc, S_mc = np.asarray(draws[name].A), np.asarray(draws[name].S)
        np.testing.assert_allclose(A_mc, np.broadcast_to(np.asarray(A), A_mc.shape), rtol=1e-12, atol=1e-14)
        mean, se = S_mc.mean(0), S_mc.std(0, ddof=1) / np.sqrt(S_mc.shape[0])
        assert np.all(np.abs(mean - np.asarray(S)) <= 5 * se + 1e-12), (name, np.max(np.abs(mean - S) / (se + 1e-30)))
        assert np.max(se) > 0  # the draws differ


def test_kfac_ggn_rows_refuse_a_sequence_model_beyond_max_rows():
    """Sequence logits ``(b, T, C)``: ``T·(C − 1)`` GGN rows per example. Beyond ``max_rows`` the exact rows
    are refused with the count and the alternatives named; ``curvature_prop`` trains there."""
    params = {"w": jnp.ones((3, 5)) * 0.1}
    batch = {"x": jnp.ones((2, 7, 3)), "y": jnp.zeros((2, 7), jnp.int32)}

    def seq(p, x):
        return x @ p["w"]

    method = somax.make("kfac", seq, max_rows=27)  # 7 positions x 4 rows = 28
    with pytest.raises(ValueError, match="28 rows per example.*curvature_prop"):
        jax.eval_shape(method.step, params, batch, method.init(params))  # refused at the first trace
    ok = somax.make("kfac", seq, max_rows=28)
    jax.eval_shape(ok.step, params, batch, ok.init(params))
    cp = somax.make("kfac", seq, fisher="curvature_prop", max_rows=1)
    _, _, info = _jit(cp.step)(params, batch, cp.init(params), jax.random.PRNGKey(0))
    assert bool(info["finite"])


def test_kfac_mc_fisher_needs_an_rng_and_a_sampler():
    """The preset with ``fisher="mc"`` asks for an rng at the step, trains with one, and a fresh draw is
    made every step even with the same key (the estimator counts its evaluations)."""
    method = somax.make("kfac", _mlp, fisher="mc", lam0=0.1, learning_rate=0.1)
    assert "estimator" in method.plan.needs_rng
    params, batch = _mlp_setup(6, seed=3)
    params, batch = _dev(params), _dev(batch)
    state = method.init(params)
    with pytest.raises(ValueError, match="rng=None"):
        method.step(params, batch, state)
    step = _jit(method.step)
    key = jax.random.PRNGKey(0)
    p1, s1, _ = step(params, batch, state, key)
    _, s2, _ = step(p1, batch, s1, key)
    assert int(s2.estimator.refreshes) == 2
    assert np.all(np.isfinite(_flat(p1)))


@pytest.mark.parametrize("damping", ["eigen", "pi", "pi_cached"])
def test_kfac_single_dense_mse_equals_dense_damped_solve(damping):
    """z = x W + b with MSE: G = A ⊗ I exactly; eigen-damping gives (G + λI)⁻¹ g; π-damping,
    here with ``damping_scale = 2`` (μ = 2λ), gives (A + π√μ I)⁻¹ ⊗ (I + √μ/π I)⁻¹ g, from the
    eigenbases or from the cached inverses (``cache_inverse``)."""
    lam = 0.3
    scale = 1.0 if damping == "eigen" else 2.0
    kw = {"eps": 0.0, "damping": damping[:2] if damping == "pi_cached" else damping, "eigh_dtype": "float64",
          "damping_scale": scale, "cache_inverse": damping == "pi_cached"}  # fmt: skip
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _linear_model}),
        precondition=PrecondSpec("kfac", kwargs=kw),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=lam),
        tx=optax.scale(-1.0),
    )
    params, batch = _lin_params(), _data(5, n=9)
    new, _, _ = _jit(method.step)(params, batch, _jit(method.init)(params))
    d = _direction(new, params, 1.0)
    s = np.concatenate([d["w"], d["b"][None]], 0)
    g = _mse_grad(params, batch)
    gm = np.concatenate([np.asarray(g["w"]), np.asarray(g["b"])[None]], 0)
    x = np.concatenate([np.asarray(batch["x"]), np.ones((9, 1))], 1)
    A = x.T @ x / 9
    if damping == "eigen":
        G = np.kron(A, np.eye(3))
        want = np.linalg.solve(G + lam * np.eye(G.shape[0]), gm.ravel()).reshape(gm.shape)
    else:
        pi, mu = np.sqrt(np.trace(A) / A.shape[0]), scale * lam
        want = np.linalg.solve(A + pi * np.sqrt(mu) * np.eye(5), gm) / (1 + np.sqrt(mu) / pi)
    np.testing.assert_allclose(s, want, rtol=1e-10, atol=1e-12)


def test_kfac_cached_inverses_use_the_refresh_lambda():
    """``cache_inverse``: the Kronecker block applies ``(A + π√μ_r I)⁻¹ V (S + √μ_r/π I)⁻¹`` with the
    ``λ_r`` of the last refresh, whatever ``λ`` the step has; the diagonal fallback uses the step's ``λ``;
    ``refresh_uses_lam`` is declared only in that mode; eigen-damping with it is refused."""
    from somax.estimators.kronecker import LayerFactors
    from somax.precond.kfac import KFAC

    rng = np.random.default_rng(5)
    params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))}, "scale": jnp.zeros((2,))}
    xa, xs = rng.normal(size=(7, 5)), rng.normal(size=(6, 3))
    A, S = xa.T @ xa / 7, xs.T @ xs / 6
    diag = {"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)}, "scale": np.array([0.5, 2.0])}
    stat = {"layers": {"['dense']['kernel']": LayerFactors(jnp.asarray(A), jnp.asarray(S))},
            "diagonal": jax.tree_util.tree_map(jnp.asarray, diag)}  # fmt: skip
    pre = KFAC(damping="pi", cache_inverse=True, beta=0.0, eps=0.0, eigh_dtype="float64", damping_scale=2.0)
    assert pre.refresh_uses_lam and not KFAC(damping="pi").refresh_uses_lam
    lam_r, lam_now = 0.3, 7.0
    state = pre.refresh(pre.update(pre.init(params), stat), jnp.asarray(lam_r))
    v = {"dense": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)}, "scale": rng.normal(size=2)}
    out = pre.inverse(state, jnp.asarray(lam_now))(jax.tree_util.tree_map(jnp.asarray, v))
    mu, pi = 2.0 * lam_r, np.sqrt((np.trace(A) / 5) / (np.trace(S) / 3))
    vm = np.concatenate([v["dense"]["kernel"], v["dense"]["bias"][None]], 0)
    want = np.linalg.solve(A + pi * np.sqrt(mu) * np.eye(5), vm) @ np.linalg.inv(S + np.sqrt(mu) / pi * np.eye(3))
    np.testing.assert_allclose(out["dense"]["kernel"], want[:4], rtol=1e-10)
    np.testing.assert_allclose(out["dense"]["bias"], want[4], rtol=1e-10)
    np.testing.assert_allclose(out["scale"], v["scale"] / (diag["scale"] + 2.0 * lam_now), rtol=1e-12)
    with pytest.raises(ValueError, match="cache_inverse=True needs damping='pi'"):
        KFAC(cache_inverse=True)


def test_kfac_cached_inverse_of_an_indefinite_factor_falls_back_to_the_clipped_eigenbasis():
    """A factor with an eigenvalue below ``−shift`` (rounding of a large EMA): Cholesky fails, and the
    cached inverse is ``Q diag(1/(max(λ, 0) + shift)) Qᵀ``, finite."""
    from somax.precond.kfac import _damped_inverse

    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    lam = np.array([-1e-2, 0.0, 1.0, 3.0])
    mat, shift = (q * lam) @ q.T, 1e-3
    got = np.asarray(_jit(lambda m, c: _damped_inverse(m, c, "float64"))(jnp.asarray(mat), jnp.asarray(shift)))
    np.testing.assert_allclose(got, (q / (np.maximum(lam, 0) + shift)) @ q.T, rtol=1e-9)
    pd = (q * np.abs(lam)) @ q.T
    got = np.asarray(_jit(lambda m, c: _damped_inverse(m, c, "float64"))(jnp.asarray(pd), jnp.asarray(shift)))
    np.testing.assert_allclose(got, np.linalg.inv(pd + shift * np.eye(4)), rtol=1e-9)


def _cg_iterations(A: np.ndarray, b: np.ndarray, tol: float, maxiter: int) -> int:
    """Textbook CG on ``A s = b`` from ``s = 0`` with somax's stopping rule ``‖r‖ ≤ tol‖b‖``: iterations."""
    s, r = np.zeros_like(b), b.copy()
    p, rr = r.copy(), r @ r
    for i in range(maxiter):
        if np.sqrt(rr) <= tol * np.linalg.norm(b):
            return i
        ap = A @ p
        alpha = rr / (p @ ap)
        s, r = s + alpha * p, r - alpha * ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    return maxiter


def test_kfac_pcg_fewer_iterations_same_direction():
    """Ill-conditioned inputs: PCG with K-FAC reaches the damped GGN direction (the dense solve)
    in fewer iterations than plain CG needs on the same system with the same stopping rule."""
    params, batch = _mlp_setup(32, seed=2, d=(4, 5, 3))
    params = _dev({**params, "l0": {**params["l0"], "w": 0.1 * params["l0"]["w"]}})  # tanh near-linear
    batch = _dev({**batch, "x": batch["x"] * np.asarray([1.0, 20.0, 0.05, 3.0])})  # input scales: A ill-conditioned
    lam, tol = 1e-4, 1e-10
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": _mlp}),
        solver=SolverSpec("cg", kwargs={"maxiter": 300, "tol": tol, "warm_start": False}),
        precondition=PrecondSpec("kfac", kwargs={"eigh_dtype": "float64"}),
        damping=DampingSpec("constant", lam0=lam),
    )
    new, _, info = _jit(method.step)(params, batch, _jit(method.init)(params))
    s = _flat(params) - _flat(new)
    G, g = (np.asarray(a) for a in _dense_ggn_ce(params, batch))
    A = G + lam * np.eye(G.shape[0])
    np.testing.assert_allclose(s, np.linalg.solve(A, g), rtol=1e-6, atol=1e-8)
    plain = _cg_iterations(A, g, tol, 300)
    assert int(info["cg_iters"]) < plain, (int(info["cg_iters"]), plain)


def test_kfac_describe_assignment():
    params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros((4,))}, "scale": jnp.zeros((4,))}
    text = somax.precond.KFAC().describe(
        params, lambda p, x: (x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["scale"], jnp.zeros((2, 3))
    )
    assert "['dense']['kernel']  kfac A 4x4 ⊗ S 4x4" in text and "['scale']  diagonal" in text


def test_kfac_rejected_step_keeps_statistics_nonfinite_step_rolls_back():
    """The preconditioner contract: after a step the damping rejects (``on_reject = "keep"``) the
    factors hold the step's statistic, ``(1 − β)·A_t`` from zero; after a non-finite step
    (``on_nonfinite = "rollback"``) they are exactly the state before the step."""
    params, batch = _mlp_setup(7, seed=1)
    beta = 0.95
    # learning rate −1: an ascent step, which the trust region rejects (ρ < 0)
    method = somax.make("kfac", _mlp, damping="trust_region", lam0=1e-3, learning_rate=-1.0, beta=beta,
                        eigh_dtype="float64")  # fmt: skip
    step = _jit(method.step)
    p, b = _dev(params), _dev(batch)
    state = _jit(method.init)(p)
    new, after, info = step(p, b, state)
    assert not bool(info["step_accepted"])
    np.testing.assert_array_equal(_flat(new), _flat(p))
    stats = _kfac_stats(params, batch)
    for blk in after.precond.blocks:
        want = [f for f in stats.values() if f[0].shape == blk["A"].shape and f[1].shape == blk["S"].shape]
        assert len(want) == 1
        np.testing.assert_allclose(np.asarray(blk["A"]), (1 - beta) * want[0][0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(np.asarray(blk["S"]), (1 - beta) * want[0][1], rtol=1e-12, atol=1e-15)
    bad = _dev({**batch, "x": np.where(np.arange(batch["x"].size).reshape(batch["x"].shape) == 0, np.nan, batch["x"])})
    _, rolled, info = step(p, bad, state)
    assert not bool(info["step_accepted"]) and int(rolled.nonfinite_count) == 1
    for x, y in zip(jax.tree_util.tree_leaves(rolled.precond), jax.tree_util.tree_leaves(state.precond), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
