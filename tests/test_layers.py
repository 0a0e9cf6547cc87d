"""Layer discovery (kinds, dims, conv geometry) and per-example ``a``/``δ`` against float64 oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from somax.curvature import LayerMap, discover_layers, layer_inputs_and_output_grads
from somax.curvature.layers import LAYER_KINDS

nn = pytest.importorskip("flax.linen")

F64 = jnp.float64


def _normal(key, shape, scale=1.0):  # numpy draws: no per-shape compiles of eager jax.random
    return jnp.asarray(scale * np.random.default_rng(key).standard_normal(shape))


def _mlp_params(sizes, key=0):
    rng = np.random.default_rng(key)
    return {
        f"l{i}": {"w": jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(n)),
                  "b": jnp.asarray(0.1 * rng.standard_normal(k))}
        for i, (n, k) in enumerate(zip(sizes[:-1], sizes[1:]))
    }  # fmt: skip


def _linen(module, x):
    """``(predict, params)`` of a Flax module, params drawn with numpy at the shapes of ``init``."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    params = treedef.unflatten([0.5 * _normal(k, a.shape) for k, a in enumerate(leaves)])
    return (lambda p, x: module.apply({"params": p}, x)), params


def _mlp(p, x):
    n = len(p)
    for i in range(n):
        x = x @ p[f"l{i}"]["w"] + p[f"l{i}"]["b"]
        x = jnp.tanh(x) if i < n - 1 else x
    return x


def _check_gradient_identity(predict, params, x, cot):
    """``Σ aᵀδ`` of every dense/conv kernel (bias in the last row) equals ``∇ Σ u·f``."""
    layers = discover_layers(predict, params, x)

    def run(params, x, cot):  # one compile: the interpreted pass (and any eager op) is slow op by op
        res = layer_inputs_and_output_grads(predict, params, x, cot, layers)
        z, vjp = jax.vjp(lambda p: predict(p, x), params)
        if cot.ndim == z.ndim:  # one cotangent per example
            grad = jax.tree_util.tree_leaves(vjp(cot)[0])
        else:  # rows: Σ over rows of the per-row gradients
            grad = [g.sum(0) for g in jax.tree_util.tree_leaves(jax.vmap(lambda u: vjp(u)[0], in_axes=1)(cot))]

        out = {}
        for name, (a, delta) in res.items():
            layer = layers[name]
            mat = jnp.einsum("ntk,n...to->ko", a, delta, precision=jax.lax.Precision.HIGHEST)
            if layer.direct:
                out[name] = layer.unmatrix(mat, params_leaves[layer.leaf].shape)
            else:  # the models below use one kernel as ``x @ W.T``: (n_in, n_out) is Wᵀ
                out[name] = mat[: layer.n_in].T, None
        return res, out, grad

    params_leaves = jax.tree_util.tree_leaves(params)
    res, out, grad = jax.jit(run)(params, x, cot)
    assert set(res) == {n for n, layer in layers.items() if layer.kind in ("dense", "conv")}
    for name, (a, delta) in res.items():
        layer, (kernel, bias) = layers[name], out[name]
        n, t = a.shape[:2]
        assert a.shape == (n, t, layer.d_in) and delta.shape[-2:] == (t, layer.d_out)
        scale = float(np.max(np.abs(grad[layer.leaf])))
        np.testing.assert_allclose(kernel, grad[layer.leaf], rtol=0, atol=1e-12 * scale, err_msg=name)
        if layer.bias is not None:
            assert np.all(np.asarray(a)[..., -1] == 1)
            expected = np.asarray(grad[layer.bias_leaf]).reshape(-1)
            np.testing.assert_allclose(bias, expected, rtol=0, atol=1e-12 * scale, err_msg=layer.bias)
    return layers, res


def test_jnp_mlp_kinds_dims_and_table():
    params = _mlp_params((3, 5, 2))
    layers = discover_layers(_mlp, params, _normal(1, (4, 3)))
    assert isinstance(layers, LayerMap) and set(layers.kinds().values()) <= set(LAYER_KINDS)
    assert layers.kinds() == {
        "['l0']['b']": "bias", "['l0']['w']": "dense", "['l1']['b']": "bias", "['l1']['w']": "dense",
    }  # fmt: skip
    w0 = layers["['l0']['w']"]
    assert (w0.n_in, w0.d_in, w0.d_out, w0.positions, w0.bias, w0.direct) == (3, 4, 5, 1, "['l0']['b']", True)
    assert layers["['l0']['b']"].kernel == "['l0']['w']"
    w = params["l0"]["w"]
    np.testing.assert_array_equal(w0.kernel_matrix(w), w)
    text = str(layers)
    assert "['l1']['w']  dense d_in=6 d_out=2 positions=1 bias=['l1']['b']" in text
    assert "bias of ['l0']['w']" in text
    with pytest.raises(KeyError):
        layers["nope"]


def test_linen_mlp_with_layernorm_kinds():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(param_dtype=F64)(nn.Dense(4, param_dtype=F64)(x))
            return nn.DenseGeneral(2, param_dtype=F64)(nn.tanh(h))

    x = _normal(1, (3, 5))
    predict, params = _linen(Net(), x)
    layers = discover_layers(predict, params, x)
    assert layers.kinds() == {
        "['DenseGeneral_0']['bias']": "bias", "['DenseGeneral_0']['kernel']": "dense",
        "['Dense_0']['bias']": "bias", "['Dense_0']['kernel']": "dense",
        "['LayerNorm_0']['bias']": "other",  # a shift of the normalised value, not of a product
        "['LayerNorm_0']['scale']": "scale",
    }  # fmt: skip
    assert (layers["['Dense_0']['kernel']"].d_in, layers["['Dense_0']['kernel']"].d_out) == (6, 4)


def test_flax_conv_kinds_geometry_and_im2col_gradient():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME", param_dtype=F64)(x)
            x = nn.Conv(2, (2, 2), kernel_dilation=(2, 1), padding="VALID", use_bias=False, param_dtype=F64)(
                jnp.tanh(x)
            )
            return nn.Dense(3, param_dtype=F64)(x.reshape(x.shape[0], -1))

    x = _normal(1, (3, 8, 8, 2))
    predict, params = _linen(Net(), x)
    layers, res = _check_gradient_identity(predict, params, x, _normal(2, (3, 3)))
    assert layers.kinds() == {
        "['Conv_0']['bias']": "bias", "['Conv_0']['kernel']": "conv", "['Conv_1']['kernel']": "conv",
        "['Dense_0']['bias']": "bias", "['Dense_0']['kernel']": "dense",
    }  # fmt: skip
    c0, c1 = layers["['Conv_0']['kernel']"], layers["['Conv_1']['kernel']"]
    assert (c0.n_in, c0.d_in, c0.d_out, c0.positions) == (2 * 9, 2 * 9 + 1, 3, 16)
    assert c0.conv.kernel_shape == (3, 3) and c0.conv.strides == (2, 2) and c0.conv.padding == ((0, 1), (0, 1))
    assert c1.bias is None and c1.conv.rhs_dilation == (2, 1) and c1.conv.out_spatial == (2, 3)
    assert res["['Conv_1']['kernel']"][0].shape == (3, 6, 3 * 4)
    # im2col layout: column (c_in, dy, dx) of pixel (oy, ox) is the padded input at (2 oy + dy, 2 ox + dx, c_in)
    a0 = np.asarray(res["['Conv_0']['kernel']"][0])
    xp = np.pad(np.asarray(x), ((0, 0), (0, 1), (0, 1), (0, 0)))
    patch = xp[:, 2:5, 4:7, :].transpose(0, 3, 1, 2).reshape(3, -1)  # pixel (1, 2) = row 1·4 + 2
    np.testing.assert_array_equal(a0[:, 6, :-1], patch)


def test_embedding_and_other_kinds():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(2, param_dtype=F64)(nn.Embed(7, 3, param_dtype=F64)(ids))

    ids = jnp.array([[1, 2, 3, 4], [0, 6, 5, 1]])
    predict, params = _linen(Net(), ids)
    layers = discover_layers(predict, params, ids)
    assert layers["['Embed_0']['embedding']"].kind == "embedding"
    dense = layers["['Dense_0']['kernel']"]
    assert (dense.kind, dense.positions, dense.bias) == ("dense", 4, "['Dense_0']['bias']")

    @jax.custom_jvp
    def custom(h, w):
        return h @ w

    custom.defjvp(lambda pr, tg: (pr[0] @ pr[1], tg[0] @ pr[1] + pr[0] @ tg[1]))

    def predict(p, x):
        h = p["table"][x[:, 0]] * p["s"]  # a jnp row lookup, then a scale
        h = jnp.tanh(h @ p["tied"]) @ p["tied"].T  # used twice
        return custom(h, p["w_custom"]) + jnp.einsum("ij,j->i", h, p["v"])[:, None]

    p = {"table": _normal(0, (5, 3)), "s": _normal(1, (3,)), "tied": _normal(2, (3, 3)),
         "w_custom": _normal(3, (3, 2)), "v": _normal(4, (3,)), "unused": _normal(5, (2,))}  # fmt: skip
    kinds = discover_layers(predict, p, jnp.array([[0], [3]])).kinds()
    assert kinds == {
        "['s']": "scale", "['table']": "embedding", "['tied']": "other", "['unused']": "unused",
        "['v']": "dense", "['w_custom']": "other",
    }  # fmt: skip


def test_sum_a_delta_is_the_gradient_with_rows_positions_and_transposed_kernels():
    """Cotangents with a rows axis; a sequence model (positions, a broadcast bias, a kernel as
    the lhs operand, a transposed kernel)."""
    params = _mlp_params((3, 4, 2))
    x = _normal(1, (5, 3))
    _check_gradient_identity(_mlp, params, x, _normal(2, (5, 3, 2)))

    p = {"w1": _normal(3, (2, 4)), "b1": _normal(4, (4,)), "w2": _normal(5, (3, 4)), "w3": _normal(6, (3, 3))}

    def seq(p, x):  # x: (n, T, 2)
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(jax.lax.dot_general(p["w2"], h, (((1,), (2,)), ((), ()))).transpose(1, 2, 0))  # kernel as lhs
        return h @ p["w3"].T  # transposed

    layers, res = _check_gradient_identity(seq, p, _normal(7, (4, 5, 2)), _normal(8, (4, 5, 3)))
    assert {n: (layer.positions, layer.bias) for n, layer in layers.items() if layer.kind == "dense"} == {
        "['w1']": (5, "['b1']"), "['w2']": (5, None), "['w3']": (5, None),
    }  # fmt: skip
    assert layers["['w2']"].kernel_operand == 0 and not layers["['w3']"].direct
    with pytest.raises(ValueError, match="used as is"):
        layers["['w3']"].kernel_matrix(p["w3"])


def test_delta_is_the_vjp_at_the_layer_output_of_a_two_layer_mlp():
    """By hand: ``z = tanh(x W1 + b1) W2 + b2``: ``δ2 = u``, ``δ1 = (u W2ᵀ) ⊙ (1 − h²)``,
    ``a1 = [x, 1]``, ``a2 = [h, 1]``."""
    params = _mlp_params((3, 4, 2))
    x, u = _normal(1, (6, 3)), _normal(2, (6, 2))
    w1, b1, w2, b2 = params["l0"]["w"], params["l0"]["b"], params["l1"]["w"], params["l1"]["b"]

    @jax.jit
    def run(params, x, u):
        y1 = x @ w1 + b1
        _, vjp_y1 = jax.vjp(lambda y: jnp.tanh(y) @ w2 + b2, y1)  # the vjp at layer 1's output, by hand
        return layer_inputs_and_output_grads(_mlp, params, x, u), vjp_y1(u)[0]

    res, vjp_delta1 = run(params, x, u)
    (a1, d1), (a2, d2) = res["['l0']['w']"], res["['l1']['w']"]
    x, u, w1, b1, w2 = (np.asarray(v) for v in (x, u, w1, b1, w2))
    h = np.tanh(x @ w1 + b1)
    ones = np.ones((6, 1))
    np.testing.assert_allclose(a1[:, 0], np.concatenate([x, ones], 1), rtol=0, atol=1e-15)
    np.testing.assert_allclose(a2[:, 0], np.concatenate([h, ones], 1), rtol=0, atol=1e-15)
    np.testing.assert_allclose(d2[:, 0], u, rtol=0, atol=1e-15)
    np.testing.assert_allclose(d1[:, 0], vjp_delta1, rtol=0, atol=1e-14)
    np.testing.assert_allclose(d1[:, 0], (u @ w2.T) * (1 - h**2), rtol=0, atol=1e-14)
    only = jax.eval_shape(lambda: layer_inputs_and_output_grads(_mlp, params, x, u, ["['l1']['w']"]))
    assert list(only) == ["['l1']['w']"] and only["['l1']['w']"][1].shape == (6, 1, 2)
    with pytest.raises(ValueError, match="bias, not a dense/conv kernel"):
        layer_inputs_and_output_grads(_mlp, params, x, u, ["['l1']['b']"])
    with pytest.raises(ValueError, match="cotangents of shape"):
        layer_inputs_and_output_grads(_mlp, params, x, u[:, :1])


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    n=st.integers(1, 4),
    rows=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_sum_a_delta_is_the_gradient_property(widths, n, rows, seed):
    params = _mlp_params(tuple(widths), key=seed)
    x = _normal(seed + 1, (n, widths[0]))
    cot = _normal(seed + 2, (n, widths[-1]) if rows == 0 else (n, rows, widths[-1]))
    _check_gradient_identity(_mlp, params, x, cot)
