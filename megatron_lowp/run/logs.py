"""The run's JSON-lines logs (metrics.jsonl, events.jsonl, numerics.jsonl): strict JSON, one object a line.

Strict: a non-finite number (a NaN loss, an Inf gradient norm) is written as null, and the row
names the keys it nulled in `"nonfinite": [...]`, so any JSON reader accepts every line and no
information is lost. `read_jsonl` skips a torn last line (a crash mid-write) rather than failing.

On resume, the rows after the resumed step are dropped first (they belong to work the checkpoint does
not hold and that is about to be redone), so a file never has duplicated or missing steps; the
rewrite is atomic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_lowp.run.atomic import dumps_strict, write_text_atomic


def read_jsonl(path: Path) -> list[dict]:
    """Every complete JSON object line of a log (a torn or foreign line is skipped)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def encode_row(row: dict[str, Any]) -> str:
    """One strict JSON line; top-level non-finite numbers become null and are named in "nonfinite"."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        row = {**row, "nonfinite": bad}
    return dumps_strict(row) + "\n"


def value(row: dict, key: str) -> float | None:
    """A logged number, NaN where the row says it was non-finite, None where the key is absent."""
    if key in row.get("nonfinite", ()):
        return math.nan
    return row.get(key)


class JsonlLog:
    """An append-only JSON-lines file of step rows. Opening it for a run resumed at `resumed_step`
    first drops (atomically) the rows of later steps."""

    def __init__(self, path: Path, resumed_step: int):
        self.path = Path(path)
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resumed_step]
        self.earlier_rows = kept  # what the run logged before this resume
        if self.path.exists():
            write_text_atomic(self.path, "".join(encode_row(r) for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def truncate(self, step: int) -> None:
        """Drop the rows after `step` (a rollback redoes them)."""
        self._file.close()
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(encode_row(r) for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            self._file.write("".join(encode_row(r) for r in rows))
            self._file.flush()
        except OSError as e:  # e.g. a full disk: name the file (a buffered write's error names none)
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def log(self, row: dict[str, Any]) -> None:
        self.write([row])

    def close(self) -> None:
        self._file.close()


class NullLog:
    """The logs of ranks other than 0: they train but do not write."""

    earlier_rows: list[dict] = []

    def log(self, row: dict[str, Any]) -> None:
        pass

    def write(self, rows: list[dict[str, Any]]) -> None:
        pass

    def truncate(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
