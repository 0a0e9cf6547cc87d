"""Smoke test for the probe-cadence benchmark: it runs and writes the documented JSON and PNG.

No timing is asserted (benchmarks never become timed tests); this only checks that the
script works end to end on a tiny model with a few rounds and a subset of the cadences.
"""

import json

import pytest

from benchmarks import probe_cadence

# Smoke runs: compilation dominates the time and no number is compared with a recorded one.
pytestmark = pytest.mark.usefixtures("fast_compile")


def test_probe_cadence_smoke(tmp_path):
    out = tmp_path / "probe_cadence.json"
    result = probe_cadence.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "probe_cadence" and data["config"]["profile"] == "smoke"
    for key in ("platform", "cpu_count", "versions"):
        assert key in data["machine"]
    assert set(data["machine"]["versions"]) >= {"jax", "jaxlib", "optax", "numpy"}
    assert set(data["sweeps"]) == set(probe_cadence.PROBES)
    variants = data["config"]["variants"]
    assert {"off", "never", "k1"} <= set(variants)
    for sw in data["sweeps"].values():
        assert set(sw["stats"]) == set(variants) == set(sw["overhead_vs_off"])
        assert sw["rounds"] % sw["cycle"] == 0 and sw["rounds"] > 0
        for name, s in sw["stats"].items():
            assert s["median_ms"] > 0 and s["p90_ms"] >= s["median_ms"] and s["mean_ms"] > 0
            assert s["timed_steps"] == sw["rounds"]
            k = probe_cadence.VARIANTS[name]
            # the script itself checks that each probe fired exactly on its cadence
            expected = 0 if k in (-1, probe_cadence.NEVER) else sw["rounds"] // k
            assert s["fired_steps"] == expected
        for key in ("median", "p90", "mean", "paired_step", "paired_cycle"):
            assert key in sw["overhead_vs_off"]["never"]
        assert set(sw["probe_cost"]) >= {"median_ms", "mean_ms", "fired_under_cond_ms"}
        assert isinstance(sw["goals"]["never"]["met"], bool)
        sparse = [n for n in variants if 1 < probe_cadence.VARIANTS[n] < probe_cadence.NEVER]
        assert sparse and all(isinstance(sw["goals"][n]["met"], bool) for n in sparse)
        assert set(sw["program"]["never"]) >= {"hlo_instructions", "conditionals", "copies"}
    assert (tmp_path / "probe_cadence.png").stat().st_size > 0
    assert "| off (-1) |" in probe_cadence.markdown_report(result)
