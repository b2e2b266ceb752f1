"""Cross-entropy over a logits buffer, with the gradient written into that buffer.

Math, per row i of logits z (V classes), target y, label smoothing e, z-loss weight k,
all in fp32 whatever the dtype of z:

    lse_i  = log sum_j exp(z_ij)                       (online: running max m and
                                                        running sum d = sum_j exp(z_ij - m),
                                                        rescaled when m grows)
    loss_i = lse_i - (1 - e) z_iy - e mean_j z_ij + k lse_i^2
           = (1 - e) NLL + e mean_j(-log p_ij) + k lse_i^2     (PyTorch's label smoothing)
    dloss_i/dz_ij = p_ij (1 + 2 k lse_i) - e / V - (1 - e) [j == y],  p_ij = exp(z_ij - lse_i)

With final-logit softcapping c (Gemma 2), z_ij is first replaced by c tanh(z_ij / c),
in fp32 wherever it is read, and the gradient is multiplied by the cap's derivative
1 - tanh(z_ij / c)^2, so it is w.r.t. the uncapped logits in the buffer.

Rows whose target is ``ignore_index`` have loss 0 and gradient 0. A target outside
[0, V) that is not ``ignore_index`` makes that row's loss NaN: checking it on the host
would cost a device sync, and a NaN loss is caught by the training loop at once.

Forward computes the loss AND the gradient (when one is needed) and overwrites the logits
buffer with dloss/dz in the input dtype. So the buffer is the only thing saved for
backward, and backward scales it by the incoming scalar gradient of the summed loss.
This halves the memory of eager cross-entropy, which keeps logits, log-probabilities and
their gradient alive together. In bf16 the scaling rounds a second time, unless the scale
is 1: call ``backward()`` on the summed loss and divide the gradients by the token count
afterwards to get exactly one rounding, as eager autograd has.

Both paths form the loss from logits shifted by the row max m, as log_softmax does:
log d - (1 - e)(z_iy - m) - e (mean_j z_ij - m) + k lse^2 with lse = m + log d;
lse - z_iy would lose the low bits of two large, nearly equal numbers.

The Triton kernel handles one row per program: it reads the target logit first, then
pass 1 reads the row once for the online logsumexp (and the row sum, only when label
smoothing is on: a constexpr), pass 2 reads it again and writes the gradient in place.
An ignored row is not read at all: its gradient row is written as zeros. Backward
scales the buffer in place, so no second [rows, V] buffer exists. ``linear_cross_entropy`` uses the same per-row entry
point, ``cross_entropy_rows_``, on chunks of logits it computes itself.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from fastune.kernels.dispatch import use_triton
from fastune.kernels.autocast import no_autocast
from fastune.kernels.interpreter import cast, tanh

# Widest vocabulary block a program loads at once: 4096 fp32 values over 8 warps are 16
# registers per thread, so the loop over a 128k vocabulary stays spill-free.
MAX_BLOCK_V = 4096
# Logits per block of rows in the eager reference: its two fp32 temporaries stay at 64 MiB
# each however many rows there are. (Cache-sized blocks mean thousands of small parallel
# ops per step, whose thread synchronization costs more than it saves on a busy machine.)
REFERENCE_BLOCK = 1 << 24


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, row_stride, labels_ptr, loss_ptr,
    vocab, ignore_index, z_loss, label_smoothing, softcap,
    COMPUTE_GRAD: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """loss_ptr[row] = loss of one row; with COMPUTE_GRAD the row becomes dloss/dlogits.
    SMOOTHING: label_smoothing is not 0 (otherwise the row sum is not formed).
    SOFTCAP: every logit read is first capped, z := softcap * tanh(z / softcap)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        # Loss 0 and a zero gradient row: nothing to read.
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
                tl.store(row_ptr + cols, zeros, mask=cols < vocab)
    else:
        in_range = (label >= 0) & (label < vocab)
        # The target logit is read FIRST: pass 2 overwrites the row, and the threads that
        # write column `label` there are ordered after this load only by the barriers of
        # pass 1's reductions (a load after them could race with pass 2's stores).
        target = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
        if SOFTCAP:
            target = softcap * tanh(target / softcap)

        # Pass 1: online logsumexp, and the row sum that label smoothing needs.
        m = float("-inf")
        d = 0.0
        row_sum = 0.0
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < vocab
            x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                x = tl.where(mask, softcap * tanh(x / softcap), float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            if SMOOTHING:
                row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m = m_new
        log_d = tl.log(d)
        lse = m + log_d

        # The loss is formed from logits shifted by the row max (see the module docstring).
        loss = log_d - (1.0 - label_smoothing) * (target - m)
        if SMOOTHING:
            loss -= label_smoothing * (row_sum / vocab - m)
        loss += z_loss * lse * lse
        tl.store(loss_ptr + row, tl.where(in_range, loss, float("nan")))

        if COMPUTE_GRAD:
            p_scale = 1.0 + 2.0 * z_loss * lse
            target_coef = 1.0 - label_smoothing
            for start in range(0, vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < vocab
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    t = tanh(x / softcap)
                    x = softcap * t
                grad = tl.exp(x - lse) * p_scale - tl.where(cols == label, target_coef, 0.0)
                if SMOOTHING:
                    grad -= label_smoothing / vocab
                if SOFTCAP:
                    grad *= 1.0 - t * t  # d(cap * tanh(z / cap))/dz
                tl.store(row_ptr + cols, cast(grad, logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary size."""
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    return block_v, (8 if block_v >= 2048 else 4)


def _cross_entropy_rows_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                               z_loss: float, label_smoothing: float,
                               compute_grad: bool, softcap: float) -> torch.Tensor:
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block_v, num_warps = _launch_config(vocab)
    _cross_entropy_kernel[(rows,)](
        logits, logits.stride(0), labels.contiguous(), loss, vocab, ignore_index, z_loss,
        label_smoothing, softcap, COMPUTE_GRAD=compute_grad, SMOOTHING=label_smoothing != 0.0,
        BLOCK_V=block_v, SOFTCAP=softcap != 0.0, num_warps=num_warps,
    )
    return loss


# An opaque op: torch.compile keeps it as one call (the kernel runs at run time, also under
# the CPU interpreter), and functionalization knows it writes into `logits`.
@torch.library.custom_op("fastune::cross_entropy_rows_", mutates_args={"logits"})
def _cross_entropy_rows_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                           z_loss: float, label_smoothing: float,
                           compute_grad: bool, softcap: float) -> torch.Tensor:
    return _cross_entropy_rows_triton(logits, labels, ignore_index, z_loss, label_smoothing,
                                      compute_grad, softcap)


@_cross_entropy_rows_op.register_fake
def _(logits, labels, ignore_index, z_loss, label_smoothing, compute_grad, softcap):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _cross_entropy_rows_math(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                             z_loss: float, label_smoothing: float,
                             compute_grad: bool, softcap: float = 0.0) -> torch.Tensor:
    """The kernel's math in plain torch, on logits shifted by the row max m. Written as
    row reductions plus one elementwise pass, so that inductor reads the row a few times
    and keeps no [rows, V] fp32 temporary (log_softmax would be one); in eager mode the
    in-place ops keep two. ``softcap`` (0: off) caps the logits first."""
    vocab = logits.shape[-1]
    z = logits.float()
    if softcap:
        z = (z / softcap).tanh_().mul_(softcap)
    m = z.amax(dim=-1, keepdim=True)
    log_d = (z - m).exp_().sum(dim=-1, keepdim=True).log()
    lse = (m + log_d).squeeze(-1)
    supervised = labels != ignore_index
    in_range = (labels >= 0) & (labels < vocab)
    safe_labels = torch.where(supervised & in_range, labels, 0).unsqueeze(-1)
    shifted_target = (z.gather(-1, safe_labels) - m).squeeze(-1)
    loss = log_d.squeeze(-1) - (1.0 - label_smoothing) * shifted_target
    if label_smoothing:
        loss = loss - label_smoothing * (z.mean(dim=-1) - m.squeeze(-1))
    loss = loss + z_loss * lse * lse
    loss = torch.where(in_range, loss, float("nan"))
    loss = torch.where(supervised, loss, 0.0)
    if compute_grad:
        p_scale = torch.where(supervised, 1.0 + 2.0 * z_loss * lse, 0.0).unsqueeze(-1)
        uniform = torch.where(supervised, label_smoothing / vocab, 0.0).unsqueeze(-1)
        target_coef = torch.where(supervised, label_smoothing - 1.0, 0.0).unsqueeze(-1)
        grad = (z - lse.unsqueeze(-1)).exp_().mul_(p_scale).sub_(uniform)
        if torch.compiler.is_compiling():
            # Inductor makes one pass of this comparison with an iota; a scatter would
            # first materialize the [rows, V] fp32 gradient.
            columns = torch.arange(vocab, device=logits.device)
            grad = grad + torch.where(columns == safe_labels, target_coef, 0.0)
        else:
            grad = grad.scatter_add_(-1, safe_labels, target_coef)
        if softcap:
            # d(cap * tanh(z / cap))/dz = 1 - (capped / cap)^2, formed in z's buffer.
            grad = grad.mul_(z.div_(softcap).square_().neg_().add_(1.0))
        logits.copy_(grad)
    return loss


@functools.cache
def _fused_rows_math():
    # dynamic: the number of rows changes from batch to batch (supervised rows only).
    return torch.compile(_cross_entropy_rows_math, dynamic=True)


def _cross_entropy_rows_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                                  z_loss: float, label_smoothing: float, compute_grad: bool,
                                  fused: bool = False, softcap: float = 0.0) -> torch.Tensor:
    """``_cross_entropy_rows_math`` over the whole buffer when torch.compile traces it
    or ``fused`` asks for inductor's version (it fuses the math, with no [rows, V]
    temporaries), and over blocks of rows in eager mode, where ops make temporaries:
    they then stay at 2 x REFERENCE_BLOCK fp32 elements however many rows there are (the
    kernel keeps none)."""
    if torch.compiler.is_compiling():
        return _cross_entropy_rows_math(logits, labels, ignore_index, z_loss, label_smoothing,
                                        compute_grad, softcap)
    if fused:
        return _fused_rows_math()(logits, labels, ignore_index, z_loss, label_smoothing,
                                  compute_grad, softcap)
    block_rows = max(1, REFERENCE_BLOCK // logits.shape[-1])
    return torch.cat([
        _cross_entropy_rows_math(x, y, ignore_index, z_loss, label_smoothing, compute_grad,
                                 softcap)
        for x, y in zip(logits.split(block_rows), labels.split(block_rows))
    ])


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        z_loss: float, label_smoothing: float, compute_grad: bool,
                        fused_reference: bool = False, softcap: float = 0.0) -> torch.Tensor:
    """Per-row fp32 loss of a [rows, V] logits buffer (last dim contiguous).

    With ``compute_grad`` the buffer is overwritten with dloss_i/dlogits_i (see the module
    docstring); without it the buffer is left as it is. ``fused_reference``: off the
    Triton path, run the reference compiled by inductor (for callers inside an opaque
    custom op of a compiled graph, where inductor cannot reach it). ``softcap`` (0: off):
    the loss is of softcap * tanh(logits / softcap), and the gradient is w.r.t. the
    uncapped logits in the buffer."""
    if use_triton(logits):
        return _cross_entropy_rows_op(logits, labels, ignore_index, z_loss, label_smoothing,
                                      compute_grad, softcap)
    return _cross_entropy_rows_reference(logits, labels, ignore_index, z_loss, label_smoothing,
                                         compute_grad, fused_reference, softcap)


def check_labels(labels: torch.Tensor, leading_shape: torch.Size, what: str) -> None:
    """One-line error when labels do not line up with the rows of ``what``."""
    if labels.shape != leading_shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but {what} needs labels of "
                         f"shape {tuple(leading_shape)} (one per token)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def supervised_count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of supervised tokens as an int64 scalar tensor (no host sync)."""
    return (labels != ignore_index).sum()


class _CrossEntropy(torch.autograd.Function):
    """Loss and gradient in forward; backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, z_loss, label_smoothing, compute_grad,
                softcap):
        loss = cross_entropy_rows_(logits, labels, ignore_index, z_loss, label_smoothing,
                                   compute_grad, softcap=softcap).sum()
        # The buffer now holds dloss/dlogits. Saving a detached alias keeps autograd's
        # version check for any other user of the logits that saved them.
        ctx.save_for_backward(logits.detach() if compute_grad else None)
        return loss

    @staticmethod
    @no_autocast
    def backward(ctx, grad_loss):
        (grad_logits,) = ctx.saved_tensors
        if grad_logits is None:
            return None, None, None, None, None, None, None
        # In place: the buffer is this op's alone since forward consumed the logits; a
        # product out of place would be a second [T, V] buffer at the peak of backward.
        return grad_logits.mul_(grad_loss), None, None, None, None, None, None


@no_autocast
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  z_loss: float = 0.0,
                  label_smoothing: float = 0.0,
                  softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``logits`` [..., V] against ``labels`` [...].

    Returns ``(loss_sum, n_tokens)``: the fp32 sum over supervised tokens (labels not
    equal to ``ignore_index``) of the per-token loss, plus ``z_loss * logsumexp**2`` per
    supervised token, with PyTorch's label smoothing; and the number of supervised tokens
    as an int64 scalar tensor. Divide by the step's total ``n_tokens`` to normalize.

    When a gradient is needed, ``logits`` is CONSUMED: its storage is overwritten with
    dloss/dlogits during the forward (that buffer is what backward returns, scaled), so
    do not read the logits after this call. Without a gradient they are left untouched.

    ``softcap`` (Gemma 2's ``final_logit_softcapping``; None or 0: off): the loss is
    taken of ``softcap * tanh(logits / softcap)``, capped inside the kernel in fp32, and
    the gradient is w.r.t. the uncapped ``logits``.
    """
    check_labels(labels, logits.shape[:-1], f"logits of shape {tuple(logits.shape)}")
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    flat_labels = labels.reshape(-1)
    loss = _CrossEntropy.apply(rows, flat_labels, ignore_index, float(z_loss),
                               float(label_smoothing), compute_grad, float(softcap or 0.0))
    return loss, supervised_count(flat_labels, ignore_index)


def aot_specs() -> list[dict]:
    """Representative launches for kernels/aot.py: the Llama 3 vocabulary (128256), bf16
    training chunks (gradient written in place) and fp32 evaluation (loss only); and
    Gemma 2's softcapped logits over its 256000 vocabulary."""
    specs = []
    for vocab, dtype, compute_grad, smoothing, softcap in (
            (128256, "bf16", True, False, False), (128256, "bf16", True, True, False),
            (128256, "fp32", False, False, False), (256000, "bf16", True, False, True),
            (256000, "fp32", False, False, True)):
        block_v, num_warps = _launch_config(vocab)
        signature = {"logits_ptr": f"*{dtype}", "row_stride": "i32", "labels_ptr": "*i64",
                     "loss_ptr": "*fp32", "vocab": "i32", "ignore_index": "i32",
                     "z_loss": "fp32", "label_smoothing": "fp32", "softcap": "fp32",
                     "COMPUTE_GRAD": "constexpr", "SMOOTHING": "constexpr",
                     "BLOCK_V": "constexpr", "SOFTCAP": "constexpr"}
        specs.append(dict(
            name=(f"cross_entropy{'+grad' if compute_grad else ''}"
                  f"{'+smooth' if smoothing else ''}{'+softcap' if softcap else ''} "
                  f"V={vocab} {dtype}"),
            kernel=_cross_entropy_kernel, signature=signature, num_warps=num_warps,
            constexprs={"COMPUTE_GRAD": compute_grad, "SMOOTHING": smoothing,
                        "BLOCK_V": block_v, "SOFTCAP": softcap},
            # 128256 and a contiguous buffer's row stride (= vocab) are multiples of 16:
            # the launcher specializes them so, and so must the AOT compile.
            multiple_of_16=["row_stride", "vocab"]))
    return specs
