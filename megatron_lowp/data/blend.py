"""Weighted blends of datasets, and building the training stream and validation set from `data:`.

`data.train` is one indexed-dataset prefix, or a blend:

    data:
      train:
        - {path: data/web_train, weight: 0.7}
        - {path: data/code_train, weight: 0.3}

Semantics are Megatron-LM's `BlendedDataset`: weights are normalized to sum to 1, and stream
position n (n = 0, 1, ...) goes to the dataset with the largest sampling error
`weight[d] * max(n, 1) - taken[d]` (the first one on ties), where taken[d] counts the samples
dataset d got at positions before n; it then supplies its taken[d]-th sample. After n samples every
dataset's count is within about one sample of weight * n. This is `build_blending_indices` of
Megatron's helpers.cpp, evaluated lazily in the same float64 arithmetic, so the assignments are
identical to Megatron's.

Dataset d's k-th sample is position k of its own `SampleStream` (packed, shuffled per epoch with a
seed derived from (run.seed, d), wrapping into further epochs when the weight asks for more than
one pass). So the whole blended order is a pure function of (seed, weights, position): resuming at
`consumed_samples` neither repeats nor skips a sample, and every data-parallel rank reads its own
contiguous slice of each global batch, as with a single dataset.

Finding taken[] at position n means replaying the greedy rule from the nearest known position
(~3M positions/s). The stream keeps the counts at recent batch boundaries, and the checkpoint
records them with the position (`state_dict`), so a resume starts from there instead of from 0.
The recorded counts are only a cache of that pure function: they are used when the weights match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_lowp.data.dataset import PackedTokenDataset, SampleStream, _compare_state, _hash64, rank_slice
from megatron_lowp.data.embedded import embedded_dataset_prefix
from megatron_lowp.data.tokenizer import EMBEDDED_TOKENIZER
from megatron_lowp.errors import UserError

log = logging.getLogger(__name__)

ANCHORS_KEPT = 16  # blend counts remembered at recent positions (besides position 0)


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum in float64, as Megatron's `normalize` does; each must be > 0."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not w.size or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"blend weights must be positive finite numbers, got {list(weights)}")
    return (w / w.sum()).tolist()


def blend_assignments(
    weights: Sequence[float], start: int, count: int, taken: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Megatron's greedy blending for positions [start, start + count), given the per-dataset counts
    `taken` at `start`. Returns (dataset index per position, that dataset's sample number per
    position, the counts at start + count)."""
    c = list(taken)
    datasets = np.empty(count, dtype=np.int64)
    numbers = np.empty(count, dtype=np.int64)
    w0, rest = weights[0], range(1, len(weights))
    for i, n in enumerate(range(start, start + count)):
        x = float(n) if n > 1 else 1.0  # max(sample_idx, 1.0)
        best, best_error = 0, w0 * x - c[0]
        for d in rest:
            error = weights[d] * x - c[d]
            if error > best_error:  # strict: ties go to the first dataset
                best, best_error = d, error
        datasets[i] = best
        numbers[i] = c[best]
        c[best] += 1
    return datasets, numbers, tuple(c)


def component_seed(seed: int, index: int) -> int:
    """The shuffle seed of a blend's index-th dataset: distinct per dataset, fixed by run.seed."""
    return _hash64("megatron_lowp.blend", seed, index)


class BlendedSampleStream:
    """The blended order of several packed datasets; same interface as `SampleStream`."""

    def __init__(self, datasets: Sequence[PackedTokenDataset], weights: Sequence[float], seed: int,
                 shuffle: bool = True) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"a blend needs one weight per dataset, got {len(datasets)} datasets and "
                             f"{len(weights)} weights")
        seq_lens = {ds.seq_len for ds in datasets}
        if len(seq_lens) != 1:
            raise ValueError(f"blended datasets must share seq_len, got {sorted(seq_lens)}")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.seed = seed
        self.seq_len = seq_lens.pop()
        self.streams = [SampleStream(ds, component_seed(seed, i), shuffle) for i, ds in enumerate(self.datasets)]
        self._zero = (0,) * len(self.datasets)
        self._anchors: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    # --- the blend schedule -------------------------------------------------------------------
    def _anchor(self, position: int, counts: tuple[int, ...]) -> None:
        self._anchors[position] = counts
        self._anchors.move_to_end(position)
        while len(self._anchors) > ANCHORS_KEPT:
            self._anchors.popitem(last=False)

    def counts_at(self, position: int) -> tuple[int, ...]:
        """How many samples each dataset supplied at stream positions [0, position)."""
        if position < 0:
            raise ValueError(f"a stream position must be >= 0, got {position}")
        base = max((p for p in self._anchors if p <= position), default=0)
        counts = self._anchors.get(base, self._zero)
        if base < position:
            counts = blend_assignments(self.weights, base, position - base, counts)[2]
            self._anchor(position, counts)
        return counts

    def assignments(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, that dataset's stream position) for stream positions [start, start + count)."""
        datasets, numbers, after = blend_assignments(self.weights, start, count, self.counts_at(start))
        self._anchor(start + count, after)
        return datasets, numbers

    def indices(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dataset index, sample index within that dataset) at stream positions [start, start + count)."""
        return self._samples(*self.assignments(start, count))

    def _samples(self, datasets: np.ndarray, numbers: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        samples = np.empty(len(datasets), dtype=np.int64)
        for d, stream in enumerate(self.streams):
            rows = np.flatnonzero(datasets == d)
            if rows.size:  # dataset d's numbers in a range of positions are consecutive: first, first + 1, ...
                samples[rows] = stream.indices(int(numbers[rows[0]]), rows.size).numpy()
        return torch.from_numpy(datasets), torch.from_numpy(samples)

    def global_batch(
        self, consumed_samples: int, global_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """This rank's contiguous slice of the global batch at consumed_samples, as `SampleStream.global_batch`."""
        start, per_rank = rank_slice(consumed_samples, global_batch_size, rank, world_size)
        # The whole global batch's schedule (cheap), so every rank also learns the counts where the next one starts.
        datasets, numbers = self.assignments(consumed_samples, global_batch_size)
        part = slice(start - consumed_samples, start - consumed_samples + per_rank)
        datasets, samples = self._samples(datasets[part], numbers[part])
        batch = torch.empty(per_rank, self.seq_len + 1, dtype=torch.long)
        for d, ds in enumerate(self.datasets):
            rows = (datasets == d).nonzero().flatten()
            if rows.numel():
                batch[rows] = ds.samples(samples[rows])
        return batch

    # --- checkpoint ---------------------------------------------------------------------------
    def state_dict(self, consumed_samples: int) -> dict[str, Any]:
        """The position, the per-dataset counts there (a cache: they follow from weights and position) and the data."""
        return {
            "kind": "blend",
            "position": int(consumed_samples),
            "seed": self.seed,
            "weights": self.weights,
            "counts": list(self.counts_at(consumed_samples)),
            "datasets": [{"path": ds.prefix, "num_samples": ds.num_samples} for ds in self.datasets],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> list[str]:
        """Take the checkpoint's counts as a shortcut when its weights are these; returns warnings (also logged)."""
        warnings = _compare_state(self.state_dict(0), state)
        if state is None or state.get("kind") != "blend" or state.get("weights") != self.weights:
            return warnings
        position, counts = state.get("position"), state.get("counts")
        if (isinstance(position, int) and isinstance(counts, list) and len(counts) == len(self.weights)
                and all(isinstance(c, int) and c >= 0 for c in counts) and sum(counts) == position):
            self._anchor(position, tuple(counts))
        return warnings


# --- from the recipe's data section -------------------------------------------------------------


def _is_embedded_tokenizer(tokenizer: str) -> bool:
    if tokenizer == "embedded":
        return True
    try:
        path = Path(tokenizer)
        return path.resolve() == EMBEDDED_TOKENIZER.resolve() or path.read_bytes() == EMBEDDED_TOKENIZER.read_bytes()
    except OSError:
        return False


def _prepare_record(prefix: str) -> Path | None:
    """The `megatron-lowp prepare` record of a prefix PREFIX_<split> (PREFIX_prepare.json), if any."""
    base, sep, split = prefix.rpartition("_")
    record = Path(f"{base}_prepare.json") if sep and split in ("train", "valid", "test") else None
    return record if record is not None and record.is_file() else None


def check_tokenizer(prefix: str, key: str, tokenizer: str, allow_mismatch: bool = False) -> None:
    """A dataset prepared with another tokenizer than data.tokenizer is an error (the ids would mean
    other pieces, silently, whenever the vocabularies have the same size); data.allow_tokenizer_mismatch
    is the override for those who mean it."""
    record_path = _prepare_record(prefix)
    if record_path is None or allow_mismatch:
        return
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        prepared_with = record["tokenizer_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a record we can read: nothing to check against
    tokenizer_file = EMBEDDED_TOKENIZER if tokenizer == "embedded" else Path(tokenizer)
    try:
        used = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    except OSError:
        return  # Tokenizer.load reports a missing file
    if used != prepared_with:
        raise UserError(f"{key}: {prefix} was prepared with the tokenizer {record.get('tokenizer', '?')} "
                        f"(sha256 {prepared_with[:12]}, {record_path.name}), but data.tokenizer is {tokenizer} "
                        f"(sha256 {used[:12]}); use the tokenizer it was prepared with, or "
                        "data.allow_tokenizer_mismatch=true if you mean it")


def resolve_prefix(value: str, split: str, key: str, tokenizer: str = "embedded", allow_mismatch: bool = False) -> str:
    """The indexed-dataset prefix a data.* value names: 'embedded' (the shipped corpus, built on first
    use) or PREFIX with PREFIX.bin and PREFIX.idx present, prepared with this tokenizer."""
    if value == "embedded":
        if not _is_embedded_tokenizer(tokenizer):
            alternative = " or data.valid=null" if key == "data.valid" else ""
            raise UserError(
                f"{key}: 'embedded' is tokenized with the embedded tokenizer, but data.tokenizer is {tokenizer}; "
                f"give a dataset prepared with that tokenizer (megatron-lowp prepare){alternative}, "
                "or data.tokenizer=embedded"
            )
        return embedded_dataset_prefix(split)
    for suffix in (".bin", ".idx"):
        if not Path(value + suffix).is_file():
            raise UserError(
                f"{key}: '{value}' has no {value}{suffix} (expected an indexed dataset prefix or 'embedded')"
            )
    check_tokenizer(value, key, tokenizer, allow_mismatch)
    return value


def _item(source: Any, name: str) -> Any:
    return source[name] if isinstance(source, dict) else getattr(source, name)


def build_train_stream(data: Any, seq_len: int, seed: int, vocab_size: int | None = None,
                       shuffle: bool = True) -> SampleStream | BlendedSampleStream:
    """The training order for `data.train` (a DataConfig): a `SampleStream` over one prefix, or a
    `BlendedSampleStream` over a list of {path, weight} entries."""
    train, tokenizer, allow = data.train, data.tokenizer, getattr(data, "allow_tokenizer_mismatch", False)
    if isinstance(train, (str, os.PathLike)):
        prefix = resolve_prefix(os.fspath(train), "train", "data.train", tokenizer, allow)
        return SampleStream(PackedTokenDataset(prefix, seq_len, vocab_size), seed=seed, shuffle=shuffle)
    if not train:
        raise UserError("data.train: an empty list; name at least one dataset ({path: PREFIX, weight: W})")
    datasets, weights, seen = [], [], {}
    for i, source in enumerate(train):
        key = f"data.train[{i}]"
        path, weight = os.fspath(_item(source, "path")), float(_item(source, "weight"))
        if not weight > 0 or not np.isfinite(weight):
            raise UserError(f"{key}.weight: {weight} must be a positive number")
        prefix = resolve_prefix(path, "train", f"{key}.path", tokenizer, allow)
        real = os.path.realpath(prefix)
        if real in seen:
            raise UserError(f"{key}.path: '{path}' is already data.train[{seen[real]}]; give it one entry "
                            "with the summed weight")
        seen[real] = i
        datasets.append(PackedTokenDataset(prefix, seq_len, vocab_size))
        weights.append(weight)
    return BlendedSampleStream(datasets, weights, seed=seed, shuffle=shuffle)


def build_valid_dataset(data: Any, seq_len: int, vocab_size: int | None = None) -> PackedTokenDataset | None:
    """The validation set `data.valid` names (None when it is null)."""
    if data.valid is None:
        return None
    prefix = resolve_prefix(data.valid, "valid", "data.valid", data.tokenizer,
                            getattr(data, "allow_tokenizer_mismatch", False))
    return PackedTokenDataset(prefix, seq_len, vocab_size)
