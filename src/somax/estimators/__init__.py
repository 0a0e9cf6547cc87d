"""Randomised curvature estimators layered on the step's linearization (issue 4 / 5 fill this in)."""

__all__: list[str] = []
