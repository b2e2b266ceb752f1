"""``CheckpointSaver``: checkpoints of a sharded run, written by every rank (DCP shards,
optionally in the background) and put in place by rank 0."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastune.distributed.resume import DCP_DIR, _resume_state
from fastune.distributed.world import World, gather_objects


@dataclasses.dataclass
class _Pending:
    """A checkpoint whose files are staged; rank 0 renames it into place once DCP is done."""

    future: Optional[Future]
    finish: Callable[[], None]
    finished: bool = False


class CheckpointSaver:
    """Saves checkpoints of a sharded run; ``wait()`` before the process ends.

    Per save, every rank: gathers the export state (the recipe does it), writes its
    DCP shards into a hidden staging folder (in the background with ``async_save``,
    from a CPU copy taken first, on a separate gloo group so its collectives never
    interleave with training's). Rank 0 writes the export into the staging folder
    first and, once the DCP files are complete, hands everything to ``commit`` (the
    training's ``save_checkpoint``: same arguments), which renames the folder into
    place atomically and prunes old checkpoints.
    """

    def __init__(self, world: World, async_save: bool = False, *, commit: Callable[..., Path]):
        self.world = world
        self.async_save = async_save
        self.commit = commit
        self._pending: Optional[_Pending] = None
        self._group = None

    def save(
        self,
        output_dir: Path,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        write_export: Callable[[Path], None],
        training_state: dict[str, Any],
        progress: dict[str, Any],
        keep_last_n: Optional[int],
        on_saved: Callable[[Path], None],
    ) -> Path:
        """Write ``output_dir/name``: ``write_export(folder)`` runs on rank 0 only, into an
        empty folder; ``training_state``, ``progress`` as in a single-process checkpoint
        (``training_state`` without the optimizer, which is in the DCP files).
        ``on_saved(path)`` runs on rank 0 once the checkpoint is in place."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save in flight at a time; DCP staging memory is reused
        output_dir = Path(output_dir)
        staging = output_dir / f".{name}.staging-{self._job_token()}"
        if self.world.is_main:
            staging.mkdir(parents=True)
            write_export(staging)  # before the DCP files: the HF writer replaces the folder wholesale
        dist.barrier()
        state = _resume_state(model, optimizer)
        target = str(staging / DCP_DIR)
        if self.async_save:
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, checkpoint_id=target, process_group=self._group)
        else:
            dcp.save(state, checkpoint_id=target)
            future = None
        frozen = copy.deepcopy(training_state)  # the loop moves on while an async save is in flight

        def finish() -> None:
            if not self.world.is_main:
                return
            path = self.commit(output_dir, name, lambda folder: _move_contents(staging, folder),
                               frozen, progress, keep_last_n)
            shutil.rmtree(staging, ignore_errors=True)
            on_saved(path)

        self._pending = _Pending(future, finish)
        if not self.async_save:
            self.wait()
        return output_dir / name

    def wait(self) -> None:
        """Finish the save in flight, if any (rank 0 renames it into place)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
            # Rank 0's DCP save ends after every rank reported its files written; the
            # barrier also keeps the ranks in step before the next save's collectives.
            dist.barrier(group=self._group)
        if not pending.finished:
            pending.finish()

    def finish_if_done(self) -> None:
        """Rank 0, after each step: put a background save whose files are all written in
        place now, so that a crash before the next save cannot leave it staged where
        resume never looks. ``wait()`` still runs the barrier that keeps ranks in step."""
        pending = self._pending
        if (self.world.is_main and pending is not None and not pending.finished
                and pending.future is not None and pending.future.done()
                and pending.future.exception() is None):
            pending.finished = True
            pending.finish()

    def _job_token(self) -> str:
        """A name all ranks agree on for this save's staging folder."""
        return gather_objects(uuid.uuid4().hex[:8] if self.world.is_main else None, self.world)[0]


def _move_contents(source: Path, dest: Path) -> None:
    for entry in source.iterdir():
        os.replace(entry, dest / entry.name)
