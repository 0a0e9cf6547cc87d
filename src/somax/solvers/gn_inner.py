"""Full Gauss-Newton with an inner optimizer [Abreu et al. 2025]: ``SolverSpec("gn_inner")``.

At ``θ_t`` the outer step minimises a convex model of the loss in the update ``Δ = θ − θ_t`` with
``N`` steps of any Optax transformation (the *inner optimizer*, default Muon), one micro-batch
``B_k`` per step, each step linearizing the model at ``θ_t`` on its micro-batch
(``z_k = f(θ_t, B_k)``, ``J_k = ∂f(θ_t, B_k)/∂θ``, ``g_z = ∇_z ℓ(z_k)``, ``H_z = ∇²_z ℓ(z_k)``):

* ``mode="quadratic"`` (GN, the paper's Alg. 1) — the second-order model of the loss of the
  linearized model, with the proximal term ``½ λ ‖Δ‖²``::

      Q_k(Δ) = ℓ(z_k) + g_zᵀ J_k Δ + ½ (J_k Δ)ᵀ H_z (J_k Δ) + ½ λ ‖Δ‖²
      ∇Q_k(Δ) = J_kᵀ (g_z + H_z J_k Δ) + λ Δ                (one JVP, one VJP)

  Its minimiser over the union of the micro-batches is ``Δ* = −(G + λI)⁻¹ g`` with ``G``, ``g`` the
  GGN and the gradient of the mean micro-batch loss.
* ``mode="prox_linear"`` (GN-prox-linear, Alg. 2) — the loss of the linearized model itself::

      P_k(Δ) = ℓ(z_k + J_k Δ) + ½ λ ‖Δ‖²,   ∇P_k(Δ) = J_kᵀ ∇_z ℓ(z_k + J_k Δ) + λ Δ

  (convex for a convex ``ℓ``; equal to ``Q_k`` for MSE).
* ``mode="layerwise"`` — block-diagonal GN: the parameters are split into groups (the top-level
  keys of the parameter dict by default, or ``groups(params) → labels``); group ``l``
  linearizes only in its own parameters, ``∇_l = J_{k,l}ᵀ (g_z + H_z J_{k,l} Δ_l) + λ Δ_l``,
  with its own inner optimizer state, and the group updates are merged. With exact inner
  solves, ``Δ_l* = −(G_ll + λI)⁻¹ g_l``.

The proximal term's gradient is ``+λΔ`` in every mode and enters the inner gradient itself
(derived from ``∇ ½λ‖Δ‖² = λΔ``). ``λ`` is the method's damping (``DampingSpec("constant",
lam0=λ)``).

**Warm start.** The inner loop starts from the previous step's pre-line-search point ``θ̂_{t−1}``:
``Δ₀ = θ̂_{t−1} − θ_t`` (kept by :meth:`GNInnerSolver.post_step` from the update actually
applied), and the inner optimizer's state is carried over, so an Optax schedule on the inner
count runs over all inner steps (a global cosine), or, on ``count mod N``, restarts each outer
step (``somax.presets.gauss_newton.inner_cosine``).

**Line search.** ``θ_{t+1} = θ_t + α (θ̂ − θ_t)`` with ``α = 2^(−i/2)``, ``i < line_search``
(5 in the paper for GN, 10 for layerwise), the argmin of the true loss on the held-out
micro-batches (non-finite losses never win); ``line_search=0``: ``α = 1``, no held-out batch
needed. The solver returns ``s = −α (θ̂ − θ_t)``; the method's ``tx`` (``−lr·s``, ``lr = 1``)
applies it. ``info["ls_alpha"]`` is ``α``.

**Batch layout** (read by the curvature ``CurvatureSpec("ggn_microbatches")``, keys configurable)::

    {"x": (N, b, ...), "y": (N, b, ...),            # N training micro-batches of b examples
     "x_val": (M, b_val, ...), "y_val": (M, ...)}   # held-out micro-batches for the line search

Optional weights (``weight_key`` / ``val_weight_key``) have shape ``(N, b)`` (or ``(N, b, T)``).
The outer loss is the mean of the micro-batch losses (each with its own normalisation), its
gradient and GGN likewise; with equal micro-batches and no weights this is the loss of the
``N·b`` examples.

**Cost per outer step:** ``N`` micro-batch linearizations (one forward pass plus one JVP and one
VJP each; layerwise: one forward pass plus one JVP and one VJP per group), one forward and
backward pass over the ``N`` micro-batches for the loss and gradient at ``θ_t`` (the step's
``info["loss"]``, ``grad_norm`` and non-finite guard), and ``line_search`` held-out forward
passes. The inner loop is one ``lax.scan`` (compiled once). ``print(method.plan)`` shows
``linearizations_per_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from somax import validate
from somax._tree import tree_scale, tree_vdot, tree_where, tree_zeros_like
from somax.contracts import Solver
from somax.curvature.base import Linearization
from somax.curvature.conv_layout import canonical_convolutions
from somax.curvature.ggn import ModelLossCurvature
from somax.curvature.losses import OutputLoss, get_output_loss
from somax.curvature.model import BatchReader, Model, as_model
from somax.registry import CURVATURES, SOLVERS
from somax.telemetry import InfoField

__all__ = ["MicroBatchGGN", "ggn_microbatches", "GNInnerState", "GNInnerSolver", "gn_inner", "MODES",
           "top_level_groups"]  # fmt: skip

PyTree = Any

#: The inner problems: the GN quadratic, the prox-linear model, block-diagonal (layerwise) GN.
MODES: tuple[str, ...] = ("quadratic", "prox_linear", "layerwise")


# ---------------------------------------------------------------------------------------- curvature


@dataclass(frozen=True)
class MicroBatchGGN(ModelLossCurvature):
    """The outer linearization of a GN step over ``N`` stacked micro-batches (and the held-out ones).

    ``linearize`` returns the mean micro-batch loss and its gradient at ``θ_t`` (one forward and
    backward pass over the micro-batches), ``loss_at`` on the same micro-batches, and a matrix-free
    product with the GGN of that loss (recomputed per call: only probes use it). The inner solver
    reads the model, the micro-batches and the held-out micro-batches from ``lin.extras``.
    """

    val_reader: BatchReader
    name: str = "ggn_microbatches"

    @property
    def has_aux(self) -> bool:  # type: ignore[override]
        return False

    def outputs(self, params: PyTree, x: Any, model_state: Any, rng: Any) -> jax.Array:
        """``f(θ, x)`` on one micro-batch ``x`` (the model's state is read, never updated)."""
        return self.model.apply(params, model_state, x, rng)[0]

    def micro_batches(self, batch: Any, held_out: bool = False) -> tuple[Any, Any, Any]:
        """``(x, y, w)`` stacked on the micro-batch axis (``w`` None without weights)."""
        r = self.val_reader if held_out else self.reader
        return r.inputs(batch), r.targets(batch), r.weights(batch)

    def mean_loss(self, params: PyTree, xs: Any, ys: Any, ws: Any, model_state: Any, rng: Any) -> jax.Array:
        """Mean over the stacked micro-batches of each micro-batch's loss at ``params``."""

        def one(x, y, w):
            return self.loss.value(self.outputs(params, x, model_state, rng), y, w)

        return jnp.mean(jax.vmap(one)(xs, ys, ws))

    def linearize(self, params: Any, batch: Any, model_state: Any = None, rng: Any = None) -> Linearization:
        xs, ys, ws = self.micro_batches(batch)
        n = _leading(xs, "training micro-batches", self.reader.x_key)

        def mean_and_outputs(p):
            zs = jax.vmap(lambda x: self.outputs(p, x, model_state, rng))(xs)
            return jnp.mean(jax.vmap(self.loss.value)(zs, ys, ws)), zs

        value_and_grad = canonical_convolutions(jax.value_and_grad(mean_and_outputs, has_aux=True))
        (value, zs), grad = value_and_grad(params)
        valid = self.loss.valid(zs[0], ys[0]) if n else None
        if valid is not None:
            valid = jnp.all(jax.vmap(self.loss.valid)(zs, ys))

        def matvec(v: Any) -> Any:
            def zs(p):
                return jax.vmap(lambda x: self.outputs(p, x, model_state, rng))(xs)

            z, jv = jax.jvp(zs, (params,), (v,))
            _, pullback = jax.vjp(zs, params)
            hv = jax.vmap(lambda zk, yk, wk, jk: self.loss.prepare(zk, yk, wk).hvp(jk))(z, ys, ws, jv)
            return pullback(hv / n)[0]

        matvec = canonical_convolutions(matvec)

        return Linearization(
            loss=value,
            grad=grad,
            matvec=matvec,
            quad=lambda v: tree_vdot(v, matvec(v)),
            loss_at=lambda p: self.mean_loss(p, xs, ys, ws, model_state, rng),
            targets=ys,
            weights=ws,
            valid=valid,
            extras={"gn_microbatches": self, "params": params, "batch": batch, "model_state": model_state, "rng": rng},
        )


def _linearized(curv: Any, theta: Any, x: Any, model_state: Any, rng: Any) -> tuple[Any, Callable, Callable]:
    """``(z, v ↦ J v, u ↦ Jᵀ u)`` of the model on micro-batch ``x`` at ``θ``, the products' convolutions in
    the canonical layout (they run inside the inner ``lax.scan``)."""
    z, jvp = jax.linearize(lambda p: curv.outputs(p, x, model_state, rng), theta)
    transpose = jax.linear_transpose(jvp, theta)
    return z, canonical_convolutions(jvp), canonical_convolutions(lambda u: transpose(u)[0])


def _leading(x: Any, what: str, key: str) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or jnp.ndim(leaves[0]) < 2:
        shape = jnp.shape(leaves[0]) if leaves else None
        raise ValueError(
            f"CurvatureSpec('ggn_microbatches'): the {what} ({key!r}) must be stacked on a leading "
            f"micro-batch axis, shape (N, b, ...); got {shape}"
        )
    return int(jnp.shape(leaves[0])[0])


def ggn_microbatches(
    *,
    loss: str | OutputLoss = "ce",
    predict_fn: Callable | None = None,
    model: Model | None = None,
    x_key: str = "x",
    y_key: str = "y",
    weight_key: str | None = None,
    x_val_key: str = "x_val",
    y_val_key: str = "y_val",
    val_weight_key: str | None = None,
) -> MicroBatchGGN:
    """``CurvatureSpec("ggn_microbatches")``: the GN step's view of a batch of stacked micro-batches.

    Training micro-batches under ``x_key``/``y_key`` (``(N, b, ...)``), held-out ones under
    ``x_val_key``/``y_val_key`` (``(M, b_val, ...)``, read only by a line search).
    """
    where = "CurvatureSpec('ggn_microbatches')"
    return MicroBatchGGN(
        as_model(predict_fn=predict_fn, model=model, where=where),
        get_output_loss(loss),
        BatchReader(x_key, y_key, weight_key, where=where),
        BatchReader(x_val_key, y_val_key, val_weight_key, where=where + " (held-out micro-batches)"),
    )


# ---------------------------------------------------------------------------------------- solver


class GNInnerState(NamedTuple):
    """The inner loop's memory between outer steps.

    ``delta0``: the next inner loop's start ``Δ₀ = θ̂_{t} − θ_{t+1}`` (set by ``post_step``);
    ``delta_hat``: this step's pre-line-search update ``θ̂_t − θ_t``; ``inner``: the inner
    optimizer's state (a tuple of one state per group in layerwise mode).
    """

    delta0: PyTree
    delta_hat: PyTree
    inner: PyTree


def top_level_groups(params: PyTree) -> PyTree:
    """The default layerwise groups: each leaf labelled by its first key in the parameter tree."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    labels = [jax.tree_util.keystr(path[:1]) if path else "" for path, _ in paths]
    return jax.tree_util.tree_unflatten(treedef, labels)


_INFO_FIELDS = {
    "gn_inner_loss": InfoField("float", "mean over the N inner steps of the inner model's loss (incl. ½λ‖Δ‖²)"),
    "gn_heldout_loss": InfoField("float", "true loss on the held-out micro-batches at the chosen step α (nan: off)"),
}


@dataclass(frozen=True, kw_only=True)
class GNInnerSolver(Solver):
    """Outer GN step by ``N`` inner-optimizer steps on linearized micro-batches, then a grid line search.

    Fields: ``micro_batches`` (``N``, checked against the batch; None: the batch's leading axis), ``inner`` (an Optax
    transformation; default ``optax.contrib.muon(0.02)``), ``mode`` (:data:`MODES`),
    ``line_search`` (grid size, 0: none), ``warm_start`` (start from ``θ̂_{t−1}``),
    ``carry_state`` (keep the inner optimizer's state), ``groups`` (layerwise:
    ``params → labels``, default :func:`top_level_groups`). See the module docstring.
    """

    micro_batches: int | None = None
    inner: optax.GradientTransformation | None = None
    mode: str = "quadratic"
    line_search: int = 5
    warm_start: bool = True
    carry_state: bool = True
    groups: Callable[[PyTree], PyTree] | None = None
    linearizations_per_step: str = field(init=False, default="N")

    lane = "param"
    needs_gradient_rhs = True  # it solves for the micro-batches' own gradient
    info_keys = ("ls_alpha", "gn_inner_loss", "gn_heldout_loss")
    info_fields = _INFO_FIELDS

    def __post_init__(self) -> None:
        where = "SolverSpec('gn_inner')"
        validate.integer(f"{where}: micro_batches", self.micro_batches, minimum=1, allow_none=True)
        validate.choice(f"{where}: mode", self.mode, MODES)
        validate.integer(f"{where}: line_search", self.line_search, minimum=0)
        validate.boolean(f"{where}: warm_start", self.warm_start)
        validate.boolean(f"{where}: carry_state", self.carry_state)
        if self.inner is None:
            object.__setattr__(self, "inner", optax.contrib.muon(0.02))
        elif not (callable(getattr(self.inner, "init", None)) and callable(getattr(self.inner, "update", None))):
            raise TypeError(f"{where}: inner must be an Optax GradientTransformation, got {self.inner!r}")
        if self.groups is not None and (self.mode != "layerwise" or not callable(self.groups)):
            raise TypeError(f"{where}: groups= is a function params -> labels, used with mode='layerwise'")
        per_step = "N (the batch's leading axis)" if self.micro_batches is None else str(self.micro_batches)
        object.__setattr__(self, "linearizations_per_step", per_step)

    # --- groups (layerwise) ---------------------------------------------------------------

    def _group_masks(self, params: PyTree) -> list[list[bool]]:
        """One boolean list over the parameter leaves per group, in order of first appearance."""
        labels = jax.tree_util.tree_leaves((self.groups or top_level_groups)(params), is_leaf=_is_label)
        n = len(jax.tree_util.tree_leaves(params))
        if len(labels) != n:
            raise ValueError(f"SolverSpec('gn_inner'): groups(params) gave {len(labels)} labels for {n} leaves")
        order: list[Hashable] = []
        for lab in labels:
            if lab not in order:
                order.append(lab)
        return [[lab == g for lab in labels] for g in order]

    def _init_inner(self, params: PyTree) -> PyTree:
        if self.mode != "layerwise":
            return self.inner.init(params)
        leaves = jax.tree_util.tree_leaves(params)
        return tuple(self.inner.init([x for x, m in zip(leaves, mask) if m]) for mask in self._group_masks(params))

    def init(self, params: PyTree) -> GNInnerState:
        """Zero updates and a fresh inner optimizer state."""
        zeros = tree_zeros_like(params)
        return GNInnerState(delta0=zeros, delta_hat=zeros, inner=self._init_inner(params))

    # --- the step -------------------------------------------------------------------------

    def solve(self, lin, rhs, lam, precond, state: GNInnerState):
        """``(s = −α(θ̂ − θ_t), state, {ls_alpha, gn_inner_loss, gn_heldout_loss})``."""
        curv = lin.extras.get("gn_microbatches") if lin.extras else None
        if not isinstance(curv, MicroBatchGGN):
            raise TypeError(
                "SolverSpec('gn_inner') needs the micro-batch linearization of CurvatureSpec('ggn_microbatches') "
                "(the model, the stacked micro-batches and the held-out ones)"
            )
        theta, batch = lin.extras["params"], lin.extras["batch"]
        model_state, rng = lin.extras["model_state"], lin.extras["rng"]
        xs, ys, ws = curv.micro_batches(batch)
        n = _leading(xs, "training micro-batches", curv.reader.x_key)
        if self.micro_batches is not None and n != self.micro_batches:
            raise ValueError(
                f"SolverSpec('gn_inner'): micro_batches={self.micro_batches}, but the batch holds {n} "
                f"training micro-batches (leading axis of {curv.reader.x_key!r})"
            )
        lam = jnp.asarray(lam)
        delta0 = state.delta0 if self.warm_start else tree_zeros_like(theta)
        inner0 = state.inner if self.carry_state else self._init_inner(theta)
        step = self._layerwise_step if self.mode == "layerwise" else self._step
        body = lambda carry, data: step(curv, theta, model_state, rng, lam, carry, data)  # noqa: E731
        (delta_hat, inner), inner_losses = jax.lax.scan(body, (delta0, inner0), (xs, ys, ws))
        fdt = jnp.result_type(lin.loss)
        alpha, heldout = self._line_search(curv, theta, delta_hat, batch, model_state, rng, fdt)
        direction = tree_scale(-alpha, delta_hat)
        stats = {"ls_alpha": alpha, "gn_inner_loss": jnp.mean(inner_losses).astype(fdt), "gn_heldout_loss": heldout}
        return direction, GNInnerState(state.delta0, delta_hat, inner), stats

    def _step(self, curv, theta, model_state, rng, lam, carry, data):
        """One inner step on micro-batch ``k``: linearize at ``θ_t``, inner gradient, Optax update."""
        delta, inner = carry
        x, y, w = data
        z, jvp, transpose = _linearized(curv, theta, x, model_state, rng)
        jd = jvp(delta)
        prox = 0.5 * lam * tree_vdot(delta, delta)
        if self.mode == "quadratic":
            out = curv.loss.prepare(z, y, w)
            hjd = out.hvp(jd)
            cot = out.grad + hjd
            value = out.value + jnp.vdot(out.grad, jd) + 0.5 * jnp.vdot(jd, hjd) + prox
        else:  # prox_linear: the loss of the linearized model
            out = curv.loss.prepare(z + jd, y, w)
            cot, value = out.grad, out.value + prox
        grad = jax.tree_util.tree_map(lambda a, d: a + lam.astype(d.dtype) * d, transpose(cot), delta)
        delta, inner = self._inner_update(grad, inner, delta, theta)
        return (delta, inner), value

    def _layerwise_step(self, curv, theta, model_state, rng, lam, carry, data):
        """One inner step per group: group ``l`` sees only ``J_{k,l} Δ_l`` (block-diagonal GN)."""
        delta, inner = carry
        x, y, w = data
        z, jvp, transpose = _linearized(curv, theta, x, model_state, rng)
        masks = self._group_masks(theta)
        leaves, treedef = jax.tree_util.tree_flatten(delta)
        tangents = [
            jax.tree_util.tree_unflatten(treedef, [d if m else jnp.zeros_like(d) for d, m in zip(leaves, mask)])
            for mask in masks
        ]
        stacked = jax.tree_util.tree_map(lambda *t: jnp.stack(t), *tangents)
        jds = jax.vmap(jvp)(stacked)  # (G, *z.shape): J_{k,l} Δ_l
        out = curv.loss.prepare(z, y, w)
        hjds = jax.vmap(out.hvp)(jds)
        grads = jax.vmap(transpose)(out.grad[None] + hjds)  # leading axis: the group
        grad_leaves = jax.tree_util.tree_leaves(grads)
        theta_leaves = jax.tree_util.tree_leaves(theta)
        new_leaves, new_inner, value = list(leaves), [], out.value
        for g, mask in enumerate(masks):
            idx = [i for i, m in enumerate(mask) if m]
            d_g = [leaves[i] for i in idx]
            grad_g = [grad_leaves[i][g] + lam.astype(leaves[i].dtype) * leaves[i] for i in idx]
            value = value + jnp.vdot(out.grad, jds[g]) + 0.5 * jnp.vdot(jds[g], hjds[g])
            value = value + 0.5 * lam * sum(jnp.vdot(d, d) for d in d_g)
            d_new, st = self._inner_update(grad_g, inner[g], d_g, [theta_leaves[i] for i in idx])
            for i, d in zip(idx, d_new):
                new_leaves[i] = d
            new_inner.append(st)
        return (jax.tree_util.tree_unflatten(treedef, new_leaves), tuple(new_inner)), value

    def _inner_update(self, grad, inner, delta, theta):
        """The inner optimizer's step on ``Δ``; its ``params`` argument is ``θ_t + Δ``."""
        params = jax.tree_util.tree_map(lambda t, d: t + d.astype(t.dtype), theta, delta)
        updates, inner = self.inner.update(grad, inner, params)
        delta = jax.tree_util.tree_map(lambda d, u: (d + u.astype(d.dtype)).astype(d.dtype), delta, updates)
        return delta, inner

    def _line_search(self, curv, theta, delta_hat, batch, model_state, rng, fdt):
        """``α = 2^(−i/2)``, ``i < line_search``, minimising the held-out loss at ``θ_t + α Δ̂``."""
        if self.line_search == 0:
            return jnp.asarray(1.0, fdt), jnp.asarray(jnp.nan, fdt)
        xv, yv, wv = curv.micro_batches(batch, held_out=True)
        _leading(xv, "held-out micro-batches", curv.val_reader.x_key)
        alphas = 2.0 ** (-jnp.arange(self.line_search, dtype=fdt) / 2)

        def heldout(alpha):
            p = jax.tree_util.tree_map(lambda t, d: t + (alpha * d).astype(t.dtype), theta, delta_hat)
            return curv.mean_loss(p, xv, yv, wv, model_state, rng).astype(fdt)

        losses = jax.lax.map(heldout, alphas)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        i = jnp.argmin(losses)
        return alphas[i], losses[i]

    def post_step(self, state: GNInnerState, update, accepted, lin) -> GNInnerState:
        """``Δ₀ ← θ̂_t − θ_{t+1} = Δ̂ − u`` (``Δ̂`` when the step was not applied)."""
        applied = tree_where(accepted, update, tree_zeros_like(update))
        delta0 = jax.tree_util.tree_map(lambda d, u: d - u.astype(d.dtype), state.delta_hat, applied)
        return state._replace(delta0=delta0)


def _is_label(x: Any) -> bool:
    return isinstance(x, (str, int)) or x is None


def gn_inner(
    *,
    micro_batches: int | None = None,
    inner: optax.GradientTransformation | None = None,
    mode: str = "quadratic",
    line_search: int = 5,
    warm_start: bool = True,
    carry_state: bool = True,
    groups: Callable[[PyTree], PyTree] | None = None,
) -> GNInnerSolver:
    """``SolverSpec("gn_inner")``: see :class:`GNInnerSolver` (needs ``CurvatureSpec("ggn_microbatches")``)."""
    return GNInnerSolver(
        micro_batches=micro_batches,
        inner=inner,
        mode=mode,
        line_search=line_search,
        warm_start=warm_start,
        carry_state=carry_state,
        groups=groups,
    )


CURVATURES.register("ggn_microbatches", ggn_microbatches)
SOLVERS.register("gn_inner", gn_inner)
