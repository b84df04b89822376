"""Data layer: Megatron indexed-dataset bytes, tokenizer, embedded corpus cache, packed samples, sampler."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lowp.data import (
    IndexedDataset,
    IndexedDatasetWriter,
    PackedTokenDataset,
    SampleStream,
    Tokenizer,
    best_token_dtype,
    document_split,
    embedded,
    embedded_dataset_prefix,
    read_corpus,
    sequential_batches,
)
from megatron_lowp.errors import UserError

# ---------------------------------------------------------------- indexed dataset


def megatron_idx(dtype_code: int, lengths: list[int], itemsize: int, doc_idx: list[int]) -> bytes:
    """An .idx built straight from the Megatron-LM layout, independent of our writer."""
    pointers, p = [], 0
    for n in lengths:
        pointers.append(p)
        p += n * itemsize
    out = b"MMIDIDX\x00\x00"
    out += struct.pack("<Q", 1)
    out += struct.pack("<B", dtype_code)
    out += struct.pack("<Q", len(lengths))
    out += struct.pack("<Q", len(doc_idx))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    out += struct.pack(f"<{len(pointers)}q", *pointers)
    out += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return out


def test_writer_matches_hand_built_megatron_files(tmp_path: Path) -> None:
    docs = [[1, 2, 3], [4, 5], [65535]]
    with IndexedDatasetWriter(tmp_path / "ours", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    want_idx = megatron_idx(8, [3, 2, 1], 2, [0, 1, 2, 3])
    assert len(want_idx) == 34 + 3 * 4 + 3 * 8 + 4 * 8
    assert (tmp_path / "ours.idx").read_bytes() == want_idx
    assert (tmp_path / "ours.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 5, 65535)

    with IndexedDatasetWriter(tmp_path / "ours32", np.int32) as w:
        w.add_document([7, -1, 200_000])
    assert (tmp_path / "ours32.idx").read_bytes() == megatron_idx(4, [3], 4, [0, 1])
    assert (tmp_path / "ours32.bin").read_bytes() == struct.pack("<3i", 7, -1, 200_000)


def test_reader_reads_hand_built_multi_sequence_documents(tmp_path: Path) -> None:
    # Megatron with sentence splitting: 3 sequences, 2 documents ([seq0, seq1], [seq2]); int32 tokens
    (tmp_path / "m.idx").write_bytes(megatron_idx(4, [2, 3, 1], 4, [0, 2, 3]))
    (tmp_path / "m.bin").write_bytes(struct.pack("<6i", 10, 11, 20, 21, 22, 30))
    ds = IndexedDataset(tmp_path / "m")
    assert len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 6
    assert ds.dtype == np.int32
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.sequence_lengths.tolist() == [2, 3, 1]
    assert ds[1].tolist() == [20, 21, 22]
    assert ds[-1].tolist() == [30]
    assert ds.tokens.tolist() == [10, 11, 20, 21, 22, 30]
    with pytest.raises(IndexError):
        ds[3]


def test_round_trip_random_documents(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 4096, size=n) for n in (5, 0, 1, 300, 17)]
    with IndexedDatasetWriter(tmp_path / "rt", best_token_dtype(4096)) as w:
        for d in docs:
            w.add_document(d)
    ds = IndexedDataset(tmp_path / "rt")
    assert len(ds) == 5 and ds.num_documents == 5
    assert ds.num_tokens == 323 and ds.dtype == np.uint16
    for got, want in zip((ds[i] for i in range(len(ds))), docs, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    assert isinstance(ds.tokens, np.memmap)
    assert sorted(os.listdir(tmp_path)) == ["rt.bin", "rt.idx"]  # no temp files left


def test_writer_streams_the_index_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_lowp.data import indexed

    monkeypatch.setattr(indexed, "INDEX_BLOCK", 3)  # blocks of 3 sequences: every boundary case below
    rng = np.random.default_rng(1)
    lengths = [4, 0, 7, 1, 3, 3, 0, 9, 2, 5]
    docs = [rng.integers(0, 70000, size=n) for n in lengths]
    with IndexedDatasetWriter(tmp_path / "blocks", np.int32) as w:
        w.add_document(docs[0])
        w.add_documents(np.concatenate(docs[1:6]), lengths[1:6])  # bulk, same bytes as one by one
        for d in docs[6:]:
            w.add_document(d)
        assert (w.num_sequences, w.num_tokens) == (10, sum(lengths))
    assert (tmp_path / "blocks.idx").read_bytes() == megatron_idx(4, lengths, 4, list(range(11)))
    assert (tmp_path / "blocks.bin").read_bytes() == np.concatenate(docs).astype("<i4").tobytes()
    assert sorted(os.listdir(tmp_path)) == ["blocks.bin", "blocks.idx"]  # the lengths temp file is gone
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass  # a dataset with no documents is valid: header and doc index [0]
    assert (tmp_path / "empty.idx").read_bytes() == megatron_idx(8, [], 2, [0])
    with pytest.raises(ValueError, match=r"do not add up to the 5 tokens"):
        with IndexedDatasetWriter(tmp_path / "bad", np.uint16) as w:
            w.add_documents([1, 2, 3, 4, 5], [2, 2])
    assert not list(tmp_path.glob("bad*"))


def test_best_token_dtype_follows_megatron() -> None:
    assert best_token_dtype(4096) == np.uint16
    assert best_token_dtype(65499) == np.uint16
    assert best_token_dtype(65500) == np.int32
    assert best_token_dtype(128256) == np.int32


def test_writer_rejects_tokens_outside_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit in uint16"):
        with IndexedDatasetWriter(tmp_path / "big", np.uint16) as w:
            w.add_document([1, 70000])
    assert os.listdir(tmp_path) == []  # a failed write leaves neither final nor temp files


def test_failed_write_keeps_the_previous_files(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        w.add_document([1, 2, 3])
    before = (tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()
    with pytest.raises(RuntimeError, match="crash"):
        with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
            w.add_document([9, 9])
            raise RuntimeError("crash")
    assert ((tmp_path / "d.bin").read_bytes(), (tmp_path / "d.idx").read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_missing_files_raise_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not found: .*nothing\.idx"):
        IndexedDataset(tmp_path / "nothing")
    (tmp_path / "half.idx").write_bytes(megatron_idx(8, [1], 2, [0, 1]))
    with pytest.raises(UserError, match=r"not found: .*half\.bin"):
        IndexedDataset(tmp_path / "half")


def test_bad_magic_raises_user_error(tmp_path: Path) -> None:
    good = megatron_idx(8, [1], 2, [0, 1])
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX\x00" + good[9:])
    (tmp_path / "x.bin").write_bytes(struct.pack("<H", 5))
    with pytest.raises(UserError, match=r"x\.idx: not a Megatron indexed dataset index \(bad magic"):
        IndexedDataset(tmp_path / "x")


def test_truncated_files_raise_user_error(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "t", np.uint16) as w:
        w.add_document(list(range(100)))
    bin_path = tmp_path / "t.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(UserError, match=r"t\.bin: truncated \(198 bytes, its index t\.idx needs 200\)"):
        IndexedDataset(tmp_path / "t")
    idx_path = tmp_path / "t.idx"
    idx_path.write_bytes(idx_path.read_bytes()[:40])
    with pytest.raises(UserError, match=r"t\.idx: truncated \(40 bytes, the header promises 62\)"):
        IndexedDataset(tmp_path / "t")


# ---------------------------------------------------------------- tokenizer


def test_embedded_tokenizer() -> None:
    tok = Tokenizer.load("embedded")
    assert tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.path.name == "tokenizer.model"
    text = "The Jargon File says:\n    “hack” — 42 ways, naïve café 日本\n\n-- anon"
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # lossless: identity normalization + byte fallback
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert all(0 <= i < 4096 for i in ids)
    assert tok.encode("") == []
    assert tok.encode_many(["a b", text]) == [tok.encode("a b"), ids]
    # common English compresses: well under one token per character
    sample = "A hacker is a person who enjoys exploring the details of programmable systems."
    assert len(tok.encode(sample)) < len(sample) / 3


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"tokenizer file not found: .*missing\.model"):
        Tokenizer.load(tmp_path / "missing.model")
    bogus = tmp_path / "bogus.model"
    bogus.write_text("not a model")
    with pytest.raises(UserError, match=r"bogus\.model: not a valid sentencepiece model"):
        Tokenizer.load(bogus)


# ---------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGATRON_LOWP_CACHE", str(cache))
        yield cache, {s: embedded_dataset_prefix(s) for s in ("train", "valid")}


def test_embedded_corpus_file() -> None:
    docs = list(read_corpus())
    counts = {s: sum(d["source"] == s for d in docs) for s in ("jargon", "devil", "fortunes")}
    assert sum(counts.values()) == len(docs)
    assert min(counts.values()) > 900  # every source contributes
    assert len({d["text"] for d in docs}) == len(docs)  # deduplicated
    assert all(d["text"] == d["text"].strip() and d["text"] for d in docs)
    corpus_dir = Path(embedded.CORPUS_PATH).parent
    assert sum(f.stat().st_size for f in corpus_dir.iterdir()) < 3 * 2**20


def test_split_rule() -> None:
    # sha1("hello") = aaf4c61ddcc5e8a2...; its first 8 bytes, big-endian, mod 20 pick the split
    assert int.from_bytes(bytes.fromhex("aaf4c61ddcc5e8a2"), "big") % 20 == 2
    assert document_split("hello") == "train"
    valid_text = next(f"doc {i}" for i in range(100) if document_split(f"doc {i}") == "valid")
    assert int.from_bytes(hashlib.sha1(valid_text.encode()).digest()[:8], "big") % 20 == 0
    texts = [f"document number {i}" for i in range(4000)]
    valid = sum(document_split(t) == "valid" for t in texts)
    assert 120 < valid < 280  # ~5%


def test_embedded_splits_are_disjoint_and_complete(embedded_cache) -> None:
    cache, prefixes = embedded_cache
    tok = Tokenizer.load("embedded")
    corpus = [d["text"] for d in read_corpus()]
    decoded = {}
    for split, prefix in prefixes.items():
        assert Path(prefix).parent.parent == cache
        ds = IndexedDataset(prefix)
        assert ds.dtype == np.uint16
        ends = ds.document_indices
        assert len(ds) == ds.num_documents
        lengths = np.asarray(ds.sequence_lengths)
        last = np.cumsum(lengths) - 1
        assert (np.asarray(ds.tokens)[last] == tok.eos_id).all()  # each document ends in EOS ...
        assert (np.asarray(ds.tokens) == tok.eos_id).sum() == len(ends) - 1  # ... and only there
        decoded[split] = [tok.decode(ds[i][:-1]) for i in range(len(ds))]
        assert all(document_split(t) == split for t in decoded[split])
    train, valid = set(decoded["train"]), set(decoded["valid"])
    assert not train & valid
    assert decoded["train"] + decoded["valid"] == [t for t in corpus if document_split(t) == "train"] + [
        t for t in corpus if document_split(t) == "valid"
    ]
    assert 0.03 < len(valid) / len(corpus) < 0.07
    n_train, n_valid = (IndexedDataset(prefixes[s]).num_tokens for s in ("train", "valid"))
    chars = sum(len(t) for t in corpus)
    assert chars / 5 < n_train + n_valid < chars / 2  # 2..5 characters per token
    assert 0.03 < n_valid / (n_train + n_valid) < 0.08


def test_embedded_cache_is_reused(embedded_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, prefixes = embedded_cache
    monkeypatch.setenv("MEGATRON_LOWP_CACHE", str(cache))
    files = [Path(prefixes[s] + ext) for s in ("train", "valid") for ext in (".bin", ".idx")]
    before = [(f.stat().st_mtime_ns, f.stat().st_ino) for f in files]
    assert embedded_dataset_prefix("train") == prefixes["train"]
    assert embedded_dataset_prefix("valid") == prefixes["valid"]
    assert [(f.stat().st_mtime_ns, f.stat().st_ino) for f in files] == before
    assert [p.name for p in cache.iterdir()] == [Path(prefixes["train"]).parent.name]  # no temp dirs


def test_embedded_cache_key_tracks_format(monkeypatch: pytest.MonkeyPatch) -> None:
    key = embedded.cache_key()
    monkeypatch.setattr(embedded, "FORMAT_VERSION", embedded.FORMAT_VERSION + 1)
    assert embedded.cache_key() != key


def test_embedded_build_tolerates_losing_the_race(embedded_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the cache was missing when we looked, as when another process finishes first.
    cache, prefixes = embedded_cache
    monkeypatch.setenv("MEGATRON_LOWP_CACHE", str(cache))
    idx = Path(prefixes["train"] + ".idx")
    before = idx.stat().st_ino
    real, calls = embedded._complete, []

    def complete(folder: Path) -> bool:
        calls.append(folder)
        return len(calls) > 1 and real(folder)

    monkeypatch.setattr(embedded, "_complete", complete)
    assert embedded_dataset_prefix("train") == prefixes["train"]
    assert len(calls) == 2  # it built, failed to rename onto the finished folder, and checked it
    assert idx.stat().st_ino == before  # the winner's files stand
    assert [p.name for p in cache.iterdir()] == [idx.parent.name]  # the loser's temp dir is gone


def test_embedded_unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MEGATRON_LOWP_CACHE", str(blocker / "cache"))
    with pytest.raises(UserError, match=r"cannot write the dataset cache in .*a_file/cache .*MEGATRON_LOWP_CACHE"):
        embedded_dataset_prefix("train")
    with pytest.raises(UserError, match="split must be one of train, valid"):
        embedded_dataset_prefix("test")


# ---------------------------------------------------------------- packed samples and sampler


def counting_dataset(tmp_path: Path, num_tokens: int, seq_len: int) -> PackedTokenDataset:
    """Tokens 0, 1, 2, ... split over a few documents, so a sample's first token names it."""
    tokens = np.arange(num_tokens)
    with IndexedDatasetWriter(tmp_path / "count", np.int32) as w:
        for part in np.array_split(tokens, 7):
            w.add_document(part)
    return PackedTokenDataset(tmp_path / "count", seq_len)


def sample_ids(batch: torch.Tensor, seq_len: int) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def test_packed_samples_are_token_stream_slices(embedded_cache) -> None:
    _, prefixes = embedded_cache
    stream = np.asarray(IndexedDataset(prefixes["valid"]).tokens)
    ds = PackedTokenDataset(prefixes["valid"], seq_len=64)
    assert ds.num_samples == (len(stream) - 1) // 64
    for i in (0, 1, 17, ds.num_samples - 1):
        s = ds.sample(i)
        assert s.dtype == torch.int64 and s.shape == (65,)
        assert s.tolist() == stream[i * 64 : i * 64 + 65].tolist()
    assert ds.sample(0)[-1] == ds.sample(1)[0]  # stride seq_len: one token of overlap
    with pytest.raises(IndexError):
        ds.sample(ds.num_samples)


def test_packed_dataset_too_small(tmp_path: Path) -> None:
    with IndexedDatasetWriter(tmp_path / "small", np.uint16) as w:
        w.add_document([5, 6, 7, 8, 2])
    with pytest.raises(UserError, match=r"has 5 tokens; one sample of train\.seq_len=8 needs at least 9"):
        PackedTokenDataset(tmp_path / "small", seq_len=8)
    assert PackedTokenDataset(tmp_path / "small", seq_len=4).num_samples == 1


def test_stream_is_deterministic_and_seeded(tmp_path: Path) -> None:
    ds = counting_dataset(tmp_path, 1001, 10)
    assert ds.num_samples == 100
    a, b, c = SampleStream(ds, seed=7), SampleStream(ds, seed=7), SampleStream(ds, seed=8)
    for k in (0, 16, 96, 250):
        assert torch.equal(a.global_batch(k, 16), b.global_batch(k, 16))
    assert not torch.equal(a.global_batch(0, 16), c.global_batch(0, 16))
    batch = a.global_batch(0, 16)
    assert batch.shape == (16, 11) and batch.dtype == torch.int64
    # every row is a real sample: 11 consecutive tokens starting at a multiple of seq_len
    assert torch.equal(batch, batch[:, :1] + torch.arange(11))
    assert (batch[:, 0] % 10 == 0).all()


def test_epochs_are_permutations(tmp_path: Path) -> None:
    ds = counting_dataset(tmp_path, 1001, 10)
    stream = SampleStream(ds, seed=3)
    orders = [stream.epoch_order(e).tolist() for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(100))
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] != list(range(100))
    # positions 0..299 of the stream are the three epochs back to back
    assert sample_ids(stream.global_batch(0, 300), 10) == orders[0] + orders[1] + orders[2]
    assert SampleStream(ds, seed=3, shuffle=False).indices(95, 10).tolist() == [95, 96, 97, 98, 99, 0, 1, 2, 3, 4]


def test_resume_never_repeats_or_skips(tmp_path: Path) -> None:
    ds = counting_dataset(tmp_path, 1001, 10)
    long = SampleStream(ds, seed=11).indices(0, 400).tolist()
    gbs = 24  # does not divide the 100 samples: batches straddle epoch boundaries
    consumed, seen = 0, []
    stream = SampleStream(ds, seed=11)
    while consumed + gbs <= 400:
        if consumed == 96:  # "resume": a fresh stream that only knows consumed_samples
            stream = SampleStream(ds, seed=11)
        seen += sample_ids(stream.global_batch(consumed, gbs), 10)
        consumed += gbs
    assert seen == long[: len(seen)]
    for k in (0, 1, 99, 100, 187):
        assert sample_ids(SampleStream(ds, seed=11).global_batch(k, gbs), 10) == long[k : k + gbs]


def test_rank_slices_partition_the_global_batch(tmp_path: Path) -> None:
    ds = counting_dataset(tmp_path, 1001, 10)
    stream = SampleStream(ds, seed=5)
    # 90: the global batch straddles epochs 0 and 1 (positions 90..101)
    for consumed in (0, 36, 90):
        full = stream.global_batch(consumed, 12)
        parts = [stream.global_batch(consumed, 12, rank=r, world_size=4) for r in range(4)]
        assert all(p.shape == (3, 11) for p in parts)
        assert torch.equal(torch.cat(parts), full)  # contiguous, disjoint stream positions
        assert sample_ids(full, 10) == stream.indices(consumed, 12).tolist()
    # within one epoch, different ranks never see the same sample
    ids = [set(sample_ids(stream.global_batch(36, 12, rank=r, world_size=4), 10)) for r in range(4)]
    assert all(not ids[i] & ids[j] for i in range(4) for j in range(i + 1, 4))
    with pytest.raises(UserError, match=r"global_batch_size \(10\) must be a positive multiple .* \(4\)"):
        stream.global_batch(0, 10, rank=0, world_size=4)


def test_stream_leaves_global_rng_alone(tmp_path: Path) -> None:
    ds = counting_dataset(tmp_path, 1001, 10)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = SampleStream(ds, seed=1).global_batch(50, 64)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # the global RNG has no say in the order
    assert torch.equal(SampleStream(ds, seed=1).global_batch(50, 64), first)


def test_sequential_batches(tmp_path: Path) -> None:
    ds = counting_dataset(tmp_path, 1001, 10)
    batches = list(sequential_batches(ds, batch_size=8, num_batches=3))
    assert [sample_ids(b, 10) for b in batches] == [list(range(i, i + 8)) for i in (0, 8, 16)]
    wrapped = list(sequential_batches(ds, batch_size=12, num_batches=9))
    assert sample_ids(wrapped[8], 10) == [96, 97, 98, 99, 0, 1, 2, 3, 4, 5, 6, 7]
