"""Real models and loops: model state, rng, aux, weights, new losses, dtypes, checkpoints, bad input, Optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from oracles import flat, regression_batch, tiny_mlp

import somax
from somax.curvature import ggn
from somax.curvature.losses import ConvexLoss, GaussianNLLLoss, SigmoidBCELoss, SoftmaxCELoss
from somax.specs import CurvatureSpec, DampingSpec


def _dense_ggn_with_hz(predict, params, x, hz_fn):
    w, unravel = ravel_pytree(params)
    z = predict(params, x)
    jac = jax.jacfwd(lambda v: predict(unravel(v), x).reshape(-1))(w)
    return jac.T @ hz_fn(z) @ jac


def _probe(params):
    return jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)


@pytest.mark.parametrize("name", ["bce", "gaussian_nll", "convex", "weighted_ce"])
def test_new_losses_ggn_matches_dense_oracle(name):
    key = jax.random.PRNGKey(4)
    x = jax.random.normal(key, (6, 3))
    if name == "bce":
        params, predict = tiny_mlp(sizes=(3, 4, 2))
        y = (jax.random.uniform(key, (6, 2)) > 0.5).astype(jnp.float64)
        loss, w = SigmoidBCELoss(), None
        hz = lambda z: jax.hessian(lambda zz: loss.value(zz.reshape(z.shape), y))(z.reshape(-1))  # exact: convex
    elif name == "gaussian_nll":
        params, predict = tiny_mlp(sizes=(3, 4, 2))
        y = jax.random.normal(key, (6,))
        loss, w = GaussianNLLLoss(), None

        def hz(z):  # the Fisher of N(μ, e^s) in (μ, s), per example, divided by b
            blocks = jnp.stack([jnp.exp(-z[:, 1]), jnp.full((6,), 0.5)], axis=1).reshape(-1)
            return jnp.diag(blocks) / 6
    elif name == "convex":
        params, predict = tiny_mlp(sizes=(3, 4, 2))
        y = jax.random.normal(key, (6, 2))
        loss, w = ConvexLoss(lambda zi, yi: jnp.sum(jnp.log(jnp.cosh(zi - yi)))), None
        hz = lambda z: jax.hessian(lambda zz: loss.value(zz.reshape(z.shape), y))(z.reshape(-1))
    else:
        params, predict = tiny_mlp(sizes=(3, 4, 3))
        y = jnp.array([0, 1, 2, 1, 0, 2])
        loss, w = SoftmaxCELoss(), jnp.array([1.0, 0.0, 2.0, 1.0, 0.5, 1.0])
        hz = lambda z: jax.hessian(lambda zz: loss.value(zz.reshape(z.shape), y, w))(z.reshape(-1))
        # the weighted mean Σ w ℓ / Σ w, checked directly
        per = -jnp.take_along_axis(jax.nn.log_softmax(predict(params, x)), y[:, None], 1)[:, 0]
        np.testing.assert_allclose(float(loss.value(predict(params, x), y, w)), float(jnp.sum(w * per) / w.sum()))
    batch = {"x": x, "y": y} if w is None else {"x": x, "y": y, "w": w}
    curv = ggn(loss=loss, predict_fn=predict, weight_key=None if w is None else "w")

    @jax.jit  # one program for the method's and the oracle's sides (eager dispatch dominated this test)
    def sides(params, batch):
        lin = curv.linearize(params, batch)
        v = _probe(params)
        g = jax.grad(lambda p: loss.value(predict(p, x), y, w))(params)
        G = _dense_ggn_with_hz(predict, params, x, hz)
        return lin.matvec(v), G @ ravel_pytree(v)[0], lin.grad, g

    hv, gv, lin_grad, g = sides(params, batch)
    np.testing.assert_allclose(flat(hv), np.asarray(gv), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat(lin_grad), flat(g), rtol=1e-9, atol=1e-14)


def test_weighted_row_factor_matches_weighted_ggn():
    params, predict = tiny_mlp(sizes=(3, 4, 3))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    y, w = jnp.array([0, 1, 2, 1, 0]), jnp.array([1.0, 0.0, 2.0, 1.0, 0.5])
    z = predict(params, x)

    @jax.jit  # one program (eager dispatch of the Jacobian and Hessian dominated this test)
    def pieces(z, y, w):
        f = SoftmaxCELoss().row_factor(z, y, w)
        R = jax.jacfwd(lambda zz: f.apply(zz.reshape(z.shape)).reshape(-1))(jnp.zeros(z.size))
        hz = jax.hessian(lambda zz: SoftmaxCELoss().value(zz.reshape(z.shape), y, w))(z.reshape(-1))
        grad_z = jax.grad(lambda zz: SoftmaxCELoss().value(zz, y, w))(z)
        return R.T @ R / f.n, hz, f.apply_t(f.residual), f.n * grad_z

    gram, hz, rt_r, n_grad = pieces(z, y, w)
    np.testing.assert_allclose(np.asarray(gram), np.asarray(hz), atol=1e-12)
    np.testing.assert_allclose(np.asarray(rt_r), np.asarray(n_grad), atol=1e-12)


def _dropout_model():
    params, predict = tiny_mlp(sizes=(3, 6, 2))

    def apply(p, state, x, rng):
        keep = jax.random.bernoulli(rng, 0.8, (x.shape[0], 6))
        h = jnp.tanh(x @ p["layer0"]["w"] + p["layer0"]["b"]) * keep / 0.8
        out = h @ p["layer1"]["w"] + p["layer1"]["b"]
        return out, {"calls": state["calls"] + 1}, {"mask_sum": jnp.sum(keep)}

    return params, somax.Model(apply, uses_rng=True, has_aux=True)


def test_model_state_rng_and_aux_flow_through_the_step():
    params, model = _dropout_model()
    method = somax.make("sgn_mse", model=model)
    state = method.init(params, {"calls": jnp.zeros((), jnp.int32)})
    step = jax.jit(method.step)
    masks = []
    for t in range(4):
        params, state, info = step(params, regression_batch(key=t, d_out=2), state, jax.random.PRNGKey(0))
        masks.append(float(info["aux"]["mask_sum"]))
    assert int(state.model_state["calls"]) == 4  # the new model state is carried
    assert len(set(masks)) > 1  # same user rng each step, yet a fresh dropout mask every step
    with pytest.raises(ValueError, match="rng=None.*the model \\(dropout\\)"):
        method.step(params, regression_batch(d_out=2), state, None)


def _linen_cnn():
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = x.reshape(x.shape[0], -1)
            return nn.Dense(10)(x)

    return CNN()


def _digits(n=512):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data[:n] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(d.target[:n])


@pytest.mark.parametrize("preset", ["sgn_ce", "sophia_g"])
def test_linen_cnn_with_batchnorm_trains_and_updates_statistics(preset):
    cnn = _linen_cnn()
    x, y = _digits()
    variables = cnn.init(jax.random.PRNGKey(0), x[:2], train=False)
    params, model_state = somax.adapters.split_linen_variables(variables)
    model = somax.adapters.linen_model(cnn, apply_kwargs={"train": True}, rng_collections=())
    kwargs = {"learning_rate": 1.0, "maxiter": 5} if preset == "sgn_ce" else {"learning_rate": 0.01}
    method = somax.make(preset, model=model, **kwargs)
    state = method.init(params, model_state)
    step = jax.jit(method.step)
    first = None
    for t in range(60):
        idx = np.arange(64) + 64 * (t % 8)
        params, state, info = step(params, {"x": x[idx], "y": y[idx]}, state, jax.random.PRNGKey(t))
        first = float(info["loss"]) if first is None else first
    stats0 = model_state["batch_stats"]
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), stats0, state.model_state["batch_stats"]
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # batch statistics were updated
    logits = cnn.apply({"params": params, **state.model_state}, x, train=False)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == y))
    assert float(info["loss"]) < 0.5 * first and acc >= 0.85, (first, float(info["loss"]), acc)


def test_nnx_mlp_trains():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
    method = somax.make("sgn_mse", model=somax.adapters.nnx_model(graphdef), learning_rate=1.0, lam0=0.1)
    state = method.init(params, rest)
    batch = regression_batch(b=32, d_out=2)
    losses = []
    step = jax.jit(method.step)
    for _ in range(15):
        params, state, info = step(params, batch, state, None)
        losses.append(float(info["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_float64_end_to_end_and_bfloat16_with_float32_solves():
    params, predict = tiny_mlp(sizes=(3, 5, 2))  # float64
    method = somax.make("sgn_mse", predict, damping="trust_region")
    new, state, info = method.step(params, regression_batch(d_out=2), method.init(params), None)
    assert all(v.dtype == jnp.float64 for k, v in info.items() if k in ("loss", "lam", "rho", "grad_norm"))
    assert state.damping.lam.dtype == jnp.float64 and flat(new).dtype == np.float64

    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    m16 = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        damping=DampingSpec("constant", lam0=0.1),
        solve_dtype="float32",
    )
    state = m16.init(p16)
    assert state.solver == () or all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(state.solver))
    batch = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), regression_batch(b=32, d_out=2))
    losses = []
    step = jax.jit(m16.step)
    for _ in range(10):
        p16, state, info = step(p16, batch, state, None)
        losses.append(float(info["loss"]))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(p16))
    assert info["loss"].dtype == jnp.float32 and state.damping.lam.dtype == jnp.float32
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("backend", ["numpy", "orbax"])
def test_checkpoint_resume_reproduces_the_run_exactly(tmp_path, backend):
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, damping="trust_region", momentum=0.9, learning_rate=0.5)
    step = jax.jit(method.step)
    batches = [regression_batch(key=t, d_out=2) for t in range(8)]

    def run(p, s, bs):
        for b in bs:
            p, s, _ = step(p, b, s, None)
        return p, s

    full_p, full_s = run(params, method.init(params), batches)
    mid_p, mid_s = run(params, method.init(params), batches[:4])
    tree = {"params": mid_p, "state": mid_s}
    if backend == "numpy":
        somax.checkpoint.save(tmp_path / "ckpt.npz", tree)
        restored = somax.checkpoint.restore(tmp_path / "ckpt.npz", like=tree)
    else:
        ocp = pytest.importorskip("orbax.checkpoint")
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp_path / "orbax", tree)
        ckpt.wait_until_finished()
        restored = ckpt.restore(tmp_path / "orbax", tree)
    restored_state = (
        somax.MethodState(*restored["state"])
        if not isinstance(restored["state"], somax.MethodState)
        else restored["state"]
    )
    res_p, res_s = run(restored["params"], restored_state, batches[4:])
    np.testing.assert_array_equal(flat(res_p), flat(full_p))
    np.testing.assert_array_equal(flat(res_s), flat(full_s))


def test_nan_batch_is_rejected_and_training_continues():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict)
    step = jax.jit(method.step)
    state = method.init(params)
    params, state, info = step(params, regression_batch(key=0, d_out=2), state, None)
    bad = regression_batch(key=1, d_out=2)
    bad["x"] = bad["x"].at[2, 1].set(jnp.nan)
    p_before, s_before = params, state
    params, state, info = step(params, bad, state, None)
    assert not bool(info["finite"]) and not bool(info["step_accepted"])
    np.testing.assert_array_equal(flat(params), flat(p_before))
    np.testing.assert_array_equal(flat(state.solver), flat(s_before.solver))
    assert int(state.nonfinite_count) == 1 and int(state.count) == 2
    params, state, info = step(params, regression_batch(key=2, d_out=2), state, None)
    assert bool(info["finite"]) and np.all(np.isfinite(flat(params)))


def test_guard_off_lets_the_non_finite_step_through():
    """``reject_nonfinite=False`` (every preset accepts it) compiles no guard: nothing is rejected."""
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, reject_nonfinite=False)
    assert method.reject_nonfinite is False and somax.make("sgn_mse", predict).reject_nonfinite is True
    with pytest.raises(TypeError, match="reject_nonfinite must be True or False, got 'no'"):
        somax.make("sgn_mse", predict, reject_nonfinite="no")
    bad = regression_batch(key=1, d_out=2)
    bad["x"] = bad["x"].at[2, 1].set(jnp.nan)
    args = (params, bad, method.init(params), None)
    assert "is_finite" not in jax.jit(method.step).lower(*args).as_text()
    assert "is_finite" in jax.jit(somax.make("sgn_mse", predict).step).lower(*args).as_text()
    _, state, info = jax.jit(method.step)(*args)
    assert np.isnan(float(info["loss"])) and int(state.nonfinite_count) == 0 and int(state.count) == 1
    assert bool(info["finite"]) and bool(info["step_accepted"])  # unchecked: reported finite


def test_malformed_inputs_name_the_offending_entry():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict)
    state = method.init(params)
    with pytest.raises(KeyError, match="no entry 'x'.*'inputs'"):
        method.step(params, {"inputs": jnp.ones((4, 3)), "y": jnp.ones((4, 2))}, state, None)
    with pytest.raises(ValueError, match=r"targets y of shape \(4, 5\)"):
        method.step(params, {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 5))}, state, None)
    with pytest.raises(TypeError, match="state must be the MethodState"):
        method.step(params, regression_batch(d_out=2), {"count": 0}, None)
    weighted = somax.make("sgn_mse", predict, curvature_kwargs={"weight_key": "w"})
    with pytest.raises(ValueError, match=r"weights of shape \(3,\).*\(4,\)"):
        weighted.step(params, {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 2)), "w": jnp.ones(3)}, state, None)
    with pytest.raises(ValueError, match="Did you mean 'bce'"):
        somax.assemble(curvature=CurvatureSpec("ggn", kwargs={"predict_fn": predict, "loss": "bec"}))
    with pytest.raises(TypeError, match="ConvexLoss"):
        somax.assemble(curvature=CurvatureSpec("ggn", kwargs={"predict_fn": predict, "loss": lambda z, y: z}))
    with pytest.raises(TypeError, match="solve_dtype"):
        somax.assemble(curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}), solve_dtype="int32")
    fn_batch = somax.make("sgn_mse", predict, curvature_kwargs={"x_fn": lambda b: b[0], "y_fn": lambda b: b[1]})
    b = regression_batch(d_out=2)
    _, _, info = fn_batch.step(params, (b["x"], b["y"]), fn_batch.init(params), None)
    assert np.isfinite(float(info["loss"]))


def test_as_optax_matches_the_step():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict, learning_rate=0.5)
    tx = somax.as_optax(method, use_updates=False)  # the method differentiates the batch itself
    opt_state = tx.init(params)
    p_opt, p_ref, s_ref = params, params, method.init(params)
    for t in range(3):
        batch = regression_batch(key=t, d_out=2)
        grads = jax.tree_util.tree_map(jnp.zeros_like, p_opt)  # ignored with use_updates=False
        updates, opt_state = jax.jit(tx.update)(grads, opt_state, p_opt, batch=batch, rng=None)
        p_opt = optax.apply_updates(p_opt, updates)
        p_ref, s_ref, info = method.step(p_ref, batch, s_ref, None)
    np.testing.assert_allclose(flat(p_opt), flat(p_ref), rtol=1e-10)
    assert float(opt_state.info["loss"]) == pytest.approx(float(info["loss"]))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_malformed_params_rng_state_and_batch_dtypes_name_the_entry():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.make("sgn_mse", predict)
    state = method.init(params)
    batch = regression_batch(d_out=2)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layer0"]["w"] = jnp.ones(params["layer0"]["w"].shape, jnp.int32)
    with pytest.raises(TypeError, match=r"params\['layer0'\]\['w'\] has dtype int32"):
        method.step(bad, batch, state, None)
    # a state from init on differently shaped params
    other, _ = tiny_mlp(sizes=(3, 4, 2))
    with pytest.raises(ValueError, match=r"state\.solver\['layer0'\]\['b'\] is float64\[4\].*float64\[5\]"):
        somax.make("sgn_mse", predict, momentum=0.9).step(
            params, batch, somax.make("sgn_mse", predict, momentum=0.9).init(other), None
        )
    # inputs with the wrong feature count: the message names the batch entries and their shapes
    with pytest.raises(TypeError, match=r"batch: \['x'\]: float64\[8, 4\], \['y'\]: float64\[8, 2\]"):
        method.step(params, {"x": jnp.ones((8, 4)), "y": jnp.ones((8, 2))}, state, None)

    # a plan that draws random numbers needs a PRNG key
    def mse(p, b):
        return 0.5 * jnp.mean(jnp.sum((predict(p, b["x"]) - b["y"]) ** 2, -1))

    sophia = somax.make("sophia_h", loss_fn=mse)
    with pytest.raises(TypeError, match=r"rng must be one PRNG key.*int32\[\]"):
        sophia.step(params, batch, sophia.init(params), jnp.asarray(3, jnp.int32))


@pytest.mark.parametrize("flag", ["couples_examples", "uses_rng"])
def test_row_gram_rejects_models_whose_single_example_jacobian_is_not_the_batch_one(flag):
    _, predict = tiny_mlp(sizes=(3, 5, 2))
    model = somax.Model(lambda p, s, x, r: (predict(p, x), s, None), **{flag: True})
    with pytest.raises(somax.IncompatibleSpecsError, match=r"SolverSpec\('row_cholesky'\).*'row_cg'"):
        somax.make("egn_mse", model=model)
    assert somax.make("egn_mse_cg", model=model).plan.lane == "row"  # batch JVP/VJP: exact, allowed
