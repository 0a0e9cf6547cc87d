"""Checkpoints: atomic writes, and a recorded method that restore checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from oracles import classification_batch, tiny_mlp

import somax
from somax.checkpoint import MethodMismatchError, restore, save

HERE = Path(__file__).resolve().parent

_FSIZE = r"""
import os, resource, signal, sys
import numpy as np
from somax.checkpoint import restore, save
path = sys.argv[1]
save(path, {"w": np.arange(10.0)})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
try:
    save(path, {"w": np.arange(100_000.0)})
except OSError as err:
    assert path in str(err), err
    print("failed as expected:", err)
else:
    raise SystemExit("the oversized save did not fail")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
back = restore(path, {"w": np.zeros(10)})
assert np.array_equal(np.asarray(back["w"]), np.arange(10.0))
left = [f for f in os.listdir(os.path.dirname(path)) if f != os.path.basename(path)]
assert not left, left
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_failed_overwrite_leaves_the_previous_checkpoint_restorable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FSIZE, str(tmp_path / "ckpt.npz")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-2000:]


def _trained(method, params):
    state = method.init(params)
    _, state, _ = jax.jit(method.step)(params, classification_batch(c=2), state)
    return state


def test_restore_refuses_a_state_written_by_another_method(tmp_path):
    params, predict = tiny_mlp()
    tr = somax.make("sgn_ce", predict, damping="trust_region", maxiter=3, tol=1e-3)
    path = tmp_path / "ckpt.npz"
    save(path, {"params": params, "state": _trained(tr, params)}, method=tr)
    like = {"params": params, "state": tr.init(params)}
    back = restore(path, like, method=tr)
    assert np.isfinite(float(back["state"].damping.lam))

    same = {"damping": "trust_region", "tol": 1e-3}
    others = {
        "newton_cg": somax.make("newton_cg", predict_fn=predict, loss="ce", maxiter=3, **same),
        "maxiter": somax.make("sgn_ce", predict, maxiter=4, **same),
        "learning_rate": somax.make("sgn_ce", predict, maxiter=3, learning_rate=0.5, **same),
        "lam0": somax.make("sgn_ce", predict, maxiter=3, lam0=2.0, **same),
    }
    for what, other in others.items():
        like_other = {"params": params, "state": other.init(params)}
        with pytest.raises(MethodMismatchError, match=what):
            restore(path, like_other, method=other)
        restore(path, like_other, method=other, allow_method_mismatch=True)  # the caller's choice


def test_a_checkpoint_without_a_method_is_refused_when_one_is_checked(tmp_path):
    params, predict = tiny_mlp()
    method = somax.make("sgn_mse", predict)
    save(tmp_path / "plain.npz", {"state": method.init(params)})
    with pytest.raises(MethodMismatchError, match="records no method"):
        restore(tmp_path / "plain.npz", {"state": method.init(params)}, method=method)
    restore(tmp_path / "plain.npz", {"state": method.init(params)})  # no method given: shapes only


def test_errors_name_the_path(tmp_path):
    with pytest.raises(OSError, match="missing.npz"):
        restore(tmp_path / "missing.npz", {"w": np.zeros(1)})
    with pytest.raises(OSError, match="no_such_folder"):
        save(tmp_path / "no_such_folder" / "c.npz", {"w": np.zeros(1)})
