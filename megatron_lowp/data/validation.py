"""The validation set: the same sequences, scored the same way, whatever the batch layout.

A run's validation loss must be comparable with any other run's on the same data: at another
micro-batch size, gradient accumulation or world size, and between `train` and `megatron-lowp eval`.
So the set is fixed by the recipe, not by the training batch:

- the sequences: `train.eval_samples` samples of `train.seq_len + 1` tokens of `data.valid`, taken
  in order from its start (wrapping around a smaller set);
- the batches they run in: chunks of `train.eval_batch_size` consecutive sequences. Chunk i runs on
  rank i mod world size; every rank runs the same number of forwards (a rank short of chunks
  repeats chunk 0 and drops the result), because sharded engines (FSDP, ZeRO-3) gather parameters
  in every forward. The chunks' contents never depend on the layout, so quantized recipes, whose
  per-tensor scales come from the whole operand, see the same operands everywhere;
- the loss: the mean cross-entropy over every predicted token. Each sequence's token losses are
  summed in FP32; the per-sequence sums are gathered by index and added in sample order in FP64.

`fingerprint()` is a sha256 of the token ids and the chunking: two runs with the same fingerprint
were validated on the same thing (compare checks it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_lowp.data.dataset import PackedTokenDataset
from megatron_lowp.data.tokenizer import EMBEDDED_TOKENIZER

# per-sequence summed token losses [B] of a batch [B, T + 1]
SequenceLosses = Callable[[torch.Tensor], torch.Tensor]


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy summed per sequence, in FP32 whatever the logits' dtype: [B]."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape).sum(dim=1)


@dataclass(frozen=True)
class ValidationSet:
    dataset: PackedTokenDataset
    samples: int
    batch_size: int

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    @property
    def tokens(self) -> int:
        """Predicted tokens the loss averages over."""
        return self.samples * self.seq_len

    def chunk(self, i: int) -> torch.Tensor:
        start = i * self.batch_size
        positions = torch.arange(start, min(start + self.batch_size, self.samples))
        return self.dataset.samples(positions % self.dataset.num_samples)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.samples / self.batch_size)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"seq_len={self.seq_len};batch={self.batch_size};".encode())
        for i in range(self.num_chunks):
            digest.update(self.chunk(i).to(torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def describe(self, data) -> dict:
        """What `compare` checks runs against: the set's fingerprint and the tokenizer (data: cfg.data)."""
        tokenizer = EMBEDDED_TOKENIZER if data.tokenizer == "embedded" else Path(data.tokenizer)
        return {"data": data.valid, "samples": self.samples, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "tokens": self.tokens, "fingerprint": self.fingerprint(), "tokenizer": data.tokenizer,
                "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest()}

    def partial_sums(self, losses_of: SequenceLosses, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's per-sequence loss sums [samples] (FP64; zero for other ranks' sequences). Every
        rank runs the same number of forwards."""
        sums = torch.zeros(self.samples, dtype=torch.float64)
        for r in range(math.ceil(self.num_chunks / world_size)):
            i = r * world_size + rank
            real = i < self.num_chunks
            values = losses_of(self.chunk(i if real else 0)).detach().to("cpu", torch.float64)
            if real:
                start = i * self.batch_size
                sums[start:start + values.numel()] = values
        return sums

    def loss(self, losses_of: SequenceLosses, rank: int = 0, world_size: int = 1,
             all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Mean token loss over the set; a collective when world_size > 1 (every rank gets the value)."""
        sums = self.partial_sums(losses_of, rank, world_size)
        if world_size > 1:
            sums = all_reduce_sum(sums)  # each entry is nonzero on one rank only: the sum is exact
        return float(sums.sum() / self.tokens)

def build_validation_set(data, train, vocab_size: int | None = None) -> ValidationSet | None:
    """The validation set of a recipe (cfg.data, cfg.train); None when data.valid is null."""
    from megatron_lowp.data.blend import build_valid_dataset

    dataset = build_valid_dataset(data, train.seq_len, vocab_size)
    if dataset is None:
        return None
    return ValidationSet(dataset, train.eval_samples, train.eval_batch_size)
