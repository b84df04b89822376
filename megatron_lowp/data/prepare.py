"""`megatron-lowp prepare`: raw text -> sentencepiece tokens -> Megatron-LM indexed datasets.

    megatron-lowp prepare --input data/*.jsonl --tokenizer tok.model --output-prefix out/web

writes out/web_train.bin/.idx and out/web_valid.bin/.idx (and out/web_test.* with --test-fraction),
the MMIDIDX v1 layout of indexed.py that Megatron-LM reads, plus out/web_prepare.json (the
summary, written last). Each document becomes one sequence: [BOS] tokens [EOS] (EOS on by default,
BOS with --bos), tokens as uint16 below 65500 vocabulary entries and int32 above, as Megatron picks.

Pipeline: the main process reads the inputs (sources.py) in chunks of ~1 MiB; a pool of worker
processes (--workers; started with multiprocessing's "spawn", so a script calling `prepare()` with
workers > 0 needs the usual `if __name__ == "__main__":` guard) decodes and tokenizes the chunks;
the main process takes the results back *in input order* (a bounded window of chunks in flight,
so memory stays flat) and appends them to the split writers. The output is therefore the same
for any number of workers.

Split rule: a document goes to valid when u < valid_fraction, to test when valid_fraction <= u <
valid_fraction + test_fraction, else to train, where u = blake2b-64(UTF-8 text, key=seed) / 2^64.
It depends on the text alone, so it is deterministic, independent of input order and sharding,
and identical documents always land in the same split (no train/valid leakage of duplicates).

Crash safety: every file is written under a temp name next to its final one and renamed only
after all splits are complete; an error, Ctrl-C or a dead worker removes the temp files and leaves
nothing under the final names (a `kill -9` of the main process leaves only `*.tmp` files). Old
outputs are replaced only with --overwrite, and are deleted just before the new files are
renamed in, so an interrupted commit leaves a missing file, never a mixed old/new pair.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm

from megatron_lowp.data.indexed import IndexedDatasetWriter, best_token_dtype
from megatron_lowp.data.sources import (
    ENCODING_ERRORS,
    Chunk,
    ReadOptions,
    decode_chunk,
    iter_chunks,
    location,
    resolve_inputs,
)
from megatron_lowp.data.tokenizer import Tokenizer
from megatron_lowp.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class PrepareConfig:
    """Everything `prepare` needs; the CLI flags map one to one."""

    inputs: list[str]
    tokenizer: str
    output_prefix: str
    valid_fraction: float = 0.01
    test_fraction: float = 0.0
    workers: int = field(default_factory=default_workers)  # 0: tokenize in this process
    append_eos: bool = True
    prepend_bos: bool = False
    seed: int = 1234  # of the split rule
    overwrite: bool = False
    progress: bool = True
    read: ReadOptions = field(default_factory=ReadOptions)


@dataclass
class SplitSummary:
    prefix: str
    documents: int = 0
    tokens: int = 0
    bytes: int = 0  # .bin + .idx on disk


@dataclass
class PrepareSummary:
    inputs: int
    input_bytes: int  # bytes read from the inputs (compressed size for .gz etc.; text bytes for datasets)
    text_bytes: int  # UTF-8 bytes of the documents kept
    documents: int
    empty_documents: int  # skipped: empty or whitespace-only
    tokens: int
    seconds: float
    workers: int
    splits: dict[str, SplitSummary]

    def report(self) -> str:
        s = max(self.seconds, 1e-9)
        lines = [f"prepared {self.documents:,} documents ({self.empty_documents:,} empty ones skipped) from "
                 f"{self.inputs} input(s), {self.input_bytes / 1e6:,.1f} MB, in {self.seconds:,.1f} s"]
        for name, split in self.splits.items():
            lines.append(f"  {name}: {split.documents:,} documents, {split.tokens:,} tokens -> "
                         f"{split.prefix}.bin/.idx ({split.bytes / 1e6:,.1f} MB)")
        lines.append(f"  throughput: {self.input_bytes / 1e6 / s:,.2f} MB/s, {self.tokens / s:,.0f} tokens/s, "
                     f"{self.documents / s:,.0f} docs/s ({self.workers} worker(s))")
        return "\n".join(lines)


def split_of(data: bytes, key: bytes, valid_fraction: float, test_fraction: float) -> int:
    """0 train, 1 valid, 2 test for a document's UTF-8 bytes (the rule in the module docstring)."""
    u = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "big") / 2**64
    return 1 if u < valid_fraction else 2 if u < valid_fraction + test_fraction else 0


@dataclass
class _Encoded:
    tokens: np.ndarray  # every document's tokens back to back
    lengths: np.ndarray  # int64, tokens per document
    splits: np.ndarray  # uint8, SPLITS index per document
    empty: int
    raw_bytes: int
    text_bytes: int


class _Encoder:
    """Decode + split + tokenize one chunk; one instance per worker process."""

    def __init__(self, tokenizer: str, read: ReadOptions, append_eos: bool, prepend_bos: bool, seed: int,
                 valid_fraction: float, test_fraction: float) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer)
        self.dtype = best_token_dtype(self.sp.get_piece_size())
        self.read = read
        self.eos = [self.sp.eos_id()] if append_eos else []
        self.bos = [self.sp.bos_id()] if prepend_bos else []
        self.key = seed.to_bytes(8, "little", signed=False)
        self.fractions = (valid_fraction, test_fraction)

    def __call__(self, chunk: Chunk) -> _Encoded:
        docs, empty = decode_chunk(chunk, self.read.text_key, self.read.encoding_errors)
        texts = [text for _, text in docs]
        data = []
        for index, text in docs:
            try:
                data.append(text.encode("utf-8"))
            except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a JSON "\ud800" escape
                raise UserError(f"{location(chunk, index)}: the text holds an unpaired surrogate at character "
                                f"{e.start}, which UTF-8 cannot encode") from None
        try:
            ids = self.sp.encode(texts, out_type=int, num_threads=1)
        except Exception as e:  # find the document
            for index, text in docs:
                try:
                    self.sp.encode(text, out_type=int)
                except Exception:
                    raise UserError(f"{location(chunk, index)}: cannot be tokenized ({e})") from None
            raise
        if self.bos or self.eos:
            ids = [self.bos + x + self.eos for x in ids]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        splits = np.fromiter((split_of(d, self.key, *self.fractions) for d in data), dtype=np.uint8, count=len(data))
        return _Encoded(tokens, lengths, splits, empty, chunk.raw_bytes, sum(map(len, data)))


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(*args) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = _Encoder(*args)


def _encode_in_worker(chunk: Chunk) -> _Encoded:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER(chunk)


def _ordered(submit: Callable[[Chunk], object], chunks: Iterable[Chunk], window: int) -> Iterator[_Encoded]:
    """Results in input order with at most `window` chunks in flight (Pool.imap would read ahead without bound)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(submit(chunk))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Now:  # an already-computed result, for workers=0
    def __init__(self, value: _Encoded) -> None:
        self.value = value

    def result(self) -> _Encoded:
        return self.value


class _Progress:
    """tqdm on a terminal (input bytes, with docs/s and tokens/s); a log line every `every` s otherwise."""

    def __init__(self, total: int | None, enabled: bool, every: float = 30.0) -> None:
        self.start = time.perf_counter()
        self.bytes = self.docs = self.tokens = 0
        self.bar = None
        self.enabled, self.every, self.last = enabled, every, self.start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare",
                            dynamic_ncols=True, mininterval=0.5)

    def update(self, raw_bytes: int, docs: int, tokens: int) -> None:
        self.bytes += raw_bytes
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        rates = f"{self.docs / (now - self.start):,.0f} docs/s, {self.tokens / (now - self.start):,.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
            self.bar.update(raw_bytes)
        elif self.enabled and now - self.last >= self.every:
            self.last = now
            log.info("prepare: %.1f MB, %s documents, %s tokens; %s", self.bytes / 1e6, f"{self.docs:,}",
                     f"{self.tokens:,}", rates)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check(cfg: PrepareConfig) -> None:
    if not 0 <= cfg.valid_fraction < 1 or not 0 <= cfg.test_fraction < 1:
        raise UserError(f"--valid-fraction ({cfg.valid_fraction}) and --test-fraction ({cfg.test_fraction}) "
                        "must be in [0, 1)")
    if cfg.valid_fraction + cfg.test_fraction >= 1:
        raise UserError(f"--valid-fraction + --test-fraction = {cfg.valid_fraction + cfg.test_fraction} "
                        "leaves nothing for train; their sum must be below 1")
    if cfg.workers < 0:
        raise UserError(f"--workers must be >= 0 (0: tokenize in the main process), got {cfg.workers}")
    if cfg.read.encoding_errors not in ENCODING_ERRORS:
        raise UserError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, "
                        f"got {cfg.read.encoding_errors}")
    if not cfg.output_prefix or cfg.output_prefix.endswith(("/", os.sep)) or os.path.isdir(cfg.output_prefix):
        raise UserError(f"--output-prefix '{cfg.output_prefix}' must be a path prefix like out/corpus "
                        "(files out/corpus_train.bin etc. are written), not a directory")
    if not 0 <= cfg.seed < 2**64:
        raise UserError(f"--seed must be in [0, 2^64), got {cfg.seed}")


def output_files(prefix: str, splits: Iterable[str]) -> list[Path]:
    return [Path(f"{prefix}_{s}{ext}") for s in splits for ext in (".bin", ".idx")] + [Path(f"{prefix}_prepare.json")]


def prepare(cfg: PrepareConfig) -> PrepareSummary:
    """Tokenize cfg.inputs into PREFIX_{train,valid[,test]}.bin/.idx; see the module docstring."""
    _check(cfg)
    tokenizer = Tokenizer.load(cfg.tokenizer)
    if cfg.prepend_bos and tokenizer.bos_id < 0:
        raise UserError(f"{tokenizer.path}: the tokenizer has no BOS token, so --bos cannot add one")
    sources = resolve_inputs(cfg.inputs)
    splits = [s for s, on in zip(SPLITS, (True, cfg.valid_fraction > 0, cfg.test_fraction > 0), strict=True) if on]
    existing = [p for p in output_files(cfg.output_prefix, SPLITS) if p.exists()]
    if existing and not cfg.overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace the dataset at "
                        f"{cfg.output_prefix}, or choose another --output-prefix")
    dtype = best_token_dtype(tokenizer.vocab_size)
    writers = {s: IndexedDatasetWriter(f"{cfg.output_prefix}_{s}", dtype) for s in splits}
    summaries = {s: SplitSummary(f"{cfg.output_prefix}_{s}") for s in splits}
    known = [s.size for s in sources]
    progress = _Progress(sum(known) if all(k is not None for k in known) else None, cfg.progress)  # type: ignore[misc]
    encoder_args = (str(tokenizer.path), cfg.read, cfg.append_eos, cfg.prepend_bos, cfg.seed,
                    cfg.valid_fraction, cfg.test_fraction)
    start = time.perf_counter()
    input_bytes = text_bytes = empty = 0
    executor = None
    try:
        for w in writers.values():
            w.open()
        if cfg.workers == 0:
            encoder = _Encoder(*encoder_args)
            submit: Callable[[Chunk], object] = lambda chunk: _Now(encoder(chunk))  # noqa: E731
        else:
            executor = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker, initargs=encoder_args)
            submit = lambda chunk: executor.submit(_encode_in_worker, chunk)  # noqa: E731
        try:
            for enc in _ordered(submit, iter_chunks(sources, cfg.read), window=2 * max(cfg.workers, 1) + 1):
                token_split = np.repeat(enc.splits, enc.lengths)
                for index, name in enumerate(SPLITS):
                    docs = enc.splits == index
                    if name in writers and docs.any():
                        writers[name].add_documents(enc.tokens[token_split == index], enc.lengths[docs])
                input_bytes += enc.raw_bytes
                text_bytes += enc.text_bytes
                empty += enc.empty
                progress.update(enc.raw_bytes, len(enc.lengths), len(enc.tokens))
        except BrokenProcessPool:
            raise UserError(f"a tokenizer worker process died or could not start (killed? out of memory? its own "
                            f"error, if any, is printed above); nothing was written under {cfg.output_prefix}_*; "
                            "try again, perhaps with fewer --workers") from None
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        documents = sum(w.num_sequences for w in writers.values())
        if documents == 0:
            raise UserError(f"no documents in the inputs ({', '.join(cfg.inputs)}): "
                            f"{empty} empty or whitespace-only document(s), nothing else")
        for w in writers.values():
            w.finish()
        for path in output_files(cfg.output_prefix, SPLITS):  # old outputs (--overwrite) go first: never a mix
            path.unlink(missing_ok=True)
        for w in writers.values():
            w.commit()
    finally:
        progress.close()
        for w in writers.values():
            w.abort()
    seconds = time.perf_counter() - start
    for name, w in writers.items():
        summaries[name].documents, summaries[name].tokens = w.num_sequences, w.num_tokens
        summaries[name].bytes = w.bin_path.stat().st_size + w.idx_path.stat().st_size
    summary = PrepareSummary(len(sources), input_bytes, text_bytes, documents, empty,
                             sum(w.num_tokens for w in writers.values()), seconds, cfg.workers, summaries)
    _write_summary(cfg, tokenizer, summary)
    for name, split in summaries.items():
        if split.documents == 0:
            log.warning("prepare: the %s split got no documents (the corpus is small for its fraction)", name)
    return summary


def _write_summary(cfg: PrepareConfig, tokenizer: Tokenizer, summary: PrepareSummary) -> None:
    record = {
        "inputs": cfg.inputs,
        "tokenizer": str(tokenizer.path),
        "tokenizer_sha256": hashlib.sha256(tokenizer.path.read_bytes()).hexdigest(),
        "vocab_size": tokenizer.vocab_size,
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("inputs", "tokenizer", "progress")},
        "summary": asdict(summary),
    }
    path = Path(f"{cfg.output_prefix}_prepare.json")
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
