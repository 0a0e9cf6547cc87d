"""Named methods: each is a few lines of specs (see ``somax.describe(name)``)."""

from somax.presets import param_lane  # noqa: F401  (registers the presets)
from somax.presets.param_lane import newton_cg, sgn_ce, sgn_mse
from somax.presets.registry import PRESETS, define_preset, describe, list_methods, make

__all__ = ["PRESETS", "define_preset", "describe", "list_methods", "make", "newton_cg", "sgn_ce", "sgn_mse"]
