"""Convolutions rewritten into the canonical layout (``somax.curvature.conv_layout``): same values, canonical jaxpr."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import somax
from somax.curvature.conv_layout import _canonical_numbers, canonical_conv, canonical_convolutions
from somax.specs import CurvatureSpec, DampingSpec, SolverSpec


def _convs(fn, *args):
    """The ``conv_general_dilated`` equations of ``fn``'s jaxpr (``jit`` bodies included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is lax.conv_general_dilated_p:
                found.append(eqn.params)
            if "jaxpr" in eqn.params and hasattr(eqn.params["jaxpr"], "jaxpr"):
                walk(eqn.params["jaxpr"].jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _shape(spec, logical):
    """The array shape whose axis ``spec[k]`` holds logical dimension ``k``."""
    shape = [0] * len(spec)
    for k, axis in enumerate(spec):
        shape[axis] = logical[k]
    return shape


#: tiny programs compiled once per example: XLA's backend optimisation would only add compile time
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

_LAYOUTS = st.permutations(range(4)).map(tuple)


@settings(max_examples=10, deadline=None)
@given(
    lhs_perm=_LAYOUTS,
    rhs_perm=_LAYOUTS,
    out_perm=_LAYOUTS,
    strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    rhs_dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.sampled_from(["SAME", "VALID", ((1, 0), (0, 2))]),
    seed=st.integers(0, 2**16),
)
def test_canonical_conv_equals_the_convolution_in_any_layout(
    lhs_perm, rhs_perm, out_perm, strides, rhs_dilation, padding, seed
):
    """For every layout of the operands and the output, strides, dilations and padding: the
    canonical form between transposes gives the convolution's values (float64, 1e-12)."""
    rng = np.random.default_rng(seed)
    # logical shapes: lhs (N, C, H, W) = (2, 3, 7, 6), rhs (O, I, kh, kw) = (4, 3, 3, 2); spec[k] is
    # the array axis of logical dimension k
    lhs = jnp.asarray(rng.normal(size=_shape(lhs_perm, (2, 3, 7, 6))))
    rhs = jnp.asarray(rng.normal(size=_shape(rhs_perm, (4, 3, 3, 2))))
    dn = lax.ConvDimensionNumbers(lhs_perm, rhs_perm, out_perm)

    def conv(a, b):
        return lax.conv_general_dilated(a, b, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=dn)

    (eqn,) = [e for e in jax.make_jaxpr(conv)(lhs, rhs).jaxpr.eqns if e.primitive is lax.conv_general_dilated_p]

    @_jit
    def both(a, b):
        return conv(a, b), canonical_conv(a, b, **eqn.params)

    want, got = both(lhs, rhs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)


def _cnn(params, x):
    h = lax.conv_general_dilated(x, params["k1"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h)
    h = lax.conv_general_dilated(h, params["k2"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h).reshape(x.shape[0], -1) @ params["w"]


def _cnn_params(rng):
    return {
        "k1": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3),
        "k2": jnp.asarray(rng.normal(size=(3, 3, 4, 3)) * 0.3),
        "w": jnp.asarray(rng.normal(size=(3 * 3 * 3, 5)) * 0.3),
    }


def test_wrapped_vjp_has_only_canonical_convolutions_and_the_same_values():
    rng = np.random.default_rng(0)
    params, x = _cnn_params(rng), jnp.asarray(rng.normal(size=(4, 6, 6, 2)))
    z, vjp = jax.vjp(lambda p: _cnn(p, x), params)
    u = jnp.asarray(rng.normal(size=z.shape))

    def f(u):
        return vjp(u)[0]

    g = canonical_convolutions(f)
    before, after = _convs(f, u), _convs(g, u)
    assert any(p["dimension_numbers"] != _canonical_numbers(2) for p in before)  # the VJP's weight gradients
    assert after and all(p["dimension_numbers"] == _canonical_numbers(2) for p in after)
    for key in params:
        np.testing.assert_allclose(np.asarray(g(u)[key]), np.asarray(f(u)[key]), rtol=1e-12, atol=1e-13)
    # a function without a convolution to rewrite is called as it is
    dense = canonical_convolutions(lambda v: {"y": 2.0 * v})
    np.testing.assert_array_equal(np.asarray(dense(u)["y"]), 2.0 * np.asarray(u))


def test_ggn_cg_step_on_a_cnn_matches_the_dense_damped_solve():
    """The CG lane's GGN products (their convolutions rewritten) solve (G + λI) s = g of the dense
    float64 GGN on a tiny CNN, inside the jitted step's while loop."""
    from jax.flatten_util import ravel_pytree

    rng = np.random.default_rng(1)
    params, lam = _cnn_params(rng), 0.5
    batch = {"x": jnp.asarray(rng.normal(size=(6, 6, 6, 2))), "y": jnp.asarray(rng.integers(0, 5, 6))}
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": _cnn}),
        solver=SolverSpec("cg", kwargs={"maxiter": 200, "tol": 1e-14, "unroll": False}),
        damping=DampingSpec("constant", lam0=lam),
        tx=__import__("optax").scale(-1.0),
    )
    new, _, _ = jax.jit(method.step)(params, batch, method.init(params))
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def dense(flat):
        def logits(f):
            return _cnn(unravel(f), batch["x"])

        z = logits(flat)
        jac = jax.jacfwd(lambda f: logits(f).ravel())(flat)
        p = jax.nn.softmax(z)
        hz = jax.scipy.linalg.block_diag(*[(jnp.diag(q) - jnp.outer(q, q)) / z.shape[0] for q in p])
        ggn = jac.T @ hz @ jac
        g = jax.grad(lambda f: jnp.mean(-jax.nn.log_softmax(logits(f))[jnp.arange(6), batch["y"]]))(flat)
        return jnp.linalg.solve(ggn + lam * jnp.eye(flat.size), g)

    step = flat - ravel_pytree(new)[0]
    np.testing.assert_allclose(np.asarray(step), np.asarray(dense(flat)), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "curvature",
    [
        ("ggn_ce", {}),
        ("empirical_fisher", {"loss": "ce"}),
        ("hessian", {"loss": "ce", "hvp": "linearize"}),
        ("hessian", {"loss": "ce", "hvp": "jvp"}),
    ],
)
def test_a_scan_over_steps_has_only_canonical_convolutions(curvature):
    """Every convolution of a step (gradient and curvature products) is canonical, so a ``lax.scan`` over
    steps runs no convolution in XLA:CPU's slow loop emitter."""
    from somax.curvature.conv_layout import count_loop_slow_convolutions

    kind, kwargs = curvature
    rng = np.random.default_rng(2)
    params = _cnn_params(rng)
    batch = {"x": jnp.asarray(rng.normal(size=(6, 6, 6, 2))), "y": jnp.asarray(rng.integers(0, 5, 6))}
    method = somax.assemble(
        curvature=CurvatureSpec(kind, kwargs={"predict_fn": _cnn, **kwargs}),
        solver=SolverSpec("cg", kwargs={"maxiter": 3, "unroll": False}),
        damping=DampingSpec("constant", lam0=1.0),
    )

    def scan(p, s):
        def body(carry, _):
            p, s = carry
            p, s, _ = method.step(p, batch, s)
            return (p, s), None

        return jax.lax.scan(body, (p, s), None, length=2)[0]

    assert count_loop_slow_convolutions(scan, params, method.init(params)) == 0


def test_gn_inner_loop_has_only_canonical_convolutions():
    """Full Gauss-Newton's inner ``lax.scan`` over micro-batches: every JVP/VJP convolution canonical."""
    from somax.curvature.conv_layout import count_loop_slow_convolutions

    rng = np.random.default_rng(3)
    params = _cnn_params(rng)
    x, y = jnp.asarray(rng.normal(size=(6, 6, 6, 2))), jnp.asarray(rng.integers(0, 5, 6))
    batch = {"x": x.reshape(2, 3, 6, 6, 2), "y": y.reshape(2, 3), "x_val": x[None, :3], "y_val": y[None, :3]}
    method = somax.make("gn", predict_fn=_cnn, micro_batches=2)
    assert count_loop_slow_convolutions(method.step, params, batch, method.init(params)) == 0
