"""Writes that a crash, a signal or a full disk can interrupt without leaving a torn file.

A file is written under a temporary name in the same folder, flushed and fsynced, then renamed over
the final name (atomic on POSIX): readers see the old content or the new, never a mix. A failed
write removes its temporary file, so nothing is left behind to fill a disk that is already full.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None, so that any JSON reader accepts it
    (Python's json writes bare NaN/Infinity, which the JSON standard does not allow)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, dumps_strict(obj, indent=1) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def probe_writable(folder: Path) -> None:
    """Raise OSError unless a file can be created (and removed) in `folder`; leaves nothing behind."""
    probe = Path(folder) / f".write_probe{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("ok")
    finally:
        probe.unlink(missing_ok=True)
