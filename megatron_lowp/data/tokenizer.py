"""The tokenizer: a thin, typed wrapper over a sentencepiece model.

`Tokenizer.load("embedded")` gives the BPE model shipped with the package (vocab 4096, trained on
the train split of the embedded corpus by scripts/build_corpus.py); any other value is a path to a
sentencepiece `.model` file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from megatron_lowp.errors import UserError

EMBEDDED_DIR = Path(__file__).resolve().parent / "corpus"
EMBEDDED_TOKENIZER = EMBEDDED_DIR / "tokenizer.model"


class Tokenizer:
    """encode() adds no BOS/EOS: callers decide where documents begin and end."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self._sp = processor
        self._path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        file = EMBEDDED_TOKENIZER if os.fspath(path) == "embedded" else Path(path)
        if not file.is_file():
            raise UserError(
                f"tokenizer file not found: {file} "
                "(data.tokenizer must be a sentencepiece .model file or 'embedded')"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(file))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{file}: not a valid sentencepiece model ({e})") from None
        if processor.eos_id() < 0:
            raise UserError(f"{file}: the tokenizer has no EOS token; documents need one to be separated")
        return cls(processor, file)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_many(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """encode() over a batch, in sentencepiece's own threads (-1: all cores)."""
        return self._sp.encode(texts, out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def resolve_vocab_size(vocab_size: int | None, tokenizer: Tokenizer, name: str) -> int:
    """model.vocab_size as the model is built: null follows the tokenizer (`name`, as the recipe
    gives it); a set value smaller than the tokenizer's vocabulary is an error. Training and
    `megatron-lowp config` both resolve it here."""
    if vocab_size is None:
        return tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"model.vocab_size: {vocab_size} is smaller than the tokenizer's vocabulary "
                        f"({tokenizer.vocab_size}, {name}); leave it null to follow the tokenizer")
    return vocab_size
