"""Diagonal curvature estimators against dense float64 oracles (statistical tests).

Every test draws a fixed number of independent single-probe (single-sample)
estimates with fixed seeds and checks each of the ``d`` coordinates of their mean
with a two-sided z-test on the sample standard error,

    |mean_i − diag_i| ≤ Z · std_i / √n,    Z = Φ⁻¹(1 − α / (2d)),  α = 1e-3,

a Bonferroni bound: for an unbiased estimator the whole test fails with
probability ≤ 0.1 % (normal approximation, n ≥ 2000; Z ≈ 4.2 for d = 32). The seeds
are fixed, so the outcome is deterministic. Each test also checks the *power* of
its bound: the same samples must reject a 10 %-biased target, so a wrong scaling
(e.g. a missing factor N in GNB) cannot pass.
"""

from __future__ import annotations

import dataclasses
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from oracles import classification_batch, output_loss_fn, regression_batch, tiny_mlp

import somax
from somax import CurvatureSpec, DampingSpec, EstimatorSpec, PrecondSpec, SolverSpec
from somax.curvature import MSELoss, SoftmaxCELoss, ggn, ggn_ce, ggn_mse, hessian
from somax.curvature.losses import OutputLoss
from somax.estimators import gnb, hutchinson, rademacher_like

ALPHA = 1e-3
N_SAMPLES = 6000


def _run(curvature, target_fn, params, batch, estimators, seed: int):
    """``n`` independent estimates (rows) per ``(estimator, n)`` and the dense target, in one compiled call.

    All estimates reuse one linearization, as in a step. ``target_fn(params, batch)``
    is the diagonal of the materialised float64 matrix.
    """
    keys = [jax.random.split(jax.random.PRNGKey(seed + i), n) for i, (_, n) in enumerate(estimators)]

    @jax.jit
    def run(keys):
        lin = curvature.linearize(params, batch)
        flat = lambda e, k: ravel_pytree(e.estimate(lin, k, e.init(None))[0])[0]
        samples = [jax.vmap(lambda k, e=e: flat(e, k))(ks) for (e, _), ks in zip(estimators, keys)]
        return samples, target_fn(params, batch)

    samples, target = run(keys)
    return [np.asarray(x) for x in samples], np.asarray(target)


# The diagonals of ``oracles.dense_hessian`` / ``oracles.dense_ggn``, with the same
# formulas (the materialised float64 matrix: ``jax.hessian`` of the flat loss, and
# ``Jᵀ H_z J`` from the full Jacobian and output Hessian) written in jnp so that they
# compile together with the estimates; run eagerly they would dominate this file's time.
def _hessian_diag(loss_fn):
    def diag(params, batch):
        flat, unravel = ravel_pytree(params)
        return jnp.diag(jax.hessian(lambda u: loss_fn(unravel(u), batch))(flat))

    return diag


def _ggn_diag(predict, loss: str):
    out = {"mse": MSELoss(), "ce": SoftmaxCELoss()}[loss]

    def diag(params, batch):
        flat, unravel = ravel_pytree(params)
        z = predict(params, batch["x"])
        jac = jax.jacfwd(lambda u: predict(unravel(u), batch["x"]).reshape(-1))(flat)
        extra = (batch["w"],) if "w" in batch else ()  # per-position weights
        hz = jax.hessian(lambda zz: out.value(zz.reshape(z.shape), batch["y"], *extra))(z.reshape(-1))
        return jnp.diag(jac.T @ hz @ jac)

    return diag


def _assert_unbiased(samples: np.ndarray, target: np.ndarray) -> None:
    n, d = samples.shape
    z = NormalDist().inv_cdf(1.0 - ALPHA / (2 * d))
    mean = samples.mean(axis=0)
    bound = z * samples.std(axis=0, ddof=1) / np.sqrt(n) + 1e-12 * (1 + np.abs(target))
    bad = np.abs(mean - target) > bound
    assert not bad.any(), (
        f"biased at coordinates {np.flatnonzero(bad)}: mean {mean[bad]}, target {target[bad]}, bound {bound[bad]}"
    )
    # power: a 10 % bias on the target must be detected by the same bound
    assert (np.abs(mean - 1.1 * target) > bound).any(), "the test cannot tell a 10% bias from no bias"


def _sequence_batch(b=3, t=4, d_in=3, c=4, key=3):
    """Sequence CE batch ``(B, T, C)`` with soft labels and two masked (zero-mass) positions."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    x = jax.random.normal(k1, (b, t, d_in), jnp.float64)
    y = jax.nn.one_hot(jax.random.randint(k2, (b, t), 0, c), c, dtype=jnp.float64)
    y = y.at[0, -1].set(0.0).at[2, 0].set(0.0)  # padding
    return {"x": x, "y": y}


HUTCH_CASES = [
    ("hessian_ce", "hessian", "ce", lambda: classification_batch(c=4), (3, 5, 4)),
    ("ggn_mse", "ggn", "mse", lambda: regression_batch(d_out=2), (3, 5, 2)),
]


@pytest.mark.parametrize("name,curv,loss,make_batch,sizes", HUTCH_CASES, ids=[c[0] for c in HUTCH_CASES])
def test_hutchinson_is_unbiased_for_dense_diagonal(name, curv, loss, make_batch, sizes):
    """Single probes are unbiased; ``n_probes = 16`` too, with 1/16 of the variance (within 25 %; Hessian case)."""
    params, predict = tiny_mlp(sizes=sizes)
    batch = make_batch()
    if curv == "hessian":
        curvature, target_fn = hessian(predict_fn=predict, loss=loss), _hessian_diag(output_loss_fn(predict, loss))
    else:
        curvature = (ggn_mse if loss == "mse" else ggn_ce)(predict_fn=predict)
        target_fn = _ggn_diag(predict, loss)
    estimators = [(hutchinson(), N_SAMPLES)]
    if curv == "hessian":
        estimators.append((hutchinson(n_probes=16), 2000))
    samples, target = _run(curvature, target_fn, params, batch, estimators, seed=11)
    for s in samples:
        _assert_unbiased(s, target)
    if len(samples) == 2:
        ratio = np.sum(samples[1].var(axis=0)) / np.sum(samples[0].var(axis=0))
        assert 1 / 16 / 1.25 < ratio < 1 / 16 * 1.25, ratio


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    a = {"w": jnp.asarray([3.0, -1.0, 0.5]), "k": jnp.arange(1.0, 9.0).reshape(1, 2, 2, 2)}
    loss_fn = lambda p, batch: 0.5 * sum(jnp.sum(ai * pi**2) for ai, pi in zip(jax.tree.leaves(a), jax.tree.leaves(p)))
    est = hutchinson()

    @jax.jit
    def refresh(key):
        lin = hessian(loss_fn=loss_fn).linearize(jax.tree.map(jnp.ones_like, a), {})
        return est.estimate(lin, key, est.init(None))

    for seed in range(3):
        d, state = refresh(jax.random.PRNGKey(seed))
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), d, a)
    assert int(state.refreshes) == 1


def test_rademacher_probes_are_signs_in_leaf_dtype():
    tree = {"a": jnp.zeros((3, 3, 2, 4), jnp.float32), "b": jnp.zeros((7,), jnp.float64), "c": jnp.zeros((20000,))}
    z = jax.jit(rademacher_like)(jax.random.PRNGKey(0), tree)
    assert z["a"].dtype == jnp.float32 and z["b"].dtype == jnp.float64
    allv = np.concatenate([np.ravel(x) for x in jax.tree.leaves(z)])
    assert set(np.unique(allv)) == {-1.0, 1.0}
    assert abs(float(np.mean(allv))) < 4 / np.sqrt(allv.size)  # fair signs (4σ)


def _weighted(batch, weights):
    return {**batch, "w": jnp.asarray(weights, jnp.float64)}


GNB_CASES = [
    ("ce_int", "ce", lambda: classification_batch(c=4), (3, 5, 4)),
    ("ce_sequence_onehot_masked", "ce", _sequence_batch, (3, 5, 4)),
    ("ce_weighted", "ce", lambda: _weighted(classification_batch(c=4), [0.5, 2.0, 0.0, 1.0, 3.0, 0.25]), (3, 5, 4)),
    # MSE as a Gaussian; with weights, w = 1 reduces to the unweighted loss
    ("mse_gaussian_weighted", "mse", lambda: _weighted(regression_batch(d_out=2), [1, 0, 2, 0.5, 1.5, 1]), (3, 5, 2)),
]


@pytest.mark.parametrize("name,loss,make_batch,sizes", GNB_CASES, ids=[c[0] for c in GNB_CASES])
def test_gnb_expectation_is_the_ggn_diagonal(name, loss, make_batch, sizes):
    """E[n ĝ⊙ĝ] = diag(G) with the library's mean normalisation (n = positions, or Σw with weights)."""
    params, predict = tiny_mlp(sizes=sizes)
    batch = make_batch()
    weight_key = {"weight_key": "w"} if "w" in batch else {}
    curvature = (ggn_mse if loss == "mse" else ggn_ce)(predict_fn=predict, **weight_key)
    (samples,), target = _run(curvature, _ggn_diag(predict, loss), params, batch, [(gnb(), 3 * N_SAMPLES)], seed=21)
    assert (samples >= 0).all()
    _assert_unbiased(samples, target)


def test_gnb_rejects_an_output_loss_it_cannot_sample():
    class ScaledMSE(MSELoss):
        pass

    class Custom(OutputLoss):
        name = "custom"

        def value(self, z, y):
            return jnp.mean((z - y) ** 4)

        def prepare(self, z, y):
            raise NotImplementedError

    params, predict = tiny_mlp(sizes=(3, 5, 2))
    batch = regression_batch(d_out=2)
    est = gnb()

    def refresh(loss, key):
        lin = ggn(predict_fn=predict, loss=ScaledMSE()).linearize(params, batch)
        return est.estimate(dataclasses.replace(lin, output_loss=loss), key, est.init(None))[0]

    jax.jit(lambda k: refresh(ScaledMSE(), k))(jax.random.PRNGKey(0))  # a subclass of MSE samples as MSE
    with pytest.raises(TypeError, match="custom"):
        jax.jit(lambda k: refresh(Custom(), k))(jax.random.PRNGKey(0))


def test_estimator_spec_errors_name_the_argument():
    params, predict = tiny_mlp(sizes=(3, 5, 4))
    cs = CurvatureSpec("ggn_ce", kwargs={"predict_fn": predict})
    diag = dict(solver=SolverSpec("diagonal"), precondition=PrecondSpec("diag_ema"))
    with pytest.raises(TypeError, match="Did you mean 'n_probes'"):
        somax.assemble(curvature=cs, estimator=EstimatorSpec("hutchinson", kwargs={"n_probe": 2}), **diag)
    with pytest.raises(ValueError, match="eval_every_k"):
        somax.assemble(curvature=cs, estimator=EstimatorSpec("hutchinson", kwargs={"eval_every_k": 0}), **diag)
    with pytest.raises(ValueError, match="n_samples"):
        somax.assemble(curvature=cs, estimator=EstimatorSpec("gnb", kwargs={"n_samples": 0}), **diag)
    with pytest.raises(ValueError, match="n_probes"):
        somax.assemble(curvature=cs, estimator=EstimatorSpec("hutchinson", kwargs={"n_probes": 1.5}), **diag)
    with pytest.raises(somax.UnknownKindError, match="Did you mean 'hutchinson'"):
        somax.assemble(curvature=cs, estimator=EstimatorSpec("hutchinsen"), **diag)
    hess = CurvatureSpec("hessian", kwargs={"predict_fn": predict, "loss": "ce"})
    with pytest.raises(somax.IncompatibleSpecsError, match="gnb.*hessian"):
        somax.assemble(curvature=hess, estimator=EstimatorSpec("gnb"), **diag)
    with pytest.raises(somax.IncompatibleSpecsError, match="hutchinson.*identity"):
        somax.assemble(curvature=cs, estimator=EstimatorSpec("hutchinson"), solver=SolverSpec("cg"))
    # a valid Hessian + Hutchinson assembly, and GNB with its alias
    somax.assemble(curvature=hess, estimator=EstimatorSpec("hutchinson"), damping=DampingSpec(lam0=0.0), **diag)
    somax.assemble(curvature=cs, estimator=EstimatorSpec("gauss_newton_bartlett"), **diag)
