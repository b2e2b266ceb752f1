"""Preference objectives: DPO, IPO, SimPO and ORPO on the ``Objective`` seam.

A batch holds pairs: ``chosen_tokens``/``chosen_labels`` and
``rejected_tokens``/``rejected_labels`` [B, S] (labels shifted, prompt and padding
-100; ``fastune.data.preference``). Chosen and rejected go through ONE forward: they are
concatenated along the batch ([2B, S]). A sequence's log-prob is minus the sum of its
per-token cross-entropies over the response, from the fused
``linear_cross_entropy(reduction="none")`` (``build_token_loss``), so no [tokens,
vocab] logits tensor exists.

With p = policy log-probs, r = reference log-probs, n = response lengths, c/r the
chosen/rejected halves, beta, label smoothing e and margin gamma, per pair:

- ``dpo``:   d = beta ((p_c - r_c) - (p_r - r_r)),  loss = -(1 - e) log s(d) - e log s(-d)
- ``ipo``:   loss = ((p_c - r_c) / n_c - (p_r - r_r) / n_r - 1 / (2 beta))^2
             (length-normalized, as TRL's DPOTrainer computes it)
- ``simpo``: d = beta (p_c / n_c - p_r / n_r) - gamma,  loss as dpo's (no reference)
- ``orpo``:  a = p / n;  loss = NLL_c - beta log s(log odds(a_c) - log odds(a_r)),
             log odds(a) = a - log(1 - exp(a))  (no reference; NLL_c, the SFT term, is
             the mean token NLL of the whole chosen sequence, prompt included, as in
             the ORPO paper's code and TRL, per pair)

The loss and metrics are sums over pairs; the loop divides them by the step's
normalizer, the number of pairs. Metrics use TRL's names: ``rewards/chosen``,
``rewards/rejected`` (beta (p - r) for dpo/ipo, beta p / n for simpo/orpo),
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.

The reference, for dpo and ipo, is a ``Reference`` chosen by the ``Method``: the same
model with its adapters disabled (LoRA, DoRA, QLoRA), or a frozen copy (full
fine-tuning); it runs under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastune.data import IGNORE_INDEX
from fastune.modules.lora import disable_adapters
from fastune.training.loss import TokenLossFn, build_token_loss
from fastune.training.objective import Batch, ObjectiveResult

OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo")


@dataclasses.dataclass(frozen=True)
class PreferenceOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5

    @classmethod
    def from_config(cls, section) -> "PreferenceOptions":
        return cls(beta=float(section.beta), label_smoothing=float(section.label_smoothing),
                   gamma=float(section.gamma))


@dataclasses.dataclass
class Reference:
    """Where reference log-probs come from: ``model`` (None: the policy model itself)
    run inside ``context(policy)`` (e.g. ``disable_adapters``) and ``no_grad``, with
    ``token_loss``: a separate model needs its own (the policy's closes over the
    policy's lm_head)."""

    model: Optional[nn.Module] = None
    token_loss: Optional[TokenLossFn] = None
    context: Callable[[nn.Module], contextlib.AbstractContextManager] = \
        lambda _: contextlib.nullcontext()


def build_reference(method, model: nn.Module) -> Reference:
    """The reference of ``method`` (a ``fastune.methods.method.Method``) for ``model``: a
    frozen copy with its own loss, or the model itself with its adapters disabled."""
    frozen = method.reference_model(model)
    if frozen is None:
        return Reference(context=disable_adapters)
    return Reference(model=frozen, token_loss=build_token_loss(frozen))


def pair_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) [2B, S]: chosen then rejected (they are padded to one width)."""
    tokens = torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return tokens, labels


def sequence_logps(model: nn.Module, token_loss: TokenLossFn, tokens: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed response log-prob [rows] (fp32)."""
    hidden = model(tokens, return_hidden=True)
    return -token_loss(hidden, labels).sum(-1)


def sequence_labels(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels that supervise every next token of each row's sequence (prompt included),
    which ends one token after its last supervised label (padding follows)."""
    positions = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).amax(-1, keepdim=True)
    shifted = torch.full_like(tokens, IGNORE_INDEX)
    shifted[:, :-1] = tokens[:, 1:]
    return torch.where(positions <= last, shifted, IGNORE_INDEX)


def _smoothed_sigmoid_loss(d: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)


def pair_losses(kind: str, options: PreferenceOptions, policy: torch.Tensor,
                reference: Optional[torch.Tensor], lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss [B], chosen rewards [B], rejected rewards [B]) from the policy (and
    reference) log-probs [2B] and response lengths [2B], chosen first."""
    beta = options.beta
    p_c, p_r = policy.chunk(2)
    n_c, n_r = lengths.to(policy.dtype).clamp(min=1).chunk(2)
    if kind in NEEDS_REFERENCE:
        r_c, r_r = reference.chunk(2)
        chosen, rejected = p_c - r_c, p_r - r_r
        if kind == "dpo":
            loss = _smoothed_sigmoid_loss(beta * (chosen - rejected), options.label_smoothing)
        else:
            loss = (chosen / n_c - rejected / n_r - 1 / (2 * beta)) ** 2
        return loss, beta * chosen.detach(), beta * rejected.detach()
    a_c, a_r = p_c / n_c, p_r / n_r
    if kind == "simpo":
        loss = _smoothed_sigmoid_loss(beta * (a_c - a_r) - options.gamma, options.label_smoothing)
    elif kind == "orpo":
        log_odds = (a_c - a_r) - (torch.log1p(-torch.exp(a_c)) - torch.log1p(-torch.exp(a_r)))
        loss = -beta * F.logsigmoid(log_odds)  # + the SFT term, added by the objective
    else:
        raise ValueError(f"unknown preference objective {kind!r}")
    return loss, beta * a_c.detach(), beta * a_r.detach()


class PreferenceObjective:
    """A preference loss (``kind``: dpo, ipo, simpo or orpo) over chosen/rejected pairs,
    normalized by the number of pairs."""

    def __init__(self, kind: str, token_loss: TokenLossFn, options: PreferenceOptions,
                 reference: Optional[Reference] = None):
        if kind in NEEDS_REFERENCE and reference is None:
            raise ValueError(f"objective {kind} needs a reference")
        self.kind, self.token_loss, self.options = kind, token_loss, options
        self.reference = reference if kind in NEEDS_REFERENCE else None

    def normalizer(self, batch: Batch) -> int:
        return int(batch["chosen_tokens"].shape[0])

    def reference_logps(self, model: nn.Module, tokens: torch.Tensor,
                        labels: torch.Tensor) -> Optional[torch.Tensor]:
        if self.reference is None:
            return None
        ref = self.reference
        with torch.no_grad(), ref.context(model):
            return sequence_logps(model if ref.model is None else ref.model,
                                  ref.token_loss or self.token_loss, tokens, labels)

    def __call__(self, model: nn.Module, batch: Batch,
                 forward_context: contextlib.AbstractContextManager = contextlib.nullcontext(),
                 normalizer: Optional[int] = None) -> ObjectiveResult:
        """``normalizer`` (the pairs, counted on the host) is not needed: the per-token
        loss op finds the supervised rows itself."""
        tokens, labels = pair_batch(batch)
        lengths = (labels != IGNORE_INDEX).sum(-1)
        reference = self.reference_logps(model, tokens, labels)
        supervised = labels != IGNORE_INDEX
        if self.kind == "orpo":
            # ORPO's SFT term is the NLL of the whole chosen sequence, prompt included (as in
            # the ORPO paper's code and TRL): the chosen rows get every next token as label.
            n_pairs = labels.shape[0] // 2
            labels = torch.cat([sequence_labels(tokens[:n_pairs], labels[:n_pairs]), labels[n_pairs:]])
        with forward_context:
            hidden = model(tokens, return_hidden=True)
        token_losses = self.token_loss(hidden, labels)
        policy = -(token_losses * supervised).sum(-1)
        loss, chosen, rejected = pair_losses(self.kind, self.options, policy, reference, lengths)
        if self.kind == "orpo":
            full = token_losses[:n_pairs]
            loss = loss + full.sum(-1) / (labels[:n_pairs] != IGNORE_INDEX).sum(-1).clamp(min=1)
        logps_c, logps_r = policy.detach().chunk(2)
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": logps_c.sum(),
            "logps/rejected": logps_r.sum(),
        }
        return loss.sum(), torch.tensor(loss.shape[0], device=loss.device), metrics
