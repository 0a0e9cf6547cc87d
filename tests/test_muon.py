"""``optax.contrib.muon`` as the Optax chain of a method, in every lane (parameter, row, diagonal)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import somax
from somax.specs import CurvatureSpec, DampingSpec, PrecondSpec, SolverSpec


def _model(params, x):
    return jnp.tanh(x @ params["w0"] + params["b0"]) @ params["w1"]


LANES = {
    "param": {"solver": SolverSpec("cg", kwargs={"maxiter": 3})},
    "row": {"solver": SolverSpec("row_cholesky")},
    "diag": {"solver": SolverSpec("diagonal"), "precondition": PrecondSpec("diag_ema")},
}


@pytest.mark.parametrize("lane", sorted(LANES))
def test_muon_tx_in_every_lane(lane):
    rng = np.random.default_rng(0)  # NumPy data: eager jax.random calls would each compile a program
    params = {"w0": rng.normal(size=(3, 4)), "b0": np.zeros((4,)), "w1": rng.normal(size=(4, 2))}
    batch = {"x": rng.normal(size=(8, 3)), "y": rng.normal(size=(8, 2))}
    params, batch = jax.tree_util.tree_map(jnp.asarray, (params, batch))
    method = somax.assemble(
        curvature=CurvatureSpec("ggn_mse", kwargs={"predict_fn": _model}),
        damping=DampingSpec("constant", lam0=0.1),
        tx=optax.contrib.muon(learning_rate=0.02),
        **LANES[lane],
    )
    assert method.plan.lane == lane
    new, state, info = jax.jit(method.step)(params, batch, jax.jit(method.init)(params))
    assert bool(info["finite"])
    # the 2-D kernels get Muon's orthogonalised update: its singular values are all equal
    u = np.asarray(new["w1"]) - np.asarray(params["w1"])
    sv = np.linalg.svd(u, compute_uv=False)
    assert sv.max() > 0 and sv.min() / sv.max() > 0.5
