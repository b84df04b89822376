"""Packed LM samples over an indexed dataset, and the resumable order in which training reads them.

The token stream (documents back to back, each ending in EOS) is cut into samples of seq_len + 1
tokens with stride seq_len, so sample i's targets overlap sample i+1's first input by one token
and every token is predicted exactly once per epoch.

`SampleStream` is a pure function of (seed, position): the batch at `consumed_samples` is the
same in every run, so a checkpoint only has to store that integer to resume without repeating
or skipping a sample. It never touches the global torch RNG. (Orders come from torch.randperm,
so they are reproducible on any machine with the same torch version.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import numpy as np
import torch

from megatron_lowp.data.indexed import IndexedDataset
from megatron_lowp.errors import UserError


class PackedTokenDataset:
    """Sample i = tokens[i*seq_len : i*seq_len + seq_len + 1] of the flat token stream."""

    def __init__(self, prefix: str | os.PathLike[str], seq_len: int) -> None:
        if seq_len < 1:
            raise UserError(f"train.seq_len must be a positive integer, got {seq_len}")
        self.prefix = os.fspath(prefix)
        self.seq_len = seq_len
        self.tokens = IndexedDataset(prefix).tokens
        self.num_samples = (len(self.tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise UserError(
                f"dataset {self.prefix} has {len(self.tokens)} tokens; "
                f"one sample of train.seq_len={seq_len} needs at least {seq_len + 1}"
            )

    def sample(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.prefix} ({self.num_samples} samples)")
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def samples(self, indices: torch.Tensor) -> torch.Tensor:
        """LongTensor[len(indices), seq_len + 1]."""
        rows = [self.sample(int(i)) for i in indices]
        return torch.stack(rows) if rows else torch.empty(0, self.seq_len + 1, dtype=torch.long)


def _epoch_seed(seed: int, epoch: int) -> int:
    # hash, not seed + epoch: neighbouring seeds must not share shifted epoch orders
    digest = hashlib.sha256(f"megatron_lowp.SampleStream:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleStream:
    """The infinite sample order: epoch e is a permutation of range(num_samples) seeded by (seed, e)."""

    def __init__(self, dataset: PackedTokenDataset, seed: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Sample indices of one epoch; only the latest epoch's permutation is kept."""
        if epoch != self._epoch:
            n = self.dataset.num_samples
            if self.shuffle:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                self._order = torch.randperm(n, generator=generator)
            else:
                self._order = torch.arange(n)
            self._epoch = epoch
        return self._order

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices at stream positions [start, start + count), crossing epochs as needed."""
        n = self.dataset.num_samples
        parts = []
        position = start
        while position < start + count:
            epoch, offset = divmod(position, n)
            take = min(n - offset, start + count - position)
            parts.append(self.epoch_order(epoch)[offset : offset + take])
            position += take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def global_batch(
        self, consumed_samples: int, global_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """This rank's contiguous slice of the global batch starting at stream position consumed_samples.

        Returns LongTensor[global_batch_size // world_size, seq_len + 1]; rank r gets positions
        consumed_samples + r*per_rank ... + per_rank - 1.
        """
        if global_batch_size < 1 or global_batch_size % world_size:
            raise UserError(
                f"train.global_batch_size ({global_batch_size}) must be a positive multiple of "
                f"the number of data-parallel ranks ({world_size})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        per_rank = global_batch_size // world_size
        return self.dataset.samples(self.indices(consumed_samples + rank * per_rank, per_rank))


def sequential_batches(dataset: PackedTokenDataset, batch_size: int, num_batches: int) -> Iterator[torch.Tensor]:
    """Validation batches: samples 0, 1, 2, ... in order (wrapping around when there are fewer)."""
    for b in range(num_batches):
        positions = torch.arange(b * batch_size, (b + 1) * batch_size)
        yield dataset.samples(positions % dataset.num_samples)
