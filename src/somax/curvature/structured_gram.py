"""Structured row Gram ``Ĵ Ĵᵀ`` from dense-layer structure (paper §2.3 eq. 2.8; EGN).

The row-Cholesky solver needs the dense Gram ``Ĵ Ĵᵀ`` (``m × m``) of the whitened
Jacobian ``Ĵ = R J``. Materialising per-example Jacobians and contracting them costs
``m² d`` flops. For a parameter leaf ``W`` that enters the model only as the kernel of one
dense product ``y = a W`` the per-example Jacobian has structure: with ``a_{i,t}`` the
input rows of example ``i`` (``t`` runs over positions; one position for an MLP) and
``δ_{i,c,t} = ∂(R z)_{i,c} / ∂y_{i,t}`` the backprop vector of whitened row ``(i, c)`` at
the layer output,

    ∂(R z)_{i,c} / ∂W = Σ_t a_{i,t} ⊗ δ_{i,c,t},
    ⟨Ĵ_{ic}, Ĵ_{jd}⟩_W = Σ_{t,t'} (a_{i,t} · a_{j,t'}) (δ_{i,c,t} · δ_{j,d,t'}),

which costs ``(bT)² n_in + (mT)² n_out + m² T²`` instead of ``m² n_in n_out`` (the
"structured derivatives" trick of the fast empirical NTK). The Gram does not depend on
how ``W``'s entries are laid out, so a kernel used transposed or reshaped is the same.

How the dense uses are found, without any layer registration:

1. ``predict_fn`` on one example is traced to a jaxpr (:func:`jax.make_jaxpr`).
2. The jaxpr is walked (inlining ``jit``/``closed_call`` sub-jaxprs) following every
   parameter leaf through layout-only ops (``convert_element_type``, ``copy``,
   ``reshape``, ``transpose``, ``squeeze``, ``expand_dims``). A leaf whose **only** use is
   one operand of a ``dot_general`` without batch dimensions is a *dense kernel*; every
   other leaf (biases, convolution kernels, norms, a kernel used twice or inside a
   ``custom_jvp``/``custom_vjp``/``scan``…) is a *fallback* leaf; a leaf with no use
   contributes nothing. A *bias* — a leaf whose only use is an elementwise ``add`` to the
   output of a structured kernel's ``dot_general`` (and that output has no other use) —
   is folded into its kernel: ``∂(Rz)_{ic}/∂b = δ_{ic}``, so its Gram term
   ``δ_{ic}·δ_{jd}`` joins the kernel's as ``(a_i·a_j + 1)(δ_{ic}·δ_{jd})`` at no extra cost
   (one position only; otherwise it falls back).
3. The jaxpr is re-evaluated with a zero perturbation added to each dense kernel's
   ``dot_general`` output and the other operand ``a`` recorded. One reverse pass per
   example, ``vmap``-ed over the ``m/b`` whitened rows ``Rᵢᵀ e_c`` as cotangents, gives
   every ``δ`` (the perturbations' cotangents) **and** the whitened per-example
   Jacobians of the fallback leaves (the same pass differentiates them).

Assumptions (shared with the per-example Gram of :mod:`somax.curvature.rows`): examples
do not interact (``predict_fn`` can be evaluated on a batch of one), and the row factor
``R`` is block diagonal over examples (true of every loss in the library: ``H_z`` of a
sum over examples is block diagonal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from somax.curvature.losses import RowFactor

PyTree = Any

__all__ = ["GRAM_MODES", "DenseUse", "GramPlan", "gram_plan", "structured_gram"]

#: ``"auto"``: dense kernels structured where that is cheaper than their per-example
#: Jacobian (always, for one position); ``"structured"``: every recognised kernel
#: structured; ``"per_example"``: the reference path of :mod:`somax.curvature.rows`.
GRAM_MODES = ("auto", "structured", "per_example")

_LAYOUT_OPS = frozenset({"convert_element_type", "copy", "copy_p", "reshape", "transpose", "squeeze", "expand_dims"})
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}

Path = tuple[int, ...]


@dataclass(frozen=True)
class DenseUse:
    """A parameter leaf used only as the kernel of one ``dot_general`` (``y = a W``).

    Attributes:
      leaf: index of the leaf in ``jax.tree_util.tree_leaves(params)``.
      path: equation indices from the top-level jaxpr into nested ``jit`` bodies.
      kernel_operand: 0 if the kernel is the ``dot_general``'s lhs, 1 if its rhs.
      a_contract: contracted axes of the other operand ``a``.
      a_ndim: rank of ``a``.
      positions: ``T``, the product of ``a``'s free axes (1 for an MLP on one example).
      n_in: product of the contracted sizes; n_out: product of the kernel's free sizes.
      structured: whether the Gram uses the structure (else: per-example Jacobian).
      bias: index of a bias leaf folded into this kernel (``y = aW + b``), or None.
    """

    leaf: int
    path: Path
    kernel_operand: int
    a_contract: tuple[int, ...]
    a_ndim: int
    positions: int
    n_in: int
    n_out: int
    structured: bool = True
    bias: int | None = None


@dataclass(frozen=True)
class GramPlan:
    """Per-leaf plan of the structured Gram (static; decided at trace time).

    Attributes:
      names: ``jax.tree_util.keystr`` of every leaf.
      dense: structured dense kernels.
      fallback: leaves whose whitened per-example Jacobian is materialised.
      unused: leaves the outputs do not depend on (no Gram contribution).

    Biases folded into a kernel are listed in that kernel's :attr:`DenseUse.bias`.
    """

    names: tuple[str, ...]
    dense: tuple[DenseUse, ...]
    fallback: tuple[int, ...]
    unused: tuple[int, ...]

    def kinds(self) -> dict[str, str]:
        """``{leaf name: "dense" | "bias" | "per_example" | "unused"}``."""
        out = {self.names[u.leaf]: "dense" for u in self.dense}
        out.update({self.names[u.bias]: "bias" for u in self.dense if u.bias is not None})
        out.update({self.names[i]: "per_example" for i in self.fallback})
        out.update({self.names[i]: "unused" for i in self.unused})
        return out

    def __str__(self) -> str:
        return "\n".join(f"{name}: {kind}" for name, kind in self.kinds().items())


# ----------------------------------------------------------------------------- tracing and analysis


def _single_example_jaxpr(predict_fn: Callable, params: PyTree, inputs: PyTree) -> tuple[jcore.ClosedJaxpr, Any]:
    """Jaxpr of ``(param leaves, x_i leaves) ↦ predict_fn(params, x_i[None])[0]``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    x_leaves, x_def = jax.tree_util.tree_flatten(inputs)

    def single(p_leaves: list, xi_leaves: list) -> jax.Array:
        p = jax.tree_util.tree_unflatten(treedef, p_leaves)
        xi = jax.tree_util.tree_unflatten(x_def, [a[None] for a in xi_leaves])
        return predict_fn(p, xi)[0]

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
    x_specs = [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in x_leaves]
    closed, out_shape = jax.make_jaxpr(single, return_shape=True)(specs, x_specs)
    return closed, out_shape


def _dense_pattern(eqn: Any, operand: int) -> tuple[tuple[int, ...], int, int, int, int] | None:
    """``(a_contract, a_ndim, T, n_in, n_out)`` if operand ``operand`` of this ``dot_general``
    is a kernel of ``y = a W`` (no batch dimensions, the other operand distinct), else None."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb or eqn.invars[0] is eqn.invars[1]:
        return None
    kernel, other = eqn.invars[operand], eqn.invars[1 - operand]
    k_contract, a_contract = (lc, rc) if operand == 0 else (rc, lc)
    k_shape, a_shape = kernel.aval.shape, other.aval.shape
    n_in = int(np.prod([k_shape[d] for d in k_contract], dtype=np.int64))
    n_out = int(np.prod([k_shape[d] for d in range(len(k_shape)) if d not in k_contract], dtype=np.int64))
    t = int(np.prod([a_shape[d] for d in range(len(a_shape)) if d not in a_contract], dtype=np.int64))
    return tuple(int(d) for d in a_contract), len(a_shape), t, n_in, n_out


def _use_counts(jaxpr: Any) -> dict:
    counts: dict = {}
    for v in [v for eqn in jaxpr.eqns for v in eqn.invars] + list(jaxpr.outvars):
        if not isinstance(v, jcore.Literal):
            counts[v] = counts.get(v, 0) + 1
    return counts


def _walk(jaxpr: Any, origin: dict, uses: dict[int, list], path: Path) -> None:
    """Record every use of a leaf-derived variable: ``("dense", path, operand, pattern)``,
    ``("bias", path of the dot_general it is added to)`` or ``("other",)``."""
    dot_out: dict = {}  # dot_general output var -> path, for dots with a tracked kernel
    counts = _use_counts(jaxpr)
    for e, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        tracked = [(k, origin[v]) for k, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in origin]
        if not tracked:
            continue
        inexact = jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact)
        same_size = eqn.invars[0].aval.size == eqn.outvars[0].aval.size
        if inexact and len(eqn.invars) == 1 and (name in _LAYOUT_OPS or (name == "broadcast_in_dim" and same_size)):
            origin[eqn.outvars[0]] = tracked[0][1]
        elif name in ("add", "add_any") and len(tracked) == 1 and _is_bias_add(eqn, tracked[0][0], dot_out, counts):
            k, leaf = tracked[0]
            uses[leaf].append(("bias", dot_out[eqn.invars[1 - k]]))
        elif name in _CALLS and _CALLS[name] in eqn.params:
            sub = eqn.params[_CALLS[name]].jaxpr
            sub_origin = {sub.invars[k]: leaf for k, leaf in tracked}
            _walk(sub, sub_origin, uses, path + (e,))
        elif name == "dot_general":
            for k, leaf in tracked:
                pattern = _dense_pattern(eqn, k)
                uses[leaf].append(("dense", path + (e,), k, pattern) if pattern else ("other",))
                if pattern and len(tracked) == 1:
                    dot_out[eqn.outvars[0]] = path + (e,)
        else:
            for _, leaf in tracked:
                uses[leaf].append(("other",))
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal) and v in origin:
            uses[origin[v]].append(("other",))


def _is_bias_add(eqn: Any, operand: int, dot_out: dict, counts: dict) -> bool:
    """``y = dot + b`` elementwise (same shapes), with the dot's output used only here."""
    other = eqn.invars[1 - operand]
    if isinstance(other, jcore.Literal) or other not in dot_out or counts.get(other, 0) != 1:
        return False
    return eqn.invars[operand].aval.shape == other.aval.shape == eqn.outvars[0].aval.shape


def _analyse(closed: jcore.ClosedJaxpr, names: Sequence[str], rows_per_example: int, batch: int, mode: str) -> GramPlan:
    n_leaves = len(names)
    origin = {closed.jaxpr.invars[i]: i for i in range(n_leaves)}
    uses: dict[int, list] = {i: [] for i in range(n_leaves)}
    _walk(closed.jaxpr, origin, uses, ())
    dense, fallback, unused, claimed, biases = [], [], [], set(), {}
    m = batch * rows_per_example
    for leaf in range(n_leaves):
        u = uses[leaf]
        if not u:
            unused.append(leaf)
            continue
        if len(u) == 1 and u[0][0] == "bias":
            biases[leaf] = u[0][1]
            continue
        if len(u) != 1 or u[0][0] != "dense" or u[0][1] in claimed:
            fallback.append(leaf)
            continue
        _, path, operand, (a_contract, a_ndim, t, n_in, n_out) = u[0]
        structured = True
        if mode == "auto":  # flops of the structured contraction vs the per-example Jacobian product
            cost_structured = (batch * t) ** 2 * n_in + (m * t) ** 2 * n_out + (m * t) ** 2
            cost_per_example = m * t * n_in * n_out + m * m * n_in * n_out
            structured = cost_structured < cost_per_example
        if not structured:
            fallback.append(leaf)
            continue
        claimed.add(path)
        dense.append(DenseUse(leaf, path, operand, a_contract, a_ndim, t, n_in, n_out))
    by_path = {u.path: i for i, u in enumerate(dense)}
    for leaf, path in biases.items():
        i = by_path.get(path)
        if i is None or dense[i].positions != 1 or dense[i].bias is not None:
            fallback.append(leaf)  # its kernel is not structured (or has positions): per-example Jacobian
        else:
            dense[i] = dataclasses.replace(dense[i], bias=leaf)
    return GramPlan(tuple(names), tuple(dense), tuple(sorted(fallback)), tuple(unused))


def gram_plan(
    predict_fn: Callable, params: PyTree, inputs: PyTree, *, rows_per_example: int = 1, mode: str = "auto"
) -> GramPlan:
    """Which leaves the structured Gram treats as dense kernels (``print`` it for a summary).

    ``inputs`` is a batch (leading axis = examples); ``rows_per_example`` (``m/b``) only
    matters for ``mode="auto"``'s cost comparison.
    """
    _check_mode(mode)
    closed, _ = _single_example_jaxpr(predict_fn, params, inputs)
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    batch = int(jax.tree_util.tree_leaves(inputs)[0].shape[0])
    return _analyse(closed, names, rows_per_example, batch, mode)


def _check_mode(mode: str) -> None:
    if mode not in GRAM_MODES:
        raise ValueError(f"gram must be one of {GRAM_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------- evaluation with perturbations


def _eval(
    jaxpr: Any,
    consts: Sequence,
    args: Sequence,
    perts: dict[Path, jax.Array],
    kernels: dict[Path, int],
    record: dict[Path, jax.Array],
    path: Path,
) -> list:
    """``jax.core.eval_jaxpr`` that adds ``perts[p]`` to the output of equation ``p`` (a dense
    kernel's ``dot_general``, kernel operand ``kernels[p]``) and records its other operand
    ``a`` in ``record[p]``; ``jit`` bodies containing such an equation are inlined."""
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for e, eqn in enumerate(jaxpr.eqns):
        here = path + (e,)
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        inline = name in _CALLS and any(p[: len(here)] == here and len(p) > len(here) for p in perts)
        if inline:
            sub = eqn.params[_CALLS[name]]
            outvals = _eval(sub.jaxpr, sub.consts, invals, perts, kernels, record, here)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = ans if eqn.primitive.multiple_results else [ans]
            if here in perts:
                record[here] = invals[1 - kernels[here]]
                outvals = [outvals[0] + perts[here].astype(outvals[0].dtype)]
        for v, val in zip(eqn.outvars, outvals):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _find_eqn(jaxpr: Any, path: Path) -> Any:
    eqn = jaxpr.eqns[path[0]]
    for e in path[1:]:
        eqn = eqn.params[_CALLS[eqn.primitive.name]].jaxpr.eqns[e]
    return eqn


def _row_cotangents(factor: RowFactor, out_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``Rᵢᵀ e_c`` for every example ``i`` and row ``c``: ``(b, m/b, *out_shape)``.

    ``R`` is block diagonal over examples, so one ``apply_t`` of ``e_c`` placed in every
    example's rows gives the ``c``-th row of every ``Rᵢ`` at once.
    """
    row_shape = tuple(factor.row_shape)
    per = int(np.prod(row_shape[1:], dtype=np.int64))
    basis = jnp.eye(per, dtype=dtype).reshape((per, 1) + row_shape[1:])
    basis = jnp.broadcast_to(basis, (per,) + row_shape)
    cot = jax.vmap(factor.apply_t)(basis)  # (per, b, *out_shape)
    return jnp.moveaxis(cot, 0, 1).astype(dtype)


def structured_gram(
    predict_fn: Callable,
    params: PyTree,
    inputs: PyTree,
    factor: RowFactor,
    out_shape: tuple[int, ...],
    dtype: Any,
    *,
    mode: str = "auto",
) -> jax.Array:
    """Dense ``Ĵ Ĵᵀ`` (``m × m``, accumulated in ``dtype``) from dense-kernel structure.

    Args:
      predict_fn: ``predict_fn(params, x)``, evaluated here on single examples.
      params: the linearization point.
      inputs: the batch inputs (leading axis = examples).
      factor: the output loss's row factor (``R`` block diagonal over examples).
      out_shape: the batch outputs' shape ``(b, *per-example shape)``.
      dtype: dtype of the Gram products.
      mode: ``"auto"`` or ``"structured"`` (see :data:`GRAM_MODES`).
    """
    _check_mode(mode)
    if mode == "per_example":
        raise ValueError("structured_gram: mode 'per_example' is RowOperator.gram's reference path")
    leaves = jax.tree_util.tree_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(inputs)
    b = int(out_shape[0])
    per = int(np.prod(tuple(factor.row_shape)[1:], dtype=np.int64))
    m = b * per
    closed, single_out = _single_example_jaxpr(predict_fn, params, inputs)
    if tuple(single_out.shape) != tuple(out_shape[1:]):
        raise ValueError(
            f"row Gram: predict_fn on one example gave outputs of shape {tuple(single_out.shape)}, "
            f"but the batch outputs have shape {tuple(out_shape)}; predict_fn must map a batch of one "
            f"example to outputs of shape (1, ...) like the full batch"
        )
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    plan = _analyse(closed, names, per, b, mode)
    kernels = {u.path: u.kernel_operand for u in plan.dense}
    y_avals = {u.path: _find_eqn(closed.jaxpr, u.path).outvars[0].aval for u in plan.dense}
    out_dtype = single_out.dtype
    cot = _row_cotangents(factor, tuple(single_out.shape), out_dtype)  # (b, per, *out)

    def per_example(xi_leaves: list, cot_i: jax.Array) -> tuple[dict, dict, list]:
        def f(perts: dict, fb: list) -> tuple[jax.Array, dict]:
            args = list(leaves)
            for i, v in zip(plan.fallback, fb):
                args[i] = v
            record: dict[Path, jax.Array] = {}
            (out,) = _eval(closed.jaxpr, closed.consts, args + list(xi_leaves), perts, kernels, record, ())
            return out, record

        zeros = {p: jnp.zeros(a.shape, a.dtype) for p, a in y_avals.items()}
        fb = [leaves[i] for i in plan.fallback]
        _, vjp_fn, acts = jax.vjp(f, zeros, fb, has_aux=True)
        deltas, fb_rows = jax.vmap(vjp_fn)(cot_i)
        return acts, deltas, fb_rows

    acts, deltas, fb_rows = jax.vmap(per_example)(x_leaves, cot)
    hi = jax.lax.Precision.HIGHEST
    parts = []
    for u in plan.dense:
        a = acts[u.path].astype(dtype)  # (b, *a_shape)
        free = [d for d in range(u.a_ndim) if d not in u.a_contract]
        a = jnp.transpose(a, (0,) + tuple(1 + d for d in free + list(u.a_contract))).reshape(b, u.positions, u.n_in)
        delta = deltas[u.path].astype(dtype)  # (b, per, *y_shape)
        if u.kernel_operand == 0:  # y = (kernel free, a free): bring the positions first
            delta = delta.reshape(b, per, u.n_out, u.positions).swapaxes(-1, -2)
        delta = delta.reshape(b, per, u.positions, u.n_out)
        if u.positions == 1:
            ka = jnp.dot(a[:, 0], a[:, 0].T, precision=hi)  # (b, b)
            if u.bias is not None:  # y = aW + b: the bias is a column of ones appended to a
                ka = ka + 1
            d2 = delta.reshape(m, u.n_out)
            dd = jnp.dot(d2, d2.T, precision=hi).reshape(b, per, b, per)
            parts.append((dd * ka[:, None, :, None]).reshape(m, m))
        else:
            ka = jnp.einsum("itk,jsk->itjs", a, a, precision=hi)
            dd = jnp.einsum("icto,jdso->ictjds", delta, delta, precision=hi)
            parts.append(jnp.einsum("ictjds,itjs->icjd", dd, ka, precision=hi).reshape(m, m))
    for rows in fb_rows:
        blk = rows.reshape(m, -1).astype(dtype)
        parts.append(jnp.dot(blk, blk.T, precision=hi))
    if not parts:
        return jnp.zeros((m, m), dtype)
    return sum(parts[1:], parts[0])
