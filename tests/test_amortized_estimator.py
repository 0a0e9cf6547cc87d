"""Amortized estimation (``amortize=True``): slices of the batch, their mean handed over on the cadence, no ``cond``."""

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from oracles import classification_batch, dense_ggn_array, tiny_mlp

import somax
from somax.estimators.amortized import batch_slice
from somax.estimators.base import EstimatorState, RefreshCounted
from somax.specs import CurvatureSpec, DampingSpec, EstimatorSpec, PrecondSpec, SolverSpec


@dataclass(frozen=True, kw_only=True)
class ExactDiagonal(RefreshCounted):
    """The exact diagonal of the step's curvature (one product per basis vector): a deterministic estimator."""

    kind: ClassVar[str] = "exact_diagonal_for_tests"
    produces = "diagonal"
    uses_rng = False

    def estimate(self, lin, rng, state):
        flat, unravel = ravel_pytree(lin.grad)
        cols = jax.vmap(lambda e: ravel_pytree(lin.matvec(unravel(e)))[0])(jnp.eye(flat.size, dtype=flat.dtype))
        return unravel(jnp.diag(cols)), EstimatorState(state.refreshes + 1)


if ExactDiagonal.kind not in somax.registry.ESTIMATORS:
    somax.register("estimator", ExactDiagonal.kind, ExactDiagonal)


def _method(predict, k: int, amortize: bool, beta: float = 0.5):
    return somax.assemble(
        curvature=CurvatureSpec("ggn_ce", kwargs={"predict_fn": predict}),
        estimator=EstimatorSpec(ExactDiagonal.kind, kwargs={"eval_every_k": k, "amortize": amortize}),
        precondition=PrecondSpec("diag_ema", kwargs={"beta": beta, "bias_correction": False}),
        solver=SolverSpec("diagonal"),
        damping=DampingSpec("constant", lam0=1.0),
        tx=optax.scale(0.0),  # the parameters never move: every slice sees the same curvature
    )


def test_hand_over_is_the_whole_batch_diagonal_dense_oracle():
    """k = 4 slices of a batch of 8 (float64, parameters fixed): step 0 hands over slice 0's diagonal,
    step 4 the mean of slices 1, 2, 3, 0 — the whole batch's GGN diagonal; in between the
    preconditioner is untouched."""
    params, predict = tiny_mlp(sizes=(3, 4, 3))
    batch = classification_batch(b=8, c=3)
    method = _method(predict, 4, True)
    step = jax.jit(method.step)
    state = method.init(params)
    beta = 0.5
    ggn_diag = jax.jit(lambda p, b: jnp.diag(dense_ggn_array(predict, p, b, "ce")))
    d_full = np.asarray(ggn_diag(params, batch))
    d_slice0 = np.asarray(ggn_diag(params, {k: v[:2] for k, v in batch.items()}))
    emas = []
    for _ in range(5):
        params, state, _ = step(params, batch, state)
        emas.append(ravel_pytree(state.precond.ema)[0])
    np.testing.assert_allclose(emas[0], (1 - beta) * d_slice0, rtol=1e-12, atol=1e-15)
    for t in (1, 2, 3):
        np.testing.assert_array_equal(emas[t], emas[0])
    np.testing.assert_allclose(emas[4], beta * emas[0] + (1 - beta) * d_full, rtol=1e-12, atol=1e-15)
    assert int(state.precond.count) == 2 and int(state.estimator.count) == 0


def _has_cond(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            return True
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if _has_cond(sub):
                return True
    return False


@pytest.mark.parametrize("amortize", [False, True])
def test_the_amortized_step_has_no_conditional(amortize):
    """The point of amortizing: ``sophia_h`` with ``amortize_estimator=True`` traces to a program
    without any ``cond`` (the plain cadence has one)."""
    params, predict = tiny_mlp(sizes=(3, 4, 3))
    batch = classification_batch(b=8, c=3)
    method = somax.make("sophia_h", predict_fn=predict, loss="ce", eval_every_k=4, amortize_estimator=amortize)
    jaxpr = jax.make_jaxpr(method.step)(params, batch, method.init(params), jax.random.PRNGKey(0))
    assert _has_cond(jaxpr.jaxpr) is not amortize


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 13), k=st.integers(1, 6), t=st.integers(0, 30))
def test_batch_slices_partition_the_leading_examples(b, k, t):
    """Slices ``0 … k−1`` are consecutive, disjoint, cover the first ``k·⌊b/k⌋`` examples, repeat with period
    ``k``; a scalar entry goes to every slice unchanged; a batch smaller than ``k`` is refused naming
    ``eval_every_k``."""
    batch = {"x": np.arange(b * 2).reshape(b, 2), "y": np.arange(b), "scale": np.float32(2.5)}
    if b < k:
        with pytest.raises(ValueError, match="eval_every_k"):
            batch_slice(batch, jnp.asarray(t), k)
        return
    m = b // k
    got = batch_slice(batch, jnp.asarray(t), k)
    np.testing.assert_array_equal(got["y"], np.arange((t % k) * m, (t % k + 1) * m))
    np.testing.assert_array_equal(got["x"], batch["x"][(t % k) * m : (t % k + 1) * m])
    assert float(got["scale"]) == 2.5


def test_bad_batches_and_cadences_are_named():
    with pytest.raises(ValueError, match="same leading size"):
        batch_slice({"x": np.zeros((4, 2)), "y": np.zeros(3)}, jnp.asarray(0), 2)
    with pytest.raises(ValueError, match="only scalar entries"):
        batch_slice({"n": np.float32(3.0)}, jnp.asarray(0), 2)
    with pytest.raises(ValueError, match="amortize=True needs a cadence"):
        somax.make("sophia_g", predict_fn=lambda p, x: x, eval_every_k=-1, amortize_estimator=True)
    with pytest.raises(ValueError, match="amortize must be True or False"):
        somax.make("sophia_h", predict_fn=lambda p, x: x, loss="ce", amortize_estimator="yes")
