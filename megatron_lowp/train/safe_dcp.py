"""Reading torch.distributed.checkpoint (DCP) directories without running arbitrary pickles.

DCP stores tensors in `.distcp` files (read with `weights_only` loading) but its `.metadata` index
is a plain pickle, and `pickle.load` on it would execute whatever a tampered checkpoint asks.
`SafeFileSystemReader` reads the index with an unpickler that only builds DCP's own metadata
classes, torch dtypes/sizes/layouts and paths; anything else is refused with a clear error.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_lowp.errors import UserError

_DCP_PREFIX = "torch.distributed.checkpoint."
_ALLOWED_FUNCTIONS = {("torch._utils", "_get_layout"), ("torch.serialization", "_get_layout")}
_ALLOWED_CLASSES = {("torch", "Size"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                    ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS or (module, name) in _ALLOWED_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith(_DCP_PREFIX):
            obj = super().find_class(module, name)
            # Classes (dataclasses, enums) only: no functions that could do work on load.
            if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING":
                return obj
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from checkpoint metadata")


def load_metadata(data: bytes, where: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
        raise UserError(f"{where}: checkpoint index is not a valid DCP metadata file ({e})") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{where}: checkpoint index holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = pathlib.Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = load_metadata(path.read_bytes(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
