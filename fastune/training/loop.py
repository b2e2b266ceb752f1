"""The training loop: ``fit`` runs the epochs, ``train_step`` is one optimizer step.

Loss normalization (docs/architecture.md): the loss of an optimizer step is the sum of
the objective's losses over all of its micro-batches divided by its normalizer
summed over all of them, on all ranks (for SFT: supervised tokens). The step's
micro-batches are fetched first, so that count is known before the first backward.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from fastune.checkpoint.layout import checkpoint_name
from fastune import distributed
from fastune.data import IGNORE_INDEX, SFTDataLoader
from fastune.training.evaluation import evaluate, report
from fastune.training.loggers import MetricLogger
from fastune.training.memory_optim import OptimizerInBackward
from fastune.training.memory import peak_memory_stats
from fastune.training.objective import Batch
from fastune.training.outputs import report_outputs
from fastune.training.plot import HistoryLogger
from fastune.training.run import TrainingRun
from fastune.training.saving import save_checkpoint

log = logging.getLogger(__name__)


def steps_in_epoch(loader: SFTDataLoader, cfg) -> int:
    """Optimizer steps in the loader's current epoch. With packing the number of packs,
    so of steps, changes a little from one shuffled epoch to the next."""
    steps = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    return steps if cfg.max_steps_per_epoch is None else min(steps, cfg.max_steps_per_epoch)


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
               desc=epoch_label(run), disable=run.world is not None and not run.world.is_main)
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
                # The rate this step uses; float(): torchao's optimizers hold it as a tensor that
                # the scheduler fills in place.
                lr = float(run.optimizer.param_groups[0]["lr"])
                loss, grad_norm, metrics = train_step(run, micro_batches)
                meter.add(micro_batches, time.perf_counter() - started)
                run.global_step += 1
                run.step_in_epoch += 1
                bar.update(1)
                end_of_epoch = run.step_in_epoch == epoch_steps
                last_step = end_of_epoch and run.epoch == cfg.epochs - 1
                if run.global_step % cfg.log_every_n_steps == 0 or end_of_epoch:
                    log_step(run, logger, bar, loss, lr, grad_norm, meter, metrics)
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
    report(results)
    if run.world is None or run.world.is_main:
        report_outputs(Path(cfg.output_dir), chart=logger.draw() if isinstance(logger, HistoryLogger) else None)
    return results


def _every(interval: Optional[int], step: int) -> bool:
    return bool(interval) and step % interval == 0


def train_step(run: TrainingRun, micro_batches: list[Batch]
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over ``micro_batches``; returns (step loss, grad norm, the
    objective's metrics) as tensors (read them only when logging: ``.item()`` waits for
    the device). Loss and metrics are divided by the step's normalizer."""
    model, cfg, objective = run.model, run.cfg, run.objective
    model.train()
    # Counted on the host, before the batches move: each micro-batch's count also goes to
    # its objective call, so that nothing in forward or backward reads the device.
    counts = [objective.normalizer(b) for b in micro_batches]
    normalizer = sum(counts)
    if run.world is not None:  # the whole step's count: every rank divides by the same number
        normalizer = int(distributed.sum_over_ranks(torch.tensor(normalizer, dtype=torch.float64), run.world))
    denominator = max(normalizer, 1)  # an all-masked step contributes zero gradient, not NaN
    scaler = getattr(run, "scaler", None)  # fp16 only; stand-in runs built by hand may not carry the field
    step_loss = torch.zeros((), device=run.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for batch, count in zip(micro_batches, counts):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        loss_sum, _, metrics = objective(model, batch, run.forward_context, count)
        scaled = loss_sum / denominator
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        step_loss += loss_sum.detach()
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
    step_loss = distributed.sum_over_ranks(step_loss, run.world)
    if metric_sums:
        names = sorted(metric_sums)
        totals = distributed.sum_over_ranks(torch.stack([metric_sums[n] for n in names]), run.world)
        metric_sums = {n: t / denominator for n, t in zip(names, totals)}
    if scaler is not None:
        grad_norm = _scaled_step(run)
    else:
        in_backward = isinstance(run.optimizer, OptimizerInBackward)  # clipping refused there
        grad_norm = run.optimizer.take_grad_norm() if in_backward else clip_gradients(model, cfg.clip_grad_norm)
        run.optimizer.step()  # in backward: a no-op (the hooks stepped), which the scheduler expects
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss / denominator, grad_norm, metric_sums


def _scaled_step(run: TrainingRun) -> torch.Tensor:
    """fp16: unscale, clip, and step unless a gradient is inf or NaN; then the scaler
    halves its scale (or grows it after enough good steps). A skipped step is counted;
    the schedule goes on, so the run's learning rates do not depend on the skips."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_gradients(run.model, run.cfg.clip_grad_norm)
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.scaler.get_scale() < scale:  # the scaler backs off exactly when it found inf/NaN
        run.skipped_steps += 1
    return grad_norm


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
        for batch in micro_batches:  # preference pairs: chosen_* and rejected_* fields
            for name, values in batch.items():
                if name == "tokens" or name.endswith("_tokens"):
                    self.tokens += int((values != self.pad_id).sum())
                elif name == "labels" or name.endswith("_labels"):
                    self.supervised += int((values != IGNORE_INDEX).sum())

    def rates(self, world: Optional[distributed.World] = None) -> dict[str, float]:
        """Every rank must call it under torchrun (the counts are summed over ranks)."""
        seconds = max(self.seconds, 1e-9)
        counts = torch.tensor([self.tokens, self.supervised], dtype=torch.float64)
        tokens, supervised = distributed.sum_over_ranks(counts, world).tolist()
        rates = {"tokens_per_second": tokens / seconds, "tokens_per_second_supervised": supervised / seconds}
        self.seconds, self.tokens, self.supervised = 0.0, 0, 0
        return rates


def epoch_label(run: TrainingRun) -> str:
    """The bar's epoch, 0-based like the logged ``epoch`` and the ``epoch_N`` checkpoint
    folders: this epoch's index / the last one's."""
    return f"epoch {run.epoch}/{run.cfg.epochs - 1}"


def log_step(run: TrainingRun, logger: MetricLogger, bar: tqdm, loss: torch.Tensor, lr: float,
             grad_norm: torch.Tensor, meter: ThroughputMeter, objective_metrics: dict[str, torch.Tensor]) -> None:
    metrics = {
        "loss": loss.item(),
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "global_step": run.global_step,
        "epoch": run.epoch,
        **meter.rates(run.world),
        **{name: value.item() for name, value in objective_metrics.items()},
    }
    if run.scaler is not None:
        metrics.update(loss_scale=run.scaler.get_scale(), skipped_steps=run.skipped_steps)
    if run.cfg.log_peak_memory_stats:
        metrics.update(peak_memory_stats(run.device))
    logger.log_dict(metrics, step=run.global_step)
    bar.set_description(epoch_label(run))
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                    tok_s=f"{metrics['tokens_per_second']:.0f}")
