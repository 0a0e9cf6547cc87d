"""Record the golden trajectories: ``python tests/golden/record.py`` (writes ``trajectories.npz``).

Run it only when a change of numbers is intended, and say why in the commit message.
"""

from __future__ import annotations

import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).parent))

import numpy as np  # noqa: E402
from configs import NAMES, run  # noqa: E402

if __name__ == "__main__":
    arrays = {}
    for name in NAMES:
        for key, value in run(name).items():
            arrays[f"{name}::{key}"] = value
        print(name, "ok", flush=True)
    np.savez_compressed(pathlib.Path(__file__).parent / "trajectories.npz", **arrays)
