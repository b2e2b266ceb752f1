"""Checkpoints of a training run: writing them (one process, or sharded under FSDP),
the model files inside them (the ``Method`` decides which), and putting a run back
where a checkpoint left it."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fastune import distributed
from fastune.config.sections import DistributedSection
from fastune.training import checkpointer
from fastune.training.loggers import MetricLogger
from fastune.methods.method import Method
from fastune.training.run import TrainingRun

log = logging.getLogger(__name__)


def save_checkpoint(run: TrainingRun, logger: MetricLogger, name: str) -> Path:
    """Write ``output_dir/name`` (see ``fastune.training.checkpointer``) and tell the logger."""
    cfg = run.cfg
    progress = {
        "epochs_run": run.epoch, "step_in_epoch": run.step_in_epoch, "global_step": run.global_step,
        "total_epochs": cfg.epochs, "max_steps_per_epoch": cfg.max_steps_per_epoch,
        "seed": cfg.seed, "method": run.method.name,
    }
    training_state = {
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "rng": checkpointer.rng_state(),
        "dataloader": run.train_loader.state_dict(),
    }
    if run.scaler is not None:
        training_state["grad_scaler"] = {**run.scaler.state_dict(), "skipped_steps": run.skipped_steps}
    log.info("saving checkpoint %s", Path(cfg.output_dir) / name)  # merging and writing take a while
    if run.world is not None:
        return _save_sharded_checkpoint(run, logger, name, training_state, progress)
    started = time.perf_counter()
    training_state["optimizer"] = run.optimizer.state_dict()
    path = checkpointer.save_checkpoint(
        Path(cfg.output_dir), name, lambda folder: write_model_files(run, folder),
        training_state, progress, cfg.keep_last_n,
    )
    log.info("saved %s in %.1f s", path, time.perf_counter() - started)
    logger.log_checkpoint(path, progress)
    return path


def _save_sharded_checkpoint(run: TrainingRun, logger: MetricLogger, name: str, training_state: dict,
                             progress: dict) -> Path:
    """Under FSDP: the optimizer and trainable weights as DCP shards (in the checkpoint's
    ``distributed_checkpoint/``), every rank's RNG state, and the export gathered to rank 0
    and written by ``write_model_files`` (see ``fastune.distributed.CheckpointSaver``)."""
    cfg = run.cfg
    training_state["rng_by_rank"] = distributed.gather_objects(training_state["rng"], run.world)
    export = distributed.gather_full_state_dict(run.model, run.world,
                                                trainable_only=run.method.export_trainable_only)
    return run.saver.save(
        Path(cfg.output_dir), name, run.model, run.optimizer, lambda folder: write_model_files(run, folder, export),
        training_state, progress, cfg.keep_last_n, on_saved=lambda path: logger.log_checkpoint(path, progress),
    )


def write_model_files(run: TrainingRun, folder: Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """The model files of a checkpoint folder, as ``run.method`` says (HF weights; merged
    weights and the PEFT adapter; or the adapter only). ``state_dict``: the full state
    dict gathered from the shards of a sharded run (the model's own by default)."""
    run.method.write_model_files(run.model, folder, Path(run.cfg.model.checkpoint_dir), state_dict)


def shard_and_load_resumed(model: nn.Module, method: Method, section: DistributedSection,
                           world: distributed.World, resume: Optional[Path]) -> None:
    """Shard ``model`` and load its weights (``Method.resume_weights_dir`` says from
    where). A single-process LoRA checkpoint's adapter goes over the base, shard by
    shard; a sharded checkpoint's trainable weights come from its DCP state, read by
    ``restore_training_state``."""
    sharded_state = resume is not None and distributed.has_resume_state(resume)
    weights = method.resume_weights_dir(section.model.checkpoint_dir, resume, sharded_state)
    distributed.shard_and_load(model, method, section, world, weights)
    if resume is not None and not sharded_state:
        method.load_resumed(model, resume)


def restore_training_state(run: TrainingRun, ckpt_dir: Path, progress: dict[str, Any]) -> None:
    """Put optimizer, schedule, RNGs and data position back where ``ckpt_dir`` left them
    (the weights or adapter were loaded with the model); ``progress`` is its
    trainer_state.json."""
    state = checkpointer.load_training_state(ckpt_dir)
    if distributed.has_resume_state(ckpt_dir):  # written by a sharded run; resumes at any world size
        distributed.load_resume_state(run.model, run.optimizer, ckpt_dir)
    elif run.world is not None:  # written by one process, resumed sharded
        distributed.load_full_optimizer_state(run.model, run.optimizer, state["optimizer"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if run.scaler is not None and "grad_scaler" in state:
        scaler_state = dict(state["grad_scaler"])
        run.skipped_steps = scaler_state.pop("skipped_steps")
        run.scaler.load_state_dict(scaler_state)
    run.epoch, run.step_in_epoch = progress["epochs_run"], progress["step_in_epoch"]
    run.global_step = progress["global_step"]
    if run.step_in_epoch:  # a step checkpoint: the loader continues inside the epoch
        run.train_loader.set_epoch(run.epoch)
        run.train_loader.load_state_dict(state["dataloader"])
        batches = run.train_loader.state_dict()["batches_done"]
        accumulation = run.cfg.gradient_accumulation_steps
        if batches != run.step_in_epoch * accumulation:
            raise checkpointer.ResumeError(
                f"resume_from_checkpoint: {ckpt_dir} stopped after {run.step_in_epoch} steps and "
                f"{batches} batches per rank of this run, not {run.step_in_epoch} x "
                f"gradient_accumulation_steps={accumulation}: keep the global batch (batch_size x "
                "gradient_accumulation_steps x ranks) of the run that wrote it")
    checkpointer.set_rng_state(distributed.rng_state_for_rank(state, run.world))
    run.resumed_from = ckpt_dir
    log.info("resumed from %s: epoch %d, global step %d", ckpt_dir, run.epoch, run.global_step)
