"""Fine-tuning: ``fastune train CONFIG`` ends here, in ``train(cfg)``, on one device or,
launched by torchrun, on N ranks with FSDP2 (the sharded steps are in
``fastune.distributed``; ``world`` is None in a single process).

Read it top to bottom: ``train`` opens the process group and the metric logger;
``setup`` builds everything from the validated config (device, seed, data, the
``Method`` and the model it adapts, activation checkpointing, compile, the
``Objective``, optimizer, schedule, and the state of a resumed run); then
``fastune.training.loop.fit`` runs the loop, whose ``train_step`` is one optimizer
step. The other parts: ``training.data`` (loaders), ``training.evaluation``
(validation loss, exact match), ``training.saving`` (checkpoints and resume),
``methods.method`` (what is trained and saved), ``training.objective`` (the loss).

Metrics, logged every ``log_every_n_steps`` optimizer steps (``global_step``):

- ``loss``: that step's loss (the objective's loss over the step's normalizer: for
  SFT, summed token losses over supervised tokens, over all micro-batches and ranks);
  ``lr``; ``grad_norm``: the global gradient norm before clipping; ``epoch``; and
  the objective's own metrics.
- ``tokens_per_second``: non-padding tokens (input positions whose token is not the
  tokenizer's pad id; prompt included) per second of training-step time since the
  previous log (data loading included, evaluation and checkpointing not), summed
  over ranks. A tokenizer without a pad token pads with eos, so a trailing eos then
  counts as padding. ``tokens_per_second_supervised``: positions with a label only
  (what torchtune's tokens/s counted).
- ``peak_memory_active``/``_alloc``/``_reserved`` (GiB) on CUDA, ``peak_rss_gib`` on CPU.
- ``loss_scale`` and ``skipped_steps`` (steps skipped for an inf/NaN gradient, so far)
  with ``model.dtype: fp16`` (``fastune.training.precision``).
- ``val_loss`` (and ``exact_match``, when ``eval_exact_match`` is set) before
  training, every ``eval_every_n_steps`` (or at each epoch's end) and at the end.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from fastune import distributed
from fastune.config.sections import DataSection, DistributedSection
from fastune.checkpoint.layout import ADAPTER_DIR
from fastune.data import load_tokenizer
from fastune.data.preference import is_preference_format
from fastune.errors import ConfigError
from fastune.modules.peft import count_parameters
from fastune.training import checkpointer
from fastune.methods.build import build_model
from fastune.training.compile import apply_compile
from fastune.training.data import build_data, build_exact_match_examples
from fastune.training.loggers import build_metric_logger, check_metric_logger
from fastune.training.loop import clip_gradients, fit, steps_in_epoch, train_step
from fastune.modules.chunked import apply_chunked_mlp
from fastune.training.memory import apply_activation_checkpointing, offload_activations
from fastune.methods.method import method_from_config
from fastune.training.host_memory import keep_freed_host_memory
from fastune.training.loss import build_loss, build_token_loss
from fastune.training.memory_optim import check_optimizer_config
from fastune.training.objective import SFTObjective
from fastune.training.preference import (NEEDS_REFERENCE, PreferenceObjective, PreferenceOptions,
                                        build_reference)
from fastune.training.optim import build_lr_scheduler, build_optimizer
from fastune.training.plot import keep_history
from fastune.training.precision import build_grad_scaler, check_precision
from fastune.training.run import TrainingError, TrainingRun
from fastune.training.saving import restore_training_state, save_checkpoint, shard_and_load_resumed

log = logging.getLogger(__name__)

# Importable from here, as before the recipe was split.
__all__ = ["ADAPTER_DIR", "TrainingError", "TrainingRun", "build_data", "build_loss", "clip_gradients", "fit",
           "resolve_device", "save_checkpoint", "seed_everything", "setup", "steps_in_epoch", "train",
           "train_step"]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fine-tune as ``cfg`` (a config from ``fastune.config.load_config``) says.

    Returns the evaluation results: ``val_loss_before``/``val_loss_after`` and, with
    ``eval_exact_match``, ``exact_match_before``/``exact_match_after``.
    """
    _show_info_logs()
    check_metric_logger(cfg.metric_logger)  # a missing W&B login fails now, not after loading the model
    with distributed.process_group(cfg.device, cfg.distributed.timeout_s) as world:  # None: one process
        if world is not None and not world.is_main:
            logging.getLogger("fastune").setLevel(logging.WARNING)  # INFO lines from rank 0 only
        run = setup(cfg)
        with keep_history(build_metric_logger(cfg.metric_logger, cfg), cfg.output_dir) as logger:  # closed on any exit
            return fit(run, logger)


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def _show_info_logs() -> None:
    """Show fastune's INFO lines (parameter counts, dataset sizes, results), unless the
    application has configured logging itself."""
    package = logging.getLogger("fastune")
    if package.handlers or logging.getLogger().handlers:
        return
    package.addHandler(_TqdmHandler())
    package.setLevel(logging.INFO)


# ----------------------------------------------------------------------------- setup


def setup(cfg: DictConfig) -> TrainingRun:
    world = distributed.current_world(cfg.device)
    device = world.device if world is not None else resolve_device(cfg.device)
    method = method_from_config(cfg)
    output_dir = Path(cfg.output_dir)
    resume = checkpointer.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    if resume is None:
        _refuse_to_overwrite(output_dir)
    else:
        progress = checkpointer.read_trainer_state(resume)
        if not method.wrote(progress.get("method")):
            raise checkpointer.ResumeError(
                f"resume_from_checkpoint: {resume} was written by a method={progress.get('method')} run, "
                f"this run has method={method.name}"
            )
    check_precision(cfg.model.dtype, method.lora is None, device)
    check_optimizer_config(cfg, sharded=world is not None)
    seed_everything(cfg.seed)
    if device.type == "cpu" and cfg.host_memory == "keep":
        keep_freed_host_memory()

    _check_objective(cfg, method, world)
    # Data first: a bad dataset fails in seconds, before a model is loaded.
    tokenizer = load_tokenizer(cfg.tokenizer)
    data = DataSection.from_config(cfg)
    train_loader, val_loader = build_data(data, tokenizer, device, world)
    exact_match_examples = build_exact_match_examples(data, tokenizer)
    steps_per_epoch = steps_in_epoch(train_loader, cfg)

    # One process: the base weights (a resumed full run: its own), adapted by the method,
    # then a resumed run's adapter. Sharded: built on the meta device; sharded and
    # loaded once AC and compile are in place.
    model_dir = Path(cfg.model.checkpoint_dir)
    if world is None:
        model = build_model(method.weights_dir(model_dir, resume), method, cfg.model.dtype, device,
                            kernels=list(cfg.model.kernels))
        if resume is not None:
            method.load_resumed(model, resume)
    else:
        model = build_model(model_dir, method, cfg.model.dtype, kernels=list(cfg.model.kernels), weights="meta")
    trainable, total = count_parameters(model)
    log.info("%s: %s trainable of %s parameters (%.3f%%)", method.name,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    # The reference (a frozen copy for full fine-tuning) is taken before AC and compile.
    reference = build_reference(method, model) if cfg.objective in NEEDS_REFERENCE else None
    apply_chunked_mlp(model, cfg.get("chunked_mlp"))
    apply_activation_checkpointing(model, _ac_mode(cfg.activation_checkpointing))
    if cfg.objective == "sft":
        loss_fn = build_loss(model, cfg.loss)
    else:
        loss_fn = build_token_loss(model, cfg.loss.chunk_size)
    if cfg.compile:
        loss_fn = apply_compile(model, loss_fn)
    if cfg.objective == "sft":
        objective = SFTObjective(loss_fn)
    else:
        objective = PreferenceObjective(cfg.objective, loss_fn, PreferenceOptions.from_config(cfg.preference),
                                        reference)
    if world is not None:
        shard_and_load_resumed(model, method, DistributedSection.from_config(cfg), world, resume)

    optimizer = build_optimizer(_plain(cfg.optimizer), model, device,
                                method.lora.lora_plus_lr_ratio if method.lora is not None else None,
                                in_backward=cfg.optimizer_in_backward)
    lr_scheduler = build_lr_scheduler(_plain(cfg.lr_scheduler), optimizer, cfg.epochs * steps_per_epoch)
    run = TrainingRun(
        cfg=cfg, device=device, method=method, model=model, objective=objective, optimizer=optimizer,
        lr_scheduler=lr_scheduler, tokenizer=tokenizer, train_loader=train_loader,
        val_loader=val_loader, exact_match_examples=exact_match_examples,
        steps_per_epoch=steps_per_epoch,
        forward_context=offload_activations(device, cfg.activation_offloading, model=model),
        world=world,
        saver=None if world is None else distributed.CheckpointSaver(world, cfg.distributed.async_save,
                                                                      commit=checkpointer.save_checkpoint),
        scaler=build_grad_scaler(cfg.model.dtype, device),
    )
    if resume is not None:
        restore_training_state(run, resume, progress)
    return run


def _check_objective(cfg: DictConfig, method, world) -> None:
    """A preference objective needs a preference dataset format and padded pairs, and
    the reverse; checked before anything is loaded."""
    data = cfg.dataset
    if "_component_" in data:
        return
    preference = is_preference_format(data.format)
    if (cfg.objective != "sft") != preference:
        need = "a preference format (preference, chat_preference)" if cfg.objective != "sft" else "an SFT format"
        raise ConfigError(f"dataset.format: {data.format} does not fit objective={cfg.objective}; it needs {need}")
    if preference and data.packed:
        raise ConfigError("dataset.packed: preference pairs are not packed; set dataset.packed=false")
    if cfg.objective in NEEDS_REFERENCE and world is not None and method.lora is None:
        raise ConfigError(f"objective: {cfg.objective} with method=full needs a reference copy, not built "
                          "on the sharded path yet; use a LoRA method or one process")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: cuda asked for, but torch sees no CUDA device; use device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


def _refuse_to_overwrite(output_dir: Path) -> None:
    """A fresh run would write step_N/epoch_N over an earlier run's checkpoints."""
    existing = checkpointer.checkpoint_dirs(output_dir)
    if existing:
        raise TrainingError(
            f"output_dir: {output_dir} already holds checkpoints ({existing[-1].name}); "
            "continue that run with resume_from_checkpoint=auto, or pick another output_dir"
        )


def _ac_mode(value) -> Optional[str]:
    return "full" if value is True else (value or None)


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)
