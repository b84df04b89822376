"""Weighted blending (Megatron's BlendedDataset rule), Feistel epoch orders, resume and rank slices."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.data import IndexedDatasetWriter, PackedTokenDataset, SampleStream, dataset
from megatron_lowp.data.blend import (
    BlendedSampleStream,
    blend_assignments,
    build_train_stream,
    build_valid_dataset,
    normalize_weights,
)
from megatron_lowp.data.dataset import FeistelPermutation
from megatron_lowp.errors import UserError

SEQ = 10
OFFSET = 1_000_000  # dataset d's tokens start at d * OFFSET, so a row names its dataset and sample


def counting_prefix(folder: Path, name: str, num_samples: int, base: int) -> str:
    """Tokens base, base+1, ... over a few documents: sample i of it starts with base + i*SEQ."""
    tokens = np.arange(base, base + num_samples * SEQ + 1)
    with IndexedDatasetWriter(folder / name, np.int32) as w:
        for part in np.array_split(tokens, 5):
            w.add_document(part)
    return str(folder / name)


def blend(tmp_path: Path, sizes: list[int], weights: list[float], seed: int = 3) -> BlendedSampleStream:
    datasets = [PackedTokenDataset(counting_prefix(tmp_path, f"d{i}", n, i * OFFSET), SEQ) for i, n in enumerate(sizes)]
    return BlendedSampleStream(datasets, weights, seed=seed)


def decode_rows(batch: torch.Tensor) -> list[tuple[int, int]]:
    """(dataset, sample) of each row of a batch of counting datasets."""
    first = batch[:, 0].tolist()
    return [(t // OFFSET, (t % OFFSET) // SEQ) for t in first]


def megatron_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """A line-by-line transcription of megatron/core/datasets/helpers.cpp build_blending_indices."""
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    current_samples = [0] * len(weights)
    for sample_idx in range(size):
        sample_idx_double = max(float(sample_idx), 1.0)
        max_error_index = 0
        max_error = weights[0] * sample_idx_double - float(current_samples[0])
        for dataset_idx in range(1, len(weights)):
            error = weights[dataset_idx] * sample_idx_double - float(current_samples[dataset_idx])
            if error > max_error:
                max_error = error
                max_error_index = dataset_idx
        dataset_index[sample_idx] = max_error_index
        dataset_sample_index[sample_idx] = current_samples[max_error_index]
        current_samples[max_error_index] += 1
    return dataset_index, dataset_sample_index


# ---------------------------------------------------------------- the blending rule


@pytest.mark.parametrize("weights", [[0.7, 0.3], [5, 3, 2], [1, 1, 1], [0.001, 0.999], [2, 1, 1, 1, 0.5]])
def test_assignments_equal_megatrons(weights) -> None:
    w = normalize_weights(weights)
    want_d, want_n = megatron_blending_indices(w, 3000)
    got_d, got_n, counts = blend_assignments(w, 0, 3000, [0] * len(w))
    np.testing.assert_array_equal(got_d, want_d)
    np.testing.assert_array_equal(got_n, want_n)
    assert list(counts) == np.bincount(want_d, minlength=len(w)).tolist()
    # resuming the rule from any position with the counts there continues the same sequence
    for start in (1, 2, 777, 2999):
        counts_at = np.bincount(want_d[:start], minlength=len(w)).tolist()
        d, n, _ = blend_assignments(w, start, 3000 - start, counts_at)
        np.testing.assert_array_equal(d, want_d[start:])
        np.testing.assert_array_equal(n, want_n[start:])


def test_normalize_weights() -> None:
    assert normalize_weights([7, 3]) == [0.7, 0.3]
    assert normalize_weights([1, 1, 2]) == [0.25, 0.25, 0.5]
    for bad in ([], [1, 0], [1, -1], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="positive finite"):
            normalize_weights(bad)


def test_blend_proportions_follow_the_weights(tmp_path: Path) -> None:
    stream = blend(tmp_path, [300, 50], [0.7, 0.3])
    rows = decode_rows(stream.global_batch(0, 10_000))
    counts = np.bincount([d for d, _ in rows], minlength=2)
    assert abs(counts[0] / 10_000 - 0.7) < 0.01 and abs(counts[1] / 10_000 - 0.3) < 0.01
    assert abs(counts[0] - 7000) <= 1  # the greedy rule keeps every prefix within about one sample
    for n in (10, 99, 1234, 5001):
        prefix = np.bincount([d for d, _ in rows[:n]], minlength=2)
        assert np.abs(prefix - np.array([0.7, 0.3]) * n).max() <= 1.0
    # three datasets, unnormalized weights
    (tmp_path / "three").mkdir()
    stream3 = blend(tmp_path / "three", [40, 40, 40], [5, 3, 2])
    counts3 = np.bincount([d for d, _ in decode_rows(stream3.global_batch(0, 2000))], minlength=3)
    assert counts3.tolist() == [1000, 600, 400]


def test_each_dataset_reads_its_own_shuffled_epochs(tmp_path: Path) -> None:
    stream = blend(tmp_path, [200, 30], [0.5, 0.5])
    rows = decode_rows(stream.global_batch(0, 120))
    small = [s for d, s in rows if d == 1]
    assert len(small) == 60
    # 30 samples per epoch: the first 30 are a permutation, the next 30 another one
    assert sorted(small[:30]) == list(range(30)) and sorted(small[30:]) == list(range(30))
    assert small[:30] != small[30:] and small[:30] != list(range(30))
    big = [s for d, s in rows if d == 0]
    assert len(set(big)) == len(big)  # still in its first epoch: no repeats
    # the component orders are SampleStreams with their own seeds
    assert big == stream.streams[0].indices(0, 60).tolist()
    assert stream.streams[0].seed != stream.streams[1].seed


# ---------------------------------------------------------------- resume and ranks


def test_blend_resume_never_repeats_or_skips(tmp_path: Path) -> None:
    straight = decode_rows(blend(tmp_path, [50, 20, 9], [0.5, 0.3, 0.2]).global_batch(0, 600))
    gbs = 24
    for k in (0, 24, 96, 312, 576):
        fresh = blend(tmp_path, [50, 20, 9], [0.5, 0.3, 0.2])  # knows nothing but consumed_samples
        assert decode_rows(fresh.global_batch(k, gbs)) == straight[k : k + gbs]
    # a run that goes batch by batch and "restarts" from its checkpoint meta
    stream, seen, consumed = blend(tmp_path, [50, 20, 9], [0.5, 0.3, 0.2]), [], 0
    while consumed + gbs <= 600:
        if consumed == 240:
            state = stream.state_dict(consumed)
            assert state["kind"] == "blend" and state["position"] == 240 and sum(state["counts"]) == 240
            stream = blend(tmp_path, [50, 20, 9], [0.5, 0.3, 0.2])
            assert stream.load_state_dict(state) == []
            assert stream._anchors[240] == tuple(state["counts"])  # resumes from the counts, no replay from 0
        seen += decode_rows(stream.global_batch(consumed, gbs))
        consumed += gbs
    assert seen == straight[: len(seen)]


def test_blend_checkpoint_counts_are_only_a_cache(tmp_path: Path) -> None:
    stream = blend(tmp_path, [50, 20], [0.6, 0.4])
    state = stream.state_dict(100)
    other = blend(tmp_path, [50, 20], [0.5, 0.5])  # other weights: the recorded counts do not apply
    warnings = other.load_state_dict(state)
    assert len(warnings) == 1 and "changed" in warnings[0] and "may repeat" in warnings[0]
    assert 100 not in other._anchors
    assert other.counts_at(100) == (50, 50)
    bogus = {**state, "counts": [1, 2]}  # inconsistent with the position: ignored
    again = blend(tmp_path, [50, 20], [0.6, 0.4])
    again.load_state_dict(bogus)
    assert again.counts_at(100) == tuple(state["counts"])


@pytest.mark.parametrize("world", [2, 4])
def test_blend_rank_slices_partition_the_global_batch(tmp_path: Path, world: int) -> None:
    stream = blend(tmp_path, [50, 20], [0.7, 0.3])
    for consumed in (0, 48, 200):  # 200: crosses epochs of the small dataset
        full = stream.global_batch(consumed, 16)
        fresh = [blend(tmp_path, [50, 20], [0.7, 0.3]) for _ in range(world)]  # each rank its own process
        parts = [fresh[r].global_batch(consumed, 16, rank=r, world_size=world) for r in range(world)]
        assert all(p.shape == (16 // world, SEQ + 1) for p in parts)
        assert torch.equal(torch.cat(parts), full)
    with pytest.raises(UserError, match=r"global_batch_size \(10\) must be a positive multiple"):
        stream.global_batch(0, 10, rank=0, world_size=4)


# ---------------------------------------------------------------- Feistel orders for large datasets


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_bijection(n: int) -> None:
    perm = FeistelPermutation(n, key=42)
    image = perm(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))
    np.testing.assert_array_equal(FeistelPermutation(n, key=42)(np.arange(n)), image)
    np.testing.assert_array_equal(perm(np.arange(n)[::-1]), image[::-1])  # elementwise, any order
    if n > 16:
        assert not np.array_equal(FeistelPermutation(n, key=43)(np.arange(n)), image)
        assert not np.array_equal(image, np.arange(n))


def test_large_epochs_use_feistel_orders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = PackedTokenDataset(counting_prefix(tmp_path, "big", 100, 0), SEQ)
    small_order = SampleStream(ds, seed=5).indices(0, 300)
    monkeypatch.setattr(dataset, "MAX_MATERIALIZED_ORDER", 50)  # pretend 100 samples is "large"
    stream = SampleStream(ds, seed=5)
    order = stream.indices(0, 300)
    for e in range(3):
        assert sorted(order[e * 100 : (e + 1) * 100].tolist()) == list(range(100))
    assert not torch.equal(order[:100], order[100:200]) and not torch.equal(order, small_order)
    assert torch.equal(SampleStream(ds, seed=5).indices(137, 50), order[137:187])  # resume
    assert stream._epoch == -1  # no epoch order was materialized
    assert torch.equal(stream.epoch_order(1), order[100:200])


# ---------------------------------------------------------------- from the recipe


def data_cfg(train, valid=None, tokenizer="embedded"):
    return SimpleNamespace(train=train, valid=valid, tokenizer=tokenizer)


def test_build_train_stream_from_config(tmp_path: Path) -> None:
    a = counting_prefix(tmp_path, "a", 40, 0)
    b = counting_prefix(tmp_path, "b", 40, OFFSET)
    cfg = load_config(None, [f"data.train=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]"])
    stream = build_train_stream(cfg.data, SEQ, seed=1)
    assert isinstance(stream, BlendedSampleStream) and stream.weights == [0.75, 0.25]
    assert np.bincount([d for d, _ in decode_rows(stream.global_batch(0, 40))]).tolist() == [30, 10]
    single = build_train_stream(data_cfg(a), SEQ, seed=1)
    assert isinstance(single, SampleStream) and single.state_dict(8)["datasets"][0]["path"] == a
    assert build_valid_dataset(data_cfg(a), SEQ) is None
    assert build_valid_dataset(data_cfg(a, valid=b), SEQ).prefix == b


def test_blend_config_errors(tmp_path: Path) -> None:
    a = counting_prefix(tmp_path, "a", 40, 0)
    entry = [{"path": a, "weight": 1.0}]
    with pytest.raises(UserError, match=r"data\.train\[1\]\.path: '.*nope' has no .*nope\.bin"):
        build_train_stream(data_cfg([*entry, {"path": str(tmp_path / "nope"), "weight": 1}]), SEQ, seed=1)
    with pytest.raises(UserError, match=r"data\.train\[1\]\.path: .* is already data\.train\[0\]"):
        build_train_stream(data_cfg([*entry, {"path": a, "weight": 2}]), SEQ, seed=1)
    with pytest.raises(UserError, match=r"data\.train\[0\]\.weight: 0\.0 must be a positive number"):
        build_train_stream(data_cfg([{"path": a, "weight": 0}]), SEQ, seed=1)
    with pytest.raises(UserError, match=r"data\.train: an empty list"):
        build_train_stream(data_cfg([]), SEQ, seed=1)
    # the recipe loader checks the items' keys and values, naming the item
    for override, message in [
        ("[{path: a, wieght: 1}]", r"unknown key 'data\.train\[0\]\.wieght' \(did you mean 'data\.train\[0\]\.weight'"),
        ("[{path: a, weight: 1}, {path: b, weight: -2}]", r"data\.train\[1\]\.weight: -2\.0 is out of range; .*> 0"),
        ("[{weight: 1}]", r"data\.train\[0\]: missing key 'path'"),
        ("[{path: a}]", r"data\.train\[0\]: missing key 'weight'"),
        ("[a, b]", r"data\.train\[0\]: 'a' must be a mapping with keys path, weight"),
        ("{path: a, weight: 1}", r"data\.train: .* expected a string or a list of mappings"),
        ("[]", r"data\.train: an empty list"),
    ]:
        with pytest.raises(UserError, match=message):
            load_config(None, [f"data.train={override}"])


def test_blend_recipe_file_errors_name_the_file(tmp_path: Path) -> None:
    recipe = tmp_path / "blend.yaml"
    recipe.write_text("data:\n  train:\n    - {path: a, weight: 1}\n    - {path: b, weight: 0}\n")
    with pytest.raises(UserError, match=rf"{recipe}: data\.train\[1\]\.weight: 0\.0 is out of range"):
        load_config(recipe)
    recipe.write_text("data:\n  train:\n    - {path: a, weight: 1}\n    - {path: b, weight: 3}\n")
    cfg = load_config(recipe)
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 1.0), ("b", 3.0)]


def test_token_ids_are_checked_against_the_tokenizer(tmp_path: Path) -> None:
    prefix = counting_prefix(tmp_path, "ids", 10, 0)  # ids 0..100
    assert PackedTokenDataset(prefix, SEQ, vocab_size=101).num_samples == 10
    with pytest.raises(UserError, match=r"ids\.bin: token id 100 is outside the tokenizer's vocabulary \(0\.\.99\)"):
        PackedTokenDataset(prefix, SEQ, vocab_size=100)
    with pytest.raises(UserError, match=r"'embedded' is tokenized with the embedded tokenizer, but data\.tokenizer"):
        build_train_stream(data_cfg("embedded", tokenizer=str(tmp_path / "other.model")), SEQ, seed=1)
    with pytest.raises(UserError, match=r"data\.valid: 'embedded' .* or data\.valid=null"):
        build_valid_dataset(data_cfg(prefix, valid="embedded", tokenizer=str(tmp_path / "other.model")), SEQ)


def test_single_stream_checkpoint_record(tmp_path: Path) -> None:
    a = PackedTokenDataset(counting_prefix(tmp_path, "a", 40, 0), SEQ)
    state = SampleStream(a, seed=1).state_dict(16)
    assert state == {"kind": "single", "position": 16, "seed": 1, "datasets": [{"path": a.prefix, "num_samples": 40}]}
    (tmp_path / "moved").mkdir()
    for ext in (".bin", ".idx"):
        Path(a.prefix + ext).rename(tmp_path / "moved" / f"a{ext}")
    moved = PackedTokenDataset(tmp_path / "moved" / "a", SEQ)
    assert SampleStream(moved, seed=1).load_state_dict(state) == []  # same data elsewhere: same order
    assert SampleStream(moved, seed=1).load_state_dict(None) == []  # a checkpoint from before the record
    bigger = PackedTokenDataset(counting_prefix(tmp_path, "b", 50, 0), SEQ)
    assert "changed" in SampleStream(bigger, seed=1).load_state_dict(state)[0]
    assert "seed 2" in SampleStream(moved, seed=2).load_state_dict(state)[0]
