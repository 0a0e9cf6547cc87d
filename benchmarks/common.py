"""Shared helpers for the benchmark studies: machine description, timing summaries, the
results writer, the plotting helper, the command-line skeleton and progress.

Every study writes one JSON file with the same top-level shape::

    {"benchmark": <name>, "machine": machine_info(), "config": {...}, "seeds": [...], ...}

so results from different studies (and machines) can be compared. ``machine_info`` records
what is needed to interpret a timing: platform, CPU count and usable CPUs, the JAX backend
and device, package versions, ``XLA_FLAGS``, load average, and the git commit of the
checkout with whether ``src/`` had uncommitted changes. :func:`write_result` adds the load
average at the end of the run and writes the file (:func:`save_json`). The timing loop
itself is :mod:`benchmarks.harness`; the models and problems, :mod:`benchmarks.models`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "blas_env",
    "RESULTS_DIR",
    "machine_info",
    "machine_line",
    "summarize",
    "save_json",
    "write_result",
    "save_figure",
    "study_parser",
    "profile_of",
    "progress",
    "to_jsonable",
]

#: Default folder for study outputs (JSON and PNG).
RESULTS_DIR = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


def _git_state() -> dict[str, Any] | None:
    """Commit of the checkout and whether ``src/`` has uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout
        commit = run("rev-parse", "HEAD").strip()
        dirty = run("status", "--porcelain", "--", "src").strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "src_dirty": bool(dirty)} if commit else None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure just means "not available"
        return None
    return getattr(mod, "__version__", None)


def machine_info() -> dict[str, Any]:
    """Describe the machine and software a result was measured on (JSON-serialisable)."""
    import jax
    import jaxlib
    import optax

    import somax

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = None
    versions: dict[str, Any] = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "somax": somax.__version__,
    }
    for extra in ("flax", "sklearn", "matplotlib", "mnist1d"):
        if extra in sys.modules or extra == "sklearn":
            v = _version(extra)
            if v is not None:
                versions[extra] = v
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "jax_backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "somax_git": _git_state(),
    }


def summarize(times_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Median, 90th percentile, minimum and mean of a list of times in milliseconds (plus ``n``)."""
    t = np.asarray(times_ms, dtype=np.float64).ravel()
    if t.size == 0:
        nan = float("nan")
        return {"median_ms": nan, "p90_ms": nan, "min_ms": nan, "mean_ms": nan, "n": 0}
    return {
        "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)),
        "min_ms": float(np.min(t)),
        "mean_ms": float(np.mean(t)),
        "n": int(t.size),
    }


def to_jsonable(obj: Any) -> Any:
    """Convert numpy / JAX scalars and arrays, tuples, paths and non-finite floats for ``json``.

    NaN and ±inf become ``None`` (strict JSON has no such numbers).
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # numpy / jax arrays
        return to_jsonable(np.asarray(obj).tolist())
    return obj


def save_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``result`` as indented JSON (creating parent folders); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_jsonable(result), indent=1, allow_nan=False) + "\n")
    return out


def machine_line(m: Mapping[str, Any], markdown: bool = False) -> str:
    """One line naming the machine and versions of a result's ``machine`` record (console or Markdown)."""
    v = m["versions"]
    if markdown:
        return (f"Machine: {m['platform']}, {m['cpu_count']} CPUs, backend `{m['jax_backend']}` ({m['device']}); "
                f"jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, numpy {v['numpy']}")  # fmt: skip
    return (f"{m['platform']}  cpus={m['cpu_count']}  backend={m['jax_backend']}  jax {v['jax']}  "
            f"jaxlib {v['jaxlib']}  optax {v['optax']}")  # fmt: skip


def blas_env() -> dict[str, str | None]:
    """The BLAS threading variables of this run: jaxlib's LAPACK (``eigh``) runs on OpenBLAS, whose threads
    oversubscribe a small shared machine unless ``OPENBLAS_NUM_THREADS=1`` (see docs/benchmarks.md)."""
    return {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def write_result(result: dict[str, Any], path: str | os.PathLike[str], *, quiet: bool = False) -> Path:
    """The one results writer: record the load average at the end in ``result["machine"]``
    (when the result has one), write the JSON (:func:`save_json`) and say where."""
    if isinstance(result.get("machine"), dict):
        result["machine"]["load_average_end"] = load_average()
    out = save_json(result, path)
    if not quiet:
        print(f"wrote {out}")
    return out


def write_with_table(result: dict[str, Any], path: str | os.PathLike[str], render: Callable[[dict], str]) -> str:
    """:func:`write_result` (quietly), then the Markdown table ``render(result)`` beside the JSON
    (``.md``), printed and returned; ``result`` is rendered as it reads back from the JSON."""
    out = write_result(result, path, quiet=True)
    result["machine"] = json.loads(out.read_text()).get("machine", result.get("machine"))
    table = render(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return table


def save_figure(
    path: str | os.PathLike[str], draw: Callable[..., Any], *subplots: Any, dpi: int = 110, **subplot_kw: Any
) -> Path | None:
    """The one plotting helper: ``plt.subplots(*subplots, **subplot_kw)`` on the Agg backend,
    ``draw(fig, axes)``, tight layout, save as PNG (creating the folder) and close.

    Returns the path, or None (with a message on stderr) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(*subplots, **subplot_kw)
    try:
        draw(fig, axes)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    finally:
        plt.close(fig)
    return out


def study_parser(
    doc: str | None,
    *,
    quick: str,
    smoke: str | None,
    out: Path | None = None,
    out_help: str = "JSON output path",
    raw: bool = False,
    tiny: bool = False,
    tag: bool = False,
    render: bool = False,
) -> argparse.ArgumentParser:
    """The command line every study shares: its description (the docstring's first paragraph),
    ``--quick`` and ``--smoke`` (mutually exclusive; no ``--smoke`` when ``smoke`` is None;
    ``tiny=True`` spells it ``--tiny``, with ``--smoke`` as an alias), ``--out`` (default
    ``out``), and on request ``--tag`` (a suffix of the output names) and ``--render JSON``
    (print a saved result; see :func:`render_saved`)."""
    ap = argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter if raw else argparse.HelpFormatter,
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=quick)
    if smoke is not None:
        flags = ("--tiny", "--smoke") if tiny else ("--smoke",)
        mode.add_argument(*flags, dest="smoke", action="store_true", help=smoke)
    if out is not None:
        shown = out.relative_to(RESULTS_DIR.parent.parent) if out.is_relative_to(RESULTS_DIR.parent.parent) else out
        ap.add_argument("--out", type=Path, default=out, help=f"{out_help} (default {shown})")
    if tag:
        ap.add_argument("--tag", default="", help="suffix of the output file names")
    if render:
        ap.add_argument("--render", type=Path, metavar="JSON", help="print an existing result as Markdown and exit")
    return ap


def render_saved(path: Path, render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Print ``render(result)`` for the result saved at ``path`` and return the result."""
    result = json.loads(Path(path).read_text())
    print(render(result))
    return result


def profile_of(args: argparse.Namespace) -> str:
    """``"smoke"``, ``"quick"`` or ``"full"`` from the flags of :func:`study_parser`."""
    return "smoke" if getattr(args, "smoke", False) else "quick" if args.quick else "full"


class _PlainProgress:
    """Fallback progress indicator: ``desc i/total`` on stderr, at most about once a second."""

    def __init__(self, iterable: Iterable[T], total: int | None, desc: str) -> None:
        self.iterable, self.total, self.desc = iterable, total, desc

    def __iter__(self) -> Iterator[T]:
        start = last = time.perf_counter()
        i = 0
        tot = f"/{self.total}" if self.total is not None else ""
        for i, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if now - last >= 1.0 or (self.total is not None and i == self.total):
                last = now
                print(f"\r{self.desc} {i}{tot} [{now - start:.0f}s]", end="", file=sys.stderr, flush=True)
        if i:
            print(file=sys.stderr, flush=True)


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterable[T]:
    """Wrap ``iterable`` with a progress bar: ``tqdm`` when installed, else a plain stderr counter.

    Set ``SOMAX_BENCH_PROGRESS=0`` to silence it (the tests do not need it).
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if os.environ.get("SOMAX_BENCH_PROGRESS", "1") == "0":
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
