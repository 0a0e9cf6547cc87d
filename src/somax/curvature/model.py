"""How curvature kinds see the user's model and batch.

**Model.** Every curvature works with one signature,

    apply(params, model_state, x, rng) -> (outputs, new_model_state, aux),

so models with state (BatchNorm statistics), randomness (dropout) and auxiliary
outputs are first-class. A plain ``predict_fn(params, x)`` is wrapped by
:func:`as_model`; Flax modules by :mod:`somax.adapters`. The step carries the model
state in ``MethodState.model_state`` and passes a fresh rng every step.

**Batch.** :class:`BatchReader` reads inputs, targets and optional per-example
weights (or masks) from any batch pytree, by key or by a user function, with
errors that name the missing entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax

__all__ = ["Model", "as_model", "BatchReader"]

PyTree = Any


@dataclass(frozen=True)
class Model:
    """A model: ``apply(params, model_state, x, rng) -> (outputs, new_model_state, aux)``.

    Attributes:
      apply: the forward function.
      uses_rng: the model draws randomness (dropout); the step then needs an rng.
      couples_examples: outputs of one example depend on others in the batch
        (BatchNorm in training mode), so per-example evaluations are not exact.
      has_aux: ``aux`` is meaningful; the step then returns it as ``info["aux"]``.
    """

    apply: Callable[[PyTree, PyTree, Any, jax.Array | None], tuple[Any, PyTree, Any]]
    uses_rng: bool = False
    couples_examples: bool = False
    has_aux: bool = False

    def __post_init__(self) -> None:
        if not callable(self.apply):
            raise TypeError(f"Model: apply must be callable, got {self.apply!r}")

    def predict_fn(self, model_state: PyTree, rng: jax.Array | None) -> Callable[[PyTree, Any], Any]:
        """``(params, x) ↦ outputs`` with the state and rng fixed (for per-example evaluation)."""
        return lambda p, x: self.apply(p, model_state, x, rng)[0]


def as_model(*, predict_fn: Callable | None = None, model: Model | None = None, where: str) -> Model:
    """The :class:`Model` given directly, or a plain ``predict_fn(params, x)`` wrapped as one."""
    if (predict_fn is None) == (model is None):
        raise TypeError(f"{where}: pass exactly one of predict_fn=(params, x) -> outputs or model=somax.Model(...)")
    if model is not None:
        if not isinstance(model, Model):
            raise TypeError(f"{where}: model must be a somax.Model (see somax.adapters), got {type(model).__name__}")
        return model
    if not callable(predict_fn):
        raise TypeError(f"{where}: predict_fn must be callable, got {predict_fn!r}")
    fn = predict_fn
    return Model(lambda p, s, x, r: (fn(p, x), s, None))


def _entry(batch: Any, key: str, role: str, where: str, option: str) -> Any:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{where}: batch must be a mapping with key {key!r} ({role}); got {type(batch).__name__}. "
            f"Pass {option}= (a key) or {option.replace('_key', '_fn')}= (a function of the batch)."
        )
    if key not in batch:
        raise KeyError(
            f"{where}: batch has no entry {key!r} ({role}); it has {sorted(map(str, batch))}. Set {option}=."
        )
    return batch[key]


@dataclass(frozen=True)
class BatchReader:
    """Reads ``x``, ``y`` and optional weights from a batch by key or function.

    ``weight_key``/``weight_fn`` give per-example weights (shape ``(B,)``, or
    ``(B, T)`` for sequence outputs); a 0/1 mask is a weight. The loss becomes the
    weighted mean ``Σ w ℓ / Σ w``.
    """

    x_key: str = "x"
    y_key: str = "y"
    weight_key: str | None = None
    x_fn: Callable[[Any], Any] | None = None
    y_fn: Callable[[Any], Any] | None = None
    weight_fn: Callable[[Any], Any] | None = None
    where: str = "curvature"

    def __post_init__(self) -> None:
        for name in ("x_fn", "y_fn", "weight_fn"):
            f = getattr(self, name)
            if f is not None and not callable(f):
                raise TypeError(f"{self.where}: {name} must be callable, got {f!r}")
        for name in ("x_key", "y_key"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{self.where}: {name} must be a string, got {getattr(self, name)!r}")

    def inputs(self, batch: Any) -> Any:
        return self.x_fn(batch) if self.x_fn is not None else _entry(batch, self.x_key, "inputs", self.where, "x_key")

    def targets(self, batch: Any) -> Any:
        if self.y_fn is not None:
            return self.y_fn(batch)
        return _entry(batch, self.y_key, "targets", self.where, "y_key")

    def weights(self, batch: Any) -> Any:
        if self.weight_fn is not None:
            return self.weight_fn(batch)
        if self.weight_key is not None:
            return _entry(batch, self.weight_key, "weights", self.where, "weight_key")
        return None
