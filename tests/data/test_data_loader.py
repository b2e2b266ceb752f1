"""The loader: deterministic per (seed, epoch), disjoint equal shares per rank, and
resumable at the exact batch, with and without worker processes."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from fastune.data import DataError, SFTDataLoader, TokenizedDataset, build_dataloader


def _dataset(n=37, seed=0):
    """Sample i is the token i + 1 repeated (1..6 times): its first token names it."""
    lengths = np.random.default_rng(seed).integers(1, 7, n)
    tokens = np.concatenate([np.full(k, i + 1) for i, k in enumerate(lengths)]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    labels = np.where(np.arange(len(tokens)) + 1 < len(tokens), np.roll(tokens, -1), -100).astype(np.int32)
    labels[offsets[1:] - 1] = -100
    return TokenizedDataset({"tokens": tokens, "labels": labels}, offsets, source="mem", max_seq_len=16, pad_id=0)


def _ids(batch, packed):
    """Sample ids in a batch, in order."""
    if not packed:
        return batch["tokens"][:, 0].tolist()
    out = []
    for row_tokens, row_docs in zip(batch["tokens"].tolist(), batch["document_ids"].tolist()):
        starts = [k for k in range(len(row_docs)) if k == 0 or row_docs[k] != row_docs[k - 1]]
        out += [row_tokens[k] for k in starts if row_tokens[k] != 0]
    return out


def _epoch(loader, packed=False):
    return [_ids(b, packed) for b in loader]


@pytest.mark.parametrize("packed", [False, True])
def test_every_sample_once_per_epoch_deterministic_order(packed):
    ds = _dataset()
    loader = build_dataloader(ds, 4, seed=1, packed=packed)
    first = _epoch(loader, packed)
    assert len(first) == len(build_dataloader(ds, 4, seed=1, packed=packed))
    assert sorted(i for b in first for i in b) == list(range(1, 38))
    assert first == _epoch(build_dataloader(ds, 4, seed=1, packed=packed), packed)
    assert first != _epoch(build_dataloader(ds, 4, seed=2, packed=packed), packed)
    assert loader.epoch == 1  # iterating to the end moves to the next epoch
    second = _epoch(loader, packed)
    assert second != first and sorted(i for b in second for i in b) == list(range(1, 38))
    loader.set_epoch(0)
    assert _epoch(loader, packed) == first
    no_shuffle = build_dataloader(ds, 4, shuffle=False, packed=packed)
    assert [i for b in _epoch(no_shuffle, packed) for i in b] == list(range(1, 38))


@pytest.mark.parametrize("packed", [False, True])
def test_ranks_get_disjoint_equal_shares(packed):
    ds = _dataset()
    loaders = [build_dataloader(ds, 3, seed=5, rank=r, world_size=3, packed=packed) for r in range(3)]
    epochs = [_epoch(loader, packed) for loader in loaders]
    assert len({len(e) for e in epochs}) == 1
    if not packed:
        assert len({len(e[-1]) for e in epochs}) == 1  # even the last batch has the same size
    seen = [i for e in epochs for b in e for i in b]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(1, 38))  # disjoint
    if not packed:
        assert len(seen) == 36  # 37 // 3 * 3: one sample sits this epoch out


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_resume_at_the_exact_batch(num_workers, packed):
    ds = _dataset()
    kwargs = dict(seed=3, packed=packed, pad_to_multiple_of=8)
    reference = build_dataloader(ds, 4, **kwargs)
    full = [b for _ in range(2) for b in reference]  # two epochs without stopping
    per_epoch = len(full) // 2

    first = build_dataloader(ds, 4, num_workers=num_workers, **kwargs)
    stop = per_epoch + 3  # inside the second epoch
    seen = []
    for _ in range(2):
        for batch in first:
            seen.append(batch)
            if len(seen) == stop:
                break
        if len(seen) == stop:
            break
    state = first.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 3)

    resumed = build_dataloader(ds, 4, num_workers=num_workers, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a training loop does: keeps the resume point
    seen += list(resumed)
    assert len(seen) == len(full)
    for got, want in zip(seen, full):
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in got)
    assert resumed.epoch == 2


def test_resume_state_must_match_the_run():
    ds = _dataset()
    state = build_dataloader(ds, 4, seed=3).state_dict()
    with pytest.raises(DataError, match="batch_size was 4 when saved and is 8 now"):
        build_dataloader(ds, 8, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="num_samples"):
        build_dataloader(ds.subset(range(30)), 4, seed=3).load_state_dict(state)


def test_drop_last_and_bad_arguments():
    ds = _dataset()
    assert [len(b) for b in _epoch(build_dataloader(ds, 5, drop_last=True))] == [5] * 7
    assert len(build_dataloader(ds, 5)) == 8
    with pytest.raises(DataError, match="rank must be in"):
        SFTDataLoader(ds, 4, rank=2, world_size=2)
    with pytest.raises(DataError, match="more than the packing length max_seq_len=4"):
        SFTDataLoader(ds, 4, packed=True, max_seq_len=4)
    with pytest.raises(DataError, match="too few for world_size=64"):
        SFTDataLoader(ds, 4, world_size=64)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_global_rng_alone(num_workers):
    # Otherwise each new epoch's iterator would shift the training's dropout masks.
    loader = build_dataloader(_dataset(), 4, num_workers=num_workers)
    before = torch.random.get_rng_state()
    for _ in range(2):
        list(loader)
    assert torch.equal(torch.random.get_rng_state(), before)
