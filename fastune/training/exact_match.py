"""Exact-match accuracy by greedy decoding: does the model answer held-out prompts
word for word? The demo reports it before and after fine-tuning.

Decoding is generation's KV-cache ``Generator`` with greedy sampling: a padded
batch computes what each prompt would alone, and each answer is cut before its
first stop id.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import nn

from fastune.generation.generate import Generator
from fastune.generation.sampling import SamplingParams


def exact_match_accuracy(
    model: nn.Module,
    tokenizer,
    examples: Sequence[tuple[list[int], str]],
    max_new_tokens: int,
    batch_size: int = 32,
    on_batch: Optional[Callable[[int], object]] = None,
) -> float:
    """Fraction of ``(prompt_ids, answer)`` pairs whose greedy completion, decoded and
    stripped of surrounding whitespace, equals ``answer`` stripped. ``on_batch(n)`` is
    called after each batch of ``n`` prompts (a progress bar's ``update``)."""
    was_training = model.training
    model.eval()
    generator = Generator(model)  # eager: the training model changes between evaluations
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            outputs = generator.generate([p for p, _ in chunk], max_new_tokens, sampling=SamplingParams(),
                                         stop_ids=tokenizer.stop_ids).tokens
            correct += sum(
                tokenizer.decode(ids).strip() == answer.strip()
                for ids, (_, answer) in zip(outputs, chunk)
            )
            if on_batch is not None:
                on_batch(len(chunk))
    finally:
        model.train(was_training)
    return correct / max(1, len(examples))
