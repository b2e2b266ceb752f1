"""The resume state of a sharded run: trainable parameters and optimizer state as a DCP
checkpoint (``distributed_checkpoint/`` in the checkpoint folder), resharded on load
for any number of ranks; and a single-process checkpoint's state sharded into a
sharded run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastune.checkpoint.layout import DCP_DIR, ResumeError
from fastune.errors import FastuneError
from fastune.distributed.loading import _dcp_load
from fastune.distributed.world import World

def has_resume_state(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DCP_DIR).is_dir()


def _resume_options():
    """Trainable parameters only: frozen weights (the base under LoRA, NF4 included) come
    from the HF checkpoint. ``strict=False`` as the frozen keys are absent; ``dcp.load``
    still fails on a missing trainable key, since it loads exactly the keys asked for."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _resume_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_resume_options())
    return {"model": model_state, "optimizer": optim_state}


def load_resume_state(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    """Load the trainable parameters and the optimizer state from ``ckpt_dir``'s DCP
    checkpoint, resharded for this run's ranks (or unsharded, in a single process)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fastune.checkpoint.dcp_safe import dcp_reader_kwargs

    state = _resume_state(model, optimizer)
    path = Path(ckpt_dir) / DCP_DIR
    try:
        _dcp_load(state, no_dist=not dist.is_initialized(), **dcp_reader_kwargs(path))
    except CheckpointException as e:  # a BaseException, holding each failed rank's error
        error = next(iter(e.failures.values()))[0]
        if isinstance(error, FastuneError):  # e.g. an unsafe checkpoint file: its own line
            raise error from None
        raise ResumeError(f"resume_from_checkpoint: {path} does not fit this run: {error}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_resume_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Shard a single-process run's ``optimizer.state_dict()`` into this run's optimizer.

    That state names parameters by their index in its param groups. This run's
    optimizer was built by the same ``build_optimizer`` over the same model, so the
    groups list the same parameters in the same order: the indices map to names, and
    ``set_optimizer_state_dict`` shards each full tensor as its parameter is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    groups, index_to_name = [], {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        if len(saved["params"]) != len(group["params"]):
            raise ResumeError(f"resume_from_checkpoint: the optimizer state holds {len(saved['params'])} "
                              f"parameters in a group where this run has {len(group['params'])}")
        names = [name_of[id(p)] for p in group["params"]]
        index_to_name.update(zip(saved["params"], names))
        groups.append({**saved, "params": names})
    full = {"state": {index_to_name[i]: value for i, value in state["state"].items()},
            "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full,
                             options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))


def rng_state_for_rank(training_state: dict[str, Any], world: Optional[World]) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint: its own when the world size is unchanged
    (so dropout continues exactly), rank 0's otherwise."""
    per_rank = training_state.get("rng_by_rank")
    if world is not None and per_rank is not None and len(per_rank) == world.world_size:
        return per_rank[world.rank]
    return training_state["rng"]
