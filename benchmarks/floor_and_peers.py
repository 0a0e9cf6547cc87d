"""Floor and peers: every somax preset against its hand-written floor, Adam and python-somax 1.0.1.

For every preset in ``somax.list_methods()``, times one jitted training step of

* ``somax`` — ``somax.make(preset, ...)``;
* ``hand``  — a hand-written jitted step doing the same arithmetic (the floor): one
  linearization, the same curvature products / estimator / solve, the same update;
* ``adam``  — ``jax.value_and_grad`` + ``optax.adam`` on the same loss and model;
* ``peer``  — the same preset of the ``python-somax`` 1.0.1 package on the same
  configuration, in a subprocess running that package's own virtual environment
  (both import as ``somax``), driven over a pipe.

Problems (``benchmarks.models.mlp_problem``, NumPy, fixed seeds): ReLU MLPs
``(d_in, w, w, out)`` in float32 with one fixed batch, MSE (scalar output) or softmax
cross-entropy (10 classes, integer labels). Dense-solve presets use a small model.

Method: one process plus the peer worker. For each preset, every variant is compiled
and warmed up; then :func:`benchmarks.harness.interleaved` runs rounds in which every
variant performs its *next* step (its own parameters and state advance, so cadences
such as Sophia's ``eval_every_k = 10`` fire as in training; the run stops only at whole
10-step cycles) in an order rotated every round; the peer's step is a
:class:`~benchmarks.harness.SelfTimed` candidate, timed inside the worker (``perf_counter``
around the call and ``block_until_ready``) while the main process waits on the pipe, so
the four variants alternate on the same cores. CG-based
variants run ``tol = 0`` with warm start off, i.e. exactly ``maxiter`` products.

Run ``python -m benchmarks.floor_and_peers`` (full), ``--quick`` (a few minutes on 2
CPU cores) or ``--smoke`` (the test suite). Results: ``benchmarks/results/floor_and_peers.json``
and ``.png`` (or ``--out``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import somax
from benchmarks.common import RESULTS_DIR, machine_info, profile_of, progress, save_figure, study_parser, write_result
from benchmarks.harness import SelfTimed, interleaved, timed
from benchmarks.models import adam_step, cg, loss_for, mlp_apply, n_params, to_device
from benchmarks.models import mlp_problem as make_problem

__all__ = ["main", "PRESETS", "NOT_COMPARED", "PROFILES", "VARIANTS", "ensure_peer_env"]

DEFAULT_OUT = RESULTS_DIR / "floor_and_peers.json"
BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "_floor_peer_worker.py"
PEER_VENV = BENCH_DIR / ".peers_venv"
PEER_REQUIREMENT = "python-somax==1.0.1"
VARIANTS = ("somax", "hand", "adam", "peer")

LR_SOLVE = 0.1  # learning rate of the solver presets (same in every implementation)
LR_DIAG = 1e-3  # learning rate of the diagonal presets
ADAM_LR = 1e-3
LAM = 1.0
LAM_HESS = 100.0  # keeps H + λI positive definite along CG on these ReLU MLPs, so CG never exits early

#: Profiles: model sizes, CG budget and timing rounds (rounds are a multiple of 10 for Sophia's cadence).
PROFILES: dict[str, dict[str, Any]] = {
    "full": dict(d_in=32, width=64, batch=128, dense_d_in=8, dense_width=16, maxiter=10, warmup=10,
                 rounds=60, min_rounds=20, max_seconds=45.0),
    "quick": dict(d_in=16, width=32, batch=64, dense_d_in=8, dense_width=12, maxiter=5, warmup=5,
                  rounds=20, min_rounds=10, max_seconds=8.0),
    "smoke": dict(d_in=4, width=8, batch=8, dense_d_in=4, dense_width=4, maxiter=2, warmup=1,
                  rounds=3, min_rounds=3, max_seconds=5.0),
}  # fmt: skip
CLASSES = 10


def _preset_table(maxiter: int) -> dict[str, dict[str, Any]]:
    """Per preset: problem kind and size, the model argument, somax options, the hand floor and the peer call."""
    cg = dict(maxiter=maxiter, tol=0.0, warm_start=False)
    peer_cg = dict(maxiter=maxiter, tol=0.0, warm_start=False, stabilise_every=0)
    solve = dict(damping="constant", learning_rate=LR_SOLVE)
    peer_solve = dict(lam_policy="const", learning_rate=LR_SOLVE)
    sophia = dict(learning_rate=LR_DIAG, b1=0.96, b2=0.99, eps=1e-12, weight_decay=0.2, eval_every_k=10, rho=1.0)
    peer_sophia = dict(learning_rate=LR_DIAG, beta1=0.96, beta2=0.99, eps=1e-12, weight_decay=0.2,
                       eval_every_k=10, clip_value=1.0)  # fmt: skip
    t: dict[str, dict[str, Any]] = {
        "sgn_mse": dict(kind="mse", hand="ggn_cg", ours={**cg, **solve, "lam0": LAM},
                        peer=("sgn_mse", {**peer_cg, **peer_solve, "lam0": LAM})),
        "sgn_ce": dict(kind="ce", hand="ggn_cg", ours={**cg, **solve, "lam0": LAM},
                       peer=("sgn_ce", {**peer_cg, **peer_solve, "lam0": LAM})),
        "newton_cg": dict(kind="mse", model="loss_fn", hand="hess_cg", ours={**cg, **solve, "lam0": LAM_HESS},
                          peer=("newton_cg", {**peer_cg, **peer_solve, "lam0": LAM_HESS})),
        "egn_mse": dict(kind="mse", hand="row_chol", ours={**solve, "lam0": LAM},
                        peer=("egn_mse", {**peer_solve, "lam0": LAM})),
        "egn_ce": dict(kind="ce", hand="row_chol", ours={**solve, "lam0": LAM},
                       peer=("egn_ce", {**peer_solve, "lam0": LAM})),
        "egn_mse_cg": dict(kind="mse", hand="row_cg", ours={**cg, **solve, "lam0": LAM},
                           peer=("egn_mse_cg", {**peer_cg, **peer_solve, "lam0": LAM})),
        "egn_ce_cg": dict(kind="ce", hand="row_cg", ours={**cg, **solve, "lam0": LAM},
                          peer=None, peer_note="python-somax 1.0.1 has no egn_ce_cg preset"),
        "ggn_direct_mse": dict(kind="mse", dense=True, hand="dense_chol", ours={**solve, "lam0": LAM},
                               peer=("ggn_direct_mse", {"lam0": LAM, "learning_rate": LR_SOLVE})),
        "ggn_direct_ce": dict(kind="ce", dense=True, hand="dense_chol", ours={**solve, "lam0": LAM},
                              peer=("ggn_direct_ce", {"lam0": LAM, "learning_rate": LR_SOLVE})),
        "newton_direct": dict(kind="mse", dense=True, model="loss_fn", hand="dense_eigh",
                              ours={**solve, "lam0": LAM_HESS, "negative": "abs"},
                              peer=("newton_direct", {"lam0": LAM_HESS, "learning_rate": LR_SOLVE}),
                              peer_note="python-somax's newton_direct solves (H + λI) directly; somax's "
                                        "takes |Λ| from an eigendecomposition (different arithmetic)"),
        "adahessian": dict(kind="mse", model="loss_fn", hand="adahessian",
                           ours=dict(learning_rate=LR_DIAG, b1=0.9, b2=0.999, eps=1e-4, eval_every_k=1),
                           peer=("adahessian", dict(learning_rate=LR_DIAG, beta1=0.9, beta2=0.999, eps=1e-4,
                                                    eval_every_k=1))),
        "sophia_h": dict(kind="ce", model="loss_fn", hand="sophia_h", ours={**sophia, "gamma": 0.01},
                         peer=("sophia_h", {**peer_sophia, "gamma": 0.01})),
        "sophia_g": dict(kind="ce", hand="sophia_g", ours={**sophia, "gamma": 0.05},
                         peer=("sophia_g", {**peer_sophia, "gamma": 0.05})),
        "sophia_n": dict(kind="ce", hand="sophia_n", ours={**sophia, "gamma": 0.05},
                         peer=None, peer_note="python-somax 1.0.1 has no sophia_n preset"),
    }  # fmt: skip
    for entry in t.values():
        entry.setdefault("model", "predict_fn")
        entry.setdefault("dense", False)
    return t


PRESETS = tuple(_preset_table(10))

#: Presets outside this study, and why: it compares the paper's presets with a hand-written
#: floor doing the same arithmetic and with python-somax, which has none of these.
NOT_COMPARED: dict[str, str] = {
    "shampoo": "Kronecker family; per-step cost against Adam in benchmarks.kronecker_cost",
    "soap": "Kronecker family; per-step cost against Adam in benchmarks.kronecker_cost",
    "kfac": "Kronecker family; per-step cost against Adam in benchmarks.kronecker_cost",
    "kfac_cg": "Kronecker family; per-step cost against Adam in benchmarks.kronecker_cost",
    "muon": "a first-order baseline (optax.contrib.muon) for the studies",
    "lbfgs": "embeds optax.scale_by_lbfgs; reproduces optax.lbfgs iterates (tests/test_lbfgs.py)",
    "gn": "full Gauss-Newton with an inner optimizer; benchmarks.gn_batch_size",
    "gn_prox_linear": "full Gauss-Newton with an inner optimizer; benchmarks.gn_batch_size",
    "gn_layerwise": "full Gauss-Newton with an inner optimizer; benchmarks.gn_batch_size",
}

# --------------------------------------------------------------------------- hand-written floors


def _tm(f: Callable, *trees: Any) -> Any:
    return jax.tree_util.tree_map(f, *trees)


def _ggn_parts(kind: str, params: dict, batch: dict) -> dict[str, Any]:
    """One ``jax.linearize`` of the model: loss, gradient, ``J``/``Jᵀ``, ``H_z`` and the GGN product."""
    x, y = batch["x"], batch["y"]
    z, jvp = jax.linearize(lambda p: mlp_apply(p, x), params)
    vjp_t = jax.linear_transpose(jvp, params)
    vjp = lambda u: vjp_t(u)[0]
    b = z.shape[0]
    if kind == "mse":
        r = z - y
        loss = 0.5 * jnp.sum(r * r) / b
        dz, probs = r / b, None
        hz = lambda u: u / b
    else:
        logp = jax.nn.log_softmax(z)
        probs = jnp.exp(logp)
        onehot = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
        loss = -jnp.sum(onehot * logp) / b
        dz = (probs - onehot) / b
        hz = lambda u: (probs * u - probs * jnp.sum(probs * u, -1, keepdims=True)) / b
    return dict(z=z, jvp=jvp, vjp=vjp, loss=loss, g=vjp(dz), probs=probs, b=b, mv=lambda v: vjp(hz(jvp(v))))


def _hess_parts(kind: str, params: dict, batch: dict) -> dict[str, Any]:
    """Forward-over-reverse ``jax.linearize`` of ``value_and_grad``: loss, gradient and ``v ↦ Hv``."""
    loss_fn = loss_for(kind)

    def grad_and_loss(p):
        value, g = jax.value_and_grad(loss_fn)(p, batch)
        return g, value

    g, hvp, loss = jax.linearize(grad_and_loss, params, has_aux=True)
    return dict(loss=loss, g=g, mv=hvp)


def _rows(kind: str, parts: dict, params: dict, batch: dict) -> dict[str, Any]:
    """Row form ``Ĵ = R J`` with ``ĴᵀĴ/b = G`` and residual ``r`` with ``Ĵᵀ r = b g``.

    MSE: ``R = I``, ``r = z − y``. CE: the full ``C``-row factor ``R = diag(√p) − √p pᵀ``
    (``RᵀR = diag p − ppᵀ``) with ``r = (p − e_y)/√p`` — ``C`` rows per example where somax
    uses ``C − 1`` (a Householder factor), so the floor does slightly *more* work there.
    """
    z = parts["z"]
    if kind == "mse":
        return dict(r=z - batch["y"], R=lambda u: u, Rt=lambda u: u)
    p = parts["probs"]
    sp = jnp.sqrt(p)
    onehot = jax.nn.one_hot(batch["y"], z.shape[-1], dtype=z.dtype)
    return dict(
        r=(p - onehot) / sp,
        R=lambda u: sp * u - sp * jnp.sum(p * u, -1, keepdims=True),  # (diag √p − √p pᵀ) u
        Rt=lambda u: sp * u - p * jnp.sum(sp * u, -1, keepdims=True),  # (diag √p − p √pᵀ) u
    )


def _rademacher(key: jax.Array, like: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def make_hand_step(name: str, entry: dict[str, Any], maxiter: int) -> tuple[Callable, Callable]:
    """``(init(params) -> state, step(params, batch, state, rng) -> (params, state, loss))`` of the floor."""
    kind, o, hand = entry["kind"], entry["ours"], entry["hand"]
    lr = o.get("learning_rate", LR_SOLVE)
    lam0 = o.get("lam0", LAM)
    # λ travels in the state, a runtime value as somax's damping state: written into the program
    # as a constant, XLA would fold λv = v for λ = 1 and the floor would skip a multiply per
    # parameter per CG iteration that somax cannot (step_overhead passes λ as an argument likewise).
    no_state = lambda params: (jnp.zeros((), jnp.int32), jnp.asarray(lam0, jnp.float32))

    def apply(params, s, state, loss):
        count, lam = state
        return _tm(lambda w, si: w - lr * si, params, s), (count + 1, lam), loss

    if hand in ("ggn_cg", "hess_cg"):

        def step(params, batch, state, rng):
            parts = (_ggn_parts if hand == "ggn_cg" else _hess_parts)(kind, params, batch)
            s, _ = cg(parts["mv"], parts["g"], state[1], 0.0, maxiter)
            return apply(params, s, state, parts["loss"])

        return no_state, step

    if hand in ("row_chol", "row_cg"):

        def step(params, batch, state, rng):
            parts = _ggn_parts(kind, params, batch)
            rows = _rows(kind, parts, params, batch)
            r, b = rows["r"], parts["b"]
            mu = state[1] * b
            if hand == "row_chol":
                # per-example Jacobians (vmap over single examples), whitened by R, one Gram product
                def single(p, xi):
                    return mlp_apply(p, xi[None])[0]

                jac = jax.vmap(jax.jacrev(single), in_axes=(None, 0))(params, batch["x"])
                blocks = []
                for leaf in jax.tree_util.tree_leaves(jac):
                    flat = leaf.reshape(r.shape + (-1,))
                    white = jax.vmap(rows["R"], in_axes=-1, out_axes=-1)(flat)
                    blocks.append(white.reshape(r.size, -1))
                gram = sum(jnp.dot(k, k.T, precision=jax.lax.Precision.HIGHEST) for k in blocks)
                factor = jax.scipy.linalg.cho_factor(gram + mu * jnp.eye(r.size, dtype=r.dtype), lower=True)
                v = jax.scipy.linalg.cho_solve(factor, r.reshape(-1)).reshape(r.shape)
            else:
                matvec = lambda u: rows["R"](parts["jvp"](parts["vjp"](rows["Rt"](u))))
                v, _ = cg(matvec, r, mu, 0.0, maxiter)
            s = parts["vjp"](rows["Rt"](v))
            return apply(params, s, state, parts["loss"])

        return no_state, step

    if hand in ("dense_chol", "dense_eigh"):

        def step(params, batch, state, rng):
            lam = state[1]
            parts = (_ggn_parts if hand == "dense_chol" else _hess_parts)(kind, params, batch)
            flat_g, unravel = ravel_pytree(parts["g"])
            d = flat_g.shape[0]
            cols = jax.vmap(lambda e: ravel_pytree(parts["mv"](unravel(e)))[0])(jnp.eye(d, dtype=flat_g.dtype))
            mat = 0.5 * (cols + cols.T)
            if hand == "dense_chol":
                factor = jax.scipy.linalg.cho_factor(mat + lam * jnp.eye(d, dtype=mat.dtype), lower=True)
                s = jax.scipy.linalg.cho_solve(factor, flat_g)
            else:
                evals, evecs = jnp.linalg.eigh(mat)
                s = evecs @ ((evecs.T @ flat_g) / (jnp.abs(evals) + lam))
            return apply(params, unravel(s), state, parts["loss"])

        return no_state, step

    if hand == "adahessian":
        b1, b2, eps = o["b1"], o["b2"], o["eps"]

        def init(params):
            zeros = _tm(jnp.zeros_like, params)
            return (jnp.zeros((), jnp.int32), zeros, zeros)

        def step(params, batch, state, rng):
            count, m, v = state
            parts = _hess_parts(kind, params, batch)
            zvec = _rademacher(jax.random.fold_in(rng, count), params)
            d = _tm(lambda zi, hz: jnp.square(jnp.abs(zi * hz)), zvec, parts["mv"](zvec))  # 2-D leaves: A = id
            t = (count + 1).astype(jnp.float32)
            m = _tm(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, parts["g"])
            v = _tm(lambda vi, di: b2 * vi + (1 - b2) * di, v, d)
            s = _tm(lambda mi, vi: (mi / (1 - b1**t)) / (jnp.sqrt(jnp.maximum(vi / (1 - b2**t), 0.0)) + eps), m, v)
            new = _tm(lambda w, si: w - lr * si, params, s)
            return new, (count + 1, m, v), parts["loss"]

        return init, step

    if hand in ("sophia_h", "sophia_g", "sophia_n"):
        b1, b2, eps, gamma, k = o["b1"], o["b2"], o["eps"], o["gamma"], o["eval_every_k"]
        rho, wd = o["rho"], o["weight_decay"]

        def init(params):
            zeros = _tm(jnp.zeros_like, params)
            return (jnp.zeros((), jnp.int32), zeros, zeros)

        def step(params, batch, state, rng):
            count, m, h = state
            parts = (_hess_parts if hand == "sophia_h" else _ggn_parts)(kind, params, batch)
            key = jax.random.fold_in(rng, count)

            def refresh(h):
                if hand == "sophia_g":  # Gauss-Newton-Bartlett: labels sampled from the model
                    z, b = parts["z"], parts["b"]
                    yhat = jax.random.categorical(key, z)
                    u = parts["probs"] - jax.nn.one_hot(yhat, z.shape[-1], dtype=z.dtype)
                    gh = parts["vjp"](u)
                    est = _tm(lambda gi: gi * gi / b, gh)
                else:  # Hutchinson on H (sophia_h) or on the GGN (sophia_n)
                    zvec = _rademacher(key, params)
                    est = _tm(lambda zi, hz: zi * hz, zvec, parts["mv"](zvec))
                return _tm(lambda hi, ei: b2 * hi + (1 - b2) * ei, h, est)

            h = jax.lax.cond(count % k == 0, refresh, lambda h: h, h)
            m = _tm(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, parts["g"])
            s = _tm(lambda mi, hi: jnp.clip(mi / jnp.maximum(gamma * jnp.maximum(hi, 0.0), eps), -rho, rho), m, h)
            new = _tm(lambda w, si: w - lr * (si + wd * w), params, s)
            return new, (count + 1, m, h), parts["loss"]

        return init, step

    raise ValueError(f"no hand-written floor for {name!r}")


def make_somax_step(name: str, entry: dict[str, Any]) -> tuple[Callable, Callable]:
    fn = mlp_apply if entry["model"] == "predict_fn" else loss_for(entry["kind"])
    extra = {"loss": entry["kind"]} if entry["model"] == "predict_fn" and name.startswith(("sophia_g", "sophia_n")) \
        else {}  # fmt: skip
    method = somax.make(name, **{entry["model"]: fn}, **extra, **entry["ours"])
    return method.init, method.step


# --------------------------------------------------------------------------- peer environment and worker


def ensure_peer_env(python: str | None = None, *, create: bool = True) -> tuple[str | None, str | None]:
    """Interpreter that has ``python-somax`` 1.0.1, creating ``benchmarks/.peers_venv`` on first use.

    Returns ``(python, None)`` or ``(None, reason)`` when it is unavailable (offline, no venv module, …).
    The venv pins the main process's jax/jaxlib/optax/numpy versions, so both sides run the same XLA.
    """
    if python is not None:
        if not Path(python).exists():
            return None, f"peer interpreter {python} does not exist"
        return python, None
    exe = PEER_VENV / "bin" / "python"
    if exe.exists():
        return str(exe), None
    if not create:
        return None, f"no peer environment at {PEER_VENV} (run without --no-install to create it)"
    import jaxlib

    pins = [PEER_REQUIREMENT, f"jax=={jax.__version__}", f"jaxlib=={jaxlib.__version__}",
            f"optax=={optax.__version__}", f"numpy=={np.__version__}"]  # fmt: skip
    print(f"creating {PEER_VENV} and installing {' '.join(pins)} ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", *pins], check=True, capture_output=True,
                       text=True, timeout=1200)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", "") or ""
        return None, f"could not install {PEER_REQUIREMENT} into {PEER_VENV}: {type(exc).__name__} {err[-300:]}"
    return str(exe), None


class PeerWorker:
    """The python-somax timing worker in a subprocess, spoken to over a line-based JSON pipe."""

    def __init__(self, python: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        self.proc = subprocess.Popen(
            [python, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            cwd=str(BENCH_DIR),
            env=env,
        )

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"ok": False, "error": "peer worker exited"}
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- timing


def _problem(entry: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    dense = entry["dense"]
    return {"kind": entry["kind"], "d_in": cfg["dense_d_in" if dense else "d_in"],
            "width": cfg["dense_width" if dense else "width"], "batch": cfg["batch"], "classes": CLASSES}  # fmt: skip


def time_preset(name: str, entry: dict[str, Any], cfg: dict[str, Any], peer: PeerWorker | None,
                peer_reason: str | None) -> dict[str, Any]:  # fmt: skip
    """Compile, warm up and time every variant of one preset, interleaved round by round."""
    prob = _problem(entry, cfg)
    params_np, batch_np = make_problem(prob["kind"], prob["d_in"], prob["width"], prob["batch"], CLASSES)
    params, batch = to_device(params_np), to_device(batch_np)
    rng = jax.random.PRNGKey(1)
    builders = {
        "somax": lambda: make_somax_step(name, entry),
        "hand": lambda: make_hand_step(name, entry, cfg["maxiter"]),
        "adam": lambda: adam_step(loss_for(entry["kind"]), ADAM_LR),
    }
    live: dict[str, list] = {}
    compile_ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    cg_iters: dict[str, int] = {}
    for v, build in builders.items():
        try:
            init, fn = build()
            step = jax.jit(fn)
            (p, s, aux), compile_ms[v] = timed(step, params, batch, init(params), rng)
            for _ in range(cfg["warmup"]):
                p, s, aux = jax.block_until_ready(step(p, batch, s, rng))
            if isinstance(aux, Mapping) and "cg_iters" in aux:
                cg_iters[v] = int(aux["cg_iters"])
            live[v] = [step, p, s]
        except Exception as exc:  # noqa: BLE001 - recorded, the other variants still run
            errors[v] = f"{type(exc).__name__}: {exc}"[:500]

    peer_info: dict[str, Any] = {"status": "unavailable", "reason": peer_reason}
    use_peer = False
    if entry["peer"] is None:
        peer_info = {"status": "no equivalent", "reason": entry.get("peer_note")}
    elif peer is not None:
        pname, pkw = entry["peer"]
        pkw = {**pkw, "maxiter": cfg["maxiter"]} if "maxiter" in pkw else pkw
        reply = peer.ask({"cmd": "setup", "preset": pname, "kwargs": pkw, "problem": prob,
                          "model_arg": entry["model"], "warmup": cfg["warmup"]})  # fmt: skip
        if reply.get("ok"):
            use_peer = True
            compile_ms["peer"] = reply["compile_ms"]
            peer_info = {"status": "ok", "preset": pname, "kwargs": pkw, "cg": reply.get("cg"),
                         "note": entry.get("peer_note")}  # fmt: skip
        else:
            peer_info = {"status": "error", "reason": reply.get("error"), "preset": pname, "kwargs": pkw}

    def advance(v: str) -> Callable[[int], Any]:
        def call(i: int) -> Any:  # the variant's next training step
            step, p, s = live[v]
            p, s, aux = step(p, batch, s, rng)
            live[v][1], live[v][2] = p, s
            return p, s, aux

        return call

    def peer_step(i: int) -> float:
        assert peer is not None
        reply = peer.ask({"cmd": "time"})
        if not reply.get("ok"):
            raise RuntimeError(f"peer worker failed: {reply.get('error')}")
        return reply["seconds"]

    calls = {v: SelfTimed(peer_step) if v == "peer" else advance(v) for v in VARIANTS
             if v in live or (v == "peer" and use_peer)}  # fmt: skip
    run = interleaved(calls, rounds=cfg["rounds"], min_rounds=cfg["min_rounds"], max_seconds=cfg["max_seconds"],
                      stop_every=10)  # fmt: skip
    times = run.wall_ms
    stats = run.stats()
    ratios = {f"somax_vs_{other}": run.ratio("somax", other, keys=("median", "p90", "mean", "paired_median"))
              for other in ("hand", "adam", "peer") if "somax" in stats and other in stats}  # fmt: skip
    return {
        "preset": name,
        "problem": {**prob, "n_params": n_params(params_np)},
        "somax_options": {k: v for k, v in entry["ours"].items()},
        "hand": entry["hand"],
        "peer": peer_info,
        "rounds": run.rounds if calls else 0,
        "compile_ms": compile_ms,
        "errors": errors,
        "somax_cg_iters": cg_iters.get("somax"),
        "stats": stats,
        "ratios": ratios,
        "times_ms": times,
    }


# --------------------------------------------------------------------------- output


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: median / p90 per variant (ms) and somax ratios (median / p90)."""
    out = [
        "| preset | params | somax | hand | adam | python-somax | somax/hand | somax/adam | somax/peer |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]

    def cell(st: dict, v: str) -> str:
        return f"{st[v]['median_ms']:.2f} / {st[v]['p90_ms']:.2f}" if v in st else "—"

    def rat(ra: dict, k: str) -> str:
        return f"{ra[k]['median']:.2f} / {ra[k]['p90']:.2f}" if k in ra else "—"

    for c in result["presets"]:
        st, ra = c["stats"], c["ratios"]
        peer = cell(st, "peer") if "peer" in st else c["peer"]["status"]
        out.append(f"| {c['preset']} | {c['problem']['n_params']} | {cell(st, 'somax')} | {cell(st, 'hand')} | "
                   f"{cell(st, 'adam')} | {peer} | {rat(ra, 'somax_vs_hand')} | {rat(ra, 'somax_vs_adam')} | "
                   f"{rat(ra, 'somax_vs_peer')} |")  # fmt: skip
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Bar chart of median step time (error bar to p90) per preset and variant, log scale."""
    cells = result["presets"]
    colors = {"somax": "C0", "hand": "C2", "adam": "C7", "peer": "C3"}
    labels = {"somax": "somax", "hand": "hand-written floor", "adam": "optax.adam", "peer": "python-somax 1.0.1"}

    def draw(fig, ax):
        width = 0.2
        for j, v in enumerate(VARIANTS):
            xs, med, err = [], [], []
            for i, c in enumerate(cells):
                if v in c["stats"]:
                    xs.append(i + (j - 1.5) * width)
                    med.append(c["stats"][v]["median_ms"])
                    err.append(max(c["stats"][v]["p90_ms"] - c["stats"][v]["median_ms"], 0.0))
            if xs:
                ax.bar(xs, med, width, yerr=[np.zeros(len(err)), err], color=colors[v], label=labels[v], capsize=2)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels([c["preset"] for c in cells], rotation=40, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("step time, ms (median, bar to p90)")
        m = result["machine"]
        ax.set_title(f"Floor and peers ({result['config']['profile']}; {m['jax_backend']}, {m['cpu_count']} CPUs)")
        ax.legend(fontsize=8)

    return save_figure(path, draw, figsize=(max(6.0, 0.9 * len(cells) + 2), 4.2))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = study_parser(__doc__, quick="small models, few rounds (a few minutes on 2 CPU cores)",
                      smoke="tiny models, 3 rounds (the test suite)", out=DEFAULT_OUT,
                      out_help="JSON path; the PNG goes beside it")  # fmt: skip
    ap.add_argument("--presets", nargs="+", help="subset of somax presets (default: all of somax.list_methods())")
    ap.add_argument("--rounds", type=int, help="override the number of timed rounds")
    ap.add_argument("--no-peers", action="store_true", help="do not run python-somax")
    ap.add_argument("--no-install", action="store_true", help="do not create the peer venv when it is missing")
    ap.add_argument("--peer-python", help="interpreter with python-somax 1.0.1 (default: benchmarks/.peers_venv)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    profile = profile_of(args)
    cfg = dict(PROFILES[profile])
    if args.rounds is not None:
        cfg["rounds"] = args.rounds
        cfg["min_rounds"] = min(cfg["min_rounds"], args.rounds)
    table = _preset_table(cfg["maxiter"])
    names = args.presets or somax.list_methods()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"no floor configuration for presets {unknown} (known: {sorted(table)})")

    peer: PeerWorker | None = None
    peer_reason: str | None = "disabled (--no-peers)" if args.no_peers else None
    peer_versions = None
    if not args.no_peers:
        python, peer_reason = ensure_peer_env(args.peer_python, create=not args.no_install)
        if python is not None:
            peer = PeerWorker(python)
            hello = peer.ask({"cmd": "hello"})
            if hello.get("ok"):
                peer_versions = hello["versions"]
            else:
                peer_reason = f"peer worker did not start: {hello.get('error')}"
                peer.close()
                peer = None

    result: dict[str, Any] = {
        "benchmark": "floor_and_peers",
        "machine": machine_info(),
        "config": {
            "profile": profile, **cfg, "classes": CLASSES, "lr_solve": LR_SOLVE, "lr_diag": LR_DIAG,
            "adam_lr": ADAM_LR, "lam": LAM, "lam_hessian": LAM_HESS, "cg_tol": 0.0, "warm_start": False,
            "model": "ReLU MLP (d_in, w, w, out), float32, He init; dense presets use (dense_d_in, dense_width)",
            "method": "per preset: variants compiled and warmed up, then rounds with the order rotated each round; "
                      "every call advances its own params/state; the python-somax step is timed inside its "
                      "worker process between the in-process calls (line-based JSON pipe)",
            "peer_requirement": PEER_REQUIREMENT, "peer_versions": peer_versions,
        },
        "seeds": {"problem": 0, "rng": 1},
        "presets": [],
    }  # fmt: skip
    try:
        for name in progress(names, desc="floor_and_peers"):
            result["presets"].append(time_preset(name, table[name], cfg, peer, peer_reason))
    finally:
        if peer is not None:
            peer.close()
    write_result(result, args.out, quiet=True)
    if not args.no_plot:
        png = plot(result, args.out.with_suffix(".png"))
        result["plot"] = str(png) if png else None
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
