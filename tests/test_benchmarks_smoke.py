"""Smoke test for the step-overhead benchmark: it runs and writes the documented JSON.

No timing is asserted (benchmarks never become timed tests); this only checks that the
script works end to end on one tiny point with three rounds.
"""

import json

import pytest

from benchmarks import step_overhead

# Smoke runs: compilation dominates the time and no number is compared with a recorded one.
pytestmark = pytest.mark.usefixtures("fast_compile")


def test_step_overhead_smoke(tmp_path):
    out = tmp_path / "step_overhead.json"
    result = step_overhead.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "step_overhead" and data["config"]["profile"] == "smoke"
    for key in ("platform", "cpu_count", "versions"):
        assert key in data["machine"]
    assert set(data["machine"]["versions"]) >= {"jax", "jaxlib", "optax", "numpy"}
    (point,) = data["points"]
    assert set(point["stats"]) == set(step_overhead.VARIANTS)
    for stats in point["stats"].values():
        assert stats["median_ms"] > 0 and stats["p90_ms"] >= stats["median_ms"]
    for key in ("sgn_vs_hand", "newton_vs_hand", "sgn_vs_adam", "newton_vs_adam"):
        assert set(point["ratios"][key]) >= {"median", "p90"}
    assert point["repeats"] == 3
    maxiter = data["config"]["maxiter"]
    assert all(point["cg_iters"][n] == maxiter for n in ("somax_sgn", "hand_sgn", "somax_newton", "hand_newton"))
    assert set(data["compile"]["ratios"]) == {"sgn", "newton"}
    assert result["points"][0]["width"] == point["width"]


def test_step_overhead_pair_smoke(tmp_path):
    out = tmp_path / "pair.json"
    step_overhead.main(["--smoke", "--pair", "sgn", "--out", str(out)])
    data = json.loads(out.read_text())
    (pair,) = data["pairs"]
    assert data["benchmark"] == "step_overhead_pair" and pair["lane"] == "sgn" and pair["repeats"] == 3
    assert set(pair["stats"]) == {"somax_sgn", "hand_sgn"}
    assert set(pair["ratio"]) == {"median", "p90", "paired_median"} and pair["ratio"]["median"] > 0


def test_real_sizes_tiny_smoke(tmp_path):
    from benchmarks import real_sizes

    out = tmp_path / "real_sizes.json"
    real_sizes.main(["--tiny", "--out", str(out), "--tag", "t"])
    data = json.loads((tmp_path / "real_sizes.t.json").read_text())
    assert data["benchmark"] == "real_sizes" and data["config"]["profile"] == "tiny"
    (point,) = data["points"]
    cells = point["cells"]
    assert set(cells) >= {"adam", "sgn_ce_light", "grad", "ggnvp"}
    for cell in cells.values():
        assert cell["median_ms"] > 0 and cell["p90_ms"] >= cell["median_ms"] and cell["compile_s"] > 0
    light = cells["sgn_ce_light"]
    assert set(light["ratio_to_adam"]) >= {"median", "p90", "paired_median"}
    assert light["peak_memory_ratio"] > 0 and light["loop_overhead"] > 0 and light["cg_iters"] <= 3
    assert (tmp_path / "real_sizes.t.md").exists()


def test_kronecker_flops_tiny_smoke(tmp_path):
    """XLA's FLOP counts: Shampoo does more arithmetic than Adam, and a refresh step more than the others."""
    from benchmarks import kronecker_flops

    kronecker_flops.main(["--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "kronecker_flops_tiny.json").read_text())
    (point,) = data["points"]
    assert set(point["flops"]) == {"adam", "shampoo", "shampoo_off"}
    ratio = point["ratio_to_adam"]
    assert 1 < ratio["shampoo_off"] < ratio["shampoo"]
    assert "every step (refresh off)" in (tmp_path / "kronecker_flops_tiny.md").read_text()


def test_kronecker_cost_tiny_smoke(tmp_path):
    from benchmarks import kronecker_cost

    kronecker_cost.main(["--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "kronecker_cost_tiny.json").read_text())
    assert data["benchmark"] == "kronecker_cost" and data["config"]["profile"] == "tiny"
    (point,) = data["points"]
    assert set(point["stats"]) == {"adam", "shampoo"} and set(point["ratio_to_adam"]) == {"shampoo"}
    for st in point["stats"].values():
        assert st["median_ms"] > 0 and st["p90_ms"] >= st["median_ms"]
    assert set(point["ratio_to_adam"]["shampoo"]) == {"median", "p90", "paired_median", "paired_p90"}
    assert all(point["compile_s"][m] > 0 for m in ("adam", "shampoo"))
    (row,) = data["cg_products"]["rows"]
    assert row["params"] == "init" and row["cg_median"] >= 1 and row["pcg_median"] >= 1 and row["ratio"] > 0
    assert "Goal (kfac, shampoo, soap" in (tmp_path / "kronecker_cost_tiny.md").read_text()
