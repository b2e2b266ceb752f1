"""Output projection fused with cross-entropy, never materializing [tokens, vocab] logits.

Math, for hidden states h [N, H], the output projection W [V, H] and targets y [N]:

    z = h W^T                         (the logits; GEMM with fp32 accumulation,
                                       stored in the input dtype like F.linear's)
    loss_sum = sum_i loss_i(z_i, y_i)  (per-token loss as in ``cross_entropy``, fp32)
    G = dloss_sum/dz                  (see cross_entropy.py)
    dloss_sum/dh = G W,   dloss_sum/dW = G^T h

The tokens are processed in chunks of C rows. Per chunk: z_c = h_c W^T into a [C, V]
buffer, the per-row loss and G_c written over z_c in place (Triton kernel on CUDA, plain
torch elsewhere), then at once dh_c = G_c W and dW += G_c^T h_c. All of that happens in
the FORWARD. Saved for backward: dh [N, H] (input dtype) and dW [V, H] (fp32 when
accumulated over several chunks, so the sum over chunks does not round at every step);
backward only multiplies them by the incoming scalar gradient of ``loss_sum``. dW is
neither formed nor saved when the weight needs no gradient (LoRA: lm_head frozen).

Memory: the largest temporaries are the chunk's logits, a few [C, V] buffers, and, when
W is trained, the [V, H] fp32 accumulator. The default C keeps C * V at most
``LOGITS_BUDGET`` elements (64 Mi: 128 MiB of bf16 logits); for 4096 tokens and a
128256 vocabulary that is 8 chunks of 512 tokens, against 1 GiB for the full bf16
logits (and about 6x that for eager F.linear + F.cross_entropy in training).

The matmuls are torch's (cuBLAS on CUDA), so only the per-chunk cross-entropy differs
between the Triton path and the reference path; the chunk loop is the same code, traced
by torch.compile like any Python loop (the chunk count is fixed by the shapes).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastune.kernels.cross_entropy import check_labels, cross_entropy_rows_, supervised_count

# Largest chunk of logits, in elements, that one forward holds at a time.
LOGITS_BUDGET = 1 << 26
# Vocabulary rows per GEMM when dW is accumulated over chunks (see _add_grad_weight_).
GRAD_WEIGHT_SLICE = 8192


def default_chunk_size(n_tokens: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Tokens per chunk: the fewest chunks whose [chunk, vocab] logits fit in ``budget``
    elements, then split evenly, so chunks are alike (no small ragged last chunk)."""
    n_chunks = max(1, math.ceil(n_tokens * vocab / budget))
    return max(1, math.ceil(n_tokens / n_chunks))


def _add_grad_weight_(grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                      h: torch.Tensor) -> None:
    """grad_weight += grad_logits^T h, one slice of vocabulary rows at a time: each slice's
    GEMM result (input dtype) is added into the fp32 accumulator at once, so no second
    [V, H] buffer ever exists beside it."""
    for start in range(0, grad_logits.shape[1], GRAD_WEIGHT_SLICE):
        rows = slice(start, start + GRAD_WEIGHT_SLICE)
        grad_weight[rows].add_(grad_logits[:, rows].t() @ h)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in forward; backward scales the saved gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, z_loss, label_smoothing, chunk_size,
                need_grad_hidden, need_grad_weight):
        compute_grad = need_grad_hidden or need_grad_weight
        chunks = list(zip(hidden.split(chunk_size), labels.split(chunk_size)))
        # One chunk: its GEMM gives dW as it is. More: their sum, accumulated in fp32.
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_grad_weight and len(chunks) > 1 else None)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden_chunks = []
        for h, y in chunks:
            logits = h @ weight.t()
            loss = loss + cross_entropy_rows_(logits, y, ignore_index, z_loss, label_smoothing,
                                              compute_grad).sum()
            # `logits` now holds dloss/dlogits for this chunk.
            if need_grad_hidden:
                grad_hidden_chunks.append(logits @ weight)
            if need_grad_weight and grad_weight is None:
                grad_weight = logits.t() @ h
            elif need_grad_weight:
                _add_grad_weight_(grad_weight, logits, h)
        grad_hidden = torch.cat(grad_hidden_chunks) if need_grad_hidden else None
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, z_loss: float = 0.0,
                         label_smoothing: float = 0.0,
                         chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked.

    hidden [..., H], weight [V, H] (the lm_head, possibly tied to the embedding, trained
    or frozen), labels [...] already shifted (labels[i] is the target of position i;
    ``ignore_index`` positions are not supervised). Returns ``(loss_sum, n_tokens)``: the
    fp32 sum of the per-token losses over supervised tokens (with ``z_loss *
    logsumexp**2`` per token and PyTorch's label smoothing), and the number of supervised
    tokens as an int64 scalar tensor, without a host sync. Equals
    ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum", ...)``.

    ``chunk_size`` tokens are processed at a time (default: ``default_chunk_size``).
    """
    hidden_size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden states of size "
                         f"{hidden_size} need a weight of shape [vocab, {hidden_size}]")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the output weight is "
                         f"{weight.dtype}; cast one of them")
    check_labels(labels, hidden.shape[:-1], f"hidden states of shape {tuple(hidden.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    hidden = hidden.reshape(-1, hidden_size)
    labels = labels.reshape(-1)
    grad_enabled = torch.is_grad_enabled()
    loss = _LinearCrossEntropy.apply(
        hidden, weight, labels, ignore_index, float(z_loss), float(label_smoothing),
        chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0]),
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
    )
    return loss, supervised_count(labels, ignore_index)
