"""Exact-match accuracy by greedy decoding: does the model answer held-out prompts
word for word? The demo reports it before and after fine-tuning.

Decoding is the simplest correct loop: no KV cache, the whole (left-padded) batch
re-run for every new token. Left padding is kept out of attention with
``document_ids`` (padding is document 0, the prompt document 1) and positions
start at 0 on each prompt's first real token, so a padded row computes exactly
what it would alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), each cut before its first stop id.
    The padding's token id is irrelevant (it is masked out), so it is 0."""
    device = model.embed_tokens.weight.device
    width = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    real = torch.zeros_like(tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        real[row, width - len(prompt):] = True
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = []
    for _ in range(max_new_tokens):
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        logits = model(tokens, position_ids=positions, document_ids=real.long())
        next_token = logits[:, -1].argmax(-1)
        generated.append(next_token)
        finished |= torch.isin(next_token, stops)
        if bool(finished.all()):
            break
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        real = torch.cat([real, torch.ones_like(real[:, :1])], dim=1)
    out = torch.stack(generated, dim=1).tolist()
    stop_set = set(stop_ids)
    return [_cut_at_stop(row, stop_set) for row in out]


def _cut_at_stop(ids: list[int], stop_set: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_set:
            return ids[:i]
    return ids


def exact_match_accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[tuple[list[int], str]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> float:
    """Fraction of ``(prompt_ids, answer)`` pairs whose greedy completion, decoded and
    stripped of surrounding whitespace, equals ``answer`` stripped."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            outputs = greedy_generate(
                model, [p for p, _ in chunk], max_new_tokens, tokenizer.stop_ids
            )
            correct += sum(
                tokenizer.decode(ids).strip() == answer.strip()
                for ids, (_, answer) in zip(outputs, chunk)
            )
    finally:
        model.train(was_training)
    return correct / max(1, len(examples))
