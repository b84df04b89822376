"""The embedded corpus, tokenized once into a cache of Megatron indexed datasets.

The package ships `corpus/corpus.jsonl.xz` (public-domain and BSD text, see corpus/README.md) and
`corpus/tokenizer.model`. `embedded_dataset_prefix("train")` tokenizes the corpus (each document
followed by EOS) into `<cache>/embedded-<key>/embedded_{train,valid}.{bin,idx}` on first use and
returns the prefix. `<cache>` is $MEGATRON_LOWP_CACHE or ~/.cache/megatron_lowp; `<key>` hashes the
corpus, the tokenizer and FORMAT_VERSION, so a changed corpus or tokenizer never reuses old tokens.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from megatron_lowp.data.indexed import IndexedDatasetWriter, best_token_dtype
from megatron_lowp.data.tokenizer import EMBEDDED_DIR, EMBEDDED_TOKENIZER, Tokenizer
from megatron_lowp.errors import UserError

CORPUS_PATH = EMBEDDED_DIR / "corpus.jsonl.xz"
CACHE_ENV = "MEGATRON_LOWP_CACHE"
SPLITS = ("train", "valid")
VALID_EVERY = 20  # ~5% of documents are held out
FORMAT_VERSION = 1  # bump when the tokenization or file layout below changes


def document_split(text: str) -> str:
    """The split rule: "valid" when sha1(text) mod 20 == 0, else "train". Stable across runs and machines."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return "valid" if int.from_bytes(digest[:8], "big") % VALID_EVERY == 0 else "train"


def read_corpus(path: Path = CORPUS_PATH) -> Iterator[dict[str, str]]:
    """The shipped documents, in order: {"text": ..., "source": "jargon"|"devil"|"fortunes"}."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "megatron_lowp"


def cache_key() -> str:
    h = hashlib.sha256()
    for part in (CORPUS_PATH.read_bytes(), EMBEDDED_TOKENIZER.read_bytes(), str(FORMAT_VERSION).encode()):
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs hash alike
        h.update(part)
    return h.hexdigest()[:16]


def embedded_dataset_prefix(split: str) -> str:
    """The indexed-dataset prefix of one split of the embedded corpus, built on first use."""
    if split not in SPLITS:
        raise UserError(f"embedded corpus split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = cache_root()
    final = root / f"embedded-{cache_key()}"
    if not _complete(final):
        _build(root, final)
    return str(final / f"embedded_{split}")


def _complete(folder: Path) -> bool:
    return all((folder / f"embedded_{s}{ext}").is_file() for s in SPLITS for ext in (".bin", ".idx"))


def _build(root: Path, final: Path) -> None:
    # Build in a private temp folder, then rename it into place in one step: readers see all of it
    # or nothing, and a concurrent builder that loses the race just discards its copy.
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()  # not mkdtemp: its 0700 mode would keep a shared cache from other users
    except OSError as e:
        raise _unwritable(root, e) from None
    try:
        _tokenize_corpus(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # not a lost race but a real failure
                raise
    except OSError as e:
        raise _unwritable(root, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unwritable(root: Path, error: OSError) -> UserError:
    return UserError(f"cannot write the dataset cache in {root} ({error}); set {CACHE_ENV} to a writable folder")


def _tokenize_corpus(folder: Path) -> None:
    tokenizer = Tokenizer.load(EMBEDDED_TOKENIZER)
    texts = [doc["text"] for doc in read_corpus()]
    dtype = best_token_dtype(tokenizer.vocab_size)
    with ExitStack() as stack:  # every writer commits, or (on an error) none does
        writers = {
            s: stack.enter_context(IndexedDatasetWriter(folder / f"embedded_{s}", dtype)) for s in SPLITS
        }
        for text, ids in zip(texts, tokenizer.encode_many(texts), strict=True):
            writers[document_split(text)].add_document([*ids, tokenizer.eos_id])
