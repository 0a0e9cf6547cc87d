"""One entry point for every benchmark study.

    python -m benchmarks list                                   # the studies, one line each
    python -m benchmarks <study> [--quick] [--out DIR] [...]    # run one; extra options go to the study
    python -m benchmarks <study> --help                         # the study's own options

``--out DIR`` is a folder for every study (default ``benchmarks/results``): studies whose
own ``--out`` is a JSON file get ``DIR/<study>.json`` (their PNG, if any, lands beside it).
A path ending in ``.json`` is passed through unchanged. Study modules are imported only
when run, so a study whose module or optional dependency is missing fails with a clear
message without affecting the others.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["STUDIES", "Study", "main"]


@dataclass(frozen=True)
class Study:
    """A benchmark study: module ``benchmarks.<module>`` with ``main(argv) -> dict``."""

    module: str
    summary: str
    out: str = "file"  # what the study's own --out names: "file" (a JSON path) or "dir"


STUDIES: dict[str, Study] = {
    "probe_cadence": Study("probe_cadence", "probe cadence overhead (paper Table 3)"),
    "lane_scaling": Study("lane_scaling", "parameter vs row lane step time (paper Figure 2)", out="dir"),
    "module_interactions": Study(
        "module_interactions",
        "damping x CG budget x preconditioning, SGD, Adam; time to target (paper Table 4)",
        out="dir",
    ),
    "sophia_recombination": Study("sophia_recombination", "Sophia-style recombination (paper Figure 3)"),
    "floor_and_peers": Study("floor_and_peers", "every preset against its hand-written floor and peers"),
    "step_overhead": Study("step_overhead", "somax step vs hand-written jitted step (goal: <= 1.03x the floor)"),
    "diag_vs_adam": Study("diag_vs_adam", "diagonal-lane presets vs Adam, per-step cost"),
    "sharding_memory": Study("sharding_memory", "per-device memory and step time on 1-8 forced host devices"),
    "kronecker_cost": Study(
        "kronecker_cost", "kfac, shampoo, soap, kfac_cg, sgn_ce, muon vs Adam per step; K-FAC's CG products", out="dir"
    ),
    "kronecker_flops": Study(
        "kronecker_flops", "XLA's FLOP count of a kfac, shampoo, soap step vs Adam's (refresh on, off)", out="dir"
    ),
    "kronecker_time_to_target": Study(
        "kronecker_time_to_target", "Kronecker methods, Muon, SGN vs tuned Adam: time to target accuracy", out="dir"
    ),
    "real_sizes": Study(
        "real_sizes", "presets on MLP, 28x28 CNN, ResNet-20, transformer: time, memory, CG loop overhead"
    ),
    "gn_batch_size": Study("gn_batch_size", "full Gauss-Newton vs Adam, Muon, SOAP, sgn_ce: steps to target vs batch"),
    "gn_overhead": Study("gn_overhead", "gn inner iteration and lbfgs step vs hand-written / optax floors (<= 1.05x)"),
    "kron_peers": Study("kron_peers", "kfac, shampoo, soap vs optax Muon and PSGD-Kron: per-step cost, time to target"),
    "qn_precond": Study("qn_precond", "CG preconditioned by its own curvature pairs (memory): CG iterations saved"),
}


def _usage() -> str:
    width = max(map(len, STUDIES))
    lines = [__doc__.strip().split("\n\n")[1], "", "studies:"]
    lines += [f"  {name:<{width}}  {s.summary}" for name, s in STUDIES.items()]
    return "\n".join(lines)


def _translate_out(study: str, spec: Study, argv: list[str]) -> list[str]:
    """Turn ``--out DIR`` into ``--out DIR/<study>.json`` for studies whose ``--out`` is a file."""
    if spec.out != "file":
        return argv
    out = list(argv)
    for i, arg in enumerate(out):
        value = None
        if arg == "--out" and i + 1 < len(out):
            value, where = out[i + 1], i + 1
        elif arg.startswith("--out="):
            value, where = arg.split("=", 1)[1], i
        if value is not None and not value.endswith(".json"):
            path = str(Path(value) / f"{study}.json")
            out[where] = path if where != i else f"--out={path}"
    return out


def load(study: str) -> Any:
    """Import ``benchmarks.<study>``; a missing module or dependency raises ``SystemExit`` with the reason."""
    if study not in STUDIES:
        import difflib

        close = difflib.get_close_matches(study, STUDIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SystemExit(f"unknown study {study!r}{hint}; `python -m benchmarks list` shows them")
    name = f"benchmarks.{STUDIES[study].module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            raise SystemExit(f"study {study!r}: module {name} is not in this checkout") from None
        raise SystemExit(
            f"study {study!r} needs {err.name!r}, which is not installed (pip install -e '.[bench]')"
        ) from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Dispatch ``argv = [study, *options]``; returns the study's result dict (None for ``list``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return None
    if args[0] == "list":
        print(_usage().split("studies:\n", 1)[1])
        return None
    study, rest = args[0], args[1:]
    module = load(study)
    from benchmarks.data import DatasetUnavailable

    try:
        return module.main(_translate_out(study, STUDIES[study], rest))
    except DatasetUnavailable as err:
        raise SystemExit(f"study {study!r}: {err}") from None


if __name__ == "__main__":
    main()
