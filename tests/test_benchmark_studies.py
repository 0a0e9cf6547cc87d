"""Benchmark studies on tiny settings: each writes its JSON (machine, versions, configuration, seeds) and PNG.

Nothing here asserts a timing. ``test_cli_end_to_end`` runs one study through the real
entry point (``python -m benchmarks ...`` in a subprocess), which is the end-to-end check CI runs.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as cli
from benchmarks import common

TINY_MI = ["--tiny", "--dataset", "digits", "--configs", "adam", "sgn_const_light"]


def _check_machine(machine: dict) -> None:
    assert {"platform", "cpu_count", "jax_backend", "versions"} <= set(machine)
    assert {"jax", "jaxlib", "optax", "numpy", "somax"} <= set(machine["versions"])


def test_common_helpers(tmp_path, capsys, monkeypatch):
    s = common.summarize([4.0, 1.0, 3.0, 2.0])
    assert s["median_ms"] == 2.5 and s["min_ms"] == 1.0 and s["mean_ms"] == 2.5 and s["n"] == 4
    assert 3.0 <= s["p90_ms"] <= 4.0
    out = common.save_json({"a": float("nan"), "b": (1, 2), "c": Path("x")}, tmp_path / "d" / "r.json")
    assert json.loads(out.read_text()) == {"a": None, "b": [1, 2], "c": "x"}
    monkeypatch.setitem(sys.modules, "tqdm", None)  # force the plain fallback
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert list(common.progress(range(3), desc="count")) == [0, 1, 2]
    assert "count 3/3" in capsys.readouterr().err


def test_cli_list_and_unknown(capsys):
    cli.main(["list"])
    listed = capsys.readouterr().out
    for name in ("probe_cadence", "lane_scaling", "module_interactions", "sophia_recombination", "floor_and_peers"):
        assert name in listed
    with pytest.raises(SystemExit, match="did you mean 'lane_scaling'"):
        cli.main(["lane_scalin"])


def test_cli_out_folder_for_file_studies():
    spec = cli.STUDIES["step_overhead"]
    assert cli._translate_out("step_overhead", spec, ["--out", "res"]) == [
        "--out",
        str(Path("res", "step_overhead.json")),
    ]
    assert cli._translate_out("step_overhead", spec, ["--out=a.json"]) == ["--out=a.json"]
    assert cli._translate_out("module_interactions", cli.STUDIES["module_interactions"], ["--out", "d"]) == [
        "--out",
        "d",
    ]


@pytest.mark.usefixtures("fast_compile")  # smoke run: compile time dominates
def test_cli_end_to_end(tmp_path, monkeypatch):
    """``python -m benchmarks module_interactions --tiny`` writes JSON, PNG and the Markdown table
    (through the CLI's ``main`` in this process: a subprocess would import JAX again)."""
    monkeypatch.setenv("SOMAX_BENCH_PROGRESS", "0")
    cli.main(["module_interactions", *TINY_MI, "--out", str(tmp_path)])
    stem = tmp_path / "module_interactions_digits_tiny"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    assert "| SGN | – | const | light |" in stem.with_suffix(".md").read_text()
    _check_machine(data["machine"])
    assert data["benchmark"] == "module_interactions" and data["seeds"] == [0]
    assert data["config"]["configs"] == ["adam", "sgn_const_light"]
    assert data["config"]["budgets"]["light"]["maxiter"] == 3
    for name in ("adam", "sgn_const_light"):
        s = data["summary"][name]
        assert 0.0 <= s["final_test_acc_mean"] <= 1.0 and s["seeds"] == 1 and s["compile_s"] > 0
        (run,) = data["runs"][name]
        curve = run["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] > 0 and len(curve["test_acc"]) == len(curve["time_s"])
        assert all(b >= a for a, b in zip(curve["time_s"], curve["time_s"][1:]))
    # The default target is Adam's final accuracy minus one point, and the goal record names both sides.
    assert data["target"] == pytest.approx(data["summary"]["adam"]["final_test_acc_mean"] - 0.01)
    assert set(data["goal"]) >= {"best_second_order", "adam_s", "met"}


def test_module_interactions_builds_the_preset():
    """The study's SGN configurations are the ``sgn_ce`` preset's specs, with the learning rate injected."""
    import jax
    import numpy as np

    import somax
    from benchmarks import module_interactions as mi
    from somax.models import mlp_apply, mlp_init

    assert len(mi.CONFIGS) == 10 and sum(c.second_order for c in mi.CONFIGS) == 8
    params = mlp_init(jax.random.PRNGKey(0), (5, 8, 3))
    for config in (c for c in mi.CONFIGS if c.second_order):
        ours = mi.build_sgn(config, mlp_apply)
        preset = somax.make(
            "sgn_ce", predict_fn=mlp_apply, learning_rate=0.5, damping=config.damping, tr_every_k=mi.TR_EVERY_K,
            precondition="diag_ema" if config.precond else None, lam0=mi.LAM0, **mi.BUDGETS[config.budget],
        )  # fmt: skip
        assert str(ours.plan) == str(preset.plan), config.name
        for part in ("solver", "precond", "damping", "estimator", "lam0"):
            assert getattr(ours, part) == getattr(preset, part), (config.name, part)
        assert type(ours.curvature) is type(preset.curvature)
    state = mi.Trainer(mi.CONFIGS[2], mlp_apply).init(params, 0.5)
    np.testing.assert_allclose(state.tx.hyperparams["learning_rate"], 0.5)


@pytest.mark.usefixtures("fast_compile")  # smoke run: compile time dominates
def test_lane_scaling_quick_tiny(tmp_path, monkeypatch):
    """lane_scaling's quick mode through the CLI, on a one-point sweep and without the CE part."""
    lane_scaling = importlib.import_module("benchmarks.lane_scaling")
    monkeypatch.setattr(lane_scaling, "QUICK_SWEEP", (16,))
    cli.main(["lane_scaling", "--quick", "--skip-ce", "--steps", "2", "--max-seconds", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "lane_scaling.json").read_text())
    assert (tmp_path / "lane_scaling.png").stat().st_size > 0
    assert data["figure2"]["width"] and data["figure2"]["batch"]


# sophia_recombination and floor_and_peers are run in their smoke modes by tests/test_benchmark_peers.py.


def test_harness_interleaved_rotation_warmup_and_stops():
    """The shared timing loop: warm-up steps come first, rounds rotate, stops land on ``stop_every``."""
    from benchmarks import harness

    seen: list[tuple[str, int]] = []
    calls = {n: (lambda i, n=n: seen.append((n, i))) for n in ("a", "b", "c")}
    run = harness.interleaved(calls, rounds=4, warmup=2)
    assert seen[:6] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]
    assert [n for n, _ in seen[6:15]] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {i for _, i in seen[6:9]} == {2} and run.rounds == 4 and run.cpu_ms is None
    assert all(len(t) == 4 and min(t) >= 0 for t in run.wall_ms.values())
    # a time limit already passed stops at the first allowed round: >= min_rounds and a multiple of stop_every
    run = harness.interleaved(calls, rounds=50, min_rounds=3, max_seconds=0.0, stop_every=5)
    assert run.rounds == 5
    fixed: list[str] = []
    harness.interleaved({n: (lambda i, n=n: fixed.append(n)) for n in "xy"}, rounds=3, rotate=False)
    assert fixed == ["x", "y"] * 3


def test_harness_self_timed_and_ratios():
    from benchmarks import harness

    peer = harness.SelfTimed(lambda i: 0.002 * (i + 1))  # seconds it measured itself
    run = harness.interleaved({"ref": lambda i: None, "peer": peer}, rounds=3, cpu_time=True)
    assert run.wall_ms["peer"] == pytest.approx([2.0, 4.0, 6.0])
    assert run.stats()["peer"]["median_ms"] == pytest.approx(4.0)
    r = harness.ratio([2.0, 4.0, 8.0], [1.0, 2.0, 2.0], keys=("median", "mean", "paired_median", "paired_p90"))
    assert r == pytest.approx({"median": 2.0, "mean": 14 / 5, "paired_median": 2.0, "paired_p90": 3.6})
