"""The Kronecker presets (``kfac``, ``shampoo``, ``soap``, ``kfac_cg``) on 2 and 8 devices.

One subprocess (``tests/kronecker_multidevice_check.py``) with 8 forced host devices, which
must be requested before JAX initialises: per method, 4 steps (eigendecompositions every 2)
as a ``lax.scan`` on one device (the reference), the same ``lax.scan`` on 2 devices, and 4
calls of the sharded step on 8 devices (FSDP parameters for ``kfac``). The statistics are
global-batch quantities, so parameters, the whole method state and every ``StepInfo`` entry
agree with one device at float32 tolerance; the factors stay replicated, as the
preconditioners declare; the sharded step traces and compiles once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CASES = ("kfac", "shampoo", "soap", "kfac_cg")


@pytest.fixture(scope="module")
def multi_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [sys.executable, str(HERE / "kronecker_multidevice_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kronecker_presets_on_2_and_8_devices_match_one_device(multi_device):
    assert multi_device["devices"] == 8
    assert not multi_device["errors"], "\n".join(multi_device["errors"])
    results = {r["case"]: r for r in multi_device["results"]}
    assert set(results) == set(CASES)
    bad = []
    for name, r in results.items():
        if r["err_2_init"] > 0 or not r["init_2_shardings"]:
            bad.append(f"{name}: sharded init differs or lost its shardings")
        if r["err_2"] > r["tol"]:
            bad.append(f"{name} (2 devices, lax.scan): differs by {r['err_2']:.2e} at {r['where_2'][0]}")
        if r["err_8"] > r["tol"]:
            bad.append(f"{name} (8 devices): differs by {r['err_8']:.2e}")
        if r["scan_2_traces"] != 1 or r["traces_8"] != 1 or r["cache_8"] != 1:
            bad.append(f"{name}: traced {r['scan_2_traces']}/{r['traces_8']}x, {r['cache_8']} executables")
        if not (r["shardings_8"] and r["precond_replicated_8"] and r["precond_leaves"] > 0):
            bad.append(f"{name}: shardings changed or factors not replicated")
    assert not bad, "\n".join(bad)
    # FSDP parameters really are split while the factors stay replicated
    assert "P('data', None)" in results["kfac"]["param_specs_8"]
