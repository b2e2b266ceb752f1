"""Autoregressive generation with a static KV cache, optionally with a compiled decode step.

One call generates for a batch of prompts (token ids of different lengths):

1. **Prefill.** The prompts, left-padded to the longest, run through the model
   once; their keys and values fill the cache. Padding is kept out of attention by
   the mask (see ``cache_mask``) and each row's positions start at 0 on its first
   real token, so a padded row computes exactly what it would alone.
2. **Decode.** One token per step for every row: a forward of shape [B, 1] at cache
   position ``input_pos``. All shapes are fixed, so ``torch.compile`` traces the
   step once; only the value of ``input_pos`` changes between steps.
3. **LongRoPE** (Phi-3.5, Phi-4-mini): a forward whose longest position passes the
   original context takes the long factors; at the first such step the whole
   sequence runs again to rewrite the cache, as transformers' Phi-3 generate does.
   The longest row of a batch decides for all rows (as in transformers' batches).

Only the last position goes through ``lm_head``, so a long prompt never
materializes [B, S, vocab] logits. A row stops at its first stop id (eos or
``stop_ids``); the loop ends when every row has stopped or after
``max_new_tokens``. Returned ids exclude the stop token.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fastune.errors import FastuneError
from fastune.generation.kv_cache import KVCache, cache_mask, clear_kv_caches
from fastune.generation.sampling import SamplingParams, sample
from fastune.models.rope import rope_regime_switch


# Cache lengths are powers of two from this: attention over unused (masked) positions
# (at most as many as used) costs less than compiling the decode step again for every
# prompt length. Multiples of 128 made prompts of 100 to 2000 tokens 16 compiles, past
# Dynamo's recompile limit (8), after which the step silently ran eager; powers of two
# make them 5.
CACHE_BLOCK = 128


def cache_length(tokens: int) -> int:
    """The cache length for ``tokens`` positions: the next power of two, at least CACHE_BLOCK."""
    return max(CACHE_BLOCK, 1 << (tokens - 1).bit_length())


class GenerationError(FastuneError, ValueError):
    """Generation asked for something impossible (empty prompt, no room in the context)."""


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per prompt: the generated ids, cut before the first stop id
    prompt_tokens: int  # real (non-padding) prompt tokens in the batch
    prefill_seconds: float
    step_seconds: list[float]  # wall time of each decode step, the first one included

    @property
    def batch_size(self) -> int:
        return len(self.tokens)

    @property
    def decode_tokens_per_second(self) -> Optional[float]:
        """Tokens produced per second by decode steps (every row counts, stopped or not),
        leaving out the first step, which pays for compilation and warm-up; None with
        fewer than two steps. Median step time, so one slow step on a shared machine
        does not move it."""
        if len(self.step_seconds) < 2:
            return None
        return self.batch_size / statistics.median(self.step_seconds[1:])


StopFn = Callable[[int, list[int]], bool]  # (row, ids generated so far) -> stop this row?
TokenCallback = Callable[[list[int]], None]  # the new token of every row, after each step


class Generator:
    """Generates with ``model`` (a fastune ``Transformer`` in eval mode).

    Keep one ``Generator`` for many calls: with ``compile=True`` the decode step is
    compiled on the first call and reused as long as batch size and cache length
    (``cache_length``: a power of two) stay the same (a new shape compiles once more);
    eager decoding sizes the cache exactly.
    The KV caches are allocated once and kept: every call that fits reuses the same
    memory, so CUDA graphs replay instead of recording again. They are held until the
    generator is dropped (a larger call grows them).

    On CPU, a model whose parameters need no gradient (an inference model, as
    ``load_for_inference`` returns it) is compiled with inductor's *freezing*: the
    weights become constants of the compiled step, and its linear layers run oneDNN's
    prepacked matmul, about 15% faster per decode step on the 55M-parameter
    benchmark model here. The price: a second, packed copy of the linear weights in
    memory, and a compiled step that keeps the weights it saw (make a new
    ``Generator`` after changing them).
    """

    def __init__(self, model: nn.Module, compile: bool = False):
        self.model = model
        self._decode = _compile_decode(model) if compile else _forward_last
        self._bucketed = compile  # eager decoding compiles nothing: its cache is as long as needed
        self._caches: list[KVCache] = []  # one per layer, kept across calls

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Sequence[int] = (),
        seed: Optional[int] = None,
        on_token: Optional[TokenCallback] = None,
        stop_fn: Optional[StopFn] = None,
    ) -> GenerationOutput:
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        ``seed`` makes sampling reproducible; ``on_token`` sees each step's tokens as
        they come (for streaming); ``stop_fn`` can stop a row early, e.g. on a stop string.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        model = self.model
        weight = model.embed_tokens.weight
        device = weight.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        tokens, valid, offsets = _left_pad(prompts, max_new_tokens, device, self._bucketed)
        prompt_len = tokens.shape[1]
        stop_set = set(stop_ids)
        switch = rope_regime_switch(model.config)

        self._attach_caches(len(prompts), valid.shape[1], weight)
        try:
            # One read of the device per token: the new tokens, on which the host decides
            # which rows are done (a second read, e.g. of `finished.all()`, would stall the
            # queue again). It also waits for the step, so the times are the device's.
            start = time.perf_counter()
            logits = _forward_last(model, tokens, torch.arange(prompt_len, device=device), offsets, valid)
            next_token = sample(logits, sampling, generator)
            new = next_token.tolist()
            prefill_seconds = time.perf_counter() - start
            rows = [[t] for t in new]
            step_seconds = []
            finished = self._finished(new, stop_set, rows, stop_fn, [False] * len(rows))
            if on_token is not None:
                on_token(new)
            input_pos = torch.tensor([prompt_len], device=device)
            for step in range(1, max_new_tokens):
                if all(finished):
                    break
                start = time.perf_counter()
                if prompt_len + step - 1 == switch:
                    # LongRoPE's first long step: the cache holds keys rotated by the short
                    # factors, so run the whole sequence again (as transformers' Phi-3 does).
                    so_far = torch.cat([tokens, torch.tensor(rows, device=device)], dim=1)
                    logits = _forward_last(model, so_far, torch.arange(so_far.shape[1], device=device),
                                           offsets, valid)
                else:
                    logits = self._decode(model, next_token[:, None], input_pos, offsets, valid)
                next_token = sample(logits, sampling, generator)
                new = next_token.tolist()
                step_seconds.append(time.perf_counter() - start)
                for row, t in zip(rows, new):
                    row.append(t)
                finished = self._finished(new, stop_set, rows, stop_fn, finished)
                if on_token is not None:
                    on_token(new)
                input_pos = input_pos + 1  # on the device: no copy from the host per step
        finally:
            clear_kv_caches(model)  # the generator keeps the buffers for its next call
        return GenerationOutput(
            tokens=[_cut_at_stop(row, stop_set) for row in rows],
            prompt_tokens=sum(len(p) for p in prompts),
            prefill_seconds=prefill_seconds,
            step_seconds=step_seconds,
        )

    def _attach_caches(self, batch_size: int, length: int, weight: torch.Tensor) -> None:
        """Give the model's attention layers this generator's caches, sized for the call:
        allocated on the first call and reused (same memory) by every call that fits."""
        layers = [layer.self_attn for layer in self.model.layers]
        if len(self._caches) != len(layers):
            self._caches = [KVCache(batch_size, attn.num_kv_heads, length, attn.head_dim,
                                    weight.dtype, weight.device) for attn in layers]
        for attn, cache in zip(layers, self._caches):
            cache.resize(batch_size, length, weight.dtype, weight.device)
            attn.kv_cache = cache

    @staticmethod
    def _finished(new: list[int], stop_set: set[int], rows: list[list[int]],
                  stop_fn: Optional[StopFn], finished: list[bool]) -> list[bool]:
        """Rows done after this step's tokens ``new`` (on the host): a stop id, or ``stop_fn``."""
        return [done or t in stop_set or (stop_fn is not None and stop_fn(i, row))
                for i, (done, t, row) in enumerate(zip(finished, new, rows))]


def _compile_decode(model: nn.Module) -> Callable:
    """``_forward_last`` compiled for ``model``'s device (see ``Generator``)."""
    if model.embed_tokens.weight.is_cuda:
        # CUDA graphs remove the per-step launch overhead that dominates decoding on a GPU.
        return torch.compile(_forward_last, fullgraph=True, dynamic=False, mode="reduce-overhead")
    if any(p.requires_grad for p in model.parameters()):
        return torch.compile(_forward_last, fullgraph=True, dynamic=False)
    frozen = torch.compile(_forward_last, fullgraph=True, dynamic=False, options={"freezing": True})

    def decode(*args):
        # Without prepare_freezing, dynamo hands the parameters to inductor as plain graph
        # inputs, and freezing folds nothing (checked with torch 2.13).
        with torch._dynamo.config.patch(prepare_freezing=True):
            return frozen(*args)

    return decode


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             **kwargs) -> GenerationOutput:
    """One-off ``Generator(model).generate(...)`` (eager decode)."""
    return Generator(model).generate(prompts, max_new_tokens, **kwargs)


def _left_pad(prompts: Sequence[Sequence[int]], max_new_tokens: int, device: torch.device,
              bucketed: bool):
    """(tokens [B, P] left-padded with 0, valid [B, L] False on padding, offsets [B] =
    padding length of each row). The cache length L is P + max_new_tokens, or with
    ``bucketed`` (compiled decoding) ``cache_length`` of it, so that calls with similar
    lengths share one compiled step."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long)
    offsets = torch.tensor([width - len(p) for p in prompts])
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
    length = cache_length(width + max_new_tokens) if bucketed else width + max_new_tokens
    valid = torch.arange(length)[None, :] >= offsets[:, None]
    return tokens.to(device), valid.to(device), offsets.to(device)


def _positions(input_pos: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, S]: cache position minus the row's padding (0 on padding)."""
    return (input_pos[None, :] - offsets[:, None]).clamp(min=0)


def _forward_last(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, offsets: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """Run ``tokens`` [B, S] at cache positions ``input_pos`` [S] (the prompts at 0..P-1 in
    prefill, one token per row in decode); fp32 logits [B, V] of the last position."""
    hidden = model(tokens, position_ids=_positions(input_pos, offsets), mask=cache_mask(valid, input_pos),
                   input_pos=input_pos, return_hidden=True)
    return model.logits(hidden[:, -1]).float()


def _cut_at_stop(ids: list[int], stop_set: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop_set:
            return ids[:i]
    return ids
