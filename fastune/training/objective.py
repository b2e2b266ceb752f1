"""Training objectives: what a micro-batch's loss is.

The loop (``fastune.training.loop.train_step``) and the validation loss
(``fastune.training.evaluation.validation_loss``) know nothing of the loss itself;
they ask an ``Objective``:

- ``normalizer(batch)``: the count the step's loss is divided by, read from the batch
  before any forward pass (the loop sums it over the step's micro-batches and over
  ranks first, so every micro-batch's backward already divides by the step's total:
  docs/architecture.md);
- ``objective(model, batch, forward_context, normalizer)``: the micro-batch's summed
  loss, its normalizer count (a tensor) and metric sums, each divided by the same step
  total. ``normalizer`` is this micro-batch's ``normalizer(batch)``, which the caller
  counted on the host: an objective that needs the count inside its forward takes it
  from there instead of reading it back from the device (a sync per micro-batch).

``SFTObjective`` is next-token cross-entropy on the supervised tokens. The preference
objectives (DPO and its kin, ``fastune.training.preference``) fit the same shape: their
normalizer is the number of pairs; they run the model once for chosen and rejected,
take per-sequence log-probs from the fused per-token loss, and get the reference
log-probs from the same model under ``fastune.modules.lora.disable_adapters`` (LoRA
methods) or a frozen copy (full fine-tuning), under ``no_grad``.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Protocol

import torch
from torch import nn

from fastune.data import IGNORE_INDEX
from fastune.training.loss import LossFn

Batch = dict[str, torch.Tensor]
ObjectiveResult = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Objective(Protocol):
    def normalizer(self, batch: Batch) -> int:
        """What this micro-batch adds to the step's divisor, counted without a forward."""
        ...

    def __call__(self, model: nn.Module, batch: Batch,
                 forward_context: contextlib.AbstractContextManager = contextlib.nullcontext(),
                 normalizer: Optional[int] = None) -> ObjectiveResult:
        """(summed loss, normalizer count, metric sums) of ``batch`` (on the model's
        device). ``forward_context`` wraps the model's forward passes that backward
        goes through (activation offloading); ``normalizer``, when given, is
        ``self.normalizer(batch)`` as counted on the host."""
        ...


def hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The final hidden states of ``batch`` (packed batches carry positions and documents)."""
    return model(batch["tokens"], position_ids=batch.get("position_ids"),
                 document_ids=batch.get("document_ids"), return_hidden=True)


class SFTObjective:
    """Summed cross-entropy over the supervised tokens, normalized by their count.

    ``loss_fn(hidden, labels) -> (summed loss, supervised tokens)``: the fused or eager
    loss of ``fastune.training.loss.build_loss``.
    """

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn

    def normalizer(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: nn.Module, batch: Batch,
                 forward_context: contextlib.AbstractContextManager = contextlib.nullcontext(),
                 normalizer: Optional[int] = None) -> ObjectiveResult:
        with forward_context:
            hidden = hidden_states(model, batch)
        # The supervised count: the fused loss sizes its gathered rows with it, no sync.
        loss_sum, count = self.loss_fn(hidden, batch["labels"], num_supervised=normalizer)
        return loss_sum, count, {}
