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
from fastune.training.memory import peak_memory_stats
from fastune.training.objective import Batch
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
    normalizer = sum(objective.normalizer(b) for b in micro_batches)
    if run.world is not None:  # the whole step's count: every rank divides by the same number
        normalizer = int(distributed.sum_over_ranks(torch.tensor(normalizer, dtype=torch.float64), run.world))
    denominator = max(normalizer, 1)  # an all-masked step contributes zero gradient, not NaN
    step_loss = torch.zeros((), device=run.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        loss_sum, _, metrics = objective(model, batch, run.forward_context)
        (loss_sum / denominator).backward()
        step_loss += loss_sum.detach()
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0) + value.detach().double()
    step_loss = distributed.sum_over_ranks(step_loss, run.world)
    if metric_sums:
        names = sorted(metric_sums)
        totals = distributed.sum_over_ranks(torch.stack([metric_sums[n] for n in names]), run.world)
        metric_sums = {n: t / denominator for n, t in zip(names, totals)}
    grad_norm = clip_gradients(model, cfg.clip_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss / denominator, grad_norm, metric_sums


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
    if run.cfg.log_peak_memory_stats:
        metrics.update(peak_memory_stats(run.device))
    logger.log_dict(metrics, step=run.global_step)
    bar.set_description(f"epoch {run.epoch + 1}/{run.cfg.epochs}")
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                    tok_s=f"{metrics['tokens_per_second']:.0f}")
