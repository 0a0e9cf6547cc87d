"""Assembly: the paper's App. B.3 example, registries, did-you-mean, incompatible combinations, presets."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from oracles import classification_batch, regression_batch, tiny_mlp

import somax
from somax.contracts import Solver
from somax.specs import *  # noqa: F403  (exactly as the paper's example does)
from somax.specs import CurvatureSpec, DampingSpec, PrecondSpec, SolverSpec, TelemetrySpec


class _Model:
    """Stands in for a Flax-style module: ``model.apply(params, x)``."""

    def __init__(self, predict):
        self.apply = predict


def test_paper_appendix_b3_example_verbatim():
    params, predict = tiny_mlp(sizes=(3, 6, 4))
    model = _Model(predict)
    # 1. Define the Spec
    method = somax.assemble(
        # Use Cross-Entropy GGN
        curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": model.apply}),
        # Solve in Parameter Space using PCG
        solver=SolverSpec("cg", kwargs={"maxiter": 20, "tol": 1e-4}),
        # Precondition with EMA diagonal (Adam-style heuristic)
        precondition=PrecondSpec("diag_ema", kwargs={"beta": 0.99}),
        # Use Trust-Region Damping
        damping=DampingSpec("trust_region", lam0=1.0),
        # Embed standard Optax transforms for the update application
        tx=optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.scale(-1.0),  # Descent direction
        ),
    )
    text = str(method.plan)
    assert "lane: param" in text and "rho" in text and "trust_region" in text
    assert method.plan.cadences("rho") == (1,)  # the trust region schedules the rho bundle (loss_after)
    state = method.init(params)
    batch = classification_batch(c=4, b=16)
    step = jax.jit(method.step)
    losses = []
    for _ in range(5):
        params, state, info = step(params, batch, state, jax.random.PRNGKey(0))
        losses.append(float(info["loss"]))
        assert np.isfinite(float(info["rho"]))
    assert losses[-1] < losses[0]


def test_specs_are_frozen_and_validated():
    spec = SolverSpec("cg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kind = "x"  # type: ignore[misc]
    with pytest.raises(TypeError, match="kind"):
        SolverSpec(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam0"):
        DampingSpec("constant", lam0=-1.0)
    with pytest.raises(ValueError, match="rho_every_k"):
        TelemetrySpec(rho_every_k=0)
    with pytest.raises(TypeError, match="loss_after_every_k"):
        TelemetrySpec(loss_after_every_k=2.5)


def test_unknown_kind_suggests_the_close_name():
    _, predict = tiny_mlp()
    curv = CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict})
    with pytest.raises(somax.UnknownKindError, match="Did you mean 'cg'"):
        somax.assemble(curvature=curv, solver=SolverSpec("gc"))
    with pytest.raises(somax.UnknownKindError, match="Did you mean 'trust_region'"):
        somax.assemble(curvature=curv, damping=DampingSpec("trust_regin"))
    with pytest.raises(somax.UnknownKindError, match="Did you mean 'ggn_ce'"):
        somax.assemble(curvature=CurvatureSpec("ggn_cee", kwargs={"predict_fn": predict}))


def test_bad_keywords_and_arguments_are_named():
    _, predict = tiny_mlp()
    curv = CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict})
    with pytest.raises(TypeError, match="'max_iter'.*Did you mean 'maxiter'"):
        somax.assemble(curvature=curv, solver=SolverSpec("cg", kwargs={"max_iter": 3}))
    with pytest.raises(TypeError, match="exactly one of predict_fn"):
        somax.assemble(curvature=CurvatureSpec("ggn_mse"))
    with pytest.raises(TypeError, match="solver= must be a SolverSpec"):
        somax.assemble(curvature=curv, solver="cg")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tx= must be an optax.GradientTransformation"):
        somax.assemble(curvature=curv, tx=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxiter"):
        somax.assemble(curvature=curv, solver=SolverSpec("cg", kwargs={"maxiter": 0}))
    for key in ("tol", "stabilise_every"):  # bools are ints in Python; never a valid count or tolerance
        with pytest.raises(ValueError, match=key):
            somax.assemble(curvature=curv, solver=SolverSpec("cg", kwargs={key: True}))
    with pytest.raises(ValueError, match="lower < upper"):
        somax.assemble(curvature=curv, damping=DampingSpec("trust_region", kwargs={"lower": 0.9, "upper": 0.1}))


def test_incompatible_combinations_name_both_parts():
    _, predict = tiny_mlp()
    curv = CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict})
    with pytest.raises(somax.IncompatibleSpecsError, match=r"SolverSpec\('diagonal'\).*PrecondSpec\('identity'\)"):
        somax.assemble(curvature=curv, solver=SolverSpec("diagonal"))


def test_user_registered_solver_is_used():
    calls = {"n": 0}

    @dataclasses.dataclass(frozen=True)
    class ScaledGradient(Solver):
        """s = g / (1 + λ): a deliberately simple user solver in the parameter lane."""

        scale: float = 1.0
        lane = "param"

        def solve(self, lin, rhs, lam, precond, state):
            calls["n"] += 1
            return jax.tree_util.tree_map(lambda g: self.scale * g / (1.0 + lam), rhs), state, {}

    somax.register("solver", "scaled_gradient_test", lambda *, scale=1.0: ScaledGradient(scale))
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": predict}),
        solver=SolverSpec("scaled_gradient_test", kwargs={"scale": 2.0}),
        damping=DampingSpec("constant", lam0=1.0),
    )
    batch = regression_batch(d_out=2)
    new, _, info = method.step(params, batch, method.init(params), None)
    g = jax.grad(lambda p: 0.5 * ((predict(p, batch["x"]) - batch["y"]) ** 2).sum() / 6)(params)
    np.testing.assert_allclose(
        np.asarray(new["layer0"]["w"]), np.asarray(params["layer0"]["w"] - g["layer0"]["w"]), rtol=1e-12
    )
    assert calls["n"] == 1 and int(info["cg_iters"]) == -1
    with pytest.raises(ValueError, match="already registered"):
        somax.register("solver", "scaled_gradient_test", lambda: None)
    with pytest.raises(somax.UnknownKindError, match="Did you mean 'solver'"):
        somax.register("solvr", "x", lambda: None)


def test_row_solver_with_hessian_is_rejected_naming_both():
    @dataclasses.dataclass(frozen=True)
    class FakeRow(Solver):
        lane = "row"

        def solve(self, lin, rhs, lam, precond, state):
            raise AssertionError("never reached: assembly rejects it")

    somax.register("solver", "fake_row_test", FakeRow)
    _, predict = tiny_mlp()
    with pytest.raises(
        somax.IncompatibleSpecsError, match=r"SolverSpec\('fake_row_test'\).*CurvatureSpec\('hessian'\)"
    ):
        somax.assemble(
            curvature=CurvatureSpec("hessian", kwargs={"predict_fn": predict, "loss": "mse"}),
            solver=SolverSpec("fake_row_test"),
        )


def test_presets_make_list_describe_and_typos():
    _, predict = tiny_mlp()
    assert {"sgn_mse", "sgn_ce", "newton_cg"} <= set(somax.list_methods())
    m1 = somax.sgn_mse(predict, learning_rate=0.5)
    m2 = somax.make("sgn_mse", predict_fn=predict, learning_rate=0.5)
    assert str(m1.plan) == str(m2.plan)
    with pytest.raises(TypeError, match="'lerning_rate'.*Did you mean 'learning_rate'"):
        somax.make("sgn_mse", predict_fn=predict, lerning_rate=0.1)
    with pytest.raises(TypeError, match="'max_iter'"):
        somax.sgn_ce(predict, max_iter=3)
    with pytest.raises(ValueError, match="Did you mean 'sgn_mse'"):
        somax.make("sgn_mes", predict_fn=predict)
    with pytest.raises(TypeError, match="missing model callable"):
        somax.make("sgn_ce")
    with pytest.raises(TypeError, match="loss_fn or predict_fn\\+loss"):
        somax.make("newton_cg", predict_fn=predict)
    text = somax.describe("newton_cg")
    assert "Newton-CG" in text and "learning_rate" in text and "maxiter = 10" in text
    tr = somax.make("sgn_ce", predict, damping="trust_region", tr_every_k=5, precondition="diag_ema")
    assert tr.plan.cadences("rho", requester="damping") == (5,) and "diag_ema" in str(tr.plan)
    nc = somax.make("newton_cg", curvature_kwargs={"predict_fn": predict, "loss": "mse"})
    assert nc.plan.components["curvature"] == "hessian"
    with pytest.raises(TypeError, match="both directly and in curvature_kwargs"):
        somax.make("sgn_mse", predict, curvature_kwargs={"predict_fn": predict})


def test_preset_outer_chain_options():
    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batch = regression_batch(d_out=2)
    base = somax.make("sgn_mse", predict, learning_rate=0.1, warm_start=False)
    clipped = somax.make("sgn_mse", predict, learning_rate=0.1, warm_start=False, clip_norm=1e-3)
    p0, _, i0 = base.step(params, batch, base.init(params), None)
    p1, _, i1 = clipped.step(params, batch, clipped.init(params), None)
    assert float(i1["update_norm"]) == pytest.approx(1e-4, rel=1e-6)
    assert float(i0["update_norm"]) > 1e-4
    wd = somax.make("sgn_mse", predict, learning_rate=0.1, warm_start=False, weight_decay=0.5)
    p2, _, _ = wd.step(params, batch, wd.init(params), None)
    w = lambda p: np.asarray(p["layer0"]["w"])
    np.testing.assert_allclose(w(p2), w(p0) - 0.1 * 0.5 * w(params), rtol=1e-10)


@pytest.mark.parametrize("option", [{"x_key": "image"}, {"y_key": "label"}, {"x_fn": lambda b: b}])
def test_hessian_refuses_batch_options_it_would_ignore_with_loss_fn(option):
    spec = CurvatureSpec("hessian", kwargs={"loss_fn": lambda p, b: 0.0, **option})
    with pytest.raises(TypeError, match=f"{next(iter(option))} would be ignored"):
        somax.assemble(curvature=spec, solver=SolverSpec("cg"))
