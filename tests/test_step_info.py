"""StepInfo: a fixed-key mapping whose scalars travel packed, identical inside and outside jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import regression_batch, tiny_mlp

import somax
from somax.interop import as_optax
from somax.specs import TelemetrySpec
from somax.step_info import StepInfo
from somax.telemetry import CORE_FIELDS, InfoField, fill_info


def _step(method, params, batch, jit=True):
    step = jax.jit(method.step) if jit else method.step
    return step(params, batch, method.init(params), jax.random.PRNGKey(0))


def test_scalars_are_packed_into_a_float_and_an_int_vector():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, telemetry=TelemetrySpec(eig_every_k=1, eig_k=2, block_eig_every_k=1))
    _, _, info = _step(method, params, regression_batch(d_out=2))
    assert isinstance(info, StepInfo) and list(info) == list(method.plan.info_schema)
    # two packed vectors (float; int with the bools) plus the array fields, however many scalar keys
    arrays = [info[k] for k, f in method.plan.info_schema.items() if f.shape != ()]
    assert len(arrays) == 2  # top_eigs and the per-layer block_top_eig dict
    n_array_leaves = len(jax.tree_util.tree_leaves(arrays))
    assert len(jax.tree_util.tree_leaves(info)) == 2 + n_array_leaves
    assert len(info) - len(arrays) > 2
    for key, field in method.plan.info_schema.items():
        value = info[key]
        if field.shape == ():
            assert value.shape == () and value.dtype == field.dtype(jnp.float64), key


def test_values_match_inside_and_outside_jit_and_after_device_get():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, damping="trust_region", tr_every_k=1)
    batch = regression_batch(d_out=2)
    _, _, eager = _step(method, params, batch, jit=False)

    @jax.jit
    def read_inside(p, b, s):
        _, _, info = method.step(p, b, s, None)
        return {k: info[k] for k in ("loss", "rho", "cg_iters", "step_accepted")}

    inside = read_inside(params, batch, method.init(params))
    host = jax.device_get(eager)
    assert isinstance(host, StepInfo)
    for key, value in inside.items():
        # the same fields from two differently compiled programs: equal to round-off
        np.testing.assert_allclose(np.asarray(eager[key]), np.asarray(value), rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(host[key]), np.asarray(eager[key]))
        assert np.asarray(host[key]).dtype == np.asarray(value).dtype
    assert np.isfinite(float(eager["rho"])) and int(eager["cg_iters"]) > 0
    numpy = eager.numpy()
    assert list(numpy) == list(eager) and float(numpy["loss"]) == float(eager["loss"])
    assert numpy["step_accepted"].dtype == np.bool_ and bool(numpy["step_accepted"]) is bool(inside["step_accepted"])
    assert somax.to_floats(eager) == somax.to_floats(dict(eager.items()))


def test_scan_stacks_every_field():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, telemetry=TelemetrySpec(rho_every_k=2))
    batches = [regression_batch(key=i, d_out=2) for i in range(4)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches)

    def body(carry, batch):
        p, s, info = method.step(carry[0], batch, carry[1], None)
        return (p, s), info

    _, infos = jax.lax.scan(body, (params, method.init(params)), stacked)
    assert infos["loss"].shape == (4,) and infos["cg_iters"].dtype == jnp.int32
    assert infos["step"].tolist() == [0, 1, 2, 3]
    # bools travel as int32 0/1 and come back as bools, stacked or not
    assert infos["step_accepted"].dtype == jnp.bool_ and infos["step_accepted"].tolist() == [True] * 4
    assert infos.numpy()["finite"].dtype == np.bool_ and infos.numpy()["finite"].tolist() == [True] * 4
    rho = np.asarray(infos["rho"])
    assert np.isfinite(rho[0]) and np.isnan(rho[1])


def test_unknown_key_names_the_key_and_the_choices():
    info = fill_info({"loss": CORE_FIELDS["loss"]}, {"loss": 1.0}, jnp.float32)
    with pytest.raises(KeyError, match="'lss'.*loss"):
        info["lss"]
    assert info.get("lss") is None and "lss" not in info and "loss" in info


def test_extras_and_without():
    schema = {"loss": CORE_FIELDS["loss"], "cg_iters": CORE_FIELDS["cg_iters"], "eigs": InfoField("float", "", (2,))}
    aux = {"logits": jnp.ones((2, 3))}
    info = fill_info(schema, {"loss": 2.0, "eigs": jnp.array([3.0, 1.0])}, jnp.float32, extras={"aux": aux})
    assert list(info) == ["loss", "cg_iters", "eigs", "aux"]
    assert int(info["cg_iters"]) == -1 and info["eigs"].tolist() == [3.0, 1.0]
    assert info["aux"] is aux
    smaller = info.without("aux")
    assert list(smaller) == ["loss", "cg_iters", "eigs"] and float(smaller["loss"]) == 2.0
    with pytest.raises(KeyError, match="collide"):
        fill_info(schema, {}, jnp.float32, extras={"loss": 1.0})
    assert "loss=2.0" in repr(info)
    abstract = jax.eval_shape(lambda: fill_info(schema, {"loss": 2.0}, jnp.float32))
    assert repr(abstract) == "StepInfo(loss, cg_iters, eigs)"


def test_structure_does_not_depend_on_which_fields_were_computed():
    # as_optax starts its state from an all-sentinel info; every update must keep that structure
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, damping="trust_region")
    _, _, info = _step(method, params, regression_batch(d_out=2))
    empty = fill_info(method.plan.info_schema, {}, jnp.float64)
    assert jax.tree_util.tree_structure(empty) == jax.tree_util.tree_structure(info)
    tx = as_optax(method)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    _, new_state = jax.jit(tx.update)(grads, state, params, batch=regression_batch(d_out=2))
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    assert float(new_state.info["loss"]) == float(info["loss"]) and np.isnan(float(state.info["loss"]))
