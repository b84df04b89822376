"""Megatron-LM-compatible memory-mapped indexed datasets (PREFIX.bin + PREFIX.idx, "MMIDIDX" v1).

Files written here load in Megatron-LM's `megatron.core.datasets.indexed_dataset.IndexedDataset`
and files from Megatron's `tools/preprocess_data.py` load here. Layout of PREFIX.idx, little-endian:

    9 bytes  magic b"MMIDIDX\\x00\\x00"
    uint64   version (1)
    uint8    token dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    uint64   S, the number of sequences
    uint64   D, the length of document_indices (number of documents + 1)
    int32[S] sequence lengths, in tokens
    int64[S] sequence pointers, byte offsets into PREFIX.bin
    int64[D] document indices: document k is sequences [doc[k], doc[k+1]); doc[0] == 0

PREFIX.bin is every sequence's tokens back to back in the dtype above. We write one sequence per
document (what preprocess_data.py does without sentence splitting) but read any S/D combination.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from megatron_lowp.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes; the arrays that follow are not aligned

# Megatron's DType enum codes.
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES: dict[int, np.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


def best_token_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron would pick: uint16 below 65500 tokens, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetWriter:
    """Writes PREFIX.bin/.idx; nothing appears under the final names unless the `with` block succeeds.

        with IndexedDatasetWriter("out/train", best_token_dtype(tok.vocab_size)) as w:
            for ids in docs:
                w.add_document(ids)
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: DTypeLike) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in DTYPE_CODES:
            allowed = ", ".join(str(d) for d in DTYPE_CODES)
            raise ValueError(f"indexed dataset dtype must be one of {allowed}, got {np.dtype(dtype)}")
        self.bin_path, self.idx_path = _paths(prefix)
        self._lengths: list[int] = []
        self._bin: BinaryIO | None = None
        self._bin_tmp = Path()

    def _temp(self, target: Path) -> tuple[int, Path]:
        # Next to the target, so os.replace is an atomic same-filesystem rename. Not mkstemp:
        # its 0600 mode would follow the file to its final name and hide shared datasets.
        path = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path

    def __enter__(self) -> IndexedDatasetWriter:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._bin_tmp = self._temp(self.bin_path)
        self._bin = os.fdopen(fd, "wb")
        self._lengths = []
        return self

    def add_document(self, tokens: ArrayLike) -> None:
        """Append one document (one sequence) of token ids."""
        if self._bin is None:
            raise RuntimeError("IndexedDatasetWriter.add_document outside its `with` block")
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of tokens, got shape {array.shape}")
        if array.size and np.issubdtype(array.dtype, np.integer) and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if array.min() < info.min or array.max() > info.max:
                raise ValueError(f"token ids {array.min()}..{array.max()} do not fit in {self.dtype}")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(array.size))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._bin is not None
        idx_tmp: Path | None = None
        try:
            if exc_type is None:
                self._bin.flush()
                os.fsync(self._bin.fileno())
                self._bin.close()
                fd, idx_tmp = self._temp(self.idx_path)
                with os.fdopen(fd, "wb") as f:
                    f.write(self._index_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                # .bin first: a reader needs both, so the .idx completes the pair
                os.replace(self._bin_tmp, self.bin_path)
                os.replace(idx_tmp, self.idx_path)
        finally:
            self._bin.close()
            self._bin = None
            self._bin_tmp.unlink(missing_ok=True)
            if idx_tmp is not None:
                idx_tmp.unlink(missing_ok=True)

    def _index_bytes(self) -> bytes:
        lengths = np.asarray(self._lengths, dtype="<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1].astype("<i8") * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype="<i8")
        header = MAGIC + struct.pack("<QBQQ", VERSION, DTYPE_CODES[self.dtype], len(lengths), len(documents))
        return header + lengths.tobytes() + pointers.tobytes() + documents.tobytes()


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/.idx; tokens are paged in on access."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise UserError(
                    f"indexed dataset file not found: {path} "
                    f"(a dataset prefix P needs both P.bin and P.idx, as written by Megatron's preprocess_data.py)"
                )
        self._read_index()
        self._map_tokens()

    def _read_index(self) -> None:
        idx = self.idx_path
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            header = f.read(HEADER_SIZE)
        if header[: len(MAGIC)] != MAGIC:
            raise UserError(f"{idx}: not a Megatron indexed dataset index (bad magic {header[:9]!r}, want {MAGIC!r})")
        if len(header) < HEADER_SIZE:
            raise UserError(f"{idx}: truncated header ({size} bytes, need {HEADER_SIZE})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[len(MAGIC) :])
        if version != VERSION:
            raise UserError(f"{idx}: index version {version} is not supported (only version {VERSION})")
        if code not in CODE_DTYPES:
            raise UserError(f"{idx}: unknown dtype code {code} (allowed: {sorted(CODE_DTYPES)})")
        self.dtype: np.dtype = CODE_DTYPES[code].newbyteorder("<")
        need = HEADER_SIZE + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if size < need:
            raise UserError(f"{idx}: truncated ({size} bytes, the header promises {need})")

        def array(dtype: str, count: int, offset: int) -> np.ndarray:
            if count == 0:  # np.memmap refuses zero-length maps
                return np.empty(0, dtype=dtype)
            return np.memmap(idx, dtype=dtype, mode="r", offset=offset, shape=(count,))

        self.sequence_lengths = array("<i4", n_seq, HEADER_SIZE)
        self.sequence_pointers = array("<i8", n_seq, HEADER_SIZE + 4 * n_seq)
        self.document_indices = array("<i8", n_doc, HEADER_SIZE + 12 * n_seq)
        if n_doc == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise UserError(f"{idx}: corrupt document indices (must run from 0 to the sequence count {n_seq})")

    def _map_tokens(self) -> None:
        n_seq = len(self.sequence_lengths)
        itemsize = self.dtype.itemsize
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize if n_seq else 0
        size = self.bin_path.stat().st_size
        if size < end:
            raise UserError(f"{self.bin_path}: truncated ({size} bytes, its index {self.idx_path.name} needs {end})")
        self.num_tokens = end // itemsize
        self.tokens: np.ndarray = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.empty(0, dtype=self.dtype)
        )

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i %= n
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sequence_lengths[i])]
