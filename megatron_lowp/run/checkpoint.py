"""Atomic, verified checkpoints in torch.distributed.checkpoint (DCP) format.

Layout under `<run>/checkpoints/`:
    step_<N>/          DCP files (.distcp + .metadata: tensors only), state.json (the non-tensor state:
                       optimizer param groups ...), meta.json (step, data position, config),
                       manifest.json (size and sha256 of every other file)
    latest             text file naming the newest complete checkpoint ("step_<N>", nothing else)

A checkpoint is written to a hidden temporary directory, fsynced, given its manifest, and only then
renamed to `step_<N>`; `latest` is replaced atomically afterwards. A crash at any moment leaves
either the old state or the new one, never a half checkpoint under a final name; the leftovers of
an interrupted save (`.tmp_step_N`, `.old_step_N_<pid>`) are cleaned (or put back) by the next save.
Ctrl-C during a save waits until the save is published or abandoned. A full disk removes the
partial save and says how much space the next one needs. Loading checks the manifest first, so a
truncated or altered file is named in the error, with the previous good checkpoint offered instead;
reading goes through run/safe_load.py (no pickles).

Only `step_<N>` directories directly inside this run's `checkpoints/` are ever resumed from: `latest`
naming anything else (`../../other/step_5`) or a `step_N` that is a link elsewhere is an error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron_lowp.errors import UserError
from megatron_lowp.parallel import dist
from megatron_lowp.run.atomic import dumps_strict, fsync_dir, probe_writable, sha256_file, write_text_atomic
from megatron_lowp.run.safe_load import STATE_JSON, load_state, read_metadata
from megatron_lowp.run.signals import deferred_interrupts
from megatron_lowp.run.state import json_leaves, tensor_tree

MANIFEST = "manifest.json"
META = "meta.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_OLD_DIR = re.compile(r"^\.old_step_(\d+)_\d+$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    if not match:
        raise UserError(f"{path}: not a checkpoint directory (expected a name like step_100)")
    return int(match.group(1))


def _manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path}: incomplete or not a checkpoint (no {MANIFEST})")
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                   for v in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{manifest_path}: corrupted manifest") from None
    return files


def checkpoint_bytes(path: Path) -> int:
    """The size of a complete checkpoint, from its manifest (0 if it has none)."""
    try:
        return sum(v["size"] for v in _manifest(Path(path)).values())
    except UserError:
        return 0


def verify(path: Path) -> dict:
    """The checkpoint's meta.json after checking every file against the manifest and the DCP index
    against what the safe loader accepts (run/safe_load.py)."""
    path = Path(path)
    for name, expected in _manifest(path).items():
        f = path / name
        if "/" in name or name in (".", "..") or not f.is_file():
            raise UserError(f"{f}: missing from checkpoint")
        if f.stat().st_size != expected["size"]:
            raise UserError(f"{f}: truncated or altered ({f.stat().st_size} bytes, manifest says {expected['size']})")
        if sha256_file(f) != expected["sha256"]:
            raise UserError(f"{f}: contents do not match the manifest checksum (altered or corrupted)")
    read_metadata(path)  # refuse a hostile DCP index before anything reads tensors
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path / META}: missing or unreadable") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{path / META}: no integer 'step' (not a megatron-lowp checkpoint, or damaged)")
    return meta


def meta_value(meta: dict, key: str, kind: type, checkpoint: Path, default: Any = ...) -> Any:
    """meta[key] checked to be a `kind`; a missing or mistyped key is a UserError naming the file."""
    if key not in meta or meta[key] is None:
        if default is not ...:
            return default
        raise UserError(f"{Path(checkpoint) / META}: missing key '{key}' (damaged, or not written by megatron-lowp)")
    value = meta[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, kind)
    if not ok or (kind is int and isinstance(value, bool)):
        raise UserError(f"{Path(checkpoint) / META}: '{key}' must be {kind.__name__}, got {value!r}"[:300])
    return value


def _disk_full(e: BaseException) -> bool:
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return True
        for f in (getattr(x, "failures", None) or {}).values():
            stack.append(f[0] if isinstance(f, tuple) else f)
        stack += [x.__cause__, x.__context__]
    return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int = 0):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.skipped: list[str] = []  # why latest() passed over a checkpoint (for the user)

    def _own(self, path: Path) -> bool:
        """A step_N directory of this run: directly inside checkpoints/, not a link elsewhere."""
        return path.parent.resolve() == self.dir.resolve() and path.resolve().parent == self.dir.resolve()

    def complete_checkpoints(self) -> list[Path]:
        """This run's checkpoint directories with a manifest, oldest first (contents not yet verified)."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            if not _STEP_DIR.match(p.name):
                continue
            if not self._own(p):
                self._skip(f"{p}: a link to {p.resolve()}, outside this run's checkpoints; skipped")
            elif not (p / MANIFEST).is_file():
                self._skip(f"{p}: no {MANIFEST} (an interrupted or damaged save); skipped")
            else:
                found.append(p)
        return sorted(found, key=step_of)

    def _skip(self, why: str) -> None:
        if why not in self.skipped:
            self.skipped.append(why)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, or the newest complete one if `latest` is missing/stale.
        `latest` naming anything but a step_N of this run is an error, never followed."""
        pointer = self.dir / LATEST
        complete = self.complete_checkpoints()
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8", errors="replace").strip()
            if not _STEP_DIR.match(name):
                raise UserError(f"{pointer}: names '{name[:200]}', which is not a checkpoint of this run (expected "
                                f"step_N inside {self.dir}); fix or delete the file")
            candidate = self.dir / name
            if candidate in complete:
                return candidate
            if complete:
                self._skip(f"{pointer}: names {name}, which is not a complete checkpoint; using {complete[-1].name}")
        return complete[-1] if complete else None

    # --- saving -------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Before training: a checkpoints/ folder that cannot take a file is an error now, not after a step."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe_writable(self.dir)
        except OSError as e:
            raise UserError(f"{self.dir}: cannot write checkpoints there ({e.strerror}); fix its permissions or "
                            "choose another run.out_dir") from None

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Every rank writes its shards into a temporary directory (a collective); rank 0 then adds
        state.json, meta.json and the manifest and publishes the directory with one atomic rename."""
        main = dist.is_main()
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
        dist.barrier()
        final = self.dir / f"step_{step}"
        tmp = self.dir / f".tmp_step_{step}"
        failure: BaseException | None = None
        with deferred_interrupts():
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                    dcp.save(tensor_tree(state), checkpoint_id=tmp)
                if main:
                    self._publish(tmp, final, step, meta, json_leaves(state))
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                failure = e
            # Every rank learns whether rank 0 published, so no rank waits for a save that failed.
            published_error = dist.broadcast_object(None if failure is None else _describe(failure))
            if published_error is not None and failure is None:
                failure = RuntimeError(published_error)
            if failure is not None:
                if main:
                    shutil.rmtree(tmp, ignore_errors=True)
                dist.barrier()
                raise self._save_error(step, state, failure)
        dist.barrier()
        return final

    def _save_error(self, step: int, state: dict, e: BaseException) -> BaseException:
        if not _disk_full(e) and "No space left on device" not in str(e):
            return e
        latest = self.latest()
        needed = checkpoint_bytes(latest) if latest is not None else _state_bytes(state) * dist.world_size()
        free = shutil.disk_usage(self.dir).free
        resume = f"; run the same command to resume from {latest}" if latest is not None else ""
        return UserError(f"no space left on device saving checkpoint step_{step} in {self.dir} ({_human(free)} free, "
                         f"a checkpoint takes about {_human(needed)}); the partial save was removed. Free at least "
                         f"{_human(needed)} there (or keep fewer: train.keep_checkpoints){resume}")

    def _publish(self, tmp: Path, final: Path, step: int, meta: dict[str, Any], leaves: list) -> None:
        (tmp / STATE_JSON).write_text(dumps_strict(leaves), encoding="utf-8")
        (tmp / META).write_text(dumps_strict({"step": step, **meta}, indent=1), encoding="utf-8")
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a rerun after rollback): keep it until replaced
            old = self.dir / f".old_step_{step}_{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.dir)
        write_text_atomic(self.dir / LATEST, final.name + "\n")
        self._prune()

    def _remove_leftovers(self) -> None:
        """What a crash during a save left: temporary directories (never complete, never read) are
        removed; an old copy moved aside just before its replacement was renamed in is put back if
        the replacement never arrived, else removed."""
        for leftover in self.dir.glob(".tmp_step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for old in self.dir.glob(".old_step_*"):
            match = _OLD_DIR.match(old.name)
            final = self.dir / f"step_{match.group(1)}" if match else None
            if final is not None and not final.exists() and (old / MANIFEST).is_file():
                os.replace(old, final)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for probe in self.dir.glob(".write_probe*"):
            probe.unlink(missing_ok=True)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in self.complete_checkpoints()[: -self.keep]:
            shutil.rmtree(old)

    # --- loading ------------------------------------------------------------------------------
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
        load_state(path, state)
        return meta


def _describe(e: BaseException) -> str:
    if _disk_full(e):
        return "No space left on device"
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:500]


def _state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        local = getattr(state, "_local_tensor", state)
        return local.numel() * local.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def _drop_absent_rng_states(path: Path, state: dict[str, Any]) -> None:
    """A checkpoint written on another kind of device lacks this device's RNG state (CPU -> GPU):
    resume with the states it has rather than failing; the device keeps its seeded state."""
    if "rng" not in state:
        return
    metadata = read_metadata(path)
    for key in [k for k in state["rng"] if f"rng.{k}" not in metadata.state_dict_metadata]:
        del state["rng"][key]


def _safe_step(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else 1 << 62
