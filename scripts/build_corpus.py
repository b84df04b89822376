"""Build the small embedded corpus and its tokenizer from public-domain / BSD Debian text.

Sources (installed Debian packages, see megatron_lowp/data/corpus/README.md for provenance):
  jargon   The Jargon File 4.4.7        (jargon-text)  /usr/share/doc/jargon-text/jargon.txt.gz
  devil    The Devil's Dictionary       (dict-devil)   /usr/share/dictd/devil.{index,dict.dz}
  fortunes BSD fortune cookie files     (fortunes, fortunes-min) /usr/share/games/fortunes/*

Writes, deterministically (same inputs -> same bytes):
  megatron_lowp/data/corpus/corpus.jsonl.xz   one {"text", "source"} object per line
  megatron_lowp/data/corpus/tokenizer.model   sentencepiece BPE, vocab 4096, trained on the train split

Usage: python scripts/build_corpus.py [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import lzma
import re
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from megatron_lowp.data.embedded import document_split  # noqa: E402  (the one split rule)

JARGON = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PACKAGES = ("jargon-text", "dict-devil", "fortunes", "fortunes-min")
# ascii-art holds pictures, not text: whitespace cleaning would only make noise of it. The others are
# mostly quotations from works still under copyright (Pratchett's novels, Star Trek scripts, song
# lyrics, the Zippy comic, a modern Tao Te Ching translation): left out to keep the corpus clean.
FORTUNES_SKIP = {"ascii-art", "pratchett", "startrek", "songs-poems", "zippy", "tao"}

MAX_DOC_CHARS = 3000  # long Jargon sections/entries are cut at paragraph boundaries near this
MAX_INDENT = 8  # deeper indentation (right-aligned attributions) carries no meaning in plain text
VOCAB_SIZE = 4096

_BOX_DRAWING = re.compile("[\u2500-\u257f]")  # the Jargon File's tables: unreadable once flattened
_SENTENCE_GAP = re.compile(r"""([.!?:;]["')\]]?) {2,}(?=\S)""")  # typewriter double spacing
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


# ---------------------------------------------------------------- cleaning


def _apply_backspaces(line: str) -> str:
    # Old fortunes underline by overstriking ("____\b\b\b\bBODY"); a terminal shows "BODY".
    out: list[str] = []
    for ch in line:
        if ch == "\b":
            if out:
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def clean_whitespace(text: str) -> str:
    """Keep the line structure (verse, attributions) but drop layout noise."""
    lines = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = _CONTROL.sub("", _apply_backspaces(line).expandtabs(8)).replace("\u00a0", " ")
        lines.append(line.rstrip())
    indents = [len(ln) - len(ln.lstrip(" ")) for ln in lines if ln]
    dedent = min(indents, default=0)
    out = []
    for line in lines:
        body = line.lstrip(" ")
        indent = min(len(line) - len(body) - dedent, MAX_INDENT) if body else 0
        out.append(" " * indent + _SENTENCE_GAP.sub(r"\1 ", body))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _paragraphs(lines: list[str]) -> list[str]:
    """Blank-line separated blocks, each as one string with its inner newlines."""
    paras, block = [], []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            paras.append("\n".join(block))
            block = []
    return paras


def _pack(paragraphs: list[str]) -> Iterator[str]:
    """Greedily join paragraphs into documents of at most MAX_DOC_CHARS (a longer paragraph stands alone)."""
    doc: list[str] = []
    size = 0
    for para in paragraphs:
        if doc and size + len(para) > MAX_DOC_CHARS:
            yield "\n\n".join(doc)
            doc, size = [], 0
        doc.append(para)
        size += len(para) + 2
    if doc:
        yield "\n\n".join(doc)


# ---------------------------------------------------------------- sources


def _find_line(lines: list[str], text: str, min_indent: int = 0) -> int:
    hits = [i for i, ln in enumerate(lines) if ln.strip() == text and ln.startswith(" " * min_indent)]
    if len(hits) != 1:
        raise SystemExit(f"{JARGON}: expected the heading {text!r} once, found {len(hits)}; layout changed?")
    return hits[0]


def _jargon_sections(lines: list[str]) -> Iterator[str]:
    """Front matter and appendices: split at headings, drop tables of contents and tables."""
    centered = {"Welcome to the Jargon File", "Part I. Introduction", "Part III. Appendices"}
    sections: list[list[str]] = []
    for line in lines:
        if (line and not line[0].isspace()) or line.strip() in centered:
            sections.append([line.strip()])
        elif sections:
            sections[-1].append(line)
    for title, *body in sections:
        paras, in_toc = [], False
        for para in _paragraphs(textwrap.dedent("\n".join(body)).split("\n")):  # body sits at 3 spaces
            if para.strip() == "Table of Contents":
                in_toc = True  # the TOC is a run of one-line paragraphs
                continue
            if in_toc and "\n" not in para:
                continue
            in_toc = False
            if not _BOX_DRAWING.search(para):
                paras.append(para)
        if paras:
            yield from _pack([title, *paras])


def _jargon_entries(lines: list[str]) -> Iterator[str]:
    """Lexicon entries (`   :headword: ...`); a letter heading (`  A`) and its word list end an entry."""
    entry: list[str] | None = None
    for line in lines:
        if re.match(r"^   :.+:", line) or re.match(r"^  \S$", line):
            if entry:
                yield from _pack([p for p in _paragraphs(entry) if not _BOX_DRAWING.search(p)])
            entry = [line] if line.startswith("   :") else None
        elif entry is not None:
            entry.append(line)
    if entry:
        yield from _pack([p for p in _paragraphs(entry) if not _BOX_DRAWING.search(p)])


def jargon_docs() -> Iterator[str]:
    # headings use no-break spaces ("Part\u00a0II."); plain spaces make them matchable
    lines = gzip.open(JARGON, "rt", encoding="utf-8").read().replace("\u00a0", " ").split("\n")
    welcome = _find_line(lines, "Welcome to the Jargon File", min_indent=10)  # skip the book's TOC
    lexicon = _find_line(lines, "Part II. The Jargon Lexicon")
    appendices = _find_line(lines, "Part III. Appendices")
    yield from _jargon_sections(lines[welcome:lexicon])
    yield from _jargon_entries(lines[lexicon:appendices])
    yield from _jargon_sections(lines[appendices:])


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(field: str) -> int:
    # dictd's .index stores offsets/lengths as big-endian base64 digits, not base64-encoded bytes
    value = 0
    for ch in field:
        value = value * 64 + _DICTD_B64.index(ch)
    return value


def devil_docs() -> Iterator[str]:
    data = gzip.open(DEVIL_DICT, "rb").read()  # dictzip is a gzip file with a random-access table
    spans: dict[tuple[int, int], None] = {}  # ordered set: aliases (babe/baby) share one span
    for row in DEVIL_INDEX.read_text(encoding="utf-8").splitlines():
        headword, offset, length = row.split("\t")
        if not headword.startswith("00database"):  # dictfmt metadata, not entries
            spans[(_dictd_number(offset), _dictd_number(length))] = None
    for offset, length in sorted(spans):
        yield data[offset : offset + length].decode("utf-8")


def fortune_files() -> list[Path]:
    return sorted(
        p
        for p in FORTUNES_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8") and p.name not in FORTUNES_SKIP
    )


def fortune_docs() -> Iterator[str]:
    for path in fortune_files():
        yield from re.split(r"^%$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)


# ---------------------------------------------------------------- corpus


def build_documents() -> list[dict[str, str]]:
    """All documents, cleaned and deduplicated (first occurrence wins), in a fixed order."""
    docs: list[dict[str, str]] = []
    seen: set[str] = set()
    sources: list[tuple[str, Iterable[str]]] = [
        ("jargon", jargon_docs()),
        ("devil", devil_docs()),
        ("fortunes", fortune_docs()),
    ]
    for source, texts in sources:
        for raw in texts:
            text = clean_whitespace(raw)
            key = " ".join(text.split()).casefold()  # duplicates that differ only in layout or case
            if text and key not in seen:
                seen.add(key)
                docs.append({"text": text, "source": source})
    return docs


def write_corpus(docs: list[dict[str, str]], path: Path) -> None:
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    tmp = path.with_suffix(".tmp")
    # xz output depends only on the input and the preset: the file is reproducible.
    tmp.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(path)


def train_tokenizer(train_texts: list[str], path: Path) -> None:
    model = io.BytesIO()  # in memory: a temp model_prefix would be recorded in the model and vary
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train_texts),  # whole documents, so "\n" is seen where it occurs
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # lossless: no NFKC, no whitespace squeezing; decode(encode(x)) == x
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=max(len(t.encode("utf-8")) for t in train_texts),  # train on every doc
        # determinism: every sentence, in order, no sampling
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "megatron_lowp/data/corpus")
    args = parser.parse_args()
    missing = [p for p in (JARGON, DEVIL_INDEX, DEVIL_DICT, FORTUNES_DIR / "fortunes") if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: apt-get install {' '.join(PACKAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)

    docs = build_documents()
    write_corpus(docs, args.out / "corpus.jsonl.xz")
    train = [d["text"] for d in docs if document_split(d["text"]) == "train"]
    train_tokenizer(train, args.out / "tokenizer.model")

    sp = spm.SentencePieceProcessor(model_file=str(args.out / "tokenizer.model"))
    lossy = sum(sp.decode(ids) != d["text"] for d, ids in zip(docs, sp.encode([d["text"] for d in docs]), strict=True))
    if lossy:
        raise SystemExit(f"tokenizer does not round-trip {lossy} documents")

    for source in ("jargon", "devil", "fortunes"):
        sel = [d["text"] for d in docs if d["source"] == source]
        print(f"{source:9s} {len(sel):6d} docs {sum(len(t) for t in sel):9d} chars")
    print(f"total     {len(docs):6d} docs; train {len(train)}, valid {len(docs) - len(train)}")
    for f in sorted(args.out.iterdir()):
        print(f"{f.name:20s} {f.stat().st_size:9d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
