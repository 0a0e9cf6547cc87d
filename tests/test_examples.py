"""The examples run end to end (tiny settings, synthetic data, offline)."""

import importlib.util
import math
import sys
from pathlib import Path

import jax
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Smoke runs: compilation dominates the time and no number is compared with a recorded one.
pytestmark = pytest.mark.usefixtures("fast_compile")


def _load(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # the examples import their shared helpers (_common) by name
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (flax modules) look their module up by name
    spec.loader.exec_module(module)
    return module


# SGD-momentum is plain Optax: the somax path is the one the test keeps working
@pytest.mark.parametrize("method", ["sophia_n"])
def test_resnet_example_trains_on_synthetic_data(tmp_path, method):
    pytest.importorskip("flax")
    example = _load("resnet20_cifar10")
    argv = ["--method", method, "--steps", "3", "--batch-size", "8", "--eval-every", "3", "--width", "4",
            "--blocks", "1", "--synthetic-size", "64", "--data-dir", str(tmp_path)]  # fmt: skip
    out = example.main(argv)
    assert out["method"] == method
    (last,) = out["history"]
    assert last["step"] == 3 and 0.0 <= last["test_acc"] <= 1.0 and math.isfinite(last["seconds"])


def test_resnet_example_model_is_resnet20_by_default():
    pytest.importorskip("flax")
    import jax
    import jax.numpy as jnp

    example = _load("resnet20_cifar10")
    init = lambda: example.ResNet20().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    variables = jax.eval_shape(init)  # shapes only: nothing is compiled or run
    n = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert 0.26e6 < n < 0.28e6  # ResNet-20 has about 0.27M parameters


def test_flax_linen_cnn_example_trains_with_the_train_state():
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    example = _load("flax_linen_cnn")
    argv = ["--steps", "2", "--batch-size", "16", "--width", "2", "--method", "ggn_direct_ce"]  # cheapest compile
    out = example.main(argv)
    (last,) = out["history"]
    assert last["step"] == 2 and math.isfinite(last["loss"]) and 0.0 <= last["test_acc"] <= 1.0
    assert int(out["state"].step) == 2 and "BatchNorm_0" in out["state"].batch_stats


def test_flax_nnx_example_trains_with_nnx_optimizer():
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    example = _load("flax_nnx")
    argv = ["--steps", "2", "--batch-size", "16", "--width", "2", "--method", "ggn_direct_ce", "--clip", "1.0"]
    out = example.main(argv)
    (last,) = out["history"]
    assert last["step"] == 2 and math.isfinite(last["loss"]) and 0.0 <= last["test_acc"] <= 1.0
    assert int(out["optimizer"].step[...]) == 2


def test_scan_csv_logging_example_writes_one_row_per_step(tmp_path):
    import csv

    example = _load("scan_csv_logging")
    path = tmp_path / "run.csv"
    argv = ["--steps", "4", "--chunk", "2", "--batch-size", "16", "--hidden", "4", "--method", "ggn_direct_mse"]
    out = example.main([*argv, "--out", str(path)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert out["rows"] == len(rows) == 4
    assert [float(r["step"]) for r in rows] == [0.0, 1.0, 2.0, 3.0]
    assert all(math.isfinite(float(r["loss"])) for r in rows) and "rho" in rows[0]


def test_multi_device_example_runs_on_the_devices_there_are():
    # one CPU device in the suite; tests/test_sharding.py checks 1-8 devices against the plain step
    example = _load("multi_device")
    argv = ["--steps", "2", "--batch-size", "8", "--hidden", "4", "--mode", "fsdp", "--method", "ggn_direct_mse"]
    out = example.main(argv)
    assert out["devices"] == len(jax.devices()) and out["trace_count"] == 1 and math.isfinite(out["loss"])
