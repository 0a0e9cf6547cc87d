"""Golden-trajectory configurations: every preset plus the assembly paths they do not reach.

Each entry builds a method on a tiny float64 problem. ``run(name)`` takes 20 steps
under ``lax.scan`` (one compile) and returns every parameter, every state leaf and
every ``StepInfo`` field as a flat ``{key: ndarray}``. ``record.py`` stores the result;
``test_golden.py`` compares a fresh run with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import somax
from somax.models import mlp_apply, mlp_init
from somax.specs import (
    CurvatureSpec,
    DampingSpec,
    EstimatorSpec,
    LineSearchSpec,
    PrecondSpec,
    SolverSpec,
    TelemetrySpec,
)

STEPS = 20
B = 6
#: the trust region as the paper states it (no mini-batch safeguards), as recorded
PAPER_TR = {"max_rel_update": None, "lam0_floor": None, "curvature_floor": None}


def _predict(p, x):
    return mlp_apply(p, x, activation=jnp.tanh)


def _params(d_out):
    return mlp_init(jax.random.PRNGKey(0), (3, 5, d_out), jnp.float64)


def _batches(kind):
    keys = jax.random.split(jax.random.PRNGKey(7), STEPS)

    def one(k):
        k1, k2 = jax.random.split(k)
        x = jax.random.normal(k1, (B, 3), jnp.float64)
        if kind == "mse":
            y = jax.random.normal(k2, (B, 2), jnp.float64)
        else:
            y = jax.random.randint(k2, (B,), 0, 4)
        return {"x": x, "y": y}

    return jax.vmap(one)(keys)


def _mse_loss(p, batch):
    return 0.5 * jnp.mean(jnp.sum((_predict(p, batch["x"]) - batch["y"]) ** 2, axis=-1))


def _builders():
    P = {"predict_fn": _predict}
    return {
        # every preset with its defaults
        "sgn_mse": ("mse", lambda: somax.make("sgn_mse", **P, lam0=0.1)),
        "sgn_ce": ("ce", lambda: somax.make("sgn_ce", **P, lam0=0.1)),
        "newton_cg": ("mse", lambda: somax.make("newton_cg", loss_fn=_mse_loss, lam0=0.5)),
        "egn_mse": ("mse", lambda: somax.make("egn_mse", **P, lam0=0.1)),
        "egn_ce": ("ce", lambda: somax.make("egn_ce", **P, lam0=0.1)),
        "egn_mse_cg": ("mse", lambda: somax.make("egn_mse_cg", **P, lam0=0.1)),
        "egn_ce_cg": ("ce", lambda: somax.make("egn_ce_cg", **P, lam0=0.1)),
        "ggn_direct_mse": ("mse", lambda: somax.make("ggn_direct_mse", **P, lam0=0.1)),
        "ggn_direct_ce": ("ce", lambda: somax.make("ggn_direct_ce", **P, lam0=0.1)),
        "newton_direct": ("mse", lambda: somax.make("newton_direct", loss_fn=_mse_loss, lam0=0.5)),
        "adahessian": ("mse", lambda: somax.make("adahessian", loss_fn=_mse_loss, learning_rate=0.05)),
        "sophia_h": ("mse", lambda: somax.make("sophia_h", loss_fn=_mse_loss, learning_rate=0.05, eval_every_k=3)),
        "sophia_g": ("ce", lambda: somax.make("sophia_g", **P, learning_rate=0.05, eval_every_k=2)),
        "sophia_n": ("ce", lambda: somax.make("sophia_n", **P, learning_rate=0.05, eval_every_k=2)),
        # paths the defaults do not reach
        "sgn_ce_trust_region": (
            "ce",
            lambda: somax.make(
                "sgn_ce",
                **P,
                damping=DampingSpec("trust_region", lam0=1.0, kwargs={"every_k": 2, **PAPER_TR}),
                maxiter=3,
                tol=1e-3,
                telemetry=TelemetrySpec(rho_every_k=3, norms_every_k=2),
            ),
        ),
        "sgn_mse_pcg_squared_gradient": (
            "mse",
            lambda: somax.make("sgn_mse", **P, lam0=0.1, precondition="diag_ema", momentum=0.5),
        ),
        "cg_hutchinson_step_norm_grid": (
            "mse",
            lambda: somax.assemble(
                curvature=CurvatureSpec("ggn_mse", kwargs=P),
                solver=SolverSpec("cg", kwargs={"maxiter": 4, "warm_start": True, "stabilise_every": 2}),
                precondition=PrecondSpec("diag_direct", kwargs={"eps": 1e-3}),
                estimator=EstimatorSpec("hutchinson", kwargs={"eval_every_k": 3, "n_probes": 2}),
                damping=DampingSpec(
                    "step_norm", lam0=0.3, kwargs={"low": 0.01, "high": 0.2, "every_k": 2, "max_rel_update": None}
                ),
                line_search=LineSearchSpec("grid"),
                telemetry=TelemetrySpec(trace_every_k=4, eig_every_k=5, eig_k=2, eig_iters=6, loss_after_every_k=2),
                tx=optax.chain(optax.clip_by_global_norm(2.0), optax.scale(-0.5)),
                grad_tx=optax.ema(0.5),
            ),
        ),
        "egn_mse_cg_trust_region": (
            "mse",
            lambda: somax.make(
                "egn_mse_cg",
                **P,
                lam0=1.0,
                damping=DampingSpec("trust_region", lam0=1.0, kwargs=PAPER_TR),
                maxiter=3,
                warm_start=True,
                telemetry=TelemetrySpec(
                    density_every_k=6, density_probes=2, density_iters=4, block_eig_every_k=7, block_eig_iters=4
                ),
            ),
        ),
    }


NAMES = tuple(_builders())


def run(name: str) -> dict[str, np.ndarray]:
    """20 steps of configuration ``name``: every parameter, state leaf and info field, by key."""
    kind, build = _builders()[name]
    method = build()
    params = _params(2 if kind == "mse" else 4)
    batches = _batches(kind)
    rng = jax.random.PRNGKey(3)

    def body(carry, batch):
        p, s = carry
        p, s, info = method.step(p, batch, s, jax.random.fold_in(rng, s.count))
        return (p, s), info

    (params, state), infos = jax.jit(lambda p, s, b: jax.lax.scan(body, (p, s), b))(
        params, method.init(params), batches
    )
    out: dict[str, np.ndarray] = {}
    for prefix, tree in (("params", params), ("state", state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
    for key, value in infos.numpy().items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"info[{key}][{sub}]"] = np.asarray(v)
        elif value is not None:
            out[f"info[{key}]"] = np.asarray(value)
    return out
