"""Smoke tests for the Sophia-recombination and floor-and-peers studies.

They run each study's smallest profile on a subset and check the JSON and PNG it writes;
no timing is asserted (benchmarks never become timed tests). The python-somax peer is
pointed at a missing interpreter, which exercises the "unavailable" path without a venv.
"""

import json

import numpy as np
import pytest

from benchmarks import floor_and_peers, sophia_recombination


@pytest.mark.usefixtures("fast_compile")  # smoke run: compile time dominates
def test_floor_and_peers_smoke(tmp_path):
    out = tmp_path / "fp.json"
    result = floor_and_peers.main(
        ["--smoke", "--presets", "sgn_mse", "--out", str(out), "--peer-python", str(tmp_path / "no-python")]
    )
    data = json.loads(out.read_text())
    assert data["benchmark"] == "floor_and_peers" and data["config"]["profile"] == "smoke"
    assert {"platform", "versions", "cpu_count"} <= set(data["machine"])
    assert data["seeds"] == {"problem": 0, "rng": 1}
    (cell,) = data["presets"]
    assert cell["preset"] == "sgn_mse" and cell["errors"] == {}
    assert set(cell["stats"]) == {"somax", "hand", "adam"}
    for st in cell["stats"].values():
        assert st["n"] == 3 and st["p90_ms"] >= st["median_ms"] > 0
    assert set(cell["ratios"]) == {"somax_vs_hand", "somax_vs_adam"}
    assert cell["somax_cg_iters"] == data["config"]["maxiter"]
    assert cell["peer"]["status"] == "unavailable" and "does not exist" in cell["peer"]["reason"]
    assert (tmp_path / "fp.png").stat().st_size > 0
    assert result["presets"][0]["preset"] == "sgn_mse"


def test_every_preset_has_a_floor_configuration():
    import somax

    table = floor_and_peers._preset_table(3)
    assert not set(table) & set(floor_and_peers.NOT_COMPARED)
    assert set(somax.list_methods()) <= set(table) | set(floor_and_peers.NOT_COMPARED)
    for name, entry in table.items():
        assert entry["peer"] is not None or entry.get("peer_note"), name


def test_hand_row_cholesky_matches_dense_ggn_solve():
    """The hand-written CE row floor (C-row factor) gives the damped GGN direction (float64 oracle)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    entry = {**floor_and_peers._preset_table(3)["egn_ce"], "ours": {"lam0": 0.5, "learning_rate": 1.0}}
    params_np, batch_np = floor_and_peers.make_problem("ce", 3, 4, 5, classes=3)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params_np)
    batch = {"x": jnp.asarray(batch_np["x"], jnp.float64), "y": jnp.asarray(batch_np["y"])}
    init, step = floor_and_peers.make_hand_step("egn_ce", entry, 3)
    new, _, _ = jax.jit(step)(params, batch, init(params), None)
    s_row = ravel_pytree(params)[0] - ravel_pytree(new)[0]

    @jax.jit
    def dense_direction(params, batch):
        parts = floor_and_peers._ggn_parts("ce", params, batch)
        g, unravel = ravel_pytree(parts["g"])
        gmat = jax.vmap(lambda e: ravel_pytree(parts["mv"](unravel(e)))[0])(jnp.eye(g.size, dtype=g.dtype))
        return jnp.linalg.solve(gmat + 0.5 * jnp.eye(g.size), g)

    s_dense = dense_direction(params, batch)
    np.testing.assert_allclose(np.asarray(s_row), np.asarray(s_dense), rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("fast_compile")  # smoke run: compile time dominates
def test_sophia_recombination_smoke(tmp_path):
    out = tmp_path / "sr.json"
    sophia_recombination.main(
        ["--smoke", "--dataset", "digits", "--methods", "sgdm", "sophia_n", "--steps", "4", "--eval-every", "2",
         "--out", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["benchmark"] == "sophia_recombination" and data["config"]["dataset"] == "digits"
    assert data["seeds"] == [0] and {r["method"] for r in data["runs"]} == {"sgdm", "sophia_n"}
    for run in data["runs"]:
        assert [h["step"] for h in run["history"]] == [0, 2, 4]
        assert all(0.0 <= h["test_acc"] <= 1.0 for h in run["history"])
        assert run["compile_ms"] > 0 and run["step_time"]["n"] == 4
        secs = [h["seconds"] for h in run["history"]]
        assert secs == sorted(secs)
    assert set(data["summary"]) == {"sgdm", "sophia_n"}
    assert data["summary"]["sgdm"]["step_median_vs_sgdm"] == 1.0
    assert (tmp_path / "sr.png").stat().st_size > 0
