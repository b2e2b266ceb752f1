"""The training loss: ``loss_fn(hidden, labels, num_supervised=None) -> (summed loss
over supervised tokens, their count)``, chosen by the ``loss`` kernel op that
``apply_kernels`` recorded on the model. ``num_supervised``: the labels' supervised
count when the caller knows it on the host (the loop counted it before the forward);
the fused loss then never waits for the device."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastune.data.formats import IGNORE_INDEX
from fastune.errors import ConfigError
from fastune.modules.kernels import enabled_kernels

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (hidden, labels, num_supervised=None)


def build_loss(model: nn.Module, loss_cfg: Mapping[str, Any]) -> LossFn:
    """The loss for ``model`` with the ``loss`` section's chunk_size, z_loss and
    label_smoothing.

    With the ``loss`` kernel, the output projection and cross-entropy are fused
    (``linear_cross_entropy``: [tokens, vocab] logits never exist at once). An
    ``lm_head`` that is not a plain linear layer (LoRA on it, or NF4) goes through
    its own forward, then the in-place ``cross_entropy``. Without it, the eager
    ``F.linear`` + ``F.cross_entropy`` (the baseline the kernels are measured against).
    """
    head = model.lm_head
    # Gemma 2's final-logit softcapping: the fused losses cap inside the kernel.
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    # Plain Python values: the closures below get compiled, and reading a DictConfig
    # inside a compiled function would break the graph.
    options = dict(ignore_index=IGNORE_INDEX, label_smoothing=float(loss_cfg["label_smoothing"]))
    chunk_size = loss_cfg["chunk_size"]
    if "loss" not in enabled_kernels(model):
        if loss_cfg["z_loss"]:
            raise ConfigError("loss.z_loss: needs the loss kernel (model.kernels: all, or a list with loss)")

        def eager_loss(hidden, labels, num_supervised: Optional[int] = None):
            logits = head(hidden).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum", **options)
            return loss, (labels != IGNORE_INDEX).sum()

        return eager_loss

    from fastune.kernels import cross_entropy, linear_cross_entropy

    options.update(z_loss=float(loss_cfg["z_loss"]), softcap=softcap)
    if type(head) is nn.Linear:
        def fused_loss(hidden, labels, num_supervised: Optional[int] = None):
            return linear_cross_entropy(hidden, head.weight, labels, chunk_size=chunk_size,
                                        num_supervised=num_supervised, **options)

        return fused_loss

    def head_then_loss(hidden, labels, num_supervised: Optional[int] = None):
        return cross_entropy(head(hidden), labels, **options)

    return head_then_loss


TokenLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_token_loss(model: nn.Module, chunk_size=None) -> TokenLossFn:
    """``token_loss(hidden, labels) -> per-token cross-entropy`` shaped like ``labels``
    (fp32, 0 at ignored positions): minus the tokens' log-probs, for the sequence
    log-probs of a preference objective. No label smoothing or z-loss: those would not
    be log-probs. Fused (``linear_cross_entropy(reduction="none")``) with the ``loss``
    kernel and a plain linear head; eager ``F.linear`` + ``F.cross_entropy`` otherwise."""
    head = model.lm_head
    if "loss" in enabled_kernels(model) and type(head) is nn.Linear:
        from fastune.kernels import linear_cross_entropy

        def fused_token_loss(hidden, labels):
            return linear_cross_entropy(hidden, head.weight, labels, ignore_index=IGNORE_INDEX,
                                        chunk_size=chunk_size, reduction="none")[0]

        return fused_token_loss

    def eager_token_loss(hidden, labels):
        logits = head(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX)
        return loss.reshape(labels.shape)

    return eager_token_loss
