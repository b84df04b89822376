"""The one way anything of ours reads a checkpoint's contents; loading never runs code.

A checkpoint directory (torch.distributed.checkpoint format) holds
- `.distcp` files: tensor data, each tensor read with `torch.load(weights_only=True)`;
- `.metadata`: DCP's index, a pickle. It is read by an unpickler that builds only the exact
  fully qualified names in `ALLOWED_GLOBALS` (DCP's metadata dataclasses and enums, torch dtypes,
  `torch.Size`, paths): no prefix matching, and no dotted names, so a crafted index cannot reach an
  attribute chain such as `module.os.system`;
- `state.json`: the non-tensor state (optimizer param groups ...), plain JSON (run/state.py);
- `meta.json` and `manifest.json`: JSON.

What is refused, each with a one-line UserError naming the checkpoint and the entry:
- any global outside the allow-list in `.metadata`, and an index that is not DCP Metadata;
- any *bytes* entry (DCP's default planner unpickles those with `weights_only=False`): we never
  write one, so a checkpoint holding one was written by something else or tampered with;
- storage entries that point outside the checkpoint directory or ask for stream transforms.

Readers: resume (run/checkpoint.py), `eval`, `generate`, `export`, `compare` and the lm-eval adapter
(eval/), and the DeepSpeed engine's resume all come through `load_state` and `read_metadata` here.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType

from megatron_lowp.errors import UserError
from megatron_lowp.run.state import restore_json_leaves, tensor_tree

STATE_JSON = "state.json"

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
}
# Exact (module, name) pairs the DCP index may name; nothing else is ever imported or called.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(module, name) for module, names in _DCP_CLASSES.items() for name in names}
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
    | {("torch", "Size"), ("collections", "OrderedDict"), ("torch._utils", "_get_layout"),
       ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
       ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath")}
)


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:  # exact names: a dotted name never matches
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")
        owner = sys.modules.get(module) or importlib.import_module(module)
        return getattr(owner, name)


def load_metadata(data: bytes, where: str) -> Metadata:
    """DCP's index from its bytes, checked: only allowed globals, only tensor entries, only local files."""
    try:
        metadata = _IndexUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any failure of a hostile or damaged pickle is the user's file
        raise UserError(f"{where}: checkpoint index is not a valid DCP metadata file ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{where}: checkpoint index holds a {type(metadata).__name__}, not DCP Metadata")
    entries = metadata.state_dict_metadata if isinstance(metadata.state_dict_metadata, dict) else None
    if entries is None:
        raise UserError(f"{where}: checkpoint index has no entry table")
    for key, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            raise UserError(f"{where}: entry '{key}' is stored as bytes (a pickle); megatron-lowp checkpoints "
                            "hold only tensors and JSON, so this checkpoint was written by something else or "
                            "tampered with, and it is not loaded")
    for index, info in (metadata.storage_data or {}).items():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or not relative or "/" in relative or "\\" in relative or relative in (".", ".."):
            raise UserError(f"{where}: entry '{getattr(index, 'fqn', index)}' points outside the checkpoint "
                            f"directory ({relative!r})")
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{where}: entry '{getattr(index, 'fqn', index)}' asks for stream transforms "
                            f"{info.transform_descriptors!r}, which megatron-lowp never writes")
    return metadata


def read_metadata(checkpoint: Path) -> Metadata:
    path = Path(checkpoint) / ".metadata"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the checkpoint index ({e.strerror})") from None
    return load_metadata(data, str(path))


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the checked index, and no bytes (pickle) entries ever read."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = load_metadata(path.read_bytes(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise UserError(f"{self.path}: entry '{item.dest_index.fqn}' would be unpickled; refused")
        return super().read_data(plan, planner)


def read_state_json(checkpoint: Path) -> list:
    path = Path(checkpoint) / STATE_JSON
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: missing or not JSON") from None


def load_state(checkpoint: Path, state: dict[str, Any]) -> None:
    """Fill the template `state` in place from `checkpoint`: tensors through DCP with the safe reader,
    the rest from state.json. The caller has verified the manifest (run/checkpoint.py `verify`)."""
    checkpoint = Path(checkpoint)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(tensor_tree(state), storage_reader=SafeFileSystemReader(checkpoint))
    except UserError:
        raise
    # DCP reports shape/key mismatches as CheckpointException, a BaseException
    except (Exception, CheckpointException) as e:
        user_error = _wrapped_user_error(e)
        if user_error is not None:
            raise user_error from None
        raise UserError(f"{checkpoint}: checkpoint does not fit this model/optimizer: {_first_failure(e)}") from None
    restore_json_leaves(state, read_state_json(checkpoint), str(checkpoint / STATE_JSON))


def _failures(e: BaseException) -> list[BaseException]:
    failures = getattr(e, "failures", None)
    if not failures:
        return [e]
    out = []
    for f in failures.values():
        out.append(f[0] if isinstance(f, tuple) else f)
    return out


def _wrapped_user_error(e: BaseException) -> UserError | None:
    """A UserError raised inside DCP (e.g. by our reader), which DCP wraps per rank."""
    for f in _failures(e):
        if isinstance(f, UserError):
            return f
    return None


def _first_failure(e: BaseException) -> str:
    """The message of the first per-rank failure inside a CheckpointException, else of `e`."""
    first = _failures(e)[0]
    lines = [line for line in str(first).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(first).__name__
