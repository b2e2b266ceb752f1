"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

With temperature T the probabilities are softmax(logits / T). top_k keeps the k
most likely tokens; top_p keeps the smallest set of most likely tokens whose
probabilities add up to at least p (nucleus sampling; the most likely token is
always kept). Both filters apply to the tempered distribution, which is then
renormalized, as in ``transformers``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from fastune.errors import FastuneError


class SamplingError(FastuneError, ValueError):
    """Sampling settings out of range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k None and top_p 1.0 mean no filter."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise SamplingError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SamplingError(f"top_k: must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-p set, then renormalize."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)
