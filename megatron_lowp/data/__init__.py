"""Data: sentencepiece tokenizer, Megatron-compatible indexed datasets, the embedded corpus, and the
packed, resumable sample stream the training loop reads."""

from megatron_lowp.data.dataset import PackedTokenDataset, SampleStream, sequential_batches
from megatron_lowp.data.embedded import document_split, embedded_dataset_prefix, read_corpus
from megatron_lowp.data.indexed import IndexedDataset, IndexedDatasetWriter, best_token_dtype
from megatron_lowp.data.tokenizer import Tokenizer

__all__ = [
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PackedTokenDataset",
    "SampleStream",
    "Tokenizer",
    "best_token_dtype",
    "document_split",
    "embedded_dataset_prefix",
    "read_corpus",
    "sequential_batches",
]
