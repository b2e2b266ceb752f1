"""Evaluation during training: the validation loss (by the run's objective) and
exact-match accuracy of greedy answers, logged at the current step."""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from fastune import distributed
from fastune.training.exact_match import exact_match_accuracy
from fastune.training.loggers import MetricLogger
from fastune.training.run import TrainingRun

log = logging.getLogger(__name__)


def evaluate(run: TrainingRun, logger: MetricLogger) -> dict[str, float]:
    """Validation loss (and exact-match accuracy, if configured), logged at the current step."""
    results = {}
    if run.val_loader is not None:
        results["val_loss"] = validation_loss(run)
    if run.exact_match_examples:
        with _bar(run, len(run.exact_match_examples), "exact match", "prompt") as bar:
            results["exact_match"] = exact_match_accuracy(
                run.model, run.tokenizer, run.exact_match_examples, run.cfg.eval_exact_match.max_new_tokens,
                on_batch=bar.update)
    if results:
        logger.log_dict(results, step=run.global_step)
    return results


@torch.no_grad()
def validation_loss(run: TrainingRun) -> float:
    """Summed loss over the whole validation split / its normalizer count (every rank's
    share, under torchrun): for SFT, per supervised token."""
    run.model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss, normalizer
    for batch in _bar(run, len(run.val_loader), "validation loss", "batch", run.val_loader):
        count = run.objective.normalizer(batch)  # on the host: no sync in the loss
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        loss_sum, n, _ = run.objective(run.model, batch, normalizer=count)
        sums += torch.stack([loss_sum.double(), n.double()])
    run.model.train()
    total, count = distributed.sum_over_ranks(sums, run.world).tolist()
    return total / max(count, 1)


def _bar(run: TrainingRun, total: int, desc: str, unit: str, iterable=None) -> tqdm:
    """A progress bar for an evaluation (rank 0 only), gone when it ends."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=run.world is not None and not run.world.is_main)


def report(results: dict[str, float]) -> None:
    """Log each result as ``before -> after``."""
    for name in ("val_loss", "exact_match"):
        if f"{name}_after" in results:
            before = results.get(f"{name}_before")
            shown = f"{before:.4f} -> " if before is not None else ""
            log.info("%s: %s%.4f", name, shown, results[f"{name}_after"])
