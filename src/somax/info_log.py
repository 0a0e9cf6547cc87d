"""Write step infos to a file: CSV or JSON lines, one row per step.

:class:`InfoWriter` takes a ``StepInfo`` (one step, or the stacked output of
``lax.scan``), a row dict such as :func:`~somax.telemetry.to_floats` returns, or an
iterable of either, and writes one line per step. The rows come from
:func:`~somax.telemetry.info_rows`, whose keys are fixed by the plan, so the CSV
header taken from the first row fits every later row, including rows where a probe
fired for the first time.

Non-finite values: CSV writes Python's spelling, ``nan``, ``inf`` and ``-inf``
(``float()`` and ``pandas.read_csv`` read them back); JSON lines write ``nan``,
``inf`` and ``-inf`` as ``null``, since strict JSON has no such numbers (the
``finite`` and ``step_accepted`` fields record non-finite steps).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from somax.telemetry import info_rows

__all__ = ["InfoWriter"]

_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class InfoWriter:
    """Append step infos to ``path`` as CSV or JSON lines; a context manager.

    ::

        with somax.InfoWriter("run.csv") as log:
            for t in range(steps):
                params, state, info = step(params, batch, state, rng)
                log.write(info)
            log.write(infos)  # a scanned StepInfo: one row per step

    Args:
      path: the file, created or truncated.
      format: ``"csv"`` or ``"jsonl"``; by default from the suffix (``.csv``,
        ``.jsonl``, ``.ndjson``).
      max_array: as in :func:`~somax.telemetry.to_floats`: arrays with more entries are left out.

    The CSV header is the first row's keys. A later row with a key outside it raises
    ``ValueError`` (rows of one method always have the same keys); a key missing from a
    row is written as ``nan``. Each :meth:`write` flushes the file.
    """

    def __init__(self, path: str | os.PathLike, format: Literal["csv", "jsonl"] | None = None, *, max_array: int = 32):
        if format is None:
            format = _SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower())  # type: ignore[assignment]
            if format is None:
                raise ValueError(
                    f"InfoWriter: cannot tell the format of {os.fspath(path)!r}; pass format='csv' or 'jsonl'"
                )
        if format not in ("csv", "jsonl"):
            raise ValueError(f"InfoWriter: format must be 'csv' or 'jsonl', got {format!r}")
        self.path = os.fspath(path)
        self.format = format
        self.max_array = max_array
        self.fieldnames: tuple[str, ...] | None = None
        self.rows_written = 0
        self._file = open(self.path, "w", newline="" if format == "csv" else None, encoding="utf-8")
        self._csv: csv.DictWriter | None = None

    def write(self, item: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> int:
        """Write a ``StepInfo`` (single or scanned), a row dict, or an iterable of them; returns the rows written."""
        if self._file.closed:
            raise ValueError("InfoWriter: write to a closed writer")
        if isinstance(item, Mapping):
            rows = info_rows(item, max_array=self.max_array)
        else:
            rows = [row for each in item for row in info_rows(each, max_array=self.max_array)]
        for row in rows:
            self._write_row(row)
        self._file.flush()
        self.rows_written += len(rows)
        return len(rows)

    def _write_row(self, row: dict[str, float]) -> None:
        if self.fieldnames is None:
            self.fieldnames = tuple(row)
            if self.format == "csv":
                self._csv = csv.DictWriter(self._file, fieldnames=self.fieldnames, restval="nan")
                self._csv.writeheader()
        extra = [k for k in row if k not in self.fieldnames]
        if extra:
            raise ValueError(
                f"InfoWriter: row has keys {extra} not among the first row's {len(self.fieldnames)} keys; "
                "write one method's infos per file"
            )
        if self._csv is not None:
            self._csv.writerow(row)
        else:
            strict = {k: (v if math.isfinite(v) else None) for k, v in row.items()}
            self._file.write(json.dumps(strict, allow_nan=False) + "\n")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> InfoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
