"""Fine-tuning: ``fastune train CONFIG`` ends here, in ``train(cfg)``, on one device or,
launched by torchrun, on N ranks with FSDP2 (the sharded steps are in
``fastune.distributed``; ``world`` is None in a single process).

Read it top to bottom: ``setup`` builds everything from the validated config
(device, seed, model and adapters, activation checkpointing, compile, data,
optimizer, schedule, and the state of a resumed run); ``fit`` runs the loop;
``train_step`` is one optimizer step.

Loss normalization (docs/architecture.md): the loss of an optimizer step is the
sum of token losses over all of its micro-batches divided by the number of
supervised tokens in all of them, on all ranks. The step's micro-batches are
fetched first, so that count is known before the first backward.

Metrics, logged every ``log_every_n_steps`` optimizer steps (``global_step``):

- ``loss``: that step's loss, as above; ``lr``; ``grad_norm``: the global
  gradient norm before clipping; ``epoch``.
- ``tokens_per_second``: non-padding tokens (input positions whose token is not the
  tokenizer's pad id; prompt included) per second of training-step time since the
  previous log (data loading included, evaluation and checkpointing not), summed
  over ranks. A tokenizer without a pad token pads with eos, so a trailing eos then
  counts as padding. ``tokens_per_second_supervised``: positions with a label only
  (what torchtune's tokens/s counted).
- ``peak_memory_active``/``_alloc``/``_reserved`` (GiB) on CUDA, ``peak_rss_gib`` on CPU.
- ``val_loss`` (and ``exact_match``, when ``eval_exact_match`` is set) before
  training, every ``eval_every_n_steps`` (or at each epoch's end) and at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import fastune
from fastune import distributed
from fastune.checkpoint import save_hf_checkpoint
from fastune.checkpoint.hf import parse_dtype
from fastune.checkpoint.layout import ADAPTER_DIR, checkpoint_name, copy_tokenizer_files
from fastune.checkpoint.peft import load_peft_adapter, save_peft_adapter
from fastune.config import instantiate
from fastune.config.schema import COMPONENT
from fastune.data import (
    IGNORE_INDEX,
    SFTDataLoader,
    TokenizedDataset,
    build_dataloader,
    holdout_split,
    load_sft_dataset,
    load_tokenizer,
    prompt_answer_pairs,
)
from fastune.errors import FastuneError
from fastune.hub import base_model_name
from fastune.modules.peft import apply_lora, count_parameters, merge_lora
from fastune.training import checkpointer
from fastune.training.compile import apply_compile
from fastune.training.exact_match import exact_match_accuracy
from fastune.training.loss import LossFn, build_loss
from fastune.training.loggers import MetricLogger, build_metric_logger, check_metric_logger
from fastune.training.memory import (
    apply_activation_checkpointing,
    offload_activations,
    peak_memory_stats,
)
from fastune.training.optim import build_lr_scheduler, build_optimizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class TrainingError(FastuneError):
    """A run that cannot start or go on as configured (one line, names the key or path)."""


@dataclasses.dataclass
class TrainingRun:
    """Everything the loop reads and updates."""

    cfg: DictConfig
    device: torch.device
    model: nn.Module
    loss_fn: LossFn
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

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch


def train(cfg: DictConfig) -> dict[str, float]:
    """Fine-tune as ``cfg`` (a config from ``fastune.config.load_config``) says.

    Returns the evaluation results: ``val_loss_before``/``val_loss_after`` and, with
    ``eval_exact_match``, ``exact_match_before``/``exact_match_after``.
    """
    _show_info_logs()
    check_metric_logger(cfg)  # a missing W&B login fails now, not after loading the model
    with distributed.process_group(cfg.device, cfg.distributed.timeout_s) as world:  # None: one process
        if world is not None and not world.is_main:
            logging.getLogger("fastune").setLevel(logging.WARNING)  # INFO lines from rank 0 only
        run = setup(cfg)
        with build_metric_logger(cfg) as logger:  # closed (wandb.finish) on any exit
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
    output_dir = Path(cfg.output_dir)
    resume = checkpointer.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    if resume is None:
        _refuse_to_overwrite(output_dir)
    else:
        progress = checkpointer.read_trainer_state(resume)
        if progress.get("method") != cfg.method:
            raise checkpointer.ResumeError(
                f"resume_from_checkpoint: {resume} was written by a method={progress.get('method')} run, "
                f"this run has method={cfg.method}"
            )
    seed_everything(cfg.seed)

    # Data first: a bad dataset fails in seconds, before a model is loaded.
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_loader, val_loader = build_data(cfg, tokenizer, device, world)
    exact_match_examples = build_exact_match_examples(cfg, tokenizer)
    steps_per_epoch = steps_in_epoch(train_loader, cfg)

    # Sharded: built on the meta device; sharded and loaded once AC and compile are in place.
    model = load_model(cfg, device, resume) if world is None else distributed.build_meta_model(cfg)
    trainable, total = count_parameters(model)
    log.info("%s: %s trainable of %s parameters (%.3f%%)", cfg.method,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    apply_activation_checkpointing(model, _ac_mode(cfg.activation_checkpointing))
    loss_fn = build_loss(model, cfg.loss)
    if cfg.compile:
        loss_fn = apply_compile(model, loss_fn)
    if world is not None:
        shard_and_load_resumed(model, cfg, world, resume)

    optimizer = build_optimizer(_plain(cfg.optimizer), model, device)
    lr_scheduler = build_lr_scheduler(_plain(cfg.lr_scheduler), optimizer, cfg.epochs * steps_per_epoch)
    run = TrainingRun(
        cfg=cfg, device=device, model=model, loss_fn=loss_fn, optimizer=optimizer,
        lr_scheduler=lr_scheduler, tokenizer=tokenizer, train_loader=train_loader,
        val_loader=val_loader, exact_match_examples=exact_match_examples,
        steps_per_epoch=steps_per_epoch,
        forward_context=offload_activations(device, cfg.activation_offloading, model=model),
        world=world,
        saver=None if world is None else distributed.CheckpointSaver(world, cfg.distributed.async_save,
                                                                          commit=checkpointer.save_checkpoint),
    )
    if resume is not None:
        restore_training_state(run, resume, progress)
    return run


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


def load_model(cfg: DictConfig, device: torch.device, resume: Optional[Path]) -> nn.Module:
    """The base model in the training dtype, with adapters for LoRA methods.

    Full fine-tuning resumes from the checkpoint's own weights. LoRA methods load the
    base weights, add adapters (A random, B zero; DoRA magnitudes from the loaded
    weights; NF4 base for QLoRA), and on resume load the checkpoint's adapter over them.
    """
    dtype = parse_dtype(cfg.model.dtype)
    source = resume if (resume is not None and cfg.method == "full") else cfg.model.checkpoint_dir
    model = fastune.from_pretrained(source, dtype=dtype, device=device, kernels=list(cfg.model.kernels))
    if cfg.method == "full":
        return model
    lora = cfg.lora
    apply_lora(model, list(lora.targets), lora.rank, lora.alpha, lora.dropout,
               use_dora=cfg.method == "dora", quantize_base=cfg.method == "qlora")
    if resume is not None:
        load_peft_adapter(model, resume / ADAPTER_DIR)
    return model


def _ac_mode(value) -> Optional[str]:
    return "full" if value is True else (value or None)


def _plain(node: DictConfig) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# ----------------------------------------------------------------------------- data


def build_data(cfg: DictConfig, tokenizer, device: torch.device, world: Optional[distributed.World] = None,
               ) -> tuple[SFTDataLoader, Optional[SFTDataLoader]]:
    """(train loader, validation loader or None) for ``cfg.dataset``: the built-in
    loader (source / data_files, format, ...) or a ``_component_`` called with the
    tokenizer that returns a ``TokenizedDataset``. Under torchrun each rank gets its
    own share of both splits."""
    data = cfg.dataset
    if COMPONENT in data:
        train_set, val_set = instantiate(data, tokenizer=tokenizer), None
    else:
        # Both splits' files are looked up before either is read, so a missing one fails fast.
        train_source = _split_source(data, data.split)
        val_source = None if data.val_split is None else _split_source(data, data.val_split)
        train_set = _load_split(data, train_source, tokenizer)
        val_set = None
        if val_source is not None:
            val_set = _load_split(data, val_source, tokenizer)
        elif data.val_fraction is not None:
            train_set, val_set = holdout_split(train_set, data.val_fraction, seed=cfg.seed)
    options = dict(seed=cfg.seed, packed=data.get("packed", False), num_workers=cfg.num_workers,
                   pin_memory=device.type == "cuda")
    if world is not None:
        options.update(rank=world.rank, world_size=world.world_size)
    train_loader = build_dataloader(train_set, cfg.batch_size, shuffle=data.get("shuffle", True), **options)
    val_loader = None if val_set is None else build_dataloader(val_set, cfg.batch_size, shuffle=False, **options)
    return train_loader, val_loader


def _load_split(data: DictConfig, source: tuple[str, str], tokenizer) -> TokenizedDataset:
    """One split of the built-in dataset: ``source`` is ``(path or name, split in it)``."""
    source, split_in_source = source
    return load_sft_dataset(
        source, tokenizer, format=data.format, split=split_in_source, column_map=data.column_map,
        train_on_input=data.train_on_input, max_seq_len=data.max_seq_len, truncation=data.truncation,
    )


def _split_source(data: DictConfig, split: str) -> tuple[str, str]:
    """(path or name, split in it) of a split. With ``data_files``, the split's file
    (a mapping names a file per split; a single path is the training split)."""
    files = data.data_files
    if files is None:
        return data.source, split
    if not isinstance(files, DictConfig):
        files = {"train": files}
    if split not in files:
        raise TrainingError(f"dataset.data_files: no file for split {split!r} (has {', '.join(files)})")
    chosen = files[split]
    if not isinstance(chosen, str):
        if len(chosen) != 1:
            raise TrainingError(f"dataset.data_files.{split}: give one file per split, got {len(chosen)}")
        chosen = chosen[0]
    return chosen, "train"  # a single file holds one split, which `datasets` calls train


def build_exact_match_examples(cfg: DictConfig, tokenizer) -> Optional[list[tuple[list[int], str]]]:
    """(prompt ids, expected answer) pairs for exact-match evaluation, or None when off."""
    em = cfg.eval_exact_match
    if em.source is None:
        return None
    pairs = prompt_answer_pairs(em.source, tokenizer, format=cfg.dataset.format,
                                column_map=cfg.dataset.get("column_map"))
    return pairs[:em.max_examples] if em.max_examples else pairs


# ----------------------------------------------------------------------------- resume


def shard_and_load_resumed(model: nn.Module, cfg: DictConfig, world: distributed.World,
                           resume: Optional[Path]) -> None:
    """Shard ``model`` and load its weights: from the base checkpoint, except for full
    fine-tuning resumed from a checkpoint (its own weights: in its DCP state when a
    sharded run wrote it, read by ``restore_training_state``; else its HF files). A
    single-process LoRA checkpoint's adapter goes over the base, shard by shard."""
    sharded_state = resume is not None and distributed.has_resume_state(resume)
    if resume is not None and cfg.method == "full":
        weights = None if sharded_state else resume
    else:
        weights = Path(cfg.model.checkpoint_dir)
    distributed.shard_and_load(model, cfg, world, weights)
    if resume is not None and cfg.method != "full" and not sharded_state:
        load_peft_adapter(model, resume / ADAPTER_DIR)


def steps_in_epoch(loader: SFTDataLoader, cfg: DictConfig) -> int:
    """Optimizer steps in the loader's current epoch. With packing the number of packs,
    so of steps, changes a little from one shuffled epoch to the next."""
    steps = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    return steps if cfg.max_steps_per_epoch is None else min(steps, cfg.max_steps_per_epoch)


def restore_training_state(run: TrainingRun, ckpt_dir: Path, progress: dict[str, Any]) -> None:
    """Put optimizer, schedule, RNGs and data position back where ``ckpt_dir`` left them
    (the weights or adapter were loaded by ``load_model``); ``progress`` is its
    trainer_state.json."""
    state = checkpointer.load_training_state(ckpt_dir)
    if distributed.has_resume_state(ckpt_dir):  # written by a sharded run; resumes at any world size
        distributed.load_resume_state(run.model, run.optimizer, ckpt_dir)
    elif run.world is not None:  # written by one process, resumed sharded
        distributed.load_full_optimizer_state(run.model, run.optimizer, state["optimizer"])
    else:
        run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
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


# ----------------------------------------------------------------------------- the loop


def fit(run: TrainingRun, logger: MetricLogger) -> dict[str, float]:
    cfg = run.cfg
    results: dict[str, float] = {}
    if run.resumed_from is None:
        before = evaluate(run, logger)
        if before:
            log.info("before training: %s", ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
        results.update({f"{k}_before": v for k, v in before.items()})
    accumulation = cfg.gradient_accumulation_steps
    meter = ThroughputMeter(run.tokenizer.pad_id)
    bar = tqdm(total=run.total_steps, initial=run.global_step, unit="step", dynamic_ncols=True,
               disable=run.world is not None and not run.world.is_main)
    try:
        while run.epoch < cfg.epochs:
            if run.step_in_epoch == 0:
                run.train_loader.set_epoch(run.epoch)
            epoch_steps = steps_in_epoch(run.train_loader, cfg)
            batches = iter(run.train_loader)
            while run.step_in_epoch < epoch_steps:
                started = time.perf_counter()
                micro_batches = list(itertools.islice(batches, accumulation))
                if not micro_batches:
                    break
                lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
                loss, grad_norm = train_step(run, micro_batches)
                meter.add(micro_batches, time.perf_counter() - started)
                run.global_step += 1
                run.step_in_epoch += 1
                bar.update(1)
                end_of_epoch = run.step_in_epoch == epoch_steps
                last_step = end_of_epoch and run.epoch == cfg.epochs - 1
                if run.global_step % cfg.log_every_n_steps == 0 or end_of_epoch:
                    log_step(run, logger, bar, loss, lr, grad_norm, meter)
                if _every(cfg.eval_every_n_steps, run.global_step) and not last_step:  # evaluated below
                    evaluate(run, logger)
                if _every(cfg.save_every_n_steps, run.global_step) and not end_of_epoch:
                    save_checkpoint(run, logger, checkpoint_name("step", run.global_step))
                elif run.saver is not None:
                    run.saver.finish_if_done()
            run.epoch += 1
            run.step_in_epoch = 0
            if not cfg.eval_every_n_steps and run.epoch < cfg.epochs:
                evaluate(run, logger)
            save_checkpoint(run, logger, checkpoint_name("epoch", run.epoch - 1))
        if run.saver is not None:
            run.saver.wait()  # an async save still in flight
    finally:
        bar.close()
    results.update({f"{k}_after": v for k, v in evaluate(run, logger).items()})
    _report(results)
    return results


def _every(interval: Optional[int], step: int) -> bool:
    return bool(interval) and step % interval == 0


def train_step(run: TrainingRun, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``micro_batches``; returns (step loss, grad norm) as tensors
    (read them only when logging: ``.item()`` waits for the device)."""
    model, cfg = run.model, run.cfg
    model.train()
    supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    if run.world is not None:  # the whole step's count: every rank divides by the same number
        supervised = int(distributed.sum_over_ranks(torch.tensor(supervised, dtype=torch.float64), run.world))
    denominator = max(supervised, 1)  # an all-masked step contributes zero gradient, not NaN
    step_loss = torch.zeros((), device=run.device)
    for batch in micro_batches:
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        with run.forward_context:
            hidden = model(batch["tokens"], position_ids=batch.get("position_ids"),
                           document_ids=batch.get("document_ids"), return_hidden=True)
        loss_sum, _ = run.loss_fn(hidden, batch["labels"])
        (loss_sum / denominator).backward()
        step_loss += loss_sum.detach()
    step_loss = distributed.sum_over_ranks(step_loss, run.world)
    grad_norm = clip_gradients(model, cfg.clip_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss / denominator, grad_norm


def clip_gradients(model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (if set); the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if isinstance(norm, DTensor):  # FSDP: partial norms of the shards, reduced over ranks here
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class ThroughputMeter:
    """Tokens and seconds of training steps (data loading included; evaluation and
    checkpointing excluded) since the last ``rates()`` call."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.seconds = 0.0
        self.tokens = self.supervised = 0

    def add(self, micro_batches: list[Batch], seconds: float) -> None:
        self.seconds += seconds
        for batch in micro_batches:
            self.tokens += int((batch["tokens"] != self.pad_id).sum())
            self.supervised += int((batch["labels"] != IGNORE_INDEX).sum())

    def rates(self, world: Optional[distributed.World] = None) -> dict[str, float]:
        """Every rank must call it under torchrun (the counts are summed over ranks)."""
        seconds = max(self.seconds, 1e-9)
        counts = torch.tensor([self.tokens, self.supervised], dtype=torch.float64)
        tokens, supervised = distributed.sum_over_ranks(counts, world).tolist()
        rates = {"tokens_per_second": tokens / seconds, "tokens_per_second_supervised": supervised / seconds}
        self.seconds, self.tokens, self.supervised = 0.0, 0, 0
        return rates




def log_step(run: TrainingRun, logger: MetricLogger, bar: tqdm, loss: torch.Tensor, lr: float,
             grad_norm: torch.Tensor, meter: ThroughputMeter) -> None:
    metrics = {
        "loss": loss.item(),
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "global_step": run.global_step,
        "epoch": run.epoch,
        **meter.rates(run.world),
    }
    if run.cfg.log_peak_memory_stats:
        metrics.update(peak_memory_stats(run.device))
    logger.log_dict(metrics, step=run.global_step)
    bar.set_description(f"epoch {run.epoch + 1}/{run.cfg.epochs}")
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                    tok_s=f"{metrics['tokens_per_second']:.0f}")


# ----------------------------------------------------------------------------- evaluation


def evaluate(run: TrainingRun, logger: MetricLogger) -> dict[str, float]:
    """Validation loss (and exact-match accuracy, if configured), logged at the current step."""
    results = {}
    if run.val_loader is not None:
        results["val_loss"] = validation_loss(run)
    if run.exact_match_examples:
        results["exact_match"] = exact_match_accuracy(
            run.model, run.tokenizer, run.exact_match_examples, run.cfg.eval_exact_match.max_new_tokens)
    if results:
        logger.log_dict(results, step=run.global_step)
    return results


@torch.no_grad()
def validation_loss(run: TrainingRun) -> float:
    """Summed token loss over the whole validation split / its supervised tokens (every
    rank's share, under torchrun)."""
    run.model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss, supervised tokens
    for batch in run.val_loader:
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        hidden = run.model(batch["tokens"], position_ids=batch.get("position_ids"),
                           document_ids=batch.get("document_ids"), return_hidden=True)
        loss_sum, n = run.loss_fn(hidden, batch["labels"])
        sums += torch.stack([loss_sum.double(), n.double()])
    run.model.train()
    total, count = distributed.sum_over_ranks(sums, run.world).tolist()
    return total / max(count, 1)


def _report(results: dict[str, float]) -> None:
    for name in ("val_loss", "exact_match"):
        if f"{name}_after" in results:
            before = results.get(f"{name}_before")
            shown = f"{before:.4f} -> " if before is not None else ""
            log.info("%s: %s%.4f", name, shown, results[f"{name}_after"])


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: TrainingRun, logger: MetricLogger, name: str) -> Path:
    """Write ``output_dir/name`` (see ``fastune.training.checkpointer``) and tell the logger."""
    cfg = run.cfg
    progress = {
        "epochs_run": run.epoch, "step_in_epoch": run.step_in_epoch, "global_step": run.global_step,
        "total_epochs": cfg.epochs, "max_steps_per_epoch": cfg.max_steps_per_epoch,
        "seed": cfg.seed, "method": cfg.method,
    }
    training_state = {
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "rng": checkpointer.rng_state(),
        "dataloader": run.train_loader.state_dict(),
    }
    if run.world is not None:
        return _save_sharded_checkpoint(run, logger, name, training_state, progress)
    training_state["optimizer"] = run.optimizer.state_dict()
    path = checkpointer.save_checkpoint(
        Path(cfg.output_dir), name, lambda folder: write_model_files(run, folder),
        training_state, progress, cfg.keep_last_n,
    )
    logger.log_checkpoint(path, progress)
    return path


def _save_sharded_checkpoint(run: TrainingRun, logger: MetricLogger, name: str, training_state: dict,
                             progress: dict) -> Path:
    """Under FSDP: the optimizer and trainable weights as DCP shards (in the checkpoint's
    ``distributed_checkpoint/``), every rank's RNG state, and the export gathered to rank 0
    and written by ``write_model_files`` (see ``fastune.distributed.CheckpointSaver``)."""
    cfg = run.cfg
    training_state["rng_by_rank"] = distributed.gather_objects(training_state["rng"], run.world)
    adapter_only = cfg.method != "full" and cfg.save_adapter_weights_only
    export = distributed.gather_full_state_dict(run.model, run.world, trainable_only=adapter_only)
    return run.saver.save(
        Path(cfg.output_dir), name, run.model, run.optimizer, lambda folder: write_model_files(run, folder, export),
        training_state, progress, cfg.keep_last_n, on_saved=lambda path: logger.log_checkpoint(path, progress),
    )


def write_model_files(run: TrainingRun, folder: Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """The model in HF format (merged, for LoRA methods) and, for LoRA methods, the PEFT
    adapter in ``folder/adapter``. ``state_dict``: the full state dict gathered from the
    shards of a sharded run (the model's own by default).

    The adapter gets its own folder because transformers' ``from_pretrained`` treats
    a folder holding ``adapter_config.json`` as an adapter: it would load the base
    model named there and apply the adapter, and with the merged weights beside it
    apply the update twice, silently.
    """
    cfg, model = run.cfg, run.model
    source = cfg.model.checkpoint_dir
    if cfg.method == "full":
        save_hf_checkpoint(model if state_dict is None else state_dict, model.config, folder, source_dir=source)
        return
    if cfg.save_adapter_weights_only:
        copy_tokenizer_files(Path(source), folder)
    else:
        save_hf_checkpoint(merge_lora(model, state_dict), model.config, folder, source_dir=source)
    save_peft_adapter(model, folder / ADAPTER_DIR, base_model_name_or_path=base_model_name(Path(source)),
                      state_dict=state_dict)

