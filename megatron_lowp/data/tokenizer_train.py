"""`megatron-lowp tokenizer train`: a sentencepiece BPE or unigram model from a sample of a corpus.

    megatron-lowp tokenizer train --input data/*.jsonl --vocab-size 32000 --output tok.model

Reads the inputs like `prepare` (sources.py: .txt, .jsonl, .parquet, datasets), draws a uniform
sample of --sample-docs non-empty documents (reservoir sampling, seeded: the same inputs and seed
give the same sample, in corpus order), cuts each to --max-doc-chars characters, and trains on them
with the settings of the shipped tokenizer (scripts/build_corpus.py): lossless (identity
normalization, no whitespace squeezing, byte fallback, so decode(encode(text)) == text for any
text), digits split, ids unk 0, bos 1, eos 2, no pad. Writes PATH.model (atomically) and PATH.vocab
(one "piece<TAB>score" line per id, for reading).
"""

from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

from megatron_lowp.data.sources import ENCODING_ERRORS, ReadOptions, decode_chunk, iter_chunks, resolve_inputs
from megatron_lowp.errors import UserError

MODEL_TYPES = ("bpe", "unigram")


@dataclass
class TokenizerTrainConfig:
    inputs: list[str]
    vocab_size: int
    output: str
    model_type: str = "bpe"
    sample_docs: int = 100_000
    max_doc_chars: int = 20_000
    character_coverage: float = 0.9995
    seed: int = 1234
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    read: ReadOptions = field(default_factory=ReadOptions)


@dataclass
class TokenizerTrainSummary:
    path: Path
    vocab_size: int
    documents_seen: int
    documents_used: int
    characters: int
    seconds: float

    def report(self) -> str:
        return (f"trained a {self.vocab_size:,}-token tokenizer on {self.documents_used:,} of {self.documents_seen:,} "
                f"documents ({self.characters:,} characters) in {self.seconds:,.1f} s -> {self.path} "
                f"(and {self.path.with_suffix('.vocab')})")


def sample_documents(cfg: TokenizerTrainConfig) -> tuple[list[str], int]:
    """(the sample in corpus order, number of non-empty documents seen): Algorithm R over the inputs."""
    rng = random.Random(cfg.seed)
    reservoir: list[tuple[int, str]] = []
    seen = 0
    for chunk in iter_chunks(resolve_inputs(cfg.inputs), cfg.read):
        docs, _ = decode_chunk(chunk, cfg.read.text_key, cfg.read.encoding_errors)
        for _, text in docs:
            if seen < cfg.sample_docs:
                reservoir.append((seen, text[: cfg.max_doc_chars]))
            else:
                j = rng.randrange(seen + 1)
                if j < cfg.sample_docs:
                    reservoir[j] = (seen, text[: cfg.max_doc_chars])
            seen += 1
    reservoir.sort()
    return [text for _, text in reservoir], seen


def _check(cfg: TokenizerTrainConfig) -> None:
    if cfg.model_type not in MODEL_TYPES:
        raise UserError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {cfg.model_type}")
    if cfg.vocab_size < 2:
        raise UserError(f"--vocab-size must be at least 2, got {cfg.vocab_size}")
    if cfg.sample_docs < 1 or cfg.max_doc_chars < 1:
        raise UserError("--sample-docs and --max-doc-chars must be positive")
    if not Path(cfg.output).name.endswith(".model") or Path(cfg.output).is_dir():
        raise UserError(f"--output {cfg.output}: name the model file, ending in .model (e.g. tok.model)")
    if not 0 < cfg.character_coverage <= 1:
        raise UserError(f"--character-coverage must be in (0, 1], got {cfg.character_coverage}")
    if cfg.read.encoding_errors not in ENCODING_ERRORS:
        raise UserError(f"--encoding-errors must be one of {', '.join(ENCODING_ERRORS)}, "
                        f"got {cfg.read.encoding_errors}")


def train_tokenizer(cfg: TokenizerTrainConfig) -> TokenizerTrainSummary:
    _check(cfg)
    start = time.perf_counter()
    texts, seen = sample_documents(cfg)
    if not texts:
        raise UserError(f"no documents in the inputs ({', '.join(cfg.inputs)}): every one is empty")
    model = io.BytesIO()  # in memory: a temp model_prefix would be recorded in the model
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),  # whole documents, so "\n" is seen where it occurs
            model_writer=model,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",  # lossless: decode(encode(x)) == x
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=cfg.character_coverage,
            max_sentence_length=max(len(t.encode("utf-8", "surrogatepass")) for t in texts),
            input_sentence_size=0,  # we sampled already; train on every sampled document, in order
            shuffle_input_sentence=False,
            num_threads=max(1, cfg.threads),
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (5000). Please set it to a value <= 1234."
        raise UserError(f"sentencepiece could not train a {cfg.vocab_size}-token {cfg.model_type} model on "
                        f"{len(texts)} documents: {e}") from None
    path = Path(cfg.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    path.with_suffix(".vocab").write_text(vocab, encoding="utf-8")
    return TokenizerTrainSummary(path, sp.get_piece_size(), seen, len(texts), sum(map(len, texts)),
                                 time.perf_counter() - start)
