"""Golden trajectories: 20 steps of every preset (and of the assembly paths presets do not reach)
reproduce the recorded parameters, method state and every ``StepInfo`` field (float64).

The fixture ``golden/trajectories.npz`` is written by ``golden/record.py``; re-record it only
for an intended change of numbers. Parameters and info fields are compared to 1e-8
(relative, with a 1e-9 absolute floor) rather than bit for bit, so that a refactor may
reorder a floating-point reduction (e.g. one norm over concatenated leaves instead of a sum
of per-leaf norms) and the suite may run on another CPU without failing: XLA compiles for
the host's vector instructions, and after 20 steps the row-lane trajectories recorded on one
x86-64 machine differ by up to 2e-10 on another (parameters of order 1). A change of the arithmetic
moves them by far more; every other difference fails.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "golden"))
from configs import NAMES, run  # noqa: E402

_FIXTURE = np.load(pathlib.Path(__file__).parent / "golden" / "trajectories.npz")


def _recorded(name: str) -> dict[str, np.ndarray]:
    prefix = f"{name}::"
    return {k[len(prefix) :]: _FIXTURE[k] for k in _FIXTURE.files if k.startswith(prefix)}


@pytest.mark.parametrize("name", NAMES)
def test_reproduces_recorded_trajectory(name):
    want = _recorded(name)
    got = run(name)
    assert want, f"no recorded trajectory for {name}"
    missing = sorted(set(want) - set(got))
    assert not missing, f"{name}: keys no longer produced: {missing}"
    for key, expected in want.items():
        actual = got[key]
        assert actual.shape == expected.shape, f"{name}: {key} shape {actual.shape} != {expected.shape}"
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-9, equal_nan=True, err_msg=f"{name}: {key}")
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=f"{name}: {key}")
