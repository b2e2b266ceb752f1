"""Chunked (tiled) MLP over the sequence, for long context on one card.

A decoder layer's MLP holds per-token tensors of the intermediate size I (gate, up,
their product: 3.5x the hidden size for Llama-3) while it runs forward and backward.
At 64K tokens one [T, I] bf16 tensor of Llama-3.1-8B is 1.75 GiB. The MLP acts on each
token alone, so it can run over the tokens in chunks of ``chunk`` rows:

- forward: each chunk's output is computed without autograd and written into the
  full-length output; only the MLP's input x is saved;
- backward: each chunk's forward is run again with autograd and differentiated at
  once, giving that chunk's dx and adding its share to the trainable parameters'
  gradients, which are returned to autograd as the gradients of the function's
  parameter inputs (so hooks on them, gradient accumulation and clipping see one
  ordinary gradient per step).

No [T, I] tensor exists at full length, in forward or backward; the cost is the MLP's
forward computed twice (as with activation checkpointing, with which it composes: the
checkpointed layer's recomputation calls the chunked MLP again). Dropout inside the
MLP (LoRA dropout) draws the same masks in backward as in forward: the RNG state is
saved before the forward and restored for the recomputation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _ChunkedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward: Callable, chunk: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        # The parameters live as long as the model: held on ctx, not saved as activations.
        ctx.forward, ctx.chunk, ctx.params = forward, chunk, params
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        with torch.no_grad():
            for start in range(0, flat.shape[0], chunk):
                y = forward(flat[start:start + chunk])
                if out is None:
                    out = y.new_empty(flat.shape[0], y.shape[-1])
                out[start:start + chunk] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        flat, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        need_x = ctx.needs_input_grad[2]
        dx = torch.empty_like(flat) if need_x else None
        dparams = [None] * len(params)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for start in range(0, flat.shape[0], ctx.chunk):
                piece = flat[start:start + ctx.chunk].detach().requires_grad_(need_x)
                with torch.enable_grad():
                    y = ctx.forward(piece)
                inputs = ([piece] if need_x else []) + params
                grads = torch.autograd.grad(y, inputs, flat_grad[start:start + ctx.chunk], allow_unused=True)
                if need_x:
                    dx[start:start + ctx.chunk] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        out = iter(dparams)
        param_grads = [next(out) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, None if dx is None else dx.view_as(x), *param_grads)


def _chunked(mlp: nn.Module, forward: Callable, chunk: int) -> Callable:
    def chunked_forward(x: torch.Tensor) -> torch.Tensor:
        params = [p for p in mlp.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or x.shape[:-1].numel() <= chunk:
            return forward(x)  # nothing to save (inference), or one chunk: the plain MLP
        return _ChunkedMLP.apply(forward, chunk, x, *params)

    return chunked_forward


def apply_chunked_mlp(model: nn.Module, chunk: int | None) -> None:
    """Run every decoder layer's MLP over the tokens in chunks of ``chunk`` (None or 0:
    leave the model as it is). The MLP's ``forward`` is replaced on the instance, so
    parameter names do not change. Apply before activation checkpointing and compile."""
    if not chunk:
        return
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_mlp: expected a positive number of tokens, got {chunk!r}")
    for layer in model.layers:
        layer.mlp.forward = _chunked(layer.mlp, layer.mlp.forward, chunk)
