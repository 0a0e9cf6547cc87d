"""The examples run end to end (tiny settings, synthetic data, offline)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
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
    variables = example.ResNet20().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
    assert 0.26e6 < n < 0.28e6  # ResNet-20 has about 0.27M parameters
