"""The ``StepInfo`` schema: fixed keys, dtypes, sentinels, and a logging helper.

Every step returns ``info``: a plain ``dict`` whose keys and dtypes are fixed by
the plan at assembly, whatever is enabled. A field that is disabled, or skipped
by its cadence on this step, holds its kind's sentinel:

=========  ==========
kind       sentinel
=========  ==========
float      ``nan``
int        ``-1``
bool       ``False``
=========  ==========

Sentinels never enter the method state. :func:`to_floats` turns one step's info
into Python numbers with the sentinel entries dropped, for any logger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

__all__ = ["InfoField", "CORE_FIELDS", "SENTINELS", "StepInfo", "fill_info", "to_floats"]

StepInfo = dict  # alias for documentation: a plain dict with the plan's keys

SENTINELS: Mapping[str, Any] = {"float": float("nan"), "int": -1, "bool": False}


@dataclass(frozen=True)
class InfoField:
    """One ``StepInfo`` entry: its kind (``float``/``int``/``bool``) and meaning."""

    kind: Literal["float", "int", "bool"]
    doc: str

    def dtype(self, float_dtype) -> Any:
        return {"float": float_dtype, "int": jnp.int32, "bool": jnp.bool_}[self.kind]

    def sentinel(self, float_dtype) -> Any:
        return jnp.asarray(SENTINELS[self.kind], self.dtype(float_dtype))


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
    "step_accepted": InfoField("bool", "False when the damping policy rejected the step"),
}


def fill_info(schema: Mapping[str, InfoField], values: Mapping[str, Any], float_dtype) -> dict:
    """Build the fixed-structure info dict: given values cast, the rest sentinels."""
    unknown = set(values) - set(schema)
    if unknown:
        raise KeyError(f"StepInfo: values for keys not in the plan's schema: {sorted(unknown)}")
    out = {}
    for key, field in schema.items():
        if key in values:
            out[key] = jnp.asarray(values[key]).astype(field.dtype(float_dtype)).reshape(())
        else:
            out[key] = field.sentinel(float_dtype)
    return out


def _is_sentinel(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isnan(value)
    return value == -1


def to_floats(info: Mapping[str, Any]) -> dict[str, float]:
    """One step's info as Python numbers, dropping sentinel entries (bools become 0.0/1.0)."""
    out: dict[str, float] = {}
    for key, value in info.items():
        arr = np.asarray(value)
        if arr.shape != ():
            raise ValueError(f"to_floats: info[{key!r}] has shape {arr.shape}; pass one step's info")
        item = arr.item()
        if _is_sentinel(item):
            continue
        out[key] = float(item)
    return out
