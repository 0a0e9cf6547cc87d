"""Structured row Gram (dense kernels by ``(a_i·a_j)(δ_ic·δ_jd)``) against the dense float64 ``Ĵ Ĵᵀ``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from oracles import classification_batch, damped_solve, flat, output_loss_fn, regression_batch, tiny_mlp

import somax
from somax.curvature import ggn_ce, ggn_mse
from somax.curvature.losses import SoftmaxCELoss
from somax.curvature.rows import row_operator
from somax.curvature.structured_gram import GRAM_MODES, gram_plan
from somax.models import cnn_apply, cnn_init
from somax.specs import CurvatureSpec, DampingSpec, SolverSpec

F64 = jnp.float64


@jax.custom_jvp
def _custom_dense(h, w):
    return h @ w


@_custom_dense.defjvp
def _custom_dense_jvp(primals, tangents):
    (h, w), (dh, dw) = primals, tangents
    return h @ w, dh @ w + h @ dw


@jax.jit
def _jitted_layer(h, w):
    return jax.nn.relu(h @ w)


def _mixed_params():
    shapes = {
        "w_in": (3, 5), "b": (5,), "w_t": (6, 5), "w_lhs": (4, 6), "w_jit": (4, 4), "tied": (4, 4),
        "w_custom": (4, 4), "scale": (4,), "w_out": (4, 3), "unused": (2,),
    }  # fmt: skip
    keys = jax.random.split(jax.random.PRNGKey(5), len(shapes))
    return {k: 0.7 * jax.random.normal(key, s, F64) for key, (k, s) in zip(keys, shapes.items())}


def _mixed_predict(p, x):
    """Kernels used plainly, transposed, as the lhs, inside ``jit``, twice, inside ``custom_jvp``."""
    h = jnp.tanh(x @ p["w_in"] + p["b"])
    h = jnp.tanh(h @ p["w_t"].T)  # transposed kernel: still one dense use
    h = jnp.tanh(jnp.einsum("oi,bi->bo", p["w_lhs"], h))  # kernel as the lhs operand
    h = _jitted_layer(h, p["w_jit"])  # inside a jit body, ReLU is a custom_jvp
    h = jnp.tanh(h @ p["tied"])
    h = jnp.tanh(h @ p["tied"].T)  # used twice: per-example fallback
    h = jnp.tanh(_custom_dense(h, p["w_custom"])) * p["scale"]  # custom_jvp and elementwise: fallback
    return h @ p["w_out"]


def _positions_params(n_out):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(9), 3)
    return {
        "w1": jax.random.normal(k1, (2, 4), F64),
        "b1": 0.1 * jax.random.normal(k2, (4,), F64),
        "w2": 0.5 * jax.random.normal(k3, (4, n_out), F64),
    }


def _positions_seq(p, x):  # x: (b, T, 2) -> logits (b, T, 3): T positions in every dense layer
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _positions_pooled(p, x):  # x: (b, T, 2) -> (b, 2): positions pooled before the output
    return jnp.mean(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], axis=1)


def _linen_mlp():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, param_dtype=F64)(nn.tanh(nn.Dense(5, param_dtype=F64)(x)))

    module = MLP()
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), F64))["params"]
    model = somax.adapters.linen_model(module, mutable=(), rng_collections=())
    return model.predict_fn(None, None), params


MLP_KINDS = {
    "['layer0']['w']": "dense", "['layer1']['w']": "dense",
    "['layer0']['b']": "bias", "['layer1']['b']": "bias",  # folded into their kernels: (a·a' + 1)(δ·δ')
}  # fmt: skip


def _case(name):
    """``(loss, predict_fn, params, batch, plan kinds in mode 'structured', kinds in mode 'auto')``."""
    if name in ("mlp_mse_scalar", "mlp_mse_vector", "mlp_ce"):
        c = {"mlp_mse_scalar": 1, "mlp_mse_vector": 2, "mlp_ce": 4}[name]
        params, predict = tiny_mlp(sizes=(3, 5, c))
        if name == "mlp_ce":
            return "ce", predict, params, classification_batch(c=4), MLP_KINDS, MLP_KINDS
        if c == 1:
            predict_scalar = lambda p, x: predict(p, x)[:, 0]  # noqa: E731
            # one output: the per-example Jacobian (m² n_in) is cheaper than b² n_in + 2m² for n_in < 2b
            auto = {**MLP_KINDS, "['layer1']['w']": "per_example", "['layer1']['b']": "per_example"}
            return "mse", predict_scalar, params, regression_batch(d_out=1), MLP_KINDS, auto
        return "mse", predict, params, regression_batch(d_out=2), MLP_KINDS, MLP_KINDS
    if name == "cnn_ce":
        params = cnn_init(jax.random.PRNGKey(2), channels=(2, 3), image_size=4, num_classes=3, dtype=F64)
        x = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 4, 1), F64)
        batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(4), (5,), 0, 3)}
        kinds = {f"['{leaf}']['{k}']": "per_example" for leaf in ("conv0", "conv1", "dense") for k in "bw"}
        kinds["['dense']['w']"], kinds["['dense']['b']"] = "dense", "bias"
        return "ce", cnn_apply, params, batch, kinds, kinds
    if name == "mixed_ce":
        kinds = {f"['{k}']": "dense" for k in ("w_in", "w_t", "w_lhs", "w_jit", "w_out")}
        kinds.update({f"['{k}']": "per_example" for k in ("tied", "w_custom", "scale")})
        kinds["['b']"] = "bias"
        kinds["['unused']"] = "unused"
        return "ce", _mixed_predict, _mixed_params(), classification_batch(c=3), kinds, kinds
    if name in ("positions_ce_sequence", "positions_mse_pooled"):
        x = jax.random.normal(jax.random.PRNGKey(11), (6, 3, 2), F64)
        structured = {"['w1']": "dense", "['w2']": "dense", "['b1']": "per_example"}
        auto = dict.fromkeys(structured, "per_example")  # T² (m/b)² outweighs n_in·n_out at these sizes
        if name == "positions_ce_sequence":
            batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(12), (6, 3), 0, 3)}
            return "ce", _positions_seq, _positions_params(3), batch, structured, auto
        batch = {"x": x, "y": jax.random.normal(jax.random.PRNGKey(12), (6, 2), F64)}
        return "mse", _positions_pooled, _positions_params(2), batch, structured, auto
    if name == "linen_mlp_ce":
        predict, params = _linen_mlp()
        kinds = {f"['Dense_{i}']['{k}']": kind for i in (0, 1) for k, kind in (("kernel", "dense"), ("bias", "bias"))}
        return "ce", predict, params, classification_batch(c=4), kinds, kinds
    raise ValueError(name)


GRAM_CASES = [
    "mlp_mse_scalar",
    "mlp_mse_vector",
    "mlp_ce",
    "cnn_ce",
    "mixed_ce",
    "positions_ce_sequence",
    "positions_mse_pooled",
    "linen_mlp_ce",
]


@pytest.mark.parametrize("case", GRAM_CASES)
def test_structured_gram_equals_per_example_gram_and_dense_jacobian(case):
    """Every Gram mode equals ``Ĵ Ĵᵀ`` with ``Ĵ = R J`` and ``J`` materialised by ``jax.jacfwd``
    on the whole batch (float64); the plan recognises exactly the dense kernels."""
    loss, predict, params, batch, kinds, auto_kinds = _case(case)
    curvature = (ggn_mse if loss == "mse" else ggn_ce)(predict_fn=predict)

    @jax.jit
    def grams(params, batch):
        lin = curvature.linearize(params, batch)
        rows = row_operator(lin)
        w, unravel = ravel_pytree(params)
        jac = jax.jacfwd(lambda v: predict(unravel(v), batch["x"]))(w)  # (*z.shape, d)
        j_hat = jax.vmap(rows.factor.apply, in_axes=-1, out_axes=-1)(jac).reshape(rows.num_rows, -1)
        dense = jnp.dot(j_hat, j_hat.T, precision=jax.lax.Precision.HIGHEST)
        return dense, {mode: rows.gram(mode=mode) for mode in GRAM_MODES}

    dense, out = grams(params, batch)
    scale = float(np.max(np.abs(dense)))
    assert scale > 1e-3 and np.all(np.isfinite(dense))
    for mode, gram in out.items():
        np.testing.assert_allclose(gram, dense, rtol=0, atol=1e-13 * scale, err_msg=mode)
    rows_per_example = out["auto"].shape[0] // batch["x"].shape[0]
    if case == "mlp_ce":
        assert rows_per_example == 3  # C − 1 rows per example
    for mode, expected in (("structured", kinds), ("auto", auto_kinds)):
        plan = gram_plan(predict, params, batch["x"], rows_per_example=rows_per_example, mode=mode)
        assert plan.kinds() == expected, (mode, str(plan))


def test_row_cholesky_direction_with_fallback_leaves_is_the_damped_ggn_direction():
    """Through the assembled step (structured Gram), on the model with transposed, tied and
    custom kernels and a bias: ``s = (G + λI)⁻¹ g`` of the dense float64 GGN."""
    _, predict, params, batch, _, _ = _case("mixed_ce")
    lam = 0.05
    loss_fn = output_loss_fn(predict, "ce")

    @jax.jit
    def oracle(params, batch):  # oracles.dense_ggn / dense_grad, traced once
        w, unravel = ravel_pytree(params)
        z = predict(params, batch["x"])
        jac = jax.jacfwd(lambda v: predict(unravel(v), batch["x"]).reshape(-1))(w)
        hz = jax.hessian(lambda zz: SoftmaxCELoss().value(zz.reshape(z.shape), batch["y"]))(z.reshape(-1))
        return jac.T @ hz @ jac, jax.grad(lambda v: loss_fn(unravel(v), batch))(w)

    ggn, g = oracle(params, batch)
    exact = damped_solve(np.asarray(ggn), lam, np.asarray(g))
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": predict}),
        solver=SolverSpec("row_cholesky", kwargs={"gram": "structured"}),
        damping=DampingSpec("constant", lam0=lam),
        tx=optax.scale(-1.0),
    )
    new_params, _, _ = jax.jit(method.step)(params, batch, method.init(params))
    s = flat(params) - flat(new_params)
    assert np.linalg.norm(s - exact) <= 1e-9 * np.linalg.norm(exact)


def test_egn_ce_preset_takes_the_gram_option_and_checks_it():
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    batch = classification_batch(c=4)
    assert somax.egn_ce(predict_fn=predict).solver.gram == "auto"
    assert somax.egn_mse(predict_fn=predict, gram="per_example").solver.gram == "per_example"
    with pytest.raises(TypeError, match="gram"):
        somax.egn_ce(predict_fn=predict, gramm="auto")
    with pytest.raises(ValueError, match="gram"):
        somax.solvers.row_cholesky(gram="dense")
    lin = ggn_ce(predict_fn=predict).linearize(params, batch)
    with pytest.raises(ValueError, match="mode"):
        row_operator(lin).gram(mode="dense")


def test_structured_gram_of_a_float32_model_in_float64():
    """float32 params and data with a float64 Gram (products in float64; factors are float32)."""
    params, predict = tiny_mlp(sizes=(3, 5, 4), dtype=jnp.float32)
    batch = classification_batch(c=4, dtype=jnp.float32)
    lin = ggn_ce(predict_fn=predict).linearize(params, batch)
    rows = row_operator(lin)
    structured, reference = jax.jit(lambda: (rows.gram(F64), rows.gram(F64, mode="per_example")))()
    assert structured.dtype == F64
    np.testing.assert_allclose(structured, reference, rtol=0, atol=1e-5 * float(np.max(np.abs(reference))))
