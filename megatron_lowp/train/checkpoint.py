"""Atomic, verified checkpoints in torch.distributed.checkpoint (DCP) format.

Layout under `<run>/checkpoints/`:
    step_<N>/          DCP files (.distcp + .metadata), meta.json (step, data position, config),
                       manifest.json (size and sha256 of every other file)
    latest             text file naming the newest complete checkpoint ("step_<N>")

A checkpoint is written to a hidden temporary directory, fsynced, given its manifest, and only then
renamed to `step_<N>`; `latest` is replaced atomically afterwards. A crash at any moment leaves
either the old state or the new one, never a half checkpoint under a final name. Loading checks the
manifest first, so a truncated or altered file is named in the error, with the previous good
checkpoint offered instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lowp.errors import UserError
from megatron_lowp.parallel import dist
from megatron_lowp.train.safe_dcp import SafeFileSystemReader, load_metadata

MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise UserError(f"{path}: not a checkpoint directory (expected a name like step_100)")
    return int(match.group(1))


def verify(path: Path) -> dict:
    """The checkpoint's meta.json after checking every file against the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path}: incomplete or not a checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{manifest_path}: corrupted manifest") from None
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{f}: missing from checkpoint")
        if f.stat().st_size != expected["size"]:
            raise UserError(f"{f}: truncated or altered ({f.stat().st_size} bytes, manifest says {expected['size']})")
        if _sha256(f) != expected["sha256"]:
            raise UserError(f"{f}: contents do not match the manifest checksum (altered or corrupted)")
    metadata_file = path / ".metadata"
    if metadata_file.is_file():  # refuse a hostile DCP index before anything unpickles it
        load_metadata(metadata_file.read_bytes(), str(metadata_file))
    try:
        return json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path / META}: missing or unreadable") from None


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int = 0):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories with a manifest, oldest first (contents not yet verified)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, or the newest complete one if `latest` is missing/stale."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            candidate = self.dir / pointer.read_text(encoding="utf-8").strip()
            if _STEP_DIR.match(candidate.name) and (candidate / MANIFEST).is_file():
                return candidate
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Every rank writes its shards into a temporary directory (a collective); rank 0 then adds
        meta.json and the manifest and publishes the directory with one atomic rename."""
        main = dist.is_main()
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
        dist.barrier()
        final = self.dir / f"step_{step}"
        tmp = self.dir / f".tmp_step_{step}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(state, checkpoint_id=tmp)
        if main:
            self._publish(tmp, final, step, meta)
        dist.barrier()
        return final

    def _publish(self, tmp: Path, final: Path, step: int, meta: dict[str, Any]) -> None:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1), encoding="utf-8")
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a rerun after rollback): keep it until replaced
            old = self.dir / f".old_step_{step}_{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)
        write_text_atomic(self.dir / LATEST, final.name + "\n")
        self._prune()

    def _remove_leftovers(self) -> None:
        """Temporary directories of saves that a crash interrupted: never complete, never read."""
        for leftover in self.dir.glob(".tmp_step_*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in self.complete_checkpoints()[: -self.keep]:
            shutil.rmtree(old)

    def load(self, path: Path, state: dict[str, Any], check: Callable[[dict], None] | None = None) -> dict:
        """Fill `state` (in place) from the checkpoint at `path`; returns its meta.json.

        `check(meta)` runs after the integrity check and before any tensor is read, so an
        incompatible checkpoint is reported in the caller's words rather than as a shape mismatch."""
        path = Path(path)
        try:
            meta = verify(path)
        except UserError as e:
            older = [p for p in self.complete_checkpoints() if p != path and step_of(p) < _safe_step(path)]
            hint = f"; the previous checkpoint is {older[-1]} (resume from it with run.resume={older[-1]})" if older else ""
            raise UserError(f"{e}{hint}") from None
        if check is not None:
            check(meta)
        _drop_absent_rng_states(path, state)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.load(state, storage_reader=SafeFileSystemReader(path))
        # DCP reports shape/key mismatches as CheckpointException, a BaseException
        except (Exception, CheckpointException) as e:
            raise UserError(f"{path}: checkpoint does not fit this model/optimizer: {_first_failure(e)}") from None
        return meta


def _drop_absent_rng_states(path: Path, state: dict[str, Any]) -> None:
    """A checkpoint written on another kind of device lacks this device's RNG state (CPU -> GPU):
    resume with the states it has rather than failing; the device keeps its seeded state."""
    if "rng" not in state:
        return
    metadata = load_metadata((path / ".metadata").read_bytes(), str(path / ".metadata"))
    for key in [k for k in state["rng"] if f"rng.{k}" not in metadata.state_dict_metadata]:
        del state["rng"][key]


def _safe_step(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else 1 << 62


def _first_failure(e: BaseException) -> str:
    """The message of the first per-rank failure inside a CheckpointException, else of `e`."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))
        if isinstance(e, tuple):  # (exception, traceback frames)
            e = e[0]
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(e).__name__
