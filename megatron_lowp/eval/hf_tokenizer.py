"""Our sentencepiece tokenizer as a Hugging Face `tokenizer.json` that encodes exactly as we do, for
`megatron-lowp export`.

- Documents start after EOS: our models were trained with EOS as the document separator, and
  generate/eval put it before every prompt. The post-processor does the same, so
  `AutoTokenizer.from_pretrained(DIR)(text).input_ids == [eos] + Tokenizer.encode(text)`.
- sentencepiece's dummy prefix is a Prepend("▁") normalizer, not transformers' Metaspace
  pre-tokenizer, which skips the "▁" when the text starts with a space (" x" would lose a space).
- BPE merges are derived from the vocabulary in id order, as transformers' own converter does;
  byte fallback as in sentencepiece. `check_same_ids` compares the result with sentencepiece on
  sample texts before anything is written.

Needs `tokenizers` (installed with transformers) and protobuf (to read the model's settings): the
[eval] extra.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, Unigram

from megatron_lowp.data import Tokenizer
from megatron_lowp.errors import UserError

SPACE = "▁"
UNIGRAM, BPE_TYPE = 1, 2  # sentencepiece TrainerSpec.model_type
CONTROL, USER_DEFINED = 3, 4  # sentencepiece piece types that are whole tokens, never split

# Texts the export checks token by token: spaces at the edges and in runs, digits, punctuation,
# newlines, non-ASCII (byte fallback).
SAMPLE_TEXTS = ["The hacker", " leading space", "trailing space ", "two  spaces\nnewline\ttab", "end.",
                "Zürich café 日本語 🙂", "123 4567.89 0x1F", "   ", "x"]


def _proto(tok: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    return proto


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, earliest merged piece first (sentencepiece BPE ids
    follow merge order)."""
    merges = []
    for piece, rank in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def build_hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    proto = _proto(tok)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == BPE_TYPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = BPE(vocab, _merges(vocab), unk_token=spec.unk_piece, fuse_unk=True, byte_fallback=spec.byte_fallback)
    elif spec.model_type == UNIGRAM:
        model = Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise UserError(f"export: {tok.path}: sentencepiece model type {spec.model_type} has no Hugging Face "
                        "equivalent here (bpe and unigram export)")
    hf = HFTokenizer(model)
    steps = []
    if norm.precompiled_charsmap:  # sentencepiece's normalization rule (nfkc, ...), compiled
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    hf.normalizer = normalizers.Sequence(steps)
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                   + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    whole = [AddedToken(p.piece, special=p.type == CONTROL or i == spec.unk_id, normalized=False)
             for i, p in enumerate(proto.pieces) if p.type in (CONTROL, USER_DEFINED) or i == spec.unk_id]
    hf.add_special_tokens([t for t in whole if t.special])
    hf.add_tokens([t for t in whole if not t.special])
    eos = proto.pieces[tok.eos_id].piece
    hf.post_processor = processors.TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B",
                                                      special_tokens=[(eos, tok.eos_id)])
    return hf


def check_same_ids(hf: HFTokenizer, tok: Tokenizer, texts: list[str] = SAMPLE_TEXTS) -> None:
    """Raise UserError at the first text the converted tokenizer encodes differently from ours."""
    for text in texts:
        want = [tok.eos_id] + tok.encode(text)
        got = hf.encode(text).ids
        if got != want:
            raise UserError(f"export: the Hugging Face conversion of {tok.path} encodes {text!r} as {got}, not "
                            f"{want} as ours does; this tokenizer's settings do not convert exactly")


def tokenizer_config(tok: Tokenizer, max_seq_len: int) -> dict:
    """transformers' settings around tokenizer.json (tokenizer_config.json). bos_token is our EOS
    piece, the token every document starts after, which the post-processor puts first.
    split_special_tokens: a literal "</s>" in the text is text, as sentencepiece reads it."""
    proto = _proto(tok)
    eos = proto.pieces[tok.eos_id].piece
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
            "unk_token": proto.trainer_spec.unk_piece, "model_max_length": max_seq_len,
            "clean_up_tokenization_spaces": False, "split_special_tokens": True}
