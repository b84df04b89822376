"""`prepare` and `tokenizer train`: round trips, Megatron layout, splits, bad inputs, crash safety, CLI end to end."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lowp.cli import main
from megatron_lowp.data import IndexedDataset, Tokenizer, read_corpus
from megatron_lowp.data import prepare as prepare_mod
from megatron_lowp.data.prepare import PrepareConfig, prepare, split_of
from megatron_lowp.data.sources import ReadOptions
from megatron_lowp.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer
from megatron_lowp.errors import UserError

EXTRA = ["naïve café — “quotes”, 日本語, emoji 🎉\n\ttabs and  double  spaces  ", "x" * 5000]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    corpus = [d["text"] for d in read_corpus()]
    return corpus[:150] + EXTRA + corpus[-150:]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, key: t}) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> dict[str, Path]:
    """The same 302 documents as one JSONL, as a folder of .txt files (+ gz), and split across both."""
    root = tmp_path_factory.mktemp("inputs")
    files = {"jsonl": write_jsonl(root / "all.jsonl", docs)}
    txt = root / "txt"
    txt.mkdir()
    for i, t in enumerate(docs):
        (txt / f"{i:04d}.txt").write_text(t, encoding="utf-8")
    files["txt"] = txt
    write_jsonl(root / "first.jsonl", docs[:100])
    with gzip.open(root / "rest.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in docs[100:]:
            f.write(json.dumps({"text": t}) + "\n")
    files["mixed"] = [str(root / "first.jsonl"), str(root / "rest.jsonl.gz")]
    return files


def run(inputs, out: Path, **kw) -> prepare_mod.PrepareSummary:
    read = kw.pop("read", ReadOptions(chunk_bytes=kw.pop("chunk_bytes", 64 << 10)))
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("valid_fraction", 0.1)
    paths = [str(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    return prepare(PrepareConfig(paths, kw.pop("tokenizer", "embedded"), str(out), read=read, **kw))


def read_back(prefix: str, tok: Tokenizer, eos: bool = True) -> list[str]:
    ds = IndexedDataset(prefix)
    out = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        if eos:
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            ids = ids[:-1]
        out.append(tok.decode(ids))
    return out


def expected_splits(docs: list[str], fraction: float, seed: int = 1234) -> dict[str, list[str]]:
    key = seed.to_bytes(8, "little")
    which = [split_of(d.encode(), key, fraction, 0.0) for d in docs]
    return {"train": [d for d, s in zip(docs, which, strict=True) if s == 0],
            "valid": [d for d, s in zip(docs, which, strict=True) if s == 1]}


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["jsonl", "txt", "mixed"])
def test_round_trip(tmp_path: Path, docs: list[str], inputs, kind: str) -> None:
    summary = run(inputs[kind], tmp_path / "c")
    tok = Tokenizer.load("embedded")
    want = expected_splits(docs, 0.1)
    assert 10 < len(want["valid"]) < 60
    for split in ("train", "valid"):
        assert read_back(f"{tmp_path}/c_{split}", tok) == want[split]  # lossless, in input order
    assert summary.documents == len(docs) and summary.empty_documents == 0
    assert summary.splits["valid"].documents == len(want["valid"])
    assert summary.tokens == sum(IndexedDataset(f"{tmp_path}/c_{s}").num_tokens for s in ("train", "valid"))
    record = json.loads((tmp_path / "c_prepare.json").read_text())
    assert record["summary"]["documents"] == len(docs) and record["vocab_size"] == 4096
    files = ["c_prepare.json", "c_train.bin", "c_train.idx", "c_valid.bin", "c_valid.idx"]
    assert sorted(os.listdir(tmp_path)) == files


def test_parquet_round_trip(tmp_path: Path, docs: list[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": docs[:40] + [None, "   "], "n": list(range(42))}), tmp_path / "d.parquet")
    summary = run(tmp_path / "d.parquet", tmp_path / "p", valid_fraction=0.0, read=ReadOptions(text_key="body"))
    assert read_back(f"{tmp_path}/p_train", Tokenizer.load("embedded")) == docs[:40]
    assert summary.empty_documents == 2 and list(summary.splits) == ["train"]
    assert not (tmp_path / "p_valid.bin").exists()
    with pytest.raises(UserError, match=r"d\.parquet: no column 'text' \(columns: body, n\); choose it with --text"):
        run(tmp_path / "d.parquet", tmp_path / "q")
    with pytest.raises(UserError, match=r"d\.parquet: column 'n' holds int64, not strings"):
        run(tmp_path / "d.parquet", tmp_path / "q", read=ReadOptions(text_key="n"))


def test_workers_write_the_same_bytes(tmp_path: Path, inputs) -> None:
    run(inputs["jsonl"], tmp_path / "serial", chunk_bytes=16 << 10)
    run(inputs["jsonl"], tmp_path / "pool", chunk_bytes=16 << 10, workers=2)
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        assert (tmp_path / f"serial_{name}").read_bytes() == (tmp_path / f"pool_{name}").read_bytes()


def test_prepared_index_has_megatrons_layout(tmp_path: Path, docs: list[str], inputs) -> None:
    run(inputs["jsonl"], tmp_path / "m", valid_fraction=0.0)
    tok = Tokenizer.load("embedded")
    lengths = [len(tok.encode(d)) + 1 for d in docs]
    idx = (tmp_path / "m_train.idx").read_bytes()
    n = len(docs)
    assert idx[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", idx[9:34])
    assert (version, code, n_seq, n_doc) == (1, 8, n, n + 1)  # v1, uint16 (vocab 4096 < 65500), one seq per doc
    assert len(idx) == 34 + 4 * n + 8 * n + 8 * (n + 1)
    assert list(struct.unpack(f"<{n}i", idx[34 : 34 + 4 * n])) == lengths
    pointers = struct.unpack(f"<{n}q", idx[34 + 4 * n : 34 + 12 * n])
    assert list(pointers) == [2 * p for p in np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()]
    assert list(struct.unpack(f"<{n + 1}q", idx[34 + 12 * n :])) == list(range(n + 1))
    assert (tmp_path / "m_train.bin").stat().st_size == 2 * sum(lengths)
    first = struct.unpack(f"<{lengths[0]}H", (tmp_path / "m_train.bin").read_bytes()[: 2 * lengths[0]])
    assert list(first) == tok.encode(docs[0]) + [tok.eos_id]


def test_bos_eos_and_test_split(tmp_path: Path, docs: list[str], inputs) -> None:
    tok = Tokenizer.load("embedded")
    summary = run(inputs["jsonl"], tmp_path / "b", append_eos=False, prepend_bos=True, test_fraction=0.2)
    assert set(summary.splits) == {"train", "valid", "test"}
    ds = IndexedDataset(tmp_path / "b_test")
    assert 0.1 * len(docs) < len(ds) < 0.3 * len(docs)
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[0] == tok.bos_id and tok.eos_id not in ids
    assert sum(s.documents for s in summary.splits.values()) == len(docs)


def test_split_rule_is_by_content_and_seeded() -> None:
    texts = [f"document {i}" for i in range(4000)]
    key = (1234).to_bytes(8, "little")
    splits = [split_of(t.encode(), key, 0.05, 0.05) for t in texts]
    assert 150 < splits.count(1) < 250 and 150 < splits.count(2) < 250
    assert splits == [split_of(t.encode(), key, 0.05, 0.05) for t in texts]  # deterministic
    other = [split_of(t.encode(), (7).to_bytes(8, "little"), 0.05, 0.05) for t in texts]
    assert other != splits  # the seed matters
    assert all(split_of(t.encode(), key, 0.0, 0.0) == 0 for t in texts[:100])


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", ["hello world"])
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("ok so far, then caf\u00e9".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n\n{"body": "b", "id": 3}\n')
    (tmp_path / "notjson.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    (tmp_path / "number.jsonl").write_text('{"text": 42}\n')
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": null}\n')
    (tmp_path / "data.csv").write_text("a,b\n")
    cases = [
        ("empty.txt", r"empty\.txt: empty input file \(0 bytes"),
        ("latin1.txt", r"latin1\.txt: not valid UTF-8 at byte offset 19 .*--encoding-errors replace"),
        ("latin1.jsonl", r"latin1\.jsonl:2: not valid UTF-8 at byte offset 30"),
        ("nofield.jsonl", r"nofield\.jsonl:3: no 'text' field \(fields: body, id\); choose it with --text-key"),
        ("notjson.jsonl", r"notjson\.jsonl:2: invalid JSON"),
        ("number.jsonl", r"number\.jsonl:1: field 'text' is a int, not a string"),
        ("data.csv", r"data\.csv: unsupported input file type; allowed: .jsonl, .parquet, .text, .txt"),
        ("missing.jsonl", r"missing\.jsonl: input file not found"),
        ("nothing/*.jsonl", r"nothing/\*\.jsonl: no files match this pattern"),
    ]
    for name, message in cases:
        with pytest.raises(UserError, match=message):
            run([good, tmp_path / name], tmp_path / "out" / "x")
        assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
    with pytest.raises(UserError, match=r"no documents in the inputs \(.*blank\.jsonl\): 2 empty or whitespace-only"):
        run(tmp_path / "blank.jsonl", tmp_path / "out" / "x")
    assert os.listdir(tmp_path / "out") == []
    (tmp_path / "bom.txt").write_bytes("\ufeffwith a byte-order mark".encode())
    run([good, tmp_path / "latin1.txt", tmp_path / "bom.txt"], tmp_path / "r", valid_fraction=0.0,
        read=ReadOptions(encoding_errors="replace"))
    back = read_back(f"{tmp_path}/r_train", Tokenizer.load("embedded"))
    assert back[1:] == ["ok so far, then caf\ufffd", "with a byte-order mark"]


def test_bad_options_and_existing_outputs(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", ["hello world"])
    with pytest.raises(UserError, match=r"tokenizer file not found: .*nope\.model"):
        run(good, tmp_path / "x", tokenizer=str(tmp_path / "nope.model"))
    with pytest.raises(UserError, match=r"--valid-fraction \+ --test-fraction = 1\.0 leaves nothing for train"):
        run(good, tmp_path / "x", valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match=r"--valid-fraction \(1\.5\) .* must be in \[0, 1\)"):
        run(good, tmp_path / "x", valid_fraction=1.5)
    with pytest.raises(UserError, match="--output-prefix .* not a directory"):
        run(good, tmp_path)
    run(good, tmp_path / "x", valid_fraction=0.0)
    with pytest.raises(UserError, match=r"x_train\.bin already exists; pass --overwrite"):
        run(good, tmp_path / "x", valid_fraction=0.0)
    run(good, tmp_path / "x", valid_fraction=0.0, overwrite=True)


def test_truncated_or_mismatched_pairs_name_the_file(tmp_path: Path, inputs) -> None:
    run(inputs["jsonl"], tmp_path / "t")
    train, valid = tmp_path / "t_train", tmp_path / "t_valid"
    good = train.with_suffix(".bin").read_bytes()
    train.with_suffix(".bin").write_bytes(good + b"\x00\x00")
    with pytest.raises(UserError, match=r"t_train\.bin: \d+ bytes, but its index t_train\.idx describes \d+: "
                                        r"the \.bin/\.idx pair does not match"):
        IndexedDataset(train)
    train.with_suffix(".bin").write_bytes(good[:-4])
    with pytest.raises(UserError, match=r"t_train\.bin: truncated"):
        IndexedDataset(train)
    train.with_suffix(".bin").write_bytes(good)
    valid.with_suffix(".idx").replace(train.with_suffix(".idx"))  # the valid split's index next to train's tokens
    with pytest.raises(UserError, match=r"t_train\.bin: \d+ bytes, but its index t_train\.idx describes"):
        IndexedDataset(train)


def test_datasets_library_inputs(tmp_path: Path, docs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for module in (datasets.config, huggingface_hub.constants):  # in case they were imported before the env
        if hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    data = write_jsonl(tmp_path / "d.jsonl", docs[:30])
    run(data, tmp_path / "plain", valid_fraction=0.0)
    want = (tmp_path / "plain_train.bin").read_bytes()
    for streaming in (True, False):
        read = ReadOptions(streaming=streaming, hf_cache_dir=str(tmp_path / "hf_cache"))
        run(f"json:{data}", tmp_path / f"hf{streaming}", valid_fraction=0.0, read=read)
        assert (tmp_path / f"hf{streaming}_train.bin").read_bytes() == want
    with pytest.raises(UserError, match=r"json:.*d\.jsonl: no column 'body' \(columns: id, text\)"):
        run(f"json:{data}", tmp_path / "bad", read=ReadOptions(text_key="body", hf_cache_dir=str(tmp_path / "c")))
    with pytest.raises(UserError, match=r"no-such-dataset-here: datasets\.load_dataset failed \(no local file"):
        run("no-such-dataset-here", tmp_path / "bad", read=ReadOptions(hf_cache_dir=str(tmp_path / "c")))


def test_missing_datasets_library_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match=r"'wikitext' is not a local file.*pip install 'megatron-lowp\[data\]'"):
        run("wikitext", tmp_path / "w")


# ---------------------------------------------------------------- crash safety


def test_a_crash_mid_prepare_leaves_no_dataset(tmp_path: Path, inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = prepare_mod.iter_chunks

    def failing(sources, options):
        for i, chunk in enumerate(real(sources, options)):
            if i == 3:
                raise RuntimeError("disk on fire")
            yield chunk

    monkeypatch.setattr(prepare_mod, "iter_chunks", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(inputs["jsonl"], out / "c", chunk_bytes=16 << 10, workers=2)
    assert os.listdir(out) == []  # neither final names nor temp files
    monkeypatch.setattr(prepare_mod, "iter_chunks", real)
    # an older dataset under the same prefix survives a failed --overwrite untouched
    run(inputs["jsonl"], out / "c", chunk_bytes=16 << 10)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(prepare_mod, "iter_chunks", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run(inputs["jsonl"], out / "c", chunk_bytes=16 << 10, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_killed_worker_or_a_bad_late_file_leaves_no_dataset(tmp_path: Path, inputs, monkeypatch) -> None:
    out = tmp_path / "out"
    (tmp_path / "late.txt").write_bytes(b"\xff\xfe bad bytes")
    with pytest.raises(UserError, match=r"late\.txt: not valid UTF-8 at byte offset 0"):
        run([inputs["jsonl"], tmp_path / "late.txt"], out / "c", chunk_bytes=16 << 10, workers=2)
    assert os.listdir(out) == []
    real = prepare_mod.iter_chunks

    def killing(sources, options):
        for i, chunk in enumerate(real(sources, options)):
            if i == 4:
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal.SIGKILL)
            yield chunk

    monkeypatch.setattr(prepare_mod, "iter_chunks", killing)
    with pytest.raises(UserError, match=r"worker process died or could not start .* nothing was written under .*c_\*"):
        run(inputs["jsonl"], out / "c", chunk_bytes=16 << 10, workers=2)
    assert os.listdir(out) == []


# ---------------------------------------------------------------- tokenizer training


def test_tokenizer_train(tmp_path: Path, docs: list[str], inputs) -> None:
    cfg = TokenizerTrainConfig([str(inputs["jsonl"])], vocab_size=400, output=str(tmp_path / "a.model"), threads=1)
    summary = train_tokenizer(cfg)
    assert summary.vocab_size == 400 and summary.documents_used == summary.documents_seen == len(docs)
    tok = Tokenizer.load(tmp_path / "a.model")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in EXTRA + ["\x00 control \u200b zero-width, Ελληνικά"]:
        assert tok.decode(tok.encode(text)) == text  # lossless, byte fallback for unseen characters
    assert (tmp_path / "a.vocab").read_text().splitlines()[2] == "</s>\t0.0"
    # deterministic, and a sample of the corpus when asked
    train_tokenizer(TokenizerTrainConfig([str(inputs["jsonl"])], 400, str(tmp_path / "b.model"), threads=1))
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    sampled = train_tokenizer(TokenizerTrainConfig([str(inputs["txt"])], 600, str(tmp_path / "u.model"),
                                                   model_type="unigram", sample_docs=100, threads=1))
    assert sampled.documents_used == 100 and sampled.documents_seen == len(docs)
    assert Tokenizer.load(tmp_path / "u.model").vocab_size == 600
    with pytest.raises(UserError, match=r"sentencepiece could not train a 100000-token bpe model on 20 documents"):
        train_tokenizer(TokenizerTrainConfig([str(inputs["jsonl"])], 100_000, str(tmp_path / "c.model"),
                                             sample_docs=20, threads=1))
    with pytest.raises(UserError, match=r"--output .*c\.bin: name the model file, ending in \.model"):
        train_tokenizer(TokenizerTrainConfig([str(inputs["jsonl"])], 400, str(tmp_path / "c.bin")))
    assert not (tmp_path / "c.model").exists()


# ---------------------------------------------------------------- the command line, end to end


def test_cli_tokenizer_prepare_train(tmp_path: Path, repo: Path, inputs, capsys) -> None:
    tok = str(tmp_path / "tok.model")
    assert main(["tokenizer", "train", "--input", str(inputs["txt"] / "00*.txt"), str(inputs["txt"] / "01*.txt"),
                 "--vocab-size", "512", "--output", tok, "--threads", "1"]) == 0
    assert "trained a 512-token tokenizer on 200 of 200 documents" in capsys.readouterr().out
    prefix = str(tmp_path / "data" / "corpus")
    assert main(["prepare", "--input", str(inputs["jsonl"]), "--tokenizer", tok, "--output-prefix", prefix,
                 "--valid-fraction", "0.2", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prepared 302 documents" in out and "tokens/s" in out and "docs/s" in out
    small = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.ffn_hidden_size=64",
             "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=3",
             "optim.warmup_steps=1", "train.log_every=1", "train.eval_every=3", "train.eval_samples=4",
             "logging.progress=false", f"run.out_dir={tmp_path}/runs"]
    data = [f"data.valid={prefix}_valid", f"data.tokenizer={tok}"]
    assert main(["train", str(repo / "recipes/quickstart.yaml"), *small, *data, "run.name=one",
                 f"data.train={prefix}_train"]) == 0
    assert "done: step 3" in capsys.readouterr().out
    config = (tmp_path / "runs" / "one" / "config.yaml").read_text()
    assert "vocab_size: 512" in config  # the model's vocabulary follows the tokenizer
    # a blend of the prepared train split with itself re-prepared under another seed
    assert main(["prepare", "--input", str(inputs["jsonl"]), "--tokenizer", tok, "--output-prefix", prefix + "2",
                 "--valid-fraction", "0", "--workers", "0", "--no-progress", "--seed", "9"]) == 0
    blend = f"data.train=[{{path: {prefix}_train, weight: 0.7}}, {{path: {prefix}2_train, weight: 0.3}}]"
    assert main(["train", str(repo / "recipes/quickstart.yaml"), *small, *data, "run.name=blend", blend]) == 0
    meta = json.loads(next((tmp_path / "runs" / "blend").rglob("meta.json")).read_text())
    assert meta["data"]["kind"] == "blend" and meta["data"]["position"] == meta["consumed_samples"] == 24
    assert meta["data"]["weights"] == [0.7, 0.3] and sum(meta["data"]["counts"]) == 24
