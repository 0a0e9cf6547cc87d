"""``somax.as_optax`` as an Optax / Flax drop-in: the incoming gradient is the solve's right-hand side,
model state is carried, the Flax ``TrainState`` and ``nnx.Optimizer`` run end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from oracles import flat, regression_batch, tiny_mlp

import somax
from somax.specs import TelemetrySpec


def _mse_oracle(predict, params, batch):
    """Dense float64 ``G = JᵀJ/b`` and ``g = Jᵀ(f − y)/b`` for ``L = 1/(2b) Σ‖f(x_i) − y_i‖²``."""
    w, unravel = ravel_pytree(params)
    f = lambda v: predict(unravel(v), batch["x"]).reshape(-1)  # noqa: E731
    jac = np.asarray(jax.jit(jax.jacfwd(f))(w))
    b = batch["x"].shape[0]
    residual = np.asarray(f(w)) - np.asarray(batch["y"]).reshape(-1)
    loss = lambda p: 0.5 * float(np.sum((np.asarray(predict(p, batch["x"])) - np.asarray(batch["y"])) ** 2)) / b  # noqa: E731
    return jac.T @ jac / b, jac.T @ residual / b, loss


def test_clip_chain_solves_with_the_clipped_gradient():
    # (G + λI) s = clip(g) against a dense float64 oracle; rho and its predicted decrease use clip(g)
    params, predict = tiny_mlp(sizes=(3, 4, 2))
    batch = regression_batch(d_out=2)
    lam = 0.5
    method = somax.make("ggn_direct_mse", predict, lam0=lam, learning_rate=1.0, telemetry=TelemetrySpec(rho_every_k=1))
    G, g, loss = _mse_oracle(predict, params, batch)
    c = 0.1 * np.linalg.norm(g)
    g_clip = g * (c / np.linalg.norm(g))
    solve = lambda rhs: np.linalg.solve(G + lam * np.eye(len(g)), rhs)  # noqa: E731
    grads = ravel_pytree(params)[1](jnp.asarray(g))

    chained = optax.chain(optax.clip_by_global_norm(c), somax.as_optax(method))
    plain = somax.as_optax(method)
    ignoring = somax.as_optax(method, use_updates=False)  # the opt-out: the batch gradient, updates ignored

    @jax.jit
    def run(grads, zeros):
        return (
            chained.update(grads, chained.init(params), params, batch=batch),
            plain.update(None, plain.init(params), params, batch=batch),  # no gradient given: the batch's
            ignoring.update(zeros, ignoring.init(params), params, batch=batch),
        )

    (updates, (_, state)), (batch_u, _), (ignored_u, _) = run(grads, jax.tree_util.tree_map(jnp.zeros_like, grads))
    u = flat(updates)
    np.testing.assert_allclose(u, -solve(g_clip), rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(u + solve(g)) > 0.5 * np.linalg.norm(solve(g))  # not the unclipped step
    np.testing.assert_allclose(flat(batch_u), -solve(g), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat(ignored_u), -solve(g), rtol=1e-9, atol=1e-12)
    info = state.info
    assert float(info["grad_norm"]) == pytest.approx(c, rel=1e-12)
    pred = -(g_clip @ u + 0.5 * u @ G @ u)
    assert float(info["pred_decrease"]) == pytest.approx(pred, rel=1e-9)
    actual = loss(params) - loss(optax.apply_updates(params, updates))
    assert float(info["actual_decrease"]) == pytest.approx(actual, rel=1e-7)
    assert float(info["rho"]) == pytest.approx(actual / pred, rel=1e-7)
    assert float(info["loss"]) == pytest.approx(loss(params), rel=1e-12)


def test_row_lane_refuses_an_external_gradient():
    params, predict = tiny_mlp(sizes=(3, 4, 2))
    method = somax.make("egn_mse", predict)
    with pytest.raises(ValueError, match=r"(?s)RowCholeskySolver.*residuals.*use_updates=False"):
        somax.as_optax(method)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="grad= was given.*residuals"):
        method.step(params, regression_batch(d_out=2), method.init(params), None, grad=grads)
    tx = somax.as_optax(method, use_updates=False)  # the documented opt-out
    assert isinstance(tx.init(params), somax.interop.OptaxState)
    with pytest.raises(TypeError, match="use_updates must be True or False"):
        somax.as_optax(somax.make("sgn_mse", predict), use_updates=None)
    sgn = somax.make("sgn_mse", predict)
    bad = {**grads, "layer0": {**grads["layer0"], "w": jnp.zeros((2, 2))}}
    with pytest.raises(ValueError, match=r"grad\['layer0'\]\['w'\] has shape \(2, 2\)"):
        sgn.step(params, regression_batch(d_out=2), sgn.init(params), None, grad=bad)


def _flat_normal(key, shape, dtype=jnp.float32):
    """LeCun normal drawn flat: XLA:CPU compiles a 4-D normal draw seconds slower than a flat one."""
    fan_in = int(np.prod(shape[:-1]))
    return (jax.random.normal(key, (int(np.prod(shape)),), dtype) / np.sqrt(fan_in)).reshape(shape)


def _image_batch(b=8, classes=3):
    rng = np.random.default_rng(0)
    return {"x": jnp.asarray(rng.normal(size=(b, 6, 6, 1)).astype(np.float32)), "y": jnp.arange(b) % classes}


def test_linen_train_state_with_batchnorm_and_dropout():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(3, (3, 3), strides=2, kernel_init=_flat_normal)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
            x = nn.Dropout(0.25, deterministic=not train)(x.reshape(x.shape[0], -1))
            return nn.Dense(3, kernel_init=_flat_normal)(x)

    cnn = CNN()
    batch = _image_batch()
    variables = jax.jit(lambda k: cnn.init(k, batch["x"][:1], train=False))(jax.random.key(0))
    params, model_state = somax.adapters.split_linen_variables(variables)
    model = somax.adapters.linen_model(cnn, variables, rng_collections=("dropout",), apply_kwargs={"train": True})
    method = somax.make("ggn_direct_ce", model=model, learning_rate=0.5)  # a dense solve: the cheapest compile
    TrainState = somax.flax_train.TrainState
    state = TrainState.create(apply_fn=cnn.apply, params=params, method=method, model_state=model_state)

    @jax.jit
    def train_step(state, batch, rng):
        def loss_fn(p):  # the gradient as a researcher computes it, clipped before the solve
            variables = {"params": p, **state.model_state}
            logits, _ = cnn.apply(variables, batch["x"], train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        grads = jax.grad(loss_fn)(state.params)
        grads, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
        # the reference: method.step with the same gradient from the same method state
        ref = method.step(state.params, batch, state.opt_state.method, rng, grad=grads)
        return state.apply_gradients(grads=grads, batch=batch, rng=rng), ref

    for t in range(3):
        new, (ref_params, ref_state, _) = train_step(state, batch, jax.random.key(t))
        np.testing.assert_allclose(flat(new.params), flat(ref_params), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(flat(new.batch_stats), flat(ref_state.model_state), rtol=1e-5, atol=1e-6)
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
        assert np.isfinite(float(new.info["loss"])) and bool(new.info["step_accepted"])
        assert float(new.info["grad_norm"]) <= 0.5 * (1 + 1e-6)  # the step solved with the clipped gradient
        state = new
    assert int(state.step) == 3 and int(state.opt_state.method.count) == 3
    assert not np.allclose(flat(state.batch_stats), flat(model_state["batch_stats"]))
    assert not np.allclose(flat(state.params), flat(params))
    logits = state.apply_fn(state.variables, batch["x"], train=False)  # evaluation with the new batch_stats
    assert logits.shape == (8, 3) and np.all(np.isfinite(logits))
    with pytest.raises(TypeError, match="needs the batch"):
        state.apply_gradients(grads=state.params)
    with pytest.raises(TypeError, match="pass method="):
        TrainState.create(apply_fn=cnn.apply, params=params, tx=optax.sgd(0.1), method=method)
    # the row lane takes no external gradient: apply_step only
    row = TrainState.create(apply_fn=cnn.apply, params=params, method=somax.make("egn_ce_cg", model=model),
                            batch_stats=model_state["batch_stats"])  # fmt: skip
    assert not row.takes_grads
    with pytest.raises(ValueError, match="apply_step"):
        row.apply_gradients(grads=row.params, batch=batch, rng=jax.random.key(0))


# Flax's BatchNorm writes float64 statistics into float32 variables under jax_enable_x64 (the suite's setting)
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_nnx_optimizer_with_batchnorm_and_dropout():
    nnx = pytest.importorskip("flax.nnx")

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 3, (3, 3), strides=2, kernel_init=_flat_normal, rngs=rngs)
            self.bn = nnx.BatchNorm(3, momentum=0.5, rngs=rngs)
            self.drop = nnx.Dropout(0.25, rngs=rngs)
            self.out = nnx.Linear(27, 3, kernel_init=_flat_normal, rngs=rngs)

        def __call__(self, x):
            y = self.drop(nnx.relu(self.bn(self.conv(x))))
            return self.out(y.reshape(y.shape[0], -1))

    module = CNN(nnx.Rngs(0, dropout=1))
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    method = somax.make("sophia_g", model=somax.adapters.nnx_model(graphdef))  # the diagonal lane takes g too
    optimizer = nnx.Optimizer(module, somax.as_optax(method, model_state=rest), wrt=nnx.Param)
    batch = _image_batch()

    @nnx.jit
    def train_step(module, optimizer, batch, rng):
        # the state before the step, copied (nnx.state shares the module's variables)
        params, rest = jax.tree_util.tree_map(lambda a: a, nnx.split(module, nnx.Param, ...)[1:])

        def loss_fn(module):
            return optax.softmax_cross_entropy_with_integer_labels(module(batch["x"]), batch["y"]).mean()

        grads = nnx.grad(loss_fn)(module)
        optimizer.update(module, grads, batch=batch, rng=rng)
        # method.step from the same state with the same gradient (a reference for the first step)
        new_params, new_state, _ = method.step(params, batch, method.init(params, rest), rng, grad=grads)
        return nnx.as_pure(new_params), nnx.as_pure(new_state.model_state)

    key = jax.random.key(3)
    ref_params, ref_rest = train_step(module, optimizer, batch, key)
    # equal only if the model state kept its variable types through nnx.Optimizer's plain-array
    # opt state, so that the dropout stream is keyed from the step's rng
    np.testing.assert_allclose(flat(nnx.as_pure(nnx.state(module, nnx.Param))), flat(ref_params), rtol=1e-5, atol=1e-6)
    carried = nnx.as_pure(optimizer.opt_state.model_state)
    np.testing.assert_allclose(flat(carried["bn"]), flat(ref_rest["bn"]), rtol=1e-6)
    assert not np.allclose(np.asarray(carried["bn"]["mean"]), 0.0)
    train_step(module, optimizer, batch, jax.random.key(4))
    info = optimizer.opt_state.info
    assert np.isfinite(float(info["loss"])) and np.isfinite(float(info["grad_norm"]))
    assert int(optimizer.step[...]) == 2 and int(optimizer.opt_state.method.count) == 2
