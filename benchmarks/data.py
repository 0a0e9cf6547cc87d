"""Data sets for the benchmark studies.

Offline (no network needed):

* :func:`regression` — ``sklearn.datasets.make_regression`` (paper Appendix C.1, case I:
  200 000 examples, 128 features, noise 0.1, 90/10 split, fixed seed);
* :func:`digits` — ``sklearn.datasets.load_digits`` (8×8 digit images shipped with scikit-learn);
* :func:`mnist1d` — MNIST-1D [Greydanus 2020], generated procedurally by the ``mnist1d``
  package's ``make_dataset`` (``pip install mnist1d``, or the ``bench`` extra). The package
  is required: there is no home-grown generator, so results match the published data set.
  Without it, :class:`DatasetUnavailable` says how to install it and names ``digits``.

Downloaded once into a cache folder (``cache_dir``, else ``$SOMAX_DATA``, else
``~/.cache/somax``) and checked against the publishers' MD5 checksums before parsing:

* :func:`fashion_mnist` — the four IDX ``*.gz`` files of Fashion-MNIST (Zalando);
* :func:`cifar10` — ``cifar-10-python.tar.gz`` (Krizhevsky, python pickle batches).

A file that fails its checksum is never parsed (:class:`ChecksumError`; a freshly
downloaded one is deleted). A data set that is neither cached nor downloadable raises
:class:`DatasetUnavailable`, naming the offline alternatives. Every loader returns a
:class:`Split` of NumPy arrays.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "Split",
    "DatasetUnavailable",
    "ChecksumError",
    "cache_dir",
    "file_digest",
    "verify_checksum",
    "regression",
    "digits",
    "mnist1d",
    "fashion_mnist",
    "cifar10",
    "read_idx",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MIRRORS",
    "CIFAR10_ARCHIVE",
    "CIFAR10_URLS",
    "OFFLINE_ALTERNATIVES",
]


class Split(NamedTuple):
    """Train/test arrays. Classification: ``y`` holds int32 class indices; regression: float32 targets."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class DatasetUnavailable(RuntimeError):
    """A data set is not in the cache and cannot be downloaded (offline, or the package is missing)."""


class ChecksumError(ValueError):
    """A data file does not match its published checksum."""


OFFLINE_ALTERNATIVES = (
    "offline alternatives: 'mnist1d' (generated procedurally; pip install mnist1d) or "
    "'digits' (sklearn.datasets.load_digits), e.g. `python -m benchmarks module_interactions --dataset mnist1d`"
)

#: Fashion-MNIST files and their MD5 checksums as published by Zalando Research
#: (github.com/zalandoresearch/fashion-mnist, README; the same values torchvision uses).
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRRORS: tuple[str, ...] = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
#: CIFAR-10 python archive and its MD5 as published on https://www.cs.toronto.edu/~kriz/cifar.html.
CIFAR10_ARCHIVE: tuple[str, str] = ("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a")
CIFAR10_URLS: tuple[str, ...] = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = ("test_batch",)


# --------------------------------------------------------------------------- offline sets


def _split(x: np.ndarray, y: np.ndarray, test_frac: float, seed: int) -> Split:
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_frac))
    test, train = perm[:n_test], perm[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def regression(n: int = 200_000, d: int = 128, seed: int = 0, *, noise: float = 0.1, test_frac: float = 0.1) -> Split:
    """Scalar regression from ``make_regression`` (paper case I), standardised, float32.

    Inputs are standardised with the training mean/std and targets divided by the training
    target std, so an MSE of 1 is the variance of ``y``. ``y`` has shape ``(n, 1)``.
    """
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=n, n_features=d, noise=noise, random_state=seed)
    s = _split(x.astype(np.float32), y.astype(np.float32)[:, None], test_frac, seed)
    mu, sd = s.x_train.mean(0), s.x_train.std(0) + 1e-8
    ysd = s.y_train.std() + 1e-8
    return Split((s.x_train - mu) / sd, s.y_train / ysd, (s.x_test - mu) / sd, s.y_test / ysd)


def digits(seed: int = 0, *, test_frac: float = 0.2) -> Split:
    """``load_digits`` (1797 8×8 images, 10 classes) as float32 vectors of 64 in ``[0, 1]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return _split(x, data.target.astype(np.int32), test_frac, seed)


def mnist1d(seed: int = 0, *, num_samples: int = 5000, train_split: float = 0.8) -> Split:
    """MNIST-1D from the ``mnist1d`` package's ``make_dataset`` (offline), float32 ``(n, 40)``.

    Defaults give the published data set's sizes (4000 train / 1000 test; the published
    pickle is ``seed=42``). ``make_dataset`` seeds NumPy's *global* generator; its state is
    restored afterwards.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise DatasetUnavailable(
            "MNIST-1D needs the 'mnist1d' package (pip install mnist1d, or pip install -e '.[bench]'); "
            "offline alternative without it: 'digits' (sklearn.datasets.load_digits)"
        ) from err
    args = get_dataset_args()
    args.seed, args.num_samples, args.train_split = int(seed), int(num_samples), float(train_split)
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    f32, i32 = np.float32, np.int32
    return Split(d["x"].astype(f32), d["y"].astype(i32), d["x_test"].astype(f32), d["y_test"].astype(i32))


# --------------------------------------------------------------------------- cache, checksums, download


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The data cache folder: ``path``, else ``$SOMAX_DATA``, else ``~/.cache/somax``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SOMAX_DATA")
    return Path(env) if env else Path.home() / ".cache" / "somax"


def file_digest(path: str | os.PathLike[str], algorithm: str = "md5") -> str:
    """Hex digest of a file (streamed)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`ChecksumError` unless ``path`` matches ``expected`` (``"md5:…"`` or ``"sha256:…"``)."""
    algorithm, _, want = expected.partition(":")
    if not want:
        raise ValueError(f"checksum must look like 'md5:<hex>' or 'sha256:<hex>', got {expected!r}")
    got = file_digest(path, algorithm)
    if got != want.lower():
        raise ChecksumError(f"{path}: {algorithm} is {got}, expected {want} (corrupted or incomplete file; delete it)")


def _download(urls: Sequence[str], dest: Path, checksum: str, timeout: float = 60.0) -> None:
    """Fetch the first reachable URL into ``dest`` via a temporary file; verify before moving in place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
                shutil.copyfileobj(resp, out)
            verify_checksum(tmp, checksum)
            tmp.replace(dest)
            return
        except (urllib.error.URLError, OSError, ChecksumError) as err:
            errors.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetUnavailable("; ".join(errors))


def _fetch(
    name: str, files: Mapping[str, str], urls: Mapping[str, Sequence[str]], folder: Path, download: bool
) -> None:
    """Make sure every file is in ``folder`` and matches its checksum (downloading what is missing)."""
    for fname, checksum in files.items():
        path = folder / fname
        if not path.exists():
            if not download:
                raise DatasetUnavailable(
                    f"{name}: {path} is missing and download=False. Download it (download=True, needs network) "
                    f"or copy the original files there; {OFFLINE_ALTERNATIVES}"
                )
            try:
                _download(urls[fname], path, checksum)
            except DatasetUnavailable as err:
                raise DatasetUnavailable(
                    f"{name}: {fname} is not in {folder} and could not be downloaded ({err}). "
                    f"Set SOMAX_DATA to a folder holding the original files, or use an offline set; "
                    f"{OFFLINE_ALTERNATIVES}"
                ) from None
        verify_checksum(path, checksum)


# --------------------------------------------------------------------------- Fashion-MNIST


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (``.gz`` or raw): 2 zero bytes, type code, number of dims, big-endian sizes, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says {shape} of {dtype} but the payload has {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    checksums: Mapping[str, str] | None = None,
) -> Split:
    """Fashion-MNIST: ``x`` float32 ``(n, 28, 28, 1)`` in ``[0, 1]`` (NHWC), ``y`` int32; 60 000 / 10 000.

    Files live in ``<cache>/fashion_mnist/``. ``checksums`` overrides :data:`FASHION_MNIST_FILES`
    (file name → ``"md5:…"``), e.g. for a local copy in the same format.
    """
    files = dict(checksums if checksums is not None else FASHION_MNIST_FILES)
    folder = _cache(cache_dir) / "fashion_mnist"
    urls = {f: [m + f for m in FASHION_MNIST_MIRRORS] for f in files}
    _fetch("Fashion-MNIST", files, urls, folder, download)
    out = []
    for split in ("train", "t10k"):
        images = read_idx(folder / f"{split}-images-idx3-ubyte.gz")
        labels = read_idx(folder / f"{split}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
        out += [(images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32)]
    return Split(*out)


def _cache(path: str | os.PathLike[str] | None) -> Path:
    return cache_dir(path)


# --------------------------------------------------------------------------- CIFAR-10


def cifar10(
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    checksum: str | None = None,
) -> Split:
    """CIFAR-10: ``x`` float32 ``(n, 32, 32, 3)`` in ``[0, 1]`` (NHWC), ``y`` int32; 50 000 / 10 000.

    Reads the batches straight from ``<cache>/cifar10/cifar-10-python.tar.gz`` after the
    archive's checksum passed (the batches are pickles; only a verified archive is unpickled).
    ``checksum`` overrides the published MD5 (e.g. for a local file in the same format).
    """
    fname, published = CIFAR10_ARCHIVE
    folder = _cache(cache_dir) / "cifar10"
    _fetch("CIFAR-10", {fname: checksum or published}, {fname: CIFAR10_URLS}, folder, download)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    with tarfile.open(folder / fname, "r:gz") as tar:
        for split, names in (("train", _CIFAR10_TRAIN), ("test", _CIFAR10_TEST)):
            for name in names:
                member = f"{_CIFAR10_FOLDER}/{name}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    raise ValueError(f"CIFAR-10 archive {folder / fname} has no {member}") from None
                if f is None:
                    raise ValueError(f"CIFAR-10 archive: {member} is not a regular file")
                batch = pickle.load(f, encoding="bytes")  # noqa: S301 - archive checksum verified above
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                labels = np.asarray(batch[b"labels"], dtype=np.int32)
                if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                    raise ValueError(f"CIFAR-10 {member}: data {data.shape}, labels {labels.shape}")
                parts[split].append((data, labels))
    out = []
    for split in ("train", "test"):
        data = np.concatenate([d for d, _ in parts[split]])
        labels = np.concatenate([y for _, y in parts[split]])
        x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
        out += [x, labels]
    return Split(*out)
