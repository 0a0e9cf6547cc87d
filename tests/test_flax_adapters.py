"""Flax adapters: stateful NNX modules (BatchNorm, Dropout, call-time rngs) and what linen_model infers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import somax

nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")

B = 8


def _batch():
    x = np.random.default_rng(0).normal(size=(B, 3)).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.arange(B) % 2}


class _BNDropMLP(nnx.Module):
    """Dense → BatchNorm → relu → Dropout (stored rngs) → Dense."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _nnx_split(cls, *streams):
    """``nnx.split(cls(nnx.Rngs(...)), nnx.Param, ...)`` with the initialisation jitted (eager init is slow)."""
    make = lambda: cls(nnx.Rngs(*streams[:1], **dict(streams[1:])))  # noqa: E731
    graphdef = nnx.graphdef(nnx.eval_shape(make))
    params, rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1:])()
    return graphdef, params, rest


@functools.cache
def _split_bn_drop():
    return _nnx_split(_BNDropMLP, 0, ("dropout", 1))


def _reference(graphdef, params, rest, x, key):
    """The module called directly, its dropout stream keyed as the adapter documents."""
    module = nnx.merge(graphdef, params, rest, copy=True)
    module.drop.rngs.key.set_value(jax.random.wrap_key_data(jax.random.fold_in(jax.random.fold_in(key, 0), 0)))
    module.drop.rngs.count.set_value(jnp.zeros((), jnp.uint32))
    out = module(x)
    return out, module.bn.mean.get_value()


def _train(preset, kwargs, jit):
    graphdef, params, rest = _split_bn_drop()
    model = somax.adapters.nnx_model(graphdef)
    assert model.uses_rng and model.couples_examples  # inferred: rng stream and BatchStat variables
    method = somax.make(preset, model=model, **kwargs)
    state = method.init(params, rest)
    step = jax.jit(method.step) if jit else method.step
    batch = _batch()
    for t in range(3):
        params, state, info = step(params, batch, state, jax.random.PRNGKey(t))
        assert np.isfinite(float(info["loss"]))
    new = state.model_state
    moved = float(jnp.max(jnp.abs(new["bn"]["mean"][...] - rest["bn"]["mean"][...])))
    assert moved > 1e-3  # BatchNorm running statistics are carried as model state
    assert float(jnp.max(jnp.abs(new["bn"]["var"][...] - rest["bn"]["var"][...]))) > 1e-3
    # the stored rng stream stays as passed in: randomness comes from the step's rng
    assert jnp.array_equal(jax.random.key_data(new["drop"]["rngs"]["key"][...]),
                           jax.random.key_data(rest["drop"]["rngs"]["key"][...]))  # fmt: skip
    assert int(new["drop"]["rngs"]["count"][...]) == int(rest["drop"]["rngs"]["count"][...])
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(rest)


def test_nnx_batchnorm_dropout_trains_under_jit():
    _train("sgn_ce", {"learning_rate": 1.0, "maxiter": 3}, jit=True)


def test_nnx_batchnorm_dropout_eager_outputs_match_the_module():
    graphdef, params, rest = _split_bn_drop()
    model = somax.adapters.nnx_model(graphdef)
    x, key = _batch()["x"], jax.random.PRNGKey(7)
    out, new, _ = model.apply(params, rest, x, key)
    ref_out, ref_mean = _reference(graphdef, params, rest, x, key)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new["bn"]["mean"][...], ref_mean, rtol=1e-6, atol=1e-6)
    other, _, _ = model.apply(params, rest, x, jax.random.PRNGKey(8))
    assert not np.allclose(out, other)  # another step rng, another dropout mask
    # eagerly through a method (the linearization traces the module; it used to fail on BatchStat)
    method = somax.make("sgn_ce", model=model, learning_rate=1.0, maxiter=2)
    state, p = method.init(params, rest), params
    for t in range(2):
        p, state, info = method.step(p, _batch(), state, jax.random.PRNGKey(t))
        assert np.isfinite(float(info["loss"]))
    assert not np.allclose(state.model_state["bn"]["mean"][...], rest["bn"]["mean"][...])
    assert jax.tree_util.tree_structure(state.model_state) == jax.tree_util.tree_structure(rest)


def test_nnx_batchnorm_dropout_sophia_g():
    _train("sophia_g", {"learning_rate": 0.01}, jit=True)


class _CallRngs(nnx.Module):
    """Dropout without stored rngs: the key comes as ``rngs=`` at call time."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x, *, rngs):
        return self.l2(self.drop(jnp.tanh(self.l1(x)), rngs=rngs))


def test_nnx_module_taking_rngs_at_call_time():
    graphdef, params, rest = _nnx_split(_CallRngs, 0)
    model = somax.adapters.nnx_model(graphdef, call_rngs="rngs")
    assert model.uses_rng and not model.couples_examples
    x, key = _batch()["x"], jax.random.PRNGKey(3)
    out, _, _ = model.apply(params, rest, x, key)
    direct = nnx.merge(graphdef, params, rest, copy=True)(x, rngs=nnx.Rngs(jax.random.fold_in(key, 1)))
    np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-6)
    method = somax.make("sgn_ce", model=model, learning_rate=1.0, maxiter=2)
    state = method.init(params, rest)
    step = jax.jit(method.step)
    for t in range(2):
        params, state, info = step(params, _batch(), state, jax.random.PRNGKey(t))
        assert np.isfinite(float(info["loss"]))
    with pytest.raises(ValueError, match="rng=None"):
        method.step(params, _batch(), state, None)


def test_nnx_missing_model_state_names_it():
    graphdef, params, _ = _split_bn_drop()
    model = somax.adapters.nnx_model(graphdef)
    with pytest.raises(ValueError, match="model_state="):
        model.apply(params, (), _batch()["x"], jax.random.PRNGKey(0))


class _TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), kernel_init=_flat_init)(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _flat_init(key, shape, dtype=jnp.float32):  # a flat draw: 4-D draws compile slowly on XLA:CPU
    return (jax.random.normal(key, (int(np.prod(shape)),), dtype) * 0.3).reshape(shape)


def test_linen_plain_cnn_needs_no_rng_and_runs_egn():
    cnn = _TinyCNN()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, 8, 8, 1)).astype(np.float32))
    variables = jax.jit(cnn.init)(jax.random.PRNGKey(0), x[:1])
    params, model_state = somax.adapters.split_linen_variables(variables)
    model = somax.adapters.linen_model(cnn, variables)
    assert model.couples_examples is False and model.uses_rng is False
    out, new_state, _ = model.apply(params, model_state, x, None)
    np.testing.assert_allclose(out, cnn.apply(variables, x), rtol=1e-6, atol=1e-6)
    assert new_state == {}
    method = somax.make("egn_ce", model=model)
    state = method.init(params, model_state)
    params, state, info = jax.jit(method.step)(params, {"x": x, "y": jnp.arange(B) % 2}, state, None)
    assert np.isfinite(float(info["loss"]))


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.Dense(2)(x)


class _DropNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=False)(nn.Dense(4)(x)))


def test_linen_inference_and_clear_errors():
    x = _batch()["x"]
    bn = _BNNet()
    variables = jax.jit(functools.partial(bn.init, train=False))(jax.random.PRNGKey(0), x[:1])
    params, model_state = somax.adapters.split_linen_variables(variables)
    with_vars = somax.adapters.linen_model(bn, variables, apply_kwargs={"train": True})
    assert with_vars.couples_examples and not with_vars.uses_rng
    without_vars = somax.adapters.linen_model(bn, apply_kwargs={"train": True})
    assert without_vars.couples_examples  # no variables: the conservative guess
    out, new_state, _ = with_vars.apply(params, model_state, x, None)
    assert not np.allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"], 0.0)
    for model in (with_vars, without_vars):  # forgetting model_state names it (not Flax's ScopeCollectionNotFound)
        with pytest.raises(ValueError, match="batch_stats.*model_state="):
            model.apply(params, (), x, None)
    method = somax.make("sgn_ce", model=with_vars, maxiter=2)
    with pytest.raises(ValueError, match="model_state="):
        method.step(params, _batch(), method.init(params), None)

    drop = _DropNet()
    dvars = jax.jit(drop.init)({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x[:1])
    with pytest.raises(ValueError, match="rng_collections="):
        somax.adapters.linen_model(drop, dvars).apply(dvars["params"], {}, x, None)
    dmodel = somax.adapters.linen_model(drop, dvars, rng_collections=("dropout",))
    assert dmodel.uses_rng and not dmodel.couples_examples
    a = dmodel.apply(dvars["params"], {}, x, jax.random.PRNGKey(2))[0]
    b = drop.apply(dvars, x, rngs={"dropout": jax.random.fold_in(jax.random.PRNGKey(2), 0)})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
