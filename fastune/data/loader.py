"""A deterministic, resumable, rank-aware loader over a ``TokenizedDataset``.

Each epoch's batches are a pure function of ``(seed, epoch, rank, world_size)``:

1. order: a permutation of the samples drawn from ``numpy.random.default_rng([seed,
   epoch])`` (or the file order without ``shuffle``);
2. units: the samples in that order, or greedy packs of them (``packed=True``);
3. the first ``len(units) // world_size * world_size`` units are dealt round-robin
   to the ranks (at most ``world_size - 1`` are left out per epoch), so every rank
   sees a disjoint slice and the same number of batches;
4. batches: consecutive groups of ``batch_size`` units (the last one may be
   smaller, on every rank alike, unless ``drop_last``).

Resume: ``state_dict()`` records the epoch and how many batches were handed out;
``load_state_dict()`` makes the next iteration start at the next batch, so the
run continues at the exact sample. A state saved with another world size (and the
same batch size) continues at the same sample too, when the samples handed out
make whole batches on the new ranks. Collation runs in ``num_workers`` processes
(torch ``DataLoader``, in order, persistent); workers only collate batches whose
contents were fixed in the main process, so the batches, and resuming, do not
depend on ``num_workers``: it may even change between runs.

Epochs: iterating to the end moves to the next epoch, so ``for batch in loader``
in a loop sees a new shuffle each time. ``set_epoch(e)`` moves to epoch ``e`` from
its start, and does nothing when ``e`` is the current epoch (so a training loop
calling it after ``load_state_dict`` keeps the resume point). A new iteration
always starts at the beginning of the current epoch, except the first one after
``load_state_dict``.

With packing the number of packs, hence ``len()``, can differ slightly between
epochs; ``len()`` is the current epoch's.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastune.data.collate import collate_packed, collate_padded
from fastune.data.datasets import TokenizedDataset
from fastune.data.errors import DataError
from fastune.data.packing import greedy_pack

# Settings that fix the data order: resuming under different ones would not continue the same run.
_ORDER_KEYS = ("seed", "shuffle", "batch_size", "world_size", "packed", "seq_len", "drop_last",
               "num_samples", "num_tokens")


class SFTDataLoader:
    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        packed: bool = False,
        max_seq_len: Optional[int] = None,
        pad_to_multiple_of: Optional[int] = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        """``max_seq_len`` is the packed row length, by default the dataset's.
        ``pad_to_multiple_of`` applies to unpacked batches (packed rows are always
        ``max_seq_len`` long)."""
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.packed, self.drop_last = packed, drop_last
        self.seq_len = max_seq_len or dataset.max_seq_len
        longest = int(dataset.lengths.max())
        if packed and longest > self.seq_len:
            raise DataError(f"{dataset.source}: a sample has {longest} tokens, more than the packing "
                            f"length max_seq_len={self.seq_len}")
        self.epoch = 0
        self._batches_done = 0  # batches handed out in the current epoch
        self._resume_at = 0  # where the next iteration starts (set by load_state_dict)
        self._plan_cache: tuple[int, list] = (-1, [])
        self._sampler = _PlanSampler()
        self._loader = DataLoader(
            _Collator(dataset, packed, self.seq_len, pad_to_multiple_of),
            sampler=self._sampler,
            batch_size=None,  # each "index" the sampler yields is a whole batch plan
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            # Its own generator: every new iterator draws a worker seed from it, and
            # drawing from the global RNG would shift the training's dropout masks
            # (a resumed run would then not repeat the uninterrupted one).
            generator=torch.Generator().manual_seed(seed),
        )
        self._plan(self.epoch)  # fail now, not at the first step, when the data is too small

    def __len__(self) -> int:
        return len(self._plan(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batches_done, self._resume_at = epoch, 0, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        plan = self._plan(self.epoch)
        start, self._resume_at = self._resume_at, 0
        self._batches_done = start
        self._sampler.batches = plan[start:]
        for batch in self._loader:
            self._batches_done += 1
            yield batch
        self.epoch, self._batches_done = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self._batches_done, **self._order_settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = self._for_this_world_size(state)
        settings = self._order_settings()
        for key in _ORDER_KEYS:
            if state.get(key) != settings[key]:
                raise DataError(f"data loader state: {key} was {state.get(key)!r} when saved and is "
                                f"{settings[key]!r} now, so resuming would not continue the same data order")
        self.epoch = int(state["epoch"])
        self._batches_done = self._resume_at = int(state["batches_done"])

    def _for_this_world_size(self, state: dict[str, Any]) -> dict[str, Any]:
        """A state saved under another world size (same batch size), in this loader's
        batches. Units are dealt round-robin, so after ``b`` batches on every rank the first
        ``b * batch_size * world_size`` units of the epoch were handed out; the run goes on
        at the same unit when that is a whole number of this loader's steps over all ranks."""
        saved = state.get("world_size")
        if saved in (None, self.world_size) or state.get("batch_size") != self.batch_size:
            return state  # nothing to convert, or a mismatch the caller reports
        units = int(state["batches_done"]) * self.batch_size * int(saved)
        per_batch = self.batch_size * self.world_size
        if units % per_batch:
            raise DataError(f"data loader state: {units} units were handed out on {saved} ranks, not a whole "
                            f"number of batches of {self.batch_size} on each of {self.world_size} ranks")
        return {**state, "world_size": self.world_size, "batches_done": units // per_batch}

    def _order_settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_size": self.batch_size,
                "world_size": self.world_size, "packed": self.packed, "seq_len": self.seq_len,
                "drop_last": self.drop_last, "num_samples": len(self.dataset),
                "num_tokens": self.dataset.num_tokens}

    def _plan(self, epoch: int) -> list[list]:
        """This rank's batches for ``epoch``: lists of sample indices, or of packs."""
        if self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.packed:
            units: list = [p.tolist() for p in greedy_pack(self.dataset.lengths, order, self.seq_len)]
        else:
            units = order.tolist()
        usable = len(units) // self.world_size * self.world_size
        mine = units[self.rank:usable:self.world_size]
        stop = len(mine) - len(mine) % self.batch_size if self.drop_last else len(mine)
        batches = [mine[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]
        if not batches:
            kind = "packs" if self.packed else "samples"
            raise DataError(f"{self.dataset.source}: {len(units)} {kind} are too few for world_size="
                            f"{self.world_size} and batch_size={self.batch_size}")
        self._plan_cache = (epoch, batches)
        return batches


def build_dataloader(dataset: TokenizedDataset, batch_size: int, **kwargs) -> SFTDataLoader:
    """``SFTDataLoader(dataset, batch_size, **kwargs)``; see its arguments."""
    return SFTDataLoader(dataset, batch_size, **kwargs)


class _PlanSampler(Sampler):
    """Yields the batch plans of the current epoch from the resume point; the loader
    swaps ``batches`` before each iteration (persistent workers keep running)."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Collator(Dataset):
    """Turns one batch plan into a batch; runs in the DataLoader workers."""

    def __init__(self, dataset: TokenizedDataset, packed: bool, seq_len: int,
                 pad_to_multiple_of: Optional[int]):
        self.dataset, self.packed, self.seq_len = dataset, packed, seq_len
        self.pad_to_multiple_of = pad_to_multiple_of

    def __getitem__(self, plan: list) -> dict[str, torch.Tensor]:
        ds = self.dataset
        if self.packed:
            return collate_packed([[ds[i] for i in pack] for pack in plan], ds.pad_id, self.seq_len)
        return collate_padded([ds[i] for i in plan], ds.pad_id, self.pad_to_multiple_of)
