"""Benchmark data sets: offline generators, IDX / CIFAR-10 parsing on small generated files, checksums.

No network is used: the Fashion-MNIST and CIFAR-10 tests write small files in the original
formats into a temporary cache and pass their checksums; a download attempt is made
impossible by pointing the mirrors at an unreachable local URL.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data


def _md5(path: Path) -> str:
    return "md5:" + data.file_digest(path, "md5")


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion(folder: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, arr in arrays.items():
        _write_idx(folder / name, arr)
    return arrays


def _fake_cifar(path: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {
                b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                b"batch_label": name.encode(),
            }
            batches[name] = batch
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return batches


@pytest.fixture
def offline(monkeypatch):
    """No real downloads: every mirror points to a closed local port."""
    monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    monkeypatch.setattr(data, "CIFAR10_URLS", ("http://127.0.0.1:9/cifar-10-python.tar.gz",))


def test_regression_digits_mnist1d_shapes():
    reg = data.regression(500, 8, seed=3)
    assert reg.x_train.shape == (450, 8) and reg.x_test.shape == (50, 8) and reg.y_train.shape == (450, 1)
    assert reg.x_train.dtype == np.float32
    np.testing.assert_allclose(reg.x_train.mean(0), 0.0, atol=1e-5)
    again = data.regression(500, 8, seed=3)
    np.testing.assert_array_equal(reg.x_test, again.x_test)  # fixed seed: same problem instance

    dig = data.digits(0)
    assert dig.x_train.shape[1] == 64 and len(dig.x_train) + len(dig.x_test) == 1797
    assert dig.y_train.dtype == np.int32 and set(np.unique(dig.y_train)) == set(range(10))
    assert 0.0 <= dig.x_train.min() and dig.x_train.max() <= 1.0

    pytest.importorskip("mnist1d")
    state = np.random.get_state()[1].copy()
    m = data.mnist1d(0, num_samples=200)
    assert m.x_train.shape == (160, 40) and m.x_test.shape == (40, 40) and m.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # global NumPy RNG left alone
    np.testing.assert_array_equal(data.mnist1d(0, num_samples=200).x_test, m.x_test)


def test_mnist1d_missing_package_names_the_alternative(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("mnist1d"):
            raise ImportError("no mnist1d")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(data.DatasetUnavailable, match="pip install mnist1d.*digits"):
        data.mnist1d(0)


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="payload"):
        data.read_idx(truncated)


def test_fashion_mnist_parses_generated_files(tmp_path, offline):
    folder = tmp_path / "fashion_mnist"
    arrays = _fake_fashion(folder)
    sums = {name: _md5(folder / name) for name in arrays}
    split = data.fashion_mnist(tmp_path, download=False, checksums=sums)
    assert split.x_train.shape == (6, 28, 28, 1) and split.x_test.shape == (4, 28, 28, 1)
    np.testing.assert_allclose(split.x_train[..., 0] * 255.0, arrays["train-images-idx3-ubyte.gz"], atol=1e-3)
    np.testing.assert_array_equal(split.y_test, arrays["t10k-labels-idx1-ubyte.gz"])
    assert split.y_train.dtype == np.int32


def test_fashion_mnist_cache_from_env(tmp_path, offline, monkeypatch):
    folder = tmp_path / "fashion_mnist"
    arrays = _fake_fashion(folder)
    monkeypatch.setenv("SOMAX_DATA", str(tmp_path))
    assert data.cache_dir() == tmp_path
    split = data.fashion_mnist(checksums={name: _md5(folder / name) for name in arrays})
    assert len(split.y_train) == 6


def test_published_checksums_reject_generated_files(tmp_path, offline):
    """The real Fashion-MNIST checksums do not match a file of the same format: it is rejected, not parsed."""
    _fake_fashion(tmp_path / "fashion_mnist")
    with pytest.raises(data.ChecksumError, match="md5 is .* expected 8d4fb7e6"):
        data.fashion_mnist(tmp_path, download=False)


def test_corrupted_file_is_rejected(tmp_path, offline):
    folder = tmp_path / "fashion_mnist"
    arrays = _fake_fashion(folder)
    sums = {name: _md5(folder / name) for name in arrays}
    victim = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match="t10k-images"):
        data.fashion_mnist(tmp_path, download=False, checksums=sums)

    archive = tmp_path / "cifar10" / data.CIFAR10_ARCHIVE[0]
    _fake_cifar(archive)
    good = _md5(archive)
    archive.write_bytes(archive.read_bytes()[:-10])  # truncated download
    with pytest.raises(data.ChecksumError):
        data.cifar10(tmp_path, download=False, checksum=good)


def test_verify_checksum_sha256_and_format(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"somax")
    data.verify_checksum(f, "sha256:" + data.file_digest(f, "sha256"))
    with pytest.raises(data.ChecksumError):
        data.verify_checksum(f, "sha256:" + "0" * 64)
    with pytest.raises(ValueError, match="md5:<hex>"):
        data.verify_checksum(f, "deadbeef")


def test_cifar10_parses_generated_archive(tmp_path, offline):
    archive = tmp_path / "cifar10" / data.CIFAR10_ARCHIVE[0]
    batches = _fake_cifar(archive)
    split = data.cifar10(tmp_path, download=False, checksum=_md5(archive))
    assert split.x_train.shape == (15, 32, 32, 3) and split.x_test.shape == (3, 32, 32, 3)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_allclose(split.x_train[0] * 255.0, first, atol=1e-3)
    np.testing.assert_array_equal(split.y_test, batches["test_batch"][b"labels"])
    assert split.y_train.dtype == np.int32


def test_missing_offline_names_the_alternative(tmp_path, offline):
    with pytest.raises(data.DatasetUnavailable, match="download=False.*mnist1d.*digits"):
        data.fashion_mnist(tmp_path, download=False)
    # download=True but unreachable: the error names the file, the folder and the offline sets.
    with pytest.raises(data.DatasetUnavailable, match="could not be downloaded.*SOMAX_DATA.*mnist1d"):
        data.cifar10(tmp_path, download=True)
    assert not list((tmp_path / "cifar10").glob("*.part"))  # no partial download left behind
