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

PREFIX.bin is every sequence's tokens back to back in the dtype above, nothing before, between or
after them: the reader refuses a .bin whose size differs from what its .idx describes (a truncated
file, or a pair from different runs). We write one sequence per document (what preprocess_data.py
does without sentence splitting) but read any S/D combination.
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
INDEX_BLOCK = 1 << 20  # sequences per block when the writer streams the index arrays

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

    Tokens stream to a temp file next to PREFIX.bin and the sequence lengths to another, so memory
    stays flat however large the dataset grows. On success the index is written (to a temp name as
    well) and both files are renamed into place, .bin first. Callers writing several datasets that
    belong together (train/valid splits) can use the two phases themselves: `open()`, `add_*`,
    `finish()` on every writer, then `commit()` on every writer; `abort()` removes the temp files.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: DTypeLike) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        if self.dtype not in DTYPE_CODES:
            allowed = ", ".join(str(d) for d in DTYPE_CODES)
            raise ValueError(f"indexed dataset dtype must be one of {allowed}, got {np.dtype(dtype)}")
        self.bin_path, self.idx_path = _paths(prefix)
        self.num_sequences = 0
        self.num_tokens = 0
        self._bin: BinaryIO | None = None
        self._lengths: BinaryIO | None = None
        self._temps: dict[str, Path] = {}
        self._finished = False

    def _temp(self, target: Path, tag: str) -> BinaryIO:
        # Next to the target, so os.replace is an atomic same-filesystem rename. Not mkstemp:
        # its 0600 mode would follow the file to its final name and hide shared datasets.
        path = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._temps[tag] = path
        return os.fdopen(fd, "wb")

    def open(self) -> IndexedDatasetWriter:
        """Create the temp files; called by `with`."""
        if self._bin is not None or self._finished:
            raise RuntimeError("IndexedDatasetWriter.open() called twice")
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._bin = self._temp(self.bin_path, "bin")
            self._lengths = self._temp(self.idx_path, "lengths")
        except BaseException:
            self.abort()
            raise
        return self

    def __enter__(self) -> IndexedDatasetWriter:
        return self.open()

    def _check_open(self) -> tuple[BinaryIO, BinaryIO]:
        if self._bin is None or self._lengths is None:
            raise RuntimeError("IndexedDatasetWriter: add a document between open() and finish() (or in `with`)")
        return self._bin, self._lengths

    def _check_range(self, array: np.ndarray) -> None:
        if array.size and np.issubdtype(array.dtype, np.integer) and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise ValueError(f"token ids {low}..{high} do not fit in {self.dtype}")

    def add_document(self, tokens: ArrayLike) -> None:
        """Append one document (one sequence) of token ids."""
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of tokens, got shape {array.shape}")
        self.add_documents(array, [array.size])

    def add_documents(self, tokens: ArrayLike, lengths: ArrayLike) -> None:
        """Append several documents at once: `tokens` is their concatenation, `lengths[k]` the size of the k-th."""
        bin_file, lengths_file = self._check_open()
        array = np.asarray(tokens)
        sizes = np.asarray(lengths, dtype=np.int64)
        if array.ndim != 1 or sizes.ndim != 1:
            raise ValueError(f"tokens and lengths must be 1-D, got shapes {array.shape} and {sizes.shape}")
        if int(sizes.sum()) != array.size or (sizes.size and sizes.min() < 0):
            raise ValueError(f"document lengths (sum {int(sizes.sum())}) do not add up to the {array.size} tokens")
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError(f"a document of {int(sizes.max())} tokens exceeds the index's int32 sequence length")
        self._check_range(array)
        bin_file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        lengths_file.write(sizes.astype("<i4").tobytes())
        self.num_sequences += int(sizes.size)
        self.num_tokens += int(array.size)

    def finish(self) -> None:
        """Flush the tokens and write the index, both still under temp names."""
        bin_file, lengths_file = self._check_open()
        bin_file.flush()
        os.fsync(bin_file.fileno())
        bin_file.close()
        lengths_file.close()
        self._bin = self._lengths = None
        with self._temp(self.idx_path, "idx") as f:
            self._write_index(f)
            f.flush()
            os.fsync(f.fileno())
        self._temps.pop("lengths").unlink(missing_ok=True)
        self._finished = True

    def commit(self) -> None:
        """Rename the finished files into place, .bin first: a reader needs both, so the .idx completes the pair."""
        if not self._finished:
            raise RuntimeError("IndexedDatasetWriter.commit() before finish()")
        os.replace(self._temps.pop("bin"), self.bin_path)
        os.replace(self._temps.pop("idx"), self.idx_path)

    def abort(self) -> None:
        """Close and delete whatever temp files are left; the final names are never touched."""
        for f in (self._bin, self._lengths):
            if f is not None:
                f.close()
        self._bin = self._lengths = None
        for path in self._temps.values():
            path.unlink(missing_ok=True)
        self._temps.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.finish()
                self.commit()
        finally:
            self.abort()

    def _write_index(self, f: BinaryIO) -> None:
        """Header, lengths, pointers, document indices; streamed in blocks from the lengths temp file."""
        n, block = self.num_sequences, INDEX_BLOCK
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, DTYPE_CODES[self.dtype], n, n + 1))
        lengths_path = self._temps["lengths"]
        with open(lengths_path, "rb") as src:
            while chunk := src.read(4 * block):
                f.write(chunk)
        offset = 0  # byte offset of the next sequence in PREFIX.bin
        for start in range(0, n, block):
            lengths = np.fromfile(lengths_path, dtype="<i4", count=min(block, n - start), offset=4 * start)
            ends = np.cumsum(lengths.astype("<i8") * self.dtype.itemsize) + offset
            pointers = np.concatenate([[offset], ends[:-1]]).astype("<i8")
            f.write(pointers.tobytes())
            offset = int(ends[-1])
        # one sequence per document: document indices 0, 1, ..., n
        for start in range(0, n + 1, block):
            f.write(np.arange(start, min(start + block, n + 1), dtype="<i8").tobytes())


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
        if size > end:
            raise UserError(
                f"{self.bin_path}: {size} bytes, but its index {self.idx_path.name} describes {end}: the .bin/.idx "
                "pair does not match (written by different runs?); prepare the dataset again"
            )
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
