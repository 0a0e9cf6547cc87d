"""The ``StepInfo`` schema: fixed keys, dtypes, sentinels, and a logging helper.

Every step returns ``info``: a :class:`~somax.step_info.StepInfo`, a read-only
mapping whose keys and dtypes are fixed by the plan at assembly, whatever is
enabled (its scalars travel packed in two arrays, see :mod:`somax.step_info`).
A field that is disabled, or skipped by its cadence on this step, holds its
kind's sentinel:

=========  ==========
kind       sentinel
=========  ==========
float      ``nan``
int        ``-1``
bool       ``False``
=========  ==========

Array-valued telemetry (``top_eigs``, density nodes/weights) has a fixed shape;
``block_top_eig`` is a dict keyed by parameter-block (layer) path. Sentinels never
enter the method state. :func:`to_floats` turns one step's info into a flat dict of
Python floats whose keys are the same at every step (sentinels kept as their values),
for CSV, TensorBoard or any logger; :func:`info_rows` gives one such dict per step of
a ``lax.scan``, and :class:`somax.info_log.InfoWriter` writes them as CSV or JSON lines.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from somax.step_info import STORED_IN, VECTORS, InfoLayout, StepInfo

__all__ = ["InfoField", "CORE_FIELDS", "SENTINELS", "StepInfo", "fill_info", "info_rows", "to_floats"]


#: The value a field holds when it is disabled or not computed at a step, by field kind.
SENTINELS: Mapping[str, Any] = {"float": float("nan"), "int": -1, "bool": False}


@dataclass(frozen=True)
class InfoField:
    """One ``StepInfo`` entry: its kind (``float``/``int``/``bool``) and meaning."""

    kind: Literal["float", "int", "bool"]
    doc: str
    shape: tuple[int, ...] | Literal["blocks"] = ()

    def dtype(self, float_dtype) -> Any:
        return {"float": float_dtype, "int": jnp.int32, "bool": jnp.bool_}[self.kind]

    def sentinel(self, float_dtype, blocks: tuple[str, ...] = ()) -> Any:
        value = jnp.full(() if self.shape == "blocks" else self.shape, SENTINELS[self.kind], self.dtype(float_dtype))
        if self.shape == "blocks":
            return {name: value for name in blocks}
        return value

    def cast(self, value: Any, float_dtype, blocks: tuple[str, ...] = ()) -> Any:
        dtype = self.dtype(float_dtype)
        if self.shape == "blocks":
            if set(value) != set(blocks):
                raise KeyError(f"StepInfo: block values for {sorted(value)}, expected {sorted(blocks)}")
            return {name: _as(value[name], dtype, ()) for name in blocks}
        return _as(value, dtype, self.shape)


def _as(value: Any, dtype, shape: tuple[int, ...]) -> Any:
    # Only the conversions that change something: each no-op cast or reshape is still one
    # more op to trace and lower in every compiled step.
    value = jnp.asarray(value)
    if value.dtype != dtype:
        value = value.astype(dtype)
    return value if value.shape == shape else value.reshape(shape)


#: The ``StepInfo`` fields every method reports, in order: key → :class:`InfoField`.
CORE_FIELDS: Mapping[str, InfoField] = {
    "step": InfoField("int", "index t of this step (the method's counter before the step)"),
    "loss": InfoField("float", "mini-batch loss L_B(w_t) at the step's linearization"),
    "grad_norm": InfoField("float", "‖g_t‖"),
    "update_norm": InfoField("float", "‖u_t‖ of the update from the Optax chain (applied iff step_accepted)"),
    "lam": InfoField("float", "damping λ_t used in this step's solve"),
    "rho": InfoField("float", "gain ratio actual/predicted decrease; nan unless the rho bundle fired"),
    "loss_after": InfoField("float", "L_B(w_t + u_t) on the same batch; nan unless a probe fired"),
    "pred_decrease": InfoField("float", "−(gᵀu + ½uᵀH u); nan unless the rho bundle fired"),
    "cg_iters": InfoField("int", "CG iterations; -1 in lanes without CG"),
    "cg_residual": InfoField("float", "final relative residual ‖As − g‖/‖g‖; nan in lanes without CG"),
    "cg_converged": InfoField("bool", "CG met its tolerance; False in lanes without CG"),
    "step_accepted": InfoField("bool", "False when the step was rejected (damping policy or non-finite values)"),
    "finite": InfoField(
        "bool", "loss, gradient and update were finite (else the step was rejected); True with reject_nonfinite=False"
    ),
    "batch_valid": InfoField(
        "bool",
        "the batch's target values are admissible for the loss (else the step was rejected, like a "
        "non-finite one); True with reject_nonfinite=False",
    ),
    "update_capped": InfoField(
        "bool", "the update was scaled down to the damping's bound ‖u‖ ≤ c·max(‖w‖, 1); False without a bound"
    ),
    "rel_update": InfoField("float", "‖u_t‖ / ‖w_t‖; nan unless the norms probe fired"),
    "g_dot_s": InfoField(
        "float", "g_tᵀs_t for the solved direction s_t (Newton decrement² for exact solves); nan unless norms fired"
    ),
    "actual_decrease": InfoField("float", "L_B(w_t) − L_B(w_t + u_t); nan unless loss_after is known"),
    "tr_action": InfoField("int", "damping update: 0 keep, 1 λ increased, 2 λ decreased; -1 when not updated"),
    "ls_alpha": InfoField("float", "step size chosen by the line search; nan without one"),
}


def fill_info(
    schema: Mapping[str, InfoField],
    values: Mapping[str, Any],
    float_dtype,
    blocks: tuple[str, ...] = (),
    extras: Mapping[str, Any] | None = None,
) -> StepInfo:
    """Build the fixed-structure :class:`StepInfo`: given values cast, the rest sentinels.

    Scalar fields are packed by kind (see :mod:`somax.step_info`); array fields and
    ``extras`` (e.g. the model's ``aux``, any pytree) are kept as they are.
    """
    unknown = set(values) - set(schema)
    if unknown:
        raise KeyError(f"StepInfo: values for keys not in the plan's schema: {sorted(unknown)}")
    # Positions follow the schema, never which values were given: the init of `as_optax`
    # (all sentinels) and every step must have the same pytree structure.
    packed: list[list[tuple[str, str, Any]]] = [[] for _ in VECTORS]  # (key, kind, value or None)
    arrays = {}
    for key, field in schema.items():
        if field.shape == ():
            value = field.cast(values[key], float_dtype) if key in values else None
            packed[STORED_IN[field.kind]].append((key, field.kind, value))
        elif key in values:
            arrays[key] = field.cast(values[key], float_dtype, blocks)
        else:
            arrays[key] = field.sentinel(float_dtype, blocks)
    extras = dict(extras or {})
    clash = set(extras) & set(schema)
    if clash:
        raise KeyError(f"StepInfo: extras {sorted(clash)} collide with schema keys")
    arrays.update(extras)
    vectors, slots = [], []
    for name, entries in zip(VECTORS, packed, strict=True):
        slots += [(key, kind, pos) for pos, (key, kind, _) in enumerate(entries)]
        vectors.append(_pack([(kind, v) for _, kind, v in entries], InfoField(name, "").dtype(float_dtype)))
    layout = InfoLayout(tuple(schema) + tuple(extras), tuple(slots))
    return StepInfo(layout, tuple(vectors), arrays)


def _pack(entries: list[tuple[str, Any]], dtype) -> Any:
    """One vector of ``(kind, value)`` scalars in ``dtype``, ``None`` standing for the kind's
    sentinel (bools become 0/1); each run of sentinels is one constant."""
    parts = []
    for is_unset, run in itertools.groupby(entries, key=lambda e: e[1] is None):
        run = list(run)
        if is_unset:
            parts.append(np.asarray([SENTINELS[kind] for kind, _ in run], dtype))
        else:
            parts.append(jnp.stack([_as(v, dtype, ()) for _, v in run]))
    if not parts:
        return jnp.zeros((0,), dtype)
    return jnp.asarray(parts[0]) if len(parts) == 1 else jnp.concatenate(parts)


def to_floats(info: Mapping[str, Any], *, max_array: int = 32) -> dict[str, float]:
    """One step's info as a flat dict of Python floats with the same keys at every step.

    The keys depend only on the plan (and ``max_array``), never on which probes fired,
    so a ``csv.DictWriter`` or a dashboard built from the first step fits every later one.
    Sentinel entries are kept as their values: float fields ``nan``, int fields ``-1.0``;
    bools become 0.0/1.0. Every ``nan`` is the one object :data:`math.nan`, so two rows
    compare equal with ``==`` when their fields do.

    Arrays with at most ``max_array`` entries become ``key/i`` (``key/i/j`` …); larger
    arrays (e.g. SLQ nodes) are always left out: read them from ``info`` directly.
    Per-block dicts (and other mappings, such as a dict ``aux``) become ``key/<block path>``.
    Non-numeric entries are left out.

    For the output of ``lax.scan`` (every field with a leading step axis) use
    :func:`info_rows`, which returns one such dict per step; ``to_floats`` raises a
    ``ValueError`` for a scanned info.
    """
    host = info.numpy() if isinstance(info, StepInfo) else info  # one host transfer per packed vector
    lead = _lead_shape(host)
    if lead != ():
        raise ValueError(
            f"to_floats: this info is stacked (its 'loss' has shape {lead}, e.g. the output of lax.scan); "
            "use somax.info_rows(infos) for one dict per step"
        )
    return {key: _scalar(col) for key, col in _columns(host, (), max_array)}


def info_rows(infos: Mapping[str, Any], *, max_array: int = 32) -> list[dict[str, float]]:
    """One :func:`to_floats` dict per step of a scanned ``StepInfo``, with the same keys in every row.

    ``infos`` is the stacked info of ``lax.scan`` over steps (every field with a leading
    step axis ``T``): the result has ``T`` rows, row ``t`` equal to ``to_floats`` of step
    ``t``. The info is fetched with one host transfer per packed vector and converted
    with vectorised NumPy, so long scans are cheap. A single (unscanned) info, or a
    mapping of plain numbers, gives a one-element list. Fields with more than one
    leading axis (nested scans, ``vmap``) raise ``ValueError``: index or reshape first.
    """
    host = infos.numpy() if isinstance(infos, StepInfo) else infos
    lead = _lead_shape(host)
    if len(lead) > 1:
        raise ValueError(
            f"info_rows: 'loss' has shape {lead}; expected one step axis. Index the info, or merge the axes with "
            "jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), infos)"
        )
    columns = _columns(host, lead, max_array)
    if lead == ():
        return [{key: _scalar(col) for key, col in columns}]
    keys = [key for key, _ in columns]
    matrix = np.stack([col for _, col in columns], axis=1) if columns else np.zeros(lead + (0,))
    rows = [dict(zip(keys, values, strict=True)) for values in matrix.tolist()]
    for t, j in zip(*np.nonzero(np.isnan(matrix)), strict=True):
        rows[t][keys[j]] = math.nan
    return rows


def _lead_shape(host: Mapping[str, Any]) -> tuple[int, ...]:
    """The leading (step) axes: the shape of the always-present scalar field ``loss``."""
    return tuple(np.shape(host["loss"])) if "loss" in host else ()


def _scalar(col: np.ndarray) -> float:
    value = float(col)
    return math.nan if math.isnan(value) else value


def _columns(host: Mapping[str, Any], lead: tuple[int, ...], max_array: int) -> list[tuple[str, np.ndarray]]:
    """``(key, float64 array of shape lead)`` for each loggable entry, in the info's key order."""
    out: list[tuple[str, np.ndarray]] = []
    for key, value in host.items():
        if isinstance(value, Mapping):
            out += [(f"{key}/{k}", col) for k, col in _columns(value, lead, max_array)]
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            continue
        if arr.shape[: len(lead)] != lead:
            raise ValueError(f"info field {key!r} has shape {arr.shape}; expected leading step axes {lead}")
        inner = arr.shape[len(lead) :]
        if math.prod(inner) > max_array:
            continue
        arr = arr.astype(np.float64)
        if inner == ():
            out.append((key, arr))
        else:
            out += [(key + "".join(f"/{i}" for i in idx), arr[(..., *idx)]) for idx in np.ndindex(inner)]
    return out
