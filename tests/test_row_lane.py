"""Row-space lane (EGN), its row primitives, and dense direct solves — against float64 oracles."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import (
    classification_batch,
    damped_solve,
    flat,
    output_loss_fn,
    regression_batch,
    tiny_mlp,
)

import somax
from somax.curvature import ggn_ce, ggn_mse
from somax.curvature.losses import MSELoss, SoftmaxCELoss
from somax.curvature.rows import row_operator
from somax.solvers._dtypes import check_solve_dtype
from somax.specs import CurvatureSpec, DampingSpec, PrecondSpec, SolverSpec, TelemetrySpec

LAM = 0.3


def _scalar(predict):
    return lambda p, x: predict(p, x)[:, 0]


def _sequence(predict, t=2):
    """(B, T·C) logits reshaped to (B, T, C): sequence cross-entropy over N = B·T positions."""
    return lambda p, x: predict(p, x).reshape(x.shape[0], t, -1)


def _case(name):
    """(loss, predict_fn, params, batch) for one tiny float64 problem."""
    if name == "mse_scalar":
        params, predict = tiny_mlp(sizes=(3, 5, 1))
        return "mse", _scalar(predict), params, regression_batch(d_out=1)
    if name == "mse_vector":
        params, predict = tiny_mlp(sizes=(3, 5, 2))
        return "mse", predict, params, regression_batch(d_out=2)
    if name == "ce_int":
        params, predict = tiny_mlp(sizes=(3, 5, 4))
        return "ce", predict, params, classification_batch(c=4)
    if name == "ce_onehot":
        params, predict = tiny_mlp(sizes=(3, 5, 4))
        return "ce", predict, params, classification_batch(c=4, one_hot=True)
    if name == "ce_sequence":
        params, predict = tiny_mlp(sizes=(3, 5, 6))
        batch = classification_batch(c=3)
        batch["y"] = jax.random.randint(jax.random.PRNGKey(7), (6, 2), 0, 3)
        return "ce", _sequence(predict), params, batch
    raise ValueError(name)


CASES = ["mse_scalar", "mse_vector", "ce_int", "ce_onehot"]
ROW_SOLVERS = {
    "row_cholesky": SolverSpec("row_cholesky"),
    "row_cg": SolverSpec("row_cg", kwargs={"maxiter": 200, "tol": 1e-13}),
    "row_cg_warm": SolverSpec("row_cg", kwargs={"maxiter": 200, "tol": 1e-13, "warm_start": True}),
}


def _oracle(loss, predict, params, batch, *, hessian=False):
    """Dense float64 oracle: materialised GGN ``Jᵀ H_z J`` (full Jacobian, autodiff ``H_z``), the
    gradient, the full Jacobian ``(b·C, d)`` and optionally the exact Hessian — the construction
    of ``oracles.dense_ggn`` / ``oracles.dense_hessian``, traced once instead of op by op."""
    out = {"mse": MSELoss(), "ce": SoftmaxCELoss()}[loss]

    @jax.jit
    def dense(params, batch):
        w, unravel = jax.flatten_util.ravel_pytree(params)
        z = predict(params, batch["x"])
        jac = jax.jacfwd(lambda v: predict(unravel(v), batch["x"]).reshape(-1))(w)
        hz = jax.hessian(lambda zz: out.value(zz.reshape(z.shape), batch["y"]))(z.reshape(-1))
        loss_of_w = lambda v: out.value(predict(unravel(v), batch["x"]), batch["y"])  # noqa: E731
        hess = jax.hessian(loss_of_w)(w) if hessian else None
        return jac.T @ hz @ jac, jax.grad(loss_of_w)(w), jac, hess

    return [None if a is None else np.asarray(a) for a in dense(params, batch)]


@functools.cache
def _case_oracle(case):
    loss, predict, params, batch = _case(case)
    return _oracle(loss, predict, params, batch)


def _exact_direction(loss, predict, params, batch, lam=LAM, *, case=None):
    """Oracle ``(G + λI)⁻¹ g`` with the dense GGN and the dense gradient, float64."""
    ggn, g, _, _ = _case_oracle(case) if case is not None else _oracle(loss, predict, params, batch)
    return damped_solve(ggn, lam, g)


def _method(loss, predict, solver, *, damping=None, telemetry=None, tx=None, lam=LAM):
    return somax.assemble(
        curvature=CurvatureSpec(f"ggn_{loss}", kwargs={"predict_fn": predict}),
        solver=solver,
        damping=damping or DampingSpec("constant", lam0=lam),
        telemetry=telemetry,
        tx=tx if tx is not None else optax.scale(-1.0),
    )


def _direction(method, params, batch, state=None):
    """``s`` from one step with ``tx = scale(-1)``: ``w_new = w − s``."""
    state = method.init(params) if state is None else state
    new_params, new_state, info = jax.jit(method.step)(params, batch, state)
    return flat(params) - flat(new_params), new_state, info


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# ----------------------------------------------------------------------------- loss square-root factors


@pytest.mark.parametrize(
    "loss, z_shape, labels",
    [
        ("mse", (5, 3), "real"),
        ("ce", (5, 4), "int"),
        ("ce", (5, 4), "soft_masked"),
        ("ce", (3, 2, 4), "int"),
    ],
)
def test_row_factor_is_exact_square_root(loss, z_shape, labels):
    """``RᵀR/n = H_z`` and ``Rᵀr/n = ∇_z L`` for every loss and label form (dense oracle)."""
    kz, ky = jax.random.split(jax.random.PRNGKey(3))
    z = 3.0 * jax.random.normal(kz, z_shape, jnp.float64)
    if labels == "real":
        y, out = jax.random.normal(ky, z_shape, jnp.float64), MSELoss()
    elif labels == "int":
        y, out = jax.random.randint(ky, z_shape[:-1], 0, z_shape[-1]), SoftmaxCELoss()
    elif labels == "onehot":
        y, out = jax.nn.one_hot(jax.random.randint(ky, z_shape[:-1], 0, z_shape[-1]), z_shape[-1]), SoftmaxCELoss()
    else:  # soft labels with label mass 1, 0.5 and 0 (a masked position)
        mass = jnp.array([1.0, 0.5, 0.0, 1.0, 0.25])[:, None]
        y, out = jax.nn.softmax(jax.random.normal(ky, z_shape), axis=-1) * mass, SoftmaxCELoss()
    factor = out.row_factor(z, y)
    m_out, m_rows = int(np.prod(z_shape)), int(np.prod(factor.row_shape))

    @jax.jit
    def matrices(z, y):
        f = out.row_factor(z, y)
        r_mat = jax.vmap(f.apply)(jnp.eye(m_out).reshape((m_out,) + z_shape)).reshape(m_out, m_rows).T
        rt_mat = jax.vmap(f.apply_t)(jnp.eye(m_rows).reshape((m_rows,) + f.row_shape)).reshape(m_rows, m_out)
        hz = jax.hessian(lambda zz: out.value(zz.reshape(z_shape), y))(z.reshape(-1))
        grad = jax.grad(out.value)(z, y).reshape(-1)
        return r_mat, rt_mat, hz, grad, f.apply_t(f.residual).reshape(-1)

    r_mat, rt_mat, hz, grad, rt_r = matrices(z, y)
    np.testing.assert_allclose(r_mat.T @ r_mat / factor.n, hz, atol=1e-14)
    np.testing.assert_allclose(rt_r / factor.n, grad, atol=1e-14)
    np.testing.assert_allclose(rt_mat, r_mat, atol=1e-14)  # apply_t is the transpose of apply
    if loss == "ce":
        assert factor.row_shape == z_shape[:-1] + (z_shape[-1] - 1,)  # C−1 rows per position


def test_ce_row_factor_is_finite_for_confident_wrong_predictions():
    z = jnp.array([[80.0, 0.0, 0.0], [0.0, 0.0, 0.0]], jnp.float32)
    factor = SoftmaxCELoss().row_factor(z, jnp.array([1, 2]))
    assert bool(jnp.all(jnp.isfinite(factor.residual)))
    np.testing.assert_allclose(factor.apply_t(factor.residual)[0], [1.0, -1.0, 0.0], atol=1e-5)


def test_loss_without_row_factor_names_itself():
    class Hinge(somax.curvature.OutputLoss):
        name = "hinge"

    with pytest.raises(NotImplementedError, match="hinge"):
        Hinge().row_factor(jnp.zeros((2, 1)), jnp.zeros((2, 1)))


# ----------------------------------------------------------------------------- directions vs the oracle


@pytest.mark.parametrize("case", CASES + ["ce_sequence"])
def test_row_direction_is_exact_damped_ggn_direction(case):
    """Each row solver returns ``(G + λI)⁻¹ g`` of the dense float64 GGN (μ = nλ inside).

    The three solvers run on the step's linearization inside one jitted function per case.
    """
    loss, predict, params, batch = _case(case)
    exact = _exact_direction(loss, predict, params, batch, case=case)
    curvature = (ggn_mse if loss == "mse" else ggn_ce)(predict_fn=predict)
    solvers = {name: somax.registry.SOLVERS.get(spec.kind)(**spec.kwargs) for name, spec in ROW_SOLVERS.items()}

    @jax.jit
    def directions(params, batch):
        lin = curvature.linearize(params, batch)
        lam = jnp.asarray(LAM, jnp.float64)
        return {name: sol.solve(lin, lin.grad, lam, None, sol.init(params))[::2] for name, sol in solvers.items()}

    for name, (s, stats) in directions(params, batch).items():
        assert _rel(flat(s), exact) <= 1e-6, name
        if name.startswith("row_cg"):
            assert bool(stats["cg_converged"]) and int(stats["cg_iters"]) >= 1
    # ... and through the assembled step (μ = nλ, tx on the direction) for one solver.
    if case == "ce_int":
        s, _, _ = _direction(_method(loss, predict, ROW_SOLVERS["row_cholesky"]), params, batch)
        assert _rel(s, exact) <= 1e-6


def test_row_cholesky_and_row_cg_agree_over_steps():
    """Over several steps (warm-started CG, changing batches) both row solvers give the same direction."""
    loss, predict, params, _ = _case("ce_int")
    chol = _method(loss, predict, SolverSpec("row_cholesky"))
    cg = _method(loss, predict, SolverSpec("row_cg", kwargs={"maxiter": 50, "tol": 1e-12, "warm_start": True}))
    p1, p2, st1, st2 = params, params, chol.init(params), cg.init(params)
    chol_step, cg_step = jax.jit(chol.step), jax.jit(cg.step)
    for k in range(4):
        batch = classification_batch(key=10 + k, c=4)
        p1, st1, _ = chol_step(p1, batch, st1)
        p2, st2, info = cg_step(p2, batch, st2)
        assert _rel(flat(p2), flat(p1)) <= 1e-9
        assert bool(info["cg_converged"])


def test_row_cg_warm_start_is_exact_when_the_previous_direction_solves_the_system():
    """``v₀ = α(r − Ĵs)/μ``: with ``s`` = this batch's exact direction, CG needs 0 iterations."""
    loss, predict, params, batch = _case("mse_vector")
    method = _method(loss, predict, SolverSpec("row_cg", kwargs={"maxiter": 50, "tol": 1e-10, "warm_start": True}))
    state = method.init(params)
    exact = _exact_direction(loss, predict, params, batch, case="mse_vector")
    _, unravel = jax.flatten_util.ravel_pytree(params)
    state = state._replace(solver=unravel(jnp.asarray(exact)))
    s, new_state, info = _direction(method, params, batch, state)
    assert int(info["cg_iters"]) == 0 and float(info["cg_residual"]) <= 1e-10
    assert _rel(s, exact) <= 1e-9
    assert _rel(flat(new_state.solver), exact) <= 1e-9  # the state carries the direction


def test_row_cholesky_float32_params_with_float64_gram():
    loss, predict, params, batch = _case("ce_int")
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    batch32 = {"x": batch["x"].astype(jnp.float32), "y": batch["y"]}
    exact = _exact_direction(loss, predict, params32, batch32)
    method = _method(loss, predict, SolverSpec("row_cholesky", kwargs={"solve_dtype": "float64"}))
    new_params, _, info = jax.jit(method.step)(params32, batch32, method.init(params32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(new_params))
    assert info["loss"].dtype == jnp.float32
    assert _rel(flat(params32).astype(np.float64) - flat(new_params), exact) <= 1e-5


# ----------------------------------------------------------------------------- Gram (see also test_structured_gram.py)


def test_gram_is_built_per_example_not_by_full_batch_passes():
    """Both Gram paths (structured and per-example Jacobians) evaluate the model on single
    examples (vmap) and never call the batch JVP/VJP.

    A Gram made of ``m`` full-batch matvecs (``vmap`` of ``lin.jvp``/``lin.vjp`` over row
    basis vectors) calls ``lin.jvp``/``lin.vjp``; a Gram made of per-batch Jacobians traces
    ``predict_fn`` on the full batch. Either fails here.
    """
    loss, predict, params, batch = _case("mse_vector")
    seen_shapes = []

    def traced_predict(p, x):
        seen_shapes.append(tuple(x.shape))
        return predict(p, x)

    lin = ggn_mse(predict_fn=traced_predict).linearize(params, batch)
    assert seen_shapes == [(6, 3)]  # the step's single linearization
    calls = {"jvp": 0, "vjp": 0}

    def counted(name, fn):
        def wrapper(v):
            calls[name] += 1
            return fn(v)

        return wrapper

    lin = dataclasses.replace(lin, jvp=counted("jvp", lin.jvp), vjp=counted("vjp", lin.vjp))
    seen_shapes.clear()
    grams = jax.jit(lambda: [row_operator(lin).gram(mode=mode) for mode in ("auto", "per_example")])()
    assert calls == {"jvp": 0, "vjp": 0}
    assert seen_shapes and all(shape == (1, 3) for shape in seen_shapes)  # one example at a time
    # ... and it is the right Gram: J Jᵀ of the batch (R = I for MSE).
    jac = _case_oracle("mse_vector")[2]
    for gram in grams:
        np.testing.assert_allclose(gram, jac @ jac.T, rtol=1e-12, atol=1e-12)


def test_gram_rejects_predict_fn_that_drops_the_batch_axis():
    params, predict = tiny_mlp(sizes=(3, 5, 1))
    lin = ggn_mse(predict_fn=lambda p, x: jnp.squeeze(predict(p, x))).linearize(params, regression_batch(d_out=1))
    with pytest.raises((ValueError, IndexError)):
        row_operator(lin).gram()


# ----------------------------------------------------------------------------- compilation, scan


class _TraceCounter:
    def __init__(self, method):
        self.traces = 0

        def step(params, batch, state):
            self.traces += 1  # Python side effect: runs once per trace
            return method.step(params, batch, state)

        self.step = jax.jit(step)


@pytest.mark.parametrize(
    "preset, kwargs",
    [
        ("egn_mse_cg", {"warm_start": True, "maxiter": 5}),
        ("egn_ce", {"damping": "trust_region", "tr_every_k": 3}),
    ],
)
def test_step_compiles_once_over_20_steps(preset, kwargs):
    loss = "ce" if preset.startswith("egn_ce") else "mse"
    _, predict, params, _ = _case("ce_int" if loss == "ce" else "mse_vector")
    method = somax.make(preset, predict_fn=predict, learning_rate=0.5, lam0=1.0, **kwargs)
    counter = _TraceCounter(method)
    state = method.init(params)
    losses = []
    for k in range(20):
        if loss == "ce":
            batch = classification_batch(key=100 + k, c=4)
        else:
            batch = regression_batch(key=100 + k, d_out=2)
        params, state, info = counter.step(params, batch, state)
        losses.append(float(info["loss"]))
    assert counter.traces == 1
    assert int(state.count) == 20 and np.all(np.isfinite(losses))


@pytest.mark.parametrize("preset", ["egn_mse_cg"])
def test_step_runs_inside_lax_scan(preset):
    _, predict, params, _ = _case("mse_vector")
    method = somax.make(preset, predict_fn=predict, learning_rate=0.5, lam0=0.5, warm_start=True)
    batches = [regression_batch(key=200 + k, d_out=2) for k in range(5)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *batches)

    def body(carry, batch):
        p, st = carry
        p, st, info = method.step(p, batch, st)
        return (p, st), info["loss"]

    (p_scan, st_scan), losses = jax.lax.scan(body, (params, method.init(params)), stacked)
    p_loop, st_loop = params, method.init(params)
    step = jax.jit(method.step)
    for batch in batches:
        p_loop, st_loop, _ = step(p_loop, batch, st_loop)
    np.testing.assert_allclose(flat(p_scan), flat(p_loop), rtol=1e-10, atol=1e-12)
    assert losses.shape == (5,) and int(st_scan.count) == 5


# ----------------------------------------------------------------------------- trust region


def test_trust_region_in_row_lane_matches_parameter_lane():
    """Same rho semantics: rho, λ and accept/reject agree step by step with an exact param-lane solve."""
    loss, predict, params, _ = _case("ce_int")
    damping = DampingSpec("trust_region", lam0=1e-3, kwargs={"every_k": 1, "max_rel_update": None,
                                                             "lam0_floor": None, "curvature_floor": None})  # fmt: skip
    telemetry = TelemetrySpec(rho_every_k=1)
    tx = optax.scale(-2.0)  # an over-long step so that some steps are rejected
    row = _method(loss, predict, SolverSpec("row_cholesky"), damping=damping, telemetry=telemetry, tx=tx)
    par = _method(loss, predict, SolverSpec("dense_cholesky"), damping=damping, telemetry=telemetry, tx=tx)
    p1, p2, s1, s2 = params, params, row.init(params), par.init(params)
    row_step, par_step = jax.jit(row.step), jax.jit(par.step)
    lams, accepted = [], []
    for k in range(8):
        batch = classification_batch(key=300 + k, c=4)
        p1, s1, i1 = row_step(p1, batch, s1)
        p2, s2, i2 = par_step(p2, batch, s2)
        for key in ("rho", "pred_decrease", "loss_after", "lam"):
            np.testing.assert_allclose(float(i1[key]), float(i2[key]), rtol=1e-7, atol=1e-12)
        assert bool(i1["step_accepted"]) == bool(i2["step_accepted"])
        assert float(i1["pred_decrease"]) > 0
        lams.append(float(s1.damping.lam))
        accepted.append(bool(i1["step_accepted"]))
    np.testing.assert_allclose(flat(p1), flat(p2), rtol=1e-8, atol=1e-12)
    assert len(set(lams)) > 1  # λ moved
    assert not all(accepted)  # the trust region rejected at least one step


# ----------------------------------------------------------------------------- assembly and presets


@pytest.mark.parametrize("solver", ["row_cholesky", "row_cg"])
def test_assembly_rejects_row_solver_with_hessian(solver):
    _, predict, _, _ = _case("mse_vector")
    with pytest.raises(somax.IncompatibleSpecsError) as err:
        somax.assemble(
            curvature=CurvatureSpec("hessian", kwargs={"predict_fn": predict, "loss": "mse"}),
            solver=SolverSpec(solver),
        )
    message = str(err.value)
    assert f"SolverSpec({solver!r})" in message and "CurvatureSpec('hessian')" in message and "row" in message


def test_assembly_rejects_grad_tx_in_row_lane_but_dense_accepts_it():
    loss, predict, params, batch = _case("mse_vector")
    curvature = CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict})
    with pytest.raises(somax.IncompatibleSpecsError, match=r"SolverSpec\('row_cg'\).*grad_tx"):
        somax.assemble(curvature=curvature, solver=SolverSpec("row_cg"), grad_tx=optax.scale(2.0))
    # Dense direct solves take any right-hand side: (G + λI)⁻¹ (2g).
    method = somax.assemble(
        curvature=curvature,
        solver=SolverSpec("dense_cholesky"),
        damping=DampingSpec("constant", lam0=LAM),
        grad_tx=optax.scale(2.0),
        tx=optax.scale(-1.0),
    )
    s, _, _ = _direction(method, params, batch)
    assert _rel(s, 2.0 * _exact_direction(loss, predict, params, batch, case="mse_vector")) <= 1e-10


def test_assembly_rejects_preconditioner_with_row_cg():
    _, predict, _, _ = _case("mse_vector")
    with pytest.raises(somax.IncompatibleSpecsError, match="row_cg"):
        somax.assemble(
            curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
            solver=SolverSpec("row_cg"),
            precondition=PrecondSpec("diag_ema"),
        )


def test_solver_option_validation():
    with pytest.raises(ValueError, match="solve_dtype"):
        somax.solvers.row_cholesky(solve_dtype="float16")
    with pytest.raises(ValueError, match="maxiter"):
        somax.solvers.row_cg(maxiter=0)
    with pytest.raises(ValueError, match="negative"):
        somax.solvers.dense_eigh(negative="flip")
    assert check_solve_dtype("here", jnp.float64) == "float64"
    with pytest.raises(TypeError, match="solve_dtyp"):
        somax.assemble(
            curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": lambda p, x: x}),
            solver=SolverSpec("row_cholesky", kwargs={"solve_dtyp": "float64"}),
        )


def test_float64_solve_dtype_needs_x64(monkeypatch):
    """Without x64, ``solve_dtype='float64'`` would silently be float32: refused at assembly."""
    real_read = jax.config.read
    monkeypatch.setattr(jax.config, "read", lambda name: False if name == "jax_enable_x64" else real_read(name))
    with pytest.raises(ValueError, match="jax_enable_x64"):
        somax.egn_ce(predict_fn=lambda p, x: x, solve_dtype="float64")
    assert somax.egn_ce(predict_fn=lambda p, x: x, solve_dtype="float32").solver.solve_dtype == "float32"


def test_dense_solver_refuses_large_models():
    loss, predict, params, batch = _case("mse_vector")
    method = _method(loss, predict, SolverSpec("dense_cholesky", kwargs={"max_params": 10}))
    with pytest.raises(ValueError, match="max_params"):
        method.step(params, batch, method.init(params))


ROW_PRESETS = ["egn_mse", "egn_ce", "egn_mse_cg", "egn_ce_cg", "ggn_direct_mse", "ggn_direct_ce", "newton_direct"]


@pytest.mark.parametrize("preset", ROW_PRESETS)
def test_presets_reject_misspelled_keywords_and_describe(preset):
    with pytest.raises(TypeError, match="learning_rat"):
        somax.make(preset, lambda p, x: x, learning_rat=0.1)
    assert preset in somax.list_methods()
    assert "Options:" in somax.describe(preset) and hasattr(somax, preset)


def test_row_cg_presets_take_no_preconditioner():
    with pytest.raises(TypeError, match="precondition"):
        somax.egn_mse_cg(predict_fn=lambda p, x: x, precondition="diag_ema")


@pytest.mark.parametrize(
    "preset, case",
    [
        ("egn_mse", "mse_scalar"),
        ("egn_ce_cg", "ce_onehot"),
        ("ggn_direct_mse", "mse_vector"),
        ("ggn_direct_ce", "ce_int"),
    ],
)
def test_presets_step_matches_oracle(preset, case):
    loss, predict, params, batch = _case(case)
    kwargs = {"tol": 1e-13, "maxiter": 100} if preset.endswith("_cg") else {}
    method = somax.make(preset, predict_fn=predict, learning_rate=0.7, lam0=LAM, **kwargs)
    new_params, _, info = jax.jit(method.step)(params, batch, method.init(params))
    step = (flat(params) - flat(new_params)) / 0.7
    assert _rel(step, _exact_direction(loss, predict, params, batch, case=case)) <= 1e-6
    assert method.plan.lane == ("row" if preset.startswith("egn") else "param")


# ----------------------------------------------------------------------------- dense direct solves


def test_newton_direct_on_indefinite_hessian_uses_abs_eigenvalues():
    _, predict, params, batch = _case("ce_int")
    loss_fn = output_loss_fn(predict, "ce")
    _, g, _, hess = _oracle("ce", predict, params, batch, hessian=True)
    evals, evecs = np.linalg.eigh(hess)
    assert evals[0] < 0  # the tiny tanh model's CE Hessian is indefinite here
    lam = 1e-3
    for negative, f in (("abs", np.abs(evals)), ("clip", np.maximum(evals, 0.0))):
        method = somax.newton_direct(loss_fn=loss_fn, learning_rate=1.0, lam0=lam, negative=negative)
        new_params, _, info = jax.jit(method.step)(params, batch, method.init(params))
        expected = evecs @ ((evecs.T @ g) / (f + lam))
        assert _rel(flat(params) - flat(new_params), expected) <= 1e-8
        np.testing.assert_allclose(float(info["eig_min"]), evals[0], rtol=1e-8)
        assert float(g @ expected) > 0  # a descent direction


def test_dense_eigh_equals_cholesky_on_psd_ggn():
    loss, predict, params, batch = _case("ce_onehot")
    exact = _exact_direction(loss, predict, params, batch, case="ce_onehot")
    for solver in ("dense_cholesky", "dense_eigh"):
        s, _, _ = _direction(_method(loss, predict, SolverSpec(solver)), params, batch)
        assert _rel(s, exact) <= 1e-9
