"""Curvature matvecs, gradients and losses against materialised float64 matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from oracles import (
    classification_batch,
    dense_ggn,
    dense_grad,
    dense_hessian,
    flat,
    output_loss_fn,
    regression_batch,
    tiny_mlp,
)

from somax.curvature import SoftmaxCELoss, ggn_ce, ggn_mse, hessian


def _probe(params, key=7):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


CASES = [
    ("mse_vector", "mse", lambda: regression_batch(d_out=2), (3, 5, 2)),
    ("mse_scalar", "mse", lambda: regression_batch(d_out=1), (3, 5, 1)),
    ("ce_int", "ce", lambda: classification_batch(c=4), (3, 5, 4)),
    ("ce_onehot", "ce", lambda: classification_batch(c=4, one_hot=True), (3, 5, 4)),
]


@pytest.mark.parametrize("name,loss,make_batch,sizes", CASES, ids=[c[0] for c in CASES])
def test_ggn_matvec_grad_loss_match_dense(name, loss, make_batch, sizes):
    params, predict = tiny_mlp(sizes=sizes)
    batch = make_batch()
    curv = (ggn_mse if loss == "mse" else ggn_ce)(predict_fn=predict)
    lin = curv.linearize(params, batch)
    G = dense_ggn(predict, params, batch, loss)
    v = _probe(params)
    np.testing.assert_allclose(flat(lin.matvec(v)), G @ flat(v), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(lin.quad(v)), flat(v) @ G @ flat(v), rtol=1e-10)
    lf = output_loss_fn(predict, loss)
    np.testing.assert_allclose(flat(lin.grad), dense_grad(lf, params, batch), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(lin.loss), float(lf(params, batch)), rtol=1e-12)
    np.testing.assert_allclose(float(lin.loss_at(params)), float(lin.loss), rtol=1e-12)


def test_mse_normalisation_is_shared():
    """Loss, gradient and GGN of vector-output MSE share 1/(2b) Σ‖z−y‖² (so H_z = I/b)."""
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batch = regression_batch(b=6, d_out=2)
    lin = ggn_mse(predict_fn=predict).linearize(params, batch)
    z = predict(params, batch["x"])
    expected = 0.5 * np.sum((np.asarray(z) - np.asarray(batch["y"])) ** 2) / 6
    np.testing.assert_allclose(float(lin.loss), expected, rtol=1e-12)
    # for a linear-in-output loss the GGN equals the Hessian of the loss in the last layer's bias
    H = dense_hessian(output_loss_fn(predict, "mse"), params, batch)
    G = dense_ggn(predict, params, batch, "mse")
    marker = jax.tree_util.tree_map(jnp.zeros_like, params)
    marker["layer1"]["b"] = jnp.ones(2)
    idx = np.flatnonzero(flat(marker))  # entries of the last layer's bias
    idx = np.ix_(idx, idx)
    np.testing.assert_allclose(G[idx], H[idx], rtol=1e-10)
    np.testing.assert_allclose(np.diag(G[idx]), np.ones(2), rtol=1e-10)


def test_ce_sequence_logits():
    """Logits (B, T, C) with integer labels (B, T): GGN matches the dense oracle, mean over B·T."""

    def predict(p, x):
        return jnp.einsum("btd,dc->btc", jnp.tanh(x @ p["w1"]), p["w2"])

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k[0], (3, 4)), "w2": jax.random.normal(k[1], (4, 5))}
    batch = {"x": jax.random.normal(k[2], (2, 3, 3)), "y": jax.random.randint(k[3], (2, 3), 0, 5)}
    v = _probe(params)

    @jax.jit  # one program (eager dispatch of the Jacobian and Hessian dominated this test)
    def sides(params, batch, v):
        lin = ggn_ce(predict_fn=predict).linearize(params, batch)
        w, unravel = ravel_pytree(params)
        zf = lambda ww: predict(unravel(ww), batch["x"])  # noqa: E731
        J = jax.jacfwd(lambda ww: zf(ww).reshape(-1))(w)
        z = zf(w)
        Hz = jax.hessian(lambda zz: SoftmaxCELoss().value(zz.reshape(z.shape), batch["y"]))(z.reshape(-1))
        return lin.matvec(v), J.T @ Hz @ J @ ravel_pytree(v)[0], lin.loss, jax.nn.log_softmax(z)

    hv, gv, loss, logp = sides(params, batch, v)
    np.testing.assert_allclose(flat(hv), np.asarray(gv), rtol=1e-10, atol=1e-12)
    expected = -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(batch["y"])[..., None], -1))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


@pytest.mark.parametrize("hvp", ["linearize", "jvp"])
@pytest.mark.parametrize("form", ["loss_fn", "predict_fn+loss"])
def test_hessian_matvec_matches_dense(form, hvp):
    params, predict = tiny_mlp(sizes=(3, 4, 2))
    batch = regression_batch(d_out=2)
    lf = output_loss_fn(predict, "mse")
    curv = hessian(loss_fn=lf, hvp=hvp) if form == "loss_fn" else hessian(predict_fn=predict, loss="mse", hvp=hvp)
    lin = curv.linearize(params, batch)
    H = dense_hessian(lf, params, batch)
    v = _probe(params)
    np.testing.assert_allclose(flat(lin.matvec(v)), H @ flat(v), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(lin.quad(v)), flat(v) @ H @ flat(v), rtol=1e-10)
    np.testing.assert_allclose(flat(lin.grad), dense_grad(lf, params, batch), rtol=1e-10)
    # the Hessian of this tanh MLP is indefinite: exercise of the negative-curvature path below
    assert np.linalg.eigvalsh(H).min() < 0


def test_hessian_hvp_form_is_checked():
    with pytest.raises(ValueError, match="hvp"):
        hessian(loss_fn=lambda p, b: 0.0, hvp="reverse")


def test_bad_batch_and_targets_are_named():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    curv = ggn_mse(predict_fn=predict)
    with pytest.raises(KeyError, match="'x'"):
        curv.linearize(params, {"inputs": jnp.ones((4, 3)), "y": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match=r"targets y of shape \(4, 3\)"):
        curv.linearize(params, {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 3))})
    ce = ggn_ce(predict_fn=predict)
    with pytest.raises(ValueError, match="integer labels"):
        ce.linearize(params, {"x": jnp.ones((4, 3)), "y": jnp.zeros((5,), jnp.int32)})
    custom = ggn_mse(predict_fn=predict, x_key="inputs", y_key="targets")
    lin = custom.linearize(params, {"inputs": jnp.ones((4, 3)), "targets": jnp.ones((4, 2))})
    assert np.isfinite(float(lin.loss))
    with pytest.raises(TypeError, match="hessian"):
        hessian(predict_fn=predict)


@settings(max_examples=12, deadline=None)
@given(labels=st.lists(st.integers(-2, 5), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_ce_integer_labels_equal_their_one_hot_rows(labels, seed):
    """Integer labels (their mass read off the integers) and their one-hot rows (mass summed) give the
    same loss, gradient, ``H_z`` products and row factor in float64, a label outside ``[0, C)`` included
    (its one-hot row is zero: the position has mass 0)."""
    c = 4
    y = jnp.asarray(labels, jnp.int32)
    rs = np.random.default_rng(seed)
    z = jnp.asarray(rs.standard_normal((len(labels), c)) * 3)
    v = jnp.asarray(rs.standard_normal(z.shape))
    r = jnp.asarray(rs.standard_normal((len(labels), c - 1)))
    onehot = jax.nn.one_hot(y, c, dtype=z.dtype)  # zero rows for -2, -1, 4, 5
    loss = SoftmaxCELoss()
    a, b = loss.prepare(z, y), loss.prepare(z, onehot)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(a.grad, b.grad, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(a.hvp(v), b.hvp(v), rtol=1e-14, atol=1e-15)
    fa, fb = loss.row_factor(z, y), loss.row_factor(z, onehot)
    np.testing.assert_allclose(fa.residual, fb.residual, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(fa.apply(v), fb.apply(v), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(fa.apply_t(r), fb.apply_t(r), rtol=1e-14, atol=1e-15)
    in_range = (np.asarray(labels) >= 0) & (np.asarray(labels) < c)
    np.testing.assert_array_equal(np.asarray(loss.labels(z, y)[1][:, 0]), in_range.astype(float))
