"""Raw text inputs for `prepare` and `tokenizer train`: what an --input names, read in chunks of documents.

An input spec is, in this order of precedence:

- an existing file, by its suffix (optionally compressed with .gz, .xz or .bz2):
    .txt / .text   one document per file (the whole file, decoded as UTF-8)
    .jsonl         one JSON object per line, the document in the field --text-key (default "text")
    .parquet       the string column --text-key, one document per row (needs pyarrow)
- an existing directory: every file with one of those suffixes below it (recursively, sorted);
- a glob (`data/*.jsonl`, `shards/**/*.parquet`): the matching files, sorted;
- `BUILDER:FILES` with BUILDER one of json, csv, parquet, text, arrow: `datasets.load_dataset(BUILDER,
  data_files=FILES)` (note: the `text` builder makes every *line* a document);
- `hf:NAME` or any other name that is not a local path: a dataset `datasets.load_dataset(NAME)`
  accepts (a Hugging Face Hub name on a connected machine, a local dataset script or folder),
  with --hf-config, --hf-split (default train) and --streaming.

Local files are read in the main process as raw bytes and cut into `Chunk`s of about CHUNK_BYTES;
`decode_chunk` (run in the tokenizer workers) turns a chunk into document strings. Every error
names the file and where in it: byte offset for bad UTF-8, line for JSON problems, row for
Parquet and Hugging Face rows. Documents that are empty or only whitespace are skipped and
counted; a leading UTF-8 byte-order mark is dropped.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from megatron_lowp.errors import UserError

CHUNK_BYTES = 1 << 20  # raw input bytes per chunk handed to a worker
KINDS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS: dict[str, Callable[[str], BinaryIO]] = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
HF_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
ENCODING_ERRORS = ("strict", "replace", "ignore")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One resolved input: a local file (kind txt, jsonl, parquet) or a `datasets` dataset (kind hf)."""

    kind: str
    name: str  # the file path, or the dataset name / BUILDER:FILES spec
    size: int | None = None  # bytes on disk (local files)
    builder: str | None = None  # hf: a packaged builder (json, csv, ...) reading `name`'s files


@dataclass
class Chunk:
    """Documents on their way to a worker, with enough context to name where an error is.

    kind "txt": `items` are whole files' bytes and `origins` their paths; "jsonl": `items` are raw
    lines of `origins[0]` starting at line `first_line` (1-based), byte `first_offset`; "str": `items`
    are already decoded texts (or None) from rows `first_line`, ... of `origins[0]` (0-based rows).
    """

    kind: str
    items: list[Any]
    origins: list[str]
    first_line: int = 1
    first_offset: int = 0
    raw_bytes: int = 0  # input bytes this chunk stands for (progress)
    offsets: list[int] = field(default_factory=list)  # jsonl: byte offset of each line


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read; shared by prepare and tokenizer train."""

    text_key: str = "text"
    encoding_errors: str = "strict"
    hf_config: str | None = None
    hf_split: str = "train"
    streaming: bool = False
    hf_cache_dir: str | None = None
    chunk_bytes: int = CHUNK_BYTES


def _suffixes(path: str) -> tuple[str, str | None]:
    """(kind suffix, compression suffix) of a file name: 'a.jsonl.gz' -> ('.jsonl', '.gz')."""
    name = Path(path).name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    return Path(name).suffix, compression


def _file_source(path: str, explicit: bool) -> Source | None:
    suffix, compression = _suffixes(path)
    kind = KINDS.get(suffix)
    if kind is None or (kind == "parquet" and compression):
        if not explicit:
            return None
        allowed = ", ".join(sorted(KINDS)) + " (text and JSONL also compressed: .gz, .xz, .bz2)"
        raise UserError(f"{path}: unsupported input file type; allowed: {allowed}, "
                        "or BUILDER:FILES / hf:NAME for the datasets library")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"{path}: empty input file (0 bytes, no documents); remove it from the inputs")
    return Source(kind, path, size)


def resolve_inputs(specs: list[str]) -> list[Source]:
    """The sources --input names, in order (see the module docstring); raises UserError naming a bad spec."""
    if not specs:
        raise UserError("no --input given")
    sources: list[Source] = []
    for spec in specs:
        builder, sep, files = spec.partition(":")
        if os.path.isfile(spec):
            sources.append(_file_source(spec, explicit=True))  # type: ignore[arg-type]
        elif os.path.isdir(spec):
            found = [s for p in sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())
                     if not Path(p).name.startswith(".") and (s := _file_source(p, explicit=False))]
            if not found:
                raise UserError(f"{spec}: a directory with no input files ({', '.join(sorted(KINDS))}) below it")
            sources += found
        elif sep and builder in HF_BUILDERS:
            sources.append(Source("hf", files, builder=builder))
        elif spec.startswith("hf:"):
            sources.append(Source("hf", spec[3:]))
        elif _GLOB_CHARS & set(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{spec}: no files match this pattern")
            sources += [_file_source(p, explicit=True) for p in matches]  # type: ignore[misc]
        elif _suffixes(spec)[0] in KINDS or spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
            raise UserError(f"{spec}: input file not found")
        else:
            sources.append(Source("hf", spec, builder=None))  # a hub name like "wikitext" or "org/name"
    return sources


# --- reading: main process ----------------------------------------------------------------------


def _open(path: str) -> BinaryIO:
    compression = _suffixes(path)[1]
    return COMPRESSIONS[compression](path) if compression else open(path, "rb")  # noqa: SIM115


def iter_chunks(sources: list[Source], options: ReadOptions) -> Iterator[Chunk]:
    """Every source's documents, in order, in chunks of about options.chunk_bytes."""
    pending: Chunk | None = None  # small .txt files share chunks
    for source in sources:
        if source.kind == "txt":
            with _open(source.name) as f:
                data = f.read()
            if pending is None:
                pending = Chunk("txt", [], [])
            pending.items.append(data)
            pending.origins.append(source.name)
            pending.raw_bytes += source.size or len(data)
            if sum(len(b) for b in pending.items) >= options.chunk_bytes:
                yield pending
                pending = None
            continue
        if pending is not None:
            yield pending
            pending = None
        if source.kind == "jsonl":
            yield from _jsonl_chunks(source, options)
        elif source.kind == "parquet":
            yield from _parquet_chunks(source, options)
        else:
            yield from _hf_chunks(source, options)
    if pending is not None:
        yield pending


def _jsonl_chunks(source: Source, options: ReadOptions) -> Iterator[Chunk]:
    chunk = Chunk("jsonl", [], [source.name])
    line_no, offset, size = 1, 0, 0
    with _open(source.name) as f:
        for line in f:
            if not chunk.items:
                chunk.first_line, chunk.first_offset = line_no, offset
            chunk.items.append(line)
            chunk.offsets.append(offset)
            line_no += 1
            offset += len(line)
            size += len(line)
            if size >= options.chunk_bytes:
                chunk.raw_bytes = size
                yield chunk
                chunk, size = Chunk("jsonl", [], [source.name]), 0
    if chunk.items:
        chunk.raw_bytes = size
        yield chunk


def _parquet_chunks(source: Source, options: ReadOptions) -> Iterator[Chunk]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{source.name}: reading Parquet needs pyarrow: pip install pyarrow "
                        "(or pip install 'megatron-lowp[data]')") from None
    try:
        pf = pq.ParquetFile(source.name)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{source.name}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    key = options.text_key
    if key not in schema.names:
        raise UserError(f"{source.name}: no column '{key}' (columns: {', '.join(schema.names)}); "
                        "choose it with --text-key")
    column_type = schema.field(key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{source.name}: column '{key}' holds {column_type}, not strings")
    rows = max(pf.metadata.num_rows, 1)
    row = 0
    try:
        for batch in pf.iter_batches(columns=[key], batch_size=4096):
            texts = batch.column(0).to_pylist()
            yield Chunk("str", texts, [source.name], first_line=row,
                        raw_bytes=(source.size or 0) * len(texts) // rows)
            row += len(texts)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{source.name}: cannot read row {row} onwards ({e})") from None


def _hf_chunks(source: Source, options: ReadOptions) -> Iterator[Chunk]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"input '{source.name}' is not a local file, so it is read with the datasets library, "
                        "which is not installed: pip install 'megatron-lowp[data]' (or pip install datasets)") from None
    label = f"{source.builder}:{source.name}" if source.builder else source.name
    try:
        if source.builder:
            ds = datasets.load_dataset(source.builder, data_files=source.name, split=options.hf_split,
                                       streaming=options.streaming, cache_dir=options.hf_cache_dir)
        else:
            ds = datasets.load_dataset(source.name, options.hf_config, split=options.hf_split,
                                       streaming=options.streaming, cache_dir=options.hf_cache_dir)
    except Exception as e:  # the library raises many types (not found, no network, bad config, ...)
        local = "" if source.builder else " (no local file or directory has this name either)"
        raise UserError(f"{label}: datasets.load_dataset failed{local}: {type(e).__name__}: {e}") from None
    key, row = options.text_key, 0
    columns = getattr(ds, "column_names", None)
    if columns is not None and key not in columns:
        raise UserError(f"{label}: no column '{key}' (columns: {', '.join(columns)}); choose it with --text-key")
    texts: list[Any] = []
    size = 0
    try:
        for record in ds:
            if key not in record:
                raise UserError(f"{label}: row {row} has no '{key}' field (fields: {', '.join(record)}); "
                                "choose it with --text-key")
            text = record[key]
            texts.append(text)
            size += len(text) if isinstance(text, str) else 0
            row += 1
            if size >= options.chunk_bytes:
                yield Chunk("str", texts, [label], first_line=row - len(texts), raw_bytes=size)
                texts, size = [], 0
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{label}: reading row {row} failed: {type(e).__name__}: {e}") from None
    if texts:
        yield Chunk("str", texts, [label], first_line=row - len(texts), raw_bytes=size)


# --- decoding: worker processes -----------------------------------------------------------------


def _utf8(data: bytes, errors: str, where: str, base_offset: int) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not valid UTF-8 at byte offset {base_offset + e.start} ({e.reason}); "
                        "fix the file or pass --encoding-errors replace (or ignore)") from None


def location(chunk: Chunk, index: int) -> str:
    """Where the chunk's index-th item came from: a file, a file:line, or a dataset row."""
    if chunk.kind == "txt":
        return chunk.origins[index]
    if chunk.kind == "jsonl":
        return f"{chunk.origins[0]}:{chunk.first_line + index}"
    return f"{chunk.origins[0]}: row {chunk.first_line + index}"


def decode_chunk(chunk: Chunk, text_key: str = "text",
                 encoding_errors: str = "strict") -> tuple[list[tuple[int, str]], int]:
    """The chunk's non-empty documents as (item index, text), in order, and the number of empty ones
    (empty or whitespace-only text, or a null field; blank JSONL lines are not documents at all)."""
    docs: list[tuple[int, str]] = []
    empty = 0
    for i, item in enumerate(chunk.items):
        where = location(chunk, i)
        if chunk.kind == "txt":
            value = _utf8(item, encoding_errors, where, 0).removeprefix("\ufeff")  # a byte-order mark is no text
        elif chunk.kind == "jsonl":
            line = _utf8(item, encoding_errors, where, chunk.offsets[i]).strip().removeprefix("\ufeff")
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(
                    f"{where}: a JSON {type(record).__name__}, expected an object with a '{text_key}' field"
                )
            if text_key not in record:
                fields = ", ".join(record) or "none"
                raise UserError(f"{where}: no '{text_key}' field (fields: {fields}); choose it with --text-key")
            value = record[text_key]
        else:
            value = item
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}: field '{text_key}' is a {type(value).__name__}, not a string")
        if value is None or not value.strip():
            empty += 1
        else:
            docs.append((i, value))
    return docs, empty
