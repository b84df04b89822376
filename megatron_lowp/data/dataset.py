"""Packed LM samples over an indexed dataset, and the resumable order in which training reads them.

The token stream (documents back to back, each ending in EOS) is cut into samples of seq_len + 1
tokens with stride seq_len, so sample i's targets overlap sample i+1's first input by one token
and every token is predicted exactly once per epoch. Tokens stay memory-mapped: a sample reads
its seq_len + 1 tokens from the page cache, nothing else of the corpus is loaded.

`SampleStream` is a pure function of (seed, position): the batch at `consumed_samples` is the
same in every run, so a checkpoint only has to store that integer to resume without repeating
or skipping a sample. It never touches the global torch RNG. Epoch e is a permutation of the
samples seeded by (seed, e): torch.randperm for epochs of up to MAX_MATERIALIZED_ORDER samples
(reproducible on any machine with the same torch version; 8 bytes per sample in memory), a keyed
Feistel bijection evaluated per position beyond that, so memory stays flat in the corpus size.
Weighted blends of several datasets are in blend.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megatron_lowp.data.indexed import IndexedDataset
from megatron_lowp.errors import UserError

log = logging.getLogger(__name__)

# Epochs with more samples than this use the Feistel permutation instead of a materialized randperm.
MAX_MATERIALIZED_ORDER = 1 << 24
VOCAB_CHECK_TOKENS = 1 << 16  # tokens checked against the vocabulary when a dataset is opened


class PackedTokenDataset:
    """Sample i = tokens[i*seq_len : i*seq_len + seq_len + 1] of the flat token stream.

    With `vocab_size`, every sample read (and the first VOCAB_CHECK_TOKENS tokens, at once) is
    checked to hold ids below it: a dataset tokenized with another tokenizer fails with a clear
    error instead of indexing past the embedding table.
    """

    def __init__(self, prefix: str | os.PathLike[str], seq_len: int, vocab_size: int | None = None) -> None:
        if seq_len < 1:
            raise UserError(f"train.seq_len must be a positive integer, got {seq_len}")
        self.prefix = os.fspath(prefix)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.tokens = IndexedDataset(prefix).tokens  # np.memmap: nothing is read until a sample is
        self.num_samples = (len(self.tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise UserError(
                f"dataset {self.prefix} has {len(self.tokens)} tokens; "
                f"one sample of train.seq_len={seq_len} needs at least {seq_len + 1}"
            )
        self._check_vocab(np.asarray(self.tokens[:VOCAB_CHECK_TOKENS]))

    def _check_vocab(self, tokens: np.ndarray) -> None:
        if self.vocab_size is None or not tokens.size:
            return
        high = int(tokens.max())
        if high >= self.vocab_size or int(tokens.min()) < 0:
            bad = high if high >= self.vocab_size else int(tokens.min())
            raise UserError(
                f"{self.prefix}.bin: token id {bad} is outside the tokenizer's vocabulary (0..{self.vocab_size - 1}); "
                "was the dataset prepared with another tokenizer? (data.tokenizer must be the one prepare used)"
            )

    def sample(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.prefix} ({self.num_samples} samples)")
        start = i * self.seq_len
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def samples(self, indices: torch.Tensor) -> torch.Tensor:
        """LongTensor[len(indices), seq_len + 1]."""
        rows = [self.sample(int(i)) for i in indices]
        if not rows:
            return torch.empty(0, self.seq_len + 1, dtype=torch.long)
        batch = torch.stack(rows)
        self._check_vocab(batch.numpy())
        return batch


def _hash64(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _epoch_seed(seed: int, epoch: int) -> int:
    # hash, not seed + epoch: neighbouring seeds must not share shifted epoch orders
    digest = hashlib.sha256(f"megatron_lowp.SampleStream:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class FeistelPermutation:
    """A keyed bijection of range(n), evaluated per element in O(1) memory.

    A 4-round balanced Feistel network on the smallest even number of bits covering n (a
    permutation of [0, 2^bits)), with cycle walking: an output >= n is fed through again until it
    lands in range, which keeps the map a bijection of range(n). The domain is under 4n, so a
    walk takes fewer than 4 rounds of the network on average.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(_hash64("megatron_lowp.Feistel", key, r)) for r in range(self.ROUNDS)]

    def _round(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        x = r ^ key  # splitmix64's finalizer: every input bit moves every output bit
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & self.mask

    def _network(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of `positions` (each in range(n)) as int64."""
        x = np.asarray(positions, dtype=np.uint64)
        with np.errstate(over="ignore"):
            y = self._network(x)
            out = y >= self.n
            while out.any():
                y[out] = self._network(y[out])
                out = y >= self.n
        return y.astype(np.int64)


class SampleStream:
    """The infinite sample order: epoch e is a permutation of range(num_samples) seeded by (seed, e)."""

    def __init__(self, dataset: PackedTokenDataset, seed: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All sample indices of one epoch, in order; only the latest epoch's order is kept."""
        if epoch != self._epoch:
            n = self.dataset.num_samples
            if not self.shuffle:
                self._order = torch.arange(n)
            elif n <= MAX_MATERIALIZED_ORDER:
                generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
                self._order = torch.randperm(n, generator=generator)
            else:
                self._order = self._order_slice(epoch, 0, n)
            self._epoch = epoch
        return self._order

    def _order_slice(self, epoch: int, offset: int, count: int) -> torch.Tensor:
        n = self.dataset.num_samples
        if not self.shuffle or n <= MAX_MATERIALIZED_ORDER:
            return self.epoch_order(epoch)[offset : offset + count]
        permutation = FeistelPermutation(n, _epoch_seed(self.seed, epoch))
        return torch.from_numpy(permutation(np.arange(offset, offset + count, dtype=np.int64)))

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices at stream positions [start, start + count), crossing epochs as needed."""
        n = self.dataset.num_samples
        parts = []
        position = start
        while position < start + count:
            epoch, offset = divmod(position, n)
            take = min(n - offset, start + count - position)
            parts.append(self._order_slice(epoch, offset, take))
            position += take
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def global_batch(
        self, consumed_samples: int, global_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """This rank's contiguous slice of the global batch starting at stream position consumed_samples.

        Returns LongTensor[global_batch_size // world_size, seq_len + 1]; rank r gets positions
        consumed_samples + r*per_rank ... + per_rank - 1.
        """
        start, per_rank = rank_slice(consumed_samples, global_batch_size, rank, world_size)
        return self.dataset.samples(self.indices(start, per_rank))

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self, consumed_samples: int) -> dict[str, Any]:
        """What the checkpoint records about the order (JSON): the position and what it depends on.

        The order itself is a function of (seed, position), so this is a record for checks, not
        state the stream needs back."""
        return {
            "kind": "single",
            "position": int(consumed_samples),
            "seed": self.seed,
            "datasets": [{"path": self.dataset.prefix, "num_samples": self.dataset.num_samples}],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> list[str]:
        """Compare a checkpoint's record with this stream; returns (and logs) warnings about changes."""
        return _compare_state(self.state_dict(0), state)


def rank_slice(consumed_samples: int, global_batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first stream position, count) of rank `rank`'s share of the global batch at `consumed_samples`."""
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
    return consumed_samples + rank * per_rank, per_rank


def _compare_state(now: dict[str, Any], saved: dict[str, Any] | None) -> list[str]:
    """Warnings for a resume whose data differs from the checkpoint's (the order then differs too)."""
    if saved is None:
        return []  # a checkpoint from before the record existed
    warnings = []
    if saved.get("kind") != now["kind"] or saved.get("seed") != now["seed"]:
        warnings.append(f"the checkpoint sampled {saved.get('kind')} data with seed {saved.get('seed')}, "
                        f"this run {now['kind']} data with seed {now['seed']}")
    else:  # the order depends on the sample counts and weights, not on where the files are
        def shape(state: dict[str, Any]) -> tuple:
            return [d.get("num_samples") for d in state.get("datasets", [])], state.get("weights")

        if shape(saved) != shape(now):
            warnings.append(f"the training data changed since the checkpoint (was {saved.get('datasets')} "
                            f"weights {saved.get('weights')}, now {now['datasets']} weights {now.get('weights')})")
    if warnings:
        warnings[-1] += ("; the sample order from here on is the new data's, so samples may repeat or be skipped "
                         "relative to the run so far")
        for w in warnings:
            log.warning("data: %s", w)
    return warnings


def sequential_batches(dataset: PackedTokenDataset, batch_size: int, num_batches: int) -> Iterator[torch.Tensor]:
    """Validation batches: samples 0, 1, 2, ... in order (wrapping around when there are fewer)."""
    for b in range(num_batches):
        positions = torch.arange(b * batch_size, (b + 1) * batch_size)
        yield dataset.samples(positions % dataset.num_samples)
