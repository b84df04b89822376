"""Data: sentencepiece tokenizer, Megatron-compatible indexed datasets, the embedded corpus, the
packed, resumable sample stream the training loop reads, weighted blends, and corpus preparation
(`prepare`, `tokenizer_train`).

The torch-based parts (dataset, blend) load on first use, so `megatron-lowp prepare` and its
worker processes start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from megatron_lowp.data.embedded import document_split, embedded_dataset_prefix, read_corpus
from megatron_lowp.data.indexed import IndexedDataset, IndexedDatasetWriter, best_token_dtype
from megatron_lowp.data.tokenizer import Tokenizer

_LAZY = {
    "PackedTokenDataset": "dataset",
    "SampleStream": "dataset",
    "sequential_batches": "dataset",
    "BlendedSampleStream": "blend",
    "build_train_stream": "blend",
    "build_valid_dataset": "blend",
    "resolve_prefix": "blend",
    "ValidationSet": "validation",
    "build_validation_set": "validation",
    "sequence_losses": "validation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"megatron_lowp.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_lowp.data' has no attribute {name!r}")


__all__ = [
    "BlendedSampleStream",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PackedTokenDataset",
    "SampleStream",
    "Tokenizer",
    "ValidationSet",
    "best_token_dtype",
    "build_train_stream",
    "build_valid_dataset",
    "build_validation_set",
    "document_split",
    "embedded_dataset_prefix",
    "read_corpus",
    "resolve_prefix",
    "sequence_losses",
    "sequential_batches",
]
