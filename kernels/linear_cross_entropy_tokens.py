"""Per-token output of the fused linear cross-entropy (``reduction="none"``).

Math, for hidden states h [N, H], the output projection W [V, H] and targets y [N]:

    z = h W^T,   loss_i = lse(z_i) - (1 - e) z_iy - e mean_j z_ij + k lse_i^2
                 (loss_i = 0 where y_i is ignored; see cross_entropy.py)
    given g = dL/dloss [N] and G_i = dloss_i/dz_i:
    dL/dh = (g * G) W,   dL/dW = (g * G)^T h

A preference objective needs each sequence's log-prob, the sum of -loss_i over its
response tokens, so the upstream gradient differs from token to token and is only known
after the whole batch's forward: unlike the summed op (linear_cross_entropy.py), the
gradients cannot be formed in forward and scaled later without saving G [N, V]. So
forward computes only the per-token losses, chunk by chunk through the same per-row
entry point (``cross_entropy_rows_``: Triton on CUDA, the reference elsewhere), and
saves nothing but its inputs; backward recomputes each chunk's logits once, writes G
over them in place, scales its rows by g, and forms dh and dW (dW summed over chunks in
fp32, rounded once). The price is one more [C, H] x [H, V] GEMM per chunk than the
summed op; the memory is the chunk's logits [C, V], as there.

Both passes run only on the supervised rows (counted with one host sync), gathered
first, as the summed op does: prompt tokens carry no log-prob.

Forward and backward are each ONE opaque custom op, for the reason given in
linear_cross_entropy.py (torch.compile would unroll the chunk loop and keep every chunk
alive at once).
"""

from __future__ import annotations

import torch

from fastune.kernels.autocast import no_autocast
from fastune.kernels.cross_entropy import cross_entropy_rows_


def _supervised_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Indices of the supervised rows (a host sync: their number sizes the buffers)."""
    return (labels != ignore_index).nonzero().squeeze(1)


def _chunk_losses(hidden, weight, labels, ignore_index, z_loss, label_smoothing, chunk_size,
                  fused_reference, softcap):
    losses = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
    logits_buffer = hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0])
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        logits = torch.mm(h, weight.t(), out=logits_buffer[: h.shape[0]])
        losses[rows] = cross_entropy_rows_(logits, labels[rows], ignore_index, z_loss,
                                           label_smoothing, False, fused_reference, softcap)
    return losses


@torch.library.custom_op("fastune::linear_cross_entropy_tokens", mutates_args=())
def _tokens_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               ignore_index: int, z_loss: float, label_smoothing: float, chunk_size: int,
               fused_reference: bool, softcap: float) -> torch.Tensor:
    rows = _supervised_rows(labels, ignore_index)
    out = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    if rows.numel():
        out[rows] = _chunk_losses(hidden.index_select(0, rows), weight,
                                  labels.index_select(0, rows), ignore_index, z_loss,
                                  label_smoothing, chunk_size, fused_reference, softcap)
    return out


@_tokens_op.register_fake
def _(hidden, weight, labels, ignore_index, z_loss, label_smoothing, chunk_size,
      fused_reference, softcap):
    return hidden.new_empty(labels.shape[0], dtype=torch.float32)


def _accumulate_(grad_weight: torch.Tensor, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32) += grad_logits^T h, with fp32 accumulation."""
    if grad_logits.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.t(), h)
    elif grad_weight.is_cuda:
        torch.addmm(grad_weight, grad_logits.t(), h, out=grad_weight, out_dtype=torch.float32)
    else:  # no 16-bit GEMM with an fp32 output on CPU
        grad_weight.add_(grad_logits.t() @ h)


@torch.library.custom_op("fastune::linear_cross_entropy_tokens_backward", mutates_args=())
def _tokens_backward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        grad_losses: torch.Tensor, ignore_index: int, z_loss: float,
                        label_smoothing: float, chunk_size: int, need_grad_hidden: bool,
                        need_grad_weight: bool, fused_reference: bool, softcap: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                   if need_grad_weight else weight.new_empty(0))
    rows = _supervised_rows(labels, ignore_index)
    hidden_rows, labels_rows = hidden.index_select(0, rows), labels.index_select(0, rows)
    scale = grad_losses.index_select(0, rows).float().unsqueeze(1)
    grad_rows = torch.empty_like(hidden_rows) if need_grad_hidden else None
    logits_buffer = hidden.new_empty(min(chunk_size, rows.numel()), weight.shape[0])
    for start in range(0, rows.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        h = hidden_rows[chunk]
        logits = torch.mm(h, weight.t(), out=logits_buffer[: h.shape[0]])
        cross_entropy_rows_(logits, labels_rows[chunk], ignore_index, z_loss, label_smoothing,
                            True, fused_reference, softcap)
        # `logits` now holds G; g * G in the logits' dtype (one rounding in 16 bits).
        logits.mul_(scale[chunk].to(logits.dtype))
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_rows[chunk])
        if need_grad_weight:
            _accumulate_(grad_weight, logits, h)
    if need_grad_hidden:
        grad_hidden.index_copy_(0, rows, grad_rows)
    if need_grad_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight


@_tokens_backward_op.register_fake
def _(hidden, weight, labels, grad_losses, ignore_index, z_loss, label_smoothing, chunk_size,
      need_grad_hidden, need_grad_weight, fused_reference, softcap):
    return (torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_grad_weight else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels = inputs[:3]
    ctx.options = inputs[3:]
    ctx.needs = (hidden.requires_grad, weight.requires_grad)
    ctx.save_for_backward(hidden, weight, labels)


@no_autocast
def _backward(ctx, grad_losses):
    hidden, weight, labels = ctx.saved_tensors
    ignore_index, z_loss, label_smoothing, chunk_size, fused_reference, softcap = ctx.options
    need_hidden, need_weight = ctx.needs
    grad_hidden, grad_weight = _tokens_backward_op(
        hidden, weight, labels, grad_losses.contiguous(), ignore_index, z_loss,
        label_smoothing, chunk_size, need_hidden, need_weight, fused_reference, softcap)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            None, None, None, None, None, None, None)


_tokens_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_tokens(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                ignore_index: int, z_loss: float, label_smoothing: float,
                                chunk_size: int, softcap: float = 0.0) -> torch.Tensor:
    """Per-token fp32 losses [N] of hidden [N, H] against labels [N] (0 where ignored);
    inputs already checked and flattened by ``linear_cross_entropy``. ``softcap`` (0: off)
    caps the logits as ``softcap * tanh(logits / softcap)`` inside the cross-entropy."""
    return _tokens_op(hidden, weight, labels, ignore_index, z_loss, label_smoothing, chunk_size,
                      torch.compiler.is_compiling(), softcap)


def linear_cross_entropy_tokens_reference(hidden: torch.Tensor, weight: torch.Tensor,
                                          labels: torch.Tensor, ignore_index: int = -100,
                                          z_loss: float = 0.0,
                                          label_smoothing: float = 0.0,
                                          softcap: float = 0.0) -> torch.Tensor:
    """The plain-torch formula: eager F.linear, (softcap), then per-token cross-entropy in fp32."""
    logits = torch.nn.functional.linear(hidden, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=ignore_index,
        label_smoothing=label_smoothing)
    if z_loss:
        lse = logits.flatten(0, -2).logsumexp(-1)
        loss = loss + torch.where(labels.flatten() != ignore_index, z_loss * lse * lse, 0.0)
    return loss.reshape(labels.shape)
