"""``TrainingRun``: everything the loop reads and updates, built by
``fastune.training.recipe.setup``."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from fastune import distributed
from fastune.data import SFTDataLoader
from fastune.errors import FastuneError
from fastune.methods.method import Method
from fastune.training.objective import Objective


class TrainingError(FastuneError):
    """A run that cannot start or go on as configured (one line, names the key or path)."""


@dataclasses.dataclass
class TrainingRun:
    """Everything the loop reads and updates."""

    cfg: DictConfig
    device: torch.device
    method: Method
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    tokenizer: Any
    train_loader: SFTDataLoader
    val_loader: Optional[SFTDataLoader]
    exact_match_examples: Optional[list[tuple[list[int], str]]]
    steps_per_epoch: int  # as planned from epoch 0 (packed epochs may differ a little)
    forward_context: AbstractContextManager
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0  # optimizer steps done in total
    resumed_from: Optional[Path] = None
    world: Optional[distributed.World] = None  # None: a single process
    saver: Optional[distributed.CheckpointSaver] = None  # checkpoints of a sharded run
    scaler: Optional[torch.amp.GradScaler] = None  # dynamic loss scaling of an fp16 run
    skipped_steps: int = 0  # fp16: optimizer steps skipped for an inf/NaN gradient

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch
