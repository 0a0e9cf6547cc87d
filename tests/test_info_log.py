"""Logging rows: stable keys in ``to_floats``, ``info_rows`` over ``lax.scan``, the CSV / JSON-lines writer."""

import csv
import json
import math
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import somax
from somax.models import mlp_apply, mlp_init
from somax.specs import TelemetrySpec

# rho (a float field) fires every 3 steps: at steps 0, 3, 6, …; nan in between.
TELEMETRY = TelemetrySpec(rho_every_k=3)


def _problem():
    params = mlp_init(jax.random.PRNGKey(0), (3, 4, 1), jnp.float32)
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    batch = {"x": jax.random.normal(kx, (8, 3), jnp.float32), "y": jax.random.normal(ky, (8,), jnp.float32)}
    method = somax.make("sgn_mse", predict_fn=lambda p, x: mlp_apply(p, x)[:, 0], telemetry=TELEMETRY)
    return method, params, batch


@cache
def _steps(n=4):
    """``n`` steps of a Python loop under one jit: the infos, on the host."""
    method, params, batch = _problem()
    step, state = jax.jit(method.step), method.init(params)
    infos = []
    for t in range(n):
        params, state, info = step(params, batch, state, jax.random.PRNGKey(t))
        infos.append(jax.device_get(info))
    return infos


@cache
def _scan(length):
    """A ``lax.scan`` of ``length`` steps (one compile): the stacked info, on the host."""
    method, params, batch = _problem()

    def body(carry, rng):
        p, s, info = method.step(carry[0], batch, carry[1], rng)
        return (p, s), info

    run = jax.jit(lambda p, s, rngs: jax.lax.scan(body, (p, s), rngs)[1])
    return jax.device_get(run(params, method.init(params), jax.random.split(jax.random.PRNGKey(2), length)))


def _stacked_steps():
    """The Python loop's infos stacked along a leading step axis, as ``lax.scan`` returns them (no compile)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *_steps())


def _step_of(infos, t):
    return jax.tree_util.tree_map(lambda x: x[t], infos)


def test_to_floats_keys_are_stable_while_rho_fires_every_third_step():
    rows = [somax.to_floats(info) for info in _steps()[:3]]
    assert list(rows[0]) == list(rows[1]) == list(rows[2])
    assert np.isfinite(rows[0]["rho"]) and math.isnan(rows[1]["rho"]) and math.isnan(rows[2]["rho"])
    assert math.isnan(rows[1]["loss_after"])
    assert rows[0]["tr_action"] == -1.0  # int sentinel kept as -1.0 (constant damping never updates)
    assert rows[0]["step_accepted"] == 1.0 and rows[0]["step"] == 0.0 and rows[2]["step"] == 2.0
    assert all(isinstance(v, float) for v in rows[1].values())
    assert rows[1] == somax.to_floats(_steps()[1])  # every nan is math.nan: rows compare equal


def _stacked_arrays(length):
    """A scanned-info-like mapping with array and per-block fields (probes that fired on even steps only)."""
    t = np.arange(length)
    eigs = np.where((t % 2 == 0)[:, None], np.stack([t + 2.0, t + 1.0], axis=1), np.nan).astype(np.float32)
    return {
        "loss": t * 0.5,
        "top_eigs": eigs,
        "density_nodes": np.zeros((length, 4, 9), np.float32),  # 36 entries > max_array = 32
        "block_top_eig": {"['layer0']": eigs[:, 0], "['layer1']": eigs[:, 1]},
        "cg_converged": t % 3 == 0,
    }


def test_array_and_block_fields_keep_their_keys_and_large_arrays_are_left_out():
    rows = somax.info_rows(_stacked_arrays(40))
    keys = ["loss", "top_eigs/0", "top_eigs/1", "block_top_eig/['layer0']", "block_top_eig/['layer1']",
            "cg_converged"]  # fmt: skip
    assert len(rows) == 40 and all(list(row) == keys for row in rows)
    assert rows[2]["top_eigs/1"] == 3.0 and math.isnan(rows[3]["top_eigs/0"]) and rows[3]["cg_converged"] == 1.0
    single = {k: (v[3] if not isinstance(v, dict) else {b: x[3] for b, x in v.items()})
              for k, v in _stacked_arrays(40).items()}  # fmt: skip
    assert somax.to_floats(single) == rows[3]
    assert list(somax.info_rows(_stacked_arrays(5), max_array=1)[0]) == [k for k in keys if "top_eigs/" not in k]


def test_to_floats_on_a_scanned_info_raises_and_names_info_rows():
    stacked = _stacked_steps()
    assert isinstance(stacked, somax.StepInfo) and stacked["loss"].shape == (4,)
    with pytest.raises(ValueError, match="info_rows"):
        somax.to_floats(stacked)


@pytest.mark.parametrize("length", [1, 33, 1000])
def test_info_rows_one_row_per_step_with_the_per_step_values(length):
    # scans of 33 and 1000 steps; length 1 is the first step of the 1000 (x[:1], shape (1, …)), saving a compile
    infos = jax.tree_util.tree_map(lambda x: x[:1], _scan(1000)) if length == 1 else _scan(length)
    rows = somax.info_rows(infos)
    assert len(rows) == length
    keys = list(somax.to_floats(_step_of(infos, 0)))
    assert all(list(row) == keys for row in rows)
    for t in sorted({0, 1, 2, 3, length // 2, length - 1} & set(range(length))):
        assert rows[t] == somax.to_floats(_step_of(infos, t))
    loss = np.asarray(infos["loss"], np.float64)
    np.testing.assert_array_equal([row["loss"] for row in rows], loss)
    assert [row["step"] for row in rows] == list(map(float, range(length)))
    fired = [t for t, row in enumerate(rows) if not math.isnan(row["rho"])]
    assert fired == list(range(0, length, 3))


def test_info_rows_of_a_single_info_is_a_one_element_list():
    info = _steps()[0]
    assert somax.info_rows(info) == [somax.to_floats(info)]


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=50))
def test_info_rows_length_and_keys_for_any_scan_length(n):
    infos = jax.tree_util.tree_map(lambda x: x[:n], _scan(1000))  # the first n steps: a scan of length n
    assert isinstance(infos, somax.StepInfo)
    rows = somax.info_rows(infos)
    assert len(rows) == n
    assert all(list(row) == list(rows[0]) for row in rows)


def test_csv_writer_keeps_a_probe_that_first_fires_on_a_later_row(tmp_path):
    path = tmp_path / "run.csv"
    steps = _steps()
    with somax.InfoWriter(path) as log:
        for info in steps[1:]:  # rho: nan, nan, then fired at step 3
            log.write(info)
        assert log.write(_stacked_steps()) == 4
        log.write(somax.to_floats(steps[0]))  # a row dict
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == list(somax.to_floats(steps[1]))
    assert len(read) == 3 + 4 + 1
    assert read[0]["rho"] == "nan" and read[1]["rho"] == "nan"
    assert float(read[2]["rho"]) == somax.to_floats(steps[3])["rho"]
    expected = [somax.to_floats(i) for i in [*steps[1:], *steps, steps[0]]]
    assert [{k: _canonical(float(v)) for k, v in row.items()} for row in read] == expected


def _canonical(value):
    return math.nan if math.isnan(value) else value


def test_csv_writer_rejects_a_row_with_a_new_key(tmp_path):
    with somax.InfoWriter(tmp_path / "run.csv") as log:
        log.write({"loss": 1.0})
        with pytest.raises(ValueError, match="not among the first row"):
            log.write({"loss": 1.0, "rho": 0.5})


def test_jsonl_writer_round_trip_writes_nan_as_null(tmp_path):
    path = tmp_path / "run.jsonl"
    with somax.InfoWriter(path) as log:
        log.write(_stacked_steps())
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and "NaN" not in path.read_text()
    read = [json.loads(line) for line in lines]
    rows = somax.info_rows(_stacked_steps())
    assert read[1]["rho"] is None and read[0]["rho"] == rows[0]["rho"]
    assert read == [{k: (None if math.isnan(v) else v) for k, v in row.items()} for row in rows]


def test_writer_needs_a_known_format(tmp_path):
    with pytest.raises(ValueError, match="format"):
        somax.InfoWriter(tmp_path / "run.txt")
    with somax.InfoWriter(tmp_path / "run.txt", format="jsonl") as log:
        assert log.write([{"loss": 1.0}, {"loss": float("inf")}]) == 2
    assert (tmp_path / "run.txt").read_text().splitlines() == ['{"loss": 1.0}', '{"loss": null}']
