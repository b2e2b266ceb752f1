"""Output projection fused with cross-entropy, never materializing [tokens, vocab] logits.

Math, for hidden states h [N, H], the output projection W [V, H] and targets y [N]:

    z = h W^T                         (the logits; GEMM with fp32 accumulation,
                                       stored in the input dtype like F.linear's)
    loss_sum = sum_i loss_i(z_i, y_i)  (per-token loss as in ``cross_entropy``, fp32, with
                                       its optional final-logit softcapping)
    G = dloss_sum/dz                  (see cross_entropy.py)
    dloss_sum/dh = G W,   dloss_sum/dW = G^T h

The tokens are processed in chunks of C rows. Per chunk: z_c = h_c W^T into a [C, V]
buffer, the per-row loss and G_c written over z_c in place (Triton kernel on CUDA, plain
torch elsewhere), then at once dh_c = G_c W and dW += G_c^T h_c (one GEMM into the fp32
accumulator on CUDA; see _accumulate_grad_weight_). All of that happens in
the FORWARD. Saved for backward: dh [N, H] (input dtype) and dW [V, H] (fp32 when
accumulated over several chunks, so the sum over chunks does not round at every step);
backward only multiplies them by the incoming scalar gradient of ``loss_sum``. dW is
neither formed nor saved when the weight needs no gradient (LoRA: lm_head frozen).

Memory: the chunk's logits [C, V] (the Triton kernel needs nothing more; the eager
reference adds two fp32 blocks of ``cross_entropy.REFERENCE_BLOCK`` elements), and, when
W is trained, the [V, H] fp32 accumulator (on CPU with 16-bit inputs, also a slice's GEMM
result: [GRAD_WEIGHT_SLICE, H] in the input dtype and in fp32).
The default C keeps C * V at most ``LOGITS_BUDGET`` elements (64 Mi: 128 MiB of bf16
logits); for 4096 tokens and a 128256 vocabulary that is 8 chunks of 512 tokens, against
1 GiB for the full bf16 logits (and about 6x that for eager F.linear + F.cross_entropy
in training).

The whole chunk loop is ONE opaque custom op. Traced as plain Python, the loop would be
unrolled into one graph, and inductor, free to reorder and fuse it, computes every
chunk's logits before any gradient and sums all chunks' dW in a single fused kernel: all
chunks alive at once, more memory than no chunking at all. Opaque, the loop runs as
written; the matmuls are torch's (cuBLAS on CUDA), the per-chunk cross-entropy is the
Triton kernel on CUDA and the plain-torch reference elsewhere (see cross_entropy.py),
compiled by the op itself when the caller is being compiled.

Only supervised rows are computed: ignored rows (masked prompts, padding) are dropped
before the first GEMM, and their gradient rows are zero. Counting them costs a host sync
unless the caller passes the count it knows on the host (``num_supervised``).

``reduction="none"`` (per-token losses, for sequence log-probs) is a second pair of ops
in linear_cross_entropy_tokens.py, on the same per-row cross-entropy: there the
gradient is formed in backward, since it is not one scalar times the forward's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastune.kernels.cross_entropy import (REFERENCE_BLOCK, check_labels, cross_entropy_rows_,
                                           supervised_count)
from fastune.kernels.autocast import no_autocast
from fastune.kernels.dispatch import use_triton
from fastune.kernels.linear_cross_entropy_tokens import linear_cross_entropy_tokens

# Largest chunk of logits, in elements, that one forward holds at a time.
LOGITS_BUDGET = 1 << 26
# Vocabulary rows per GEMM when dW is accumulated over chunks (see _add_grad_weight_).
GRAD_WEIGHT_SLICE = 8192


def default_chunk_size(n_tokens: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Tokens per chunk: the fewest chunks whose [chunk, vocab] logits fit in ``budget``
    elements, then split evenly, so chunks are alike (no small ragged last chunk)."""
    n_chunks = max(1, math.ceil(n_tokens * vocab / budget))
    return max(1, math.ceil(n_tokens / n_chunks))


def _accumulate_grad_weight_(grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                             h: torch.Tensor, first: bool, part: Optional[torch.Tensor],
                             part_fp32: Optional[torch.Tensor]) -> None:
    """grad_weight (fp32) = (0 if ``first`` else grad_weight) + grad_logits^T h.

    One GEMM per chunk, straight into the fp32 accumulator: cuBLAS takes bf16/fp16
    operands with an fp32 output (``addmm`` with ``out_dtype``), so dW moves 8 bytes per
    element per chunk (the accumulator read and written once) and rounds once, at the end.
    The first chunk has beta=0: the buffer is never zero-filled.

    The CPU has no such GEMM for 16-bit operands; there the product goes one slice of
    vocabulary rows at a time through the [GRAD_WEIGHT_SLICE, H] buffers ``part`` (GEMM
    result, input dtype) and ``part_fp32``, so no second [V, H] buffer exists."""
    if part is None:
        extra = {} if grad_logits.dtype == torch.float32 else {"out_dtype": torch.float32}
        torch.addmm(grad_weight, grad_logits.t(), h, beta=0 if first else 1, out=grad_weight,
                    **extra)
        return
    vocab = grad_logits.shape[1]
    for start in range(0, vocab, GRAD_WEIGHT_SLICE):
        rows = slice(start, start + GRAD_WEIGHT_SLICE)
        n = min(GRAD_WEIGHT_SLICE, vocab - start)
        torch.mm(grad_logits[:, rows].t(), h, out=part[:n])
        if first:
            grad_weight[rows].copy_(part[:n])
        else:
            # Upcast first: an fp32 += bf16 add_ converts through a fresh temporary, slowly.
            grad_weight[rows].add_(part_fp32[:n].copy_(part[:n]))


def _needs_slices(weight: torch.Tensor) -> bool:
    """Whether dW accumulates through slice buffers (16-bit GEMM on CPU, see above)."""
    return weight.device.type == "cpu" and weight.dtype != torch.float32


def _single_chunk(n_tokens: int, chunk_size: int) -> bool:
    """Whether the tokens make exactly one chunk, whose GEMM then gives dW as it is.
    Several chunks (or none) sum dW in an fp32 buffer instead."""
    return 0 < n_tokens <= chunk_size


def _supervised_rows_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int, z_loss: float, label_smoothing: float,
                             chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool,
                             fused_reference: bool, num_supervised: int = -1,
                             softcap: float = 0.0):
    """``_chunked_forward`` on the supervised rows only, gathered first.

    An ignored row has loss 0 and gradient 0, so its logits are wasted work: in
    instruction tuning with masked prompts that is most rows (86% on the training
    benchmark), and the output projection is the largest GEMM of a small model. Their
    number sizes the gathered buffer: ``num_supervised`` when the caller knows it on the
    host (>= 0), else counted here at the cost of one device sync per micro-batch; the
    GEMMs saved are worth far more.

    The row count is rounded up to one of 16 buckets of the batch (with ignored rows as
    filler): GEMM libraries cache a plan per shape (oneDNN's primitive cache on CPU
    grew by about 5 MiB per distinct row count, up to its 1024 entries)."""
    n_rows = labels.numel()
    ignored = labels == ignore_index
    if num_supervised < 0:
        num_supervised = int(n_rows - ignored.sum())  # the host sync the caller can spare
    bucket = max(64, -(-n_rows // 16))
    n_kept = min(n_rows, -(-num_supervised // bucket) * bucket)
    # dW is summed in fp32 (or not) as for the whole batch, as the fake implementation says.
    accumulate = need_grad_weight and not _single_chunk(n_rows, chunk_size)
    if n_kept == n_rows:
        return _chunked_forward(hidden, weight, labels, ignore_index, z_loss, label_smoothing,
                                chunk_size, need_grad_hidden, need_grad_weight, accumulate,
                                fused_reference, softcap)
    rows = torch.argsort(ignored.to(torch.uint8), stable=True)[:n_kept]  # supervised first
    loss, grad_rows, grad_weight = _chunked_forward(
        hidden.index_select(0, rows), weight, labels.index_select(0, rows), ignore_index,
        z_loss, label_smoothing, chunk_size, need_grad_hidden, need_grad_weight, accumulate,
        fused_reference, softcap)
    grad_hidden = hidden.new_empty(0)
    if need_grad_hidden:
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_rows)
    return loss, grad_hidden, grad_weight


def _chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     ignore_index: int, z_loss: float, label_smoothing: float, chunk_size: int,
                     need_grad_hidden: bool, need_grad_weight: bool, accumulate: bool,
                     fused_reference: bool, softcap: float = 0.0):
    """(loss_sum, dloss/dhidden, dloss/dweight), chunk by chunk; a gradient that is not
    needed comes back as an empty placeholder (custom ops return tensors only). With
    ``accumulate``, dW is summed over chunks in fp32; without, the rows make one chunk
    (or none) and dW is its GEMM, in the weight's dtype.

    Every chunk reuses the same buffers, allocated once here: on CPU a fresh large
    allocation page-faults in anew each time, which costs as much as the arithmetic."""
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    loss = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(0)
    if need_grad_weight and not accumulate and n_tokens == 0:
        grad_weight = torch.zeros_like(weight)
    part = part_fp32 = None
    if accumulate:
        # Every element is written by the first chunk's GEMM (beta=0), unless there is none.
        grad_weight = (torch.zeros if n_tokens == 0 else torch.empty)(
            weight.shape, dtype=torch.float32, device=weight.device)
        if _needs_slices(weight):
            part = weight.new_empty(min(GRAD_WEIGHT_SLICE, vocab), hidden_size)
            part_fp32 = torch.empty_like(part, dtype=torch.float32)
    logits_buffer = hidden.new_empty(min(chunk_size, n_tokens), vocab)
    for start in range(0, n_tokens, chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        logits = torch.mm(h, weight.t(), out=logits_buffer[: h.shape[0]])
        loss += cross_entropy_rows_(logits, labels[rows], ignore_index, z_loss,
                                    label_smoothing, need_grad_hidden or need_grad_weight,
                                    fused_reference, softcap).sum()
        # `logits` now holds dloss/dlogits for this chunk.
        if need_grad_hidden:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if accumulate:
            _accumulate_grad_weight_(grad_weight, logits, h, start == 0, part, part_fp32)
        elif need_grad_weight:
            grad_weight = logits.t() @ h
    return loss, grad_hidden, grad_weight


def workspace_bytes(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int, z_loss: float, label_smoothing: float, chunk_size: int,
                    need_grad_hidden: bool, need_grad_weight: bool,
                    fused_reference: bool, num_supervised: int = -1,
                    softcap: float = 0.0) -> int:
    """Most bytes the op holds inside beyond its inputs and outputs (memory trackers see
    only those): the chunk's logits, the gathered rows, dW's slice buffers, and the
    eager reference cross-entropy's two fp32 blocks. Takes the op's arguments; the bound
    holds for any ``num_supervised``."""
    n_tokens, hidden_size = hidden.shape
    vocab, item = weight.shape[0], hidden.element_size()
    logits = min(chunk_size, n_tokens) * vocab
    # + the gathered supervised rows and their gradient, when some rows are dropped
    total = logits * item + 2 * n_tokens * hidden_size * item
    if need_grad_weight and not _single_chunk(n_tokens, chunk_size) and _needs_slices(weight):
        total += min(GRAD_WEIGHT_SLICE, vocab) * hidden_size * (item + 4)
    if not use_triton(hidden) and not fused_reference:
        total += 2 * min(REFERENCE_BLOCK, logits) * 4
    return total


# Opaque to torch.compile (see the module docstring for why).
@torch.library.custom_op("fastune::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             ignore_index: int, z_loss: float, label_smoothing: float,
                             chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool,
                             fused_reference: bool, num_supervised: int, softcap: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _supervised_rows_forward(hidden, weight, labels, ignore_index, z_loss,
                                    label_smoothing, chunk_size, need_grad_hidden,
                                    need_grad_weight, fused_reference, num_supervised, softcap)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, z_loss, label_smoothing, chunk_size,
      need_grad_hidden, need_grad_weight, fused_reference, num_supervised, softcap):
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(0)
    if need_grad_weight:
        single = _single_chunk(hidden.shape[0], chunk_size)
        grad_weight = weight.new_empty(weight.shape,
                                       dtype=weight.dtype if single else torch.float32)
    return loss, grad_hidden, grad_weight


def _setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.weight_dtype = inputs[1].dtype
    ctx.need_grad_hidden, ctx.need_grad_weight = inputs[7], inputs[8]
    ctx.save_for_backward(grad_hidden, grad_weight)
    # The op's gradient outputs get no gradient: autograd would otherwise fill a zero
    # [V, H] fp32 tensor (2 GB at 8B) for grad_weight's every backward.
    ctx.set_materialize_grads(False)


def _scaled_grad_weight(grad_weight: torch.Tensor, grad_loss: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
    """grad_loss * grad_weight in ``dtype``, one slice of rows at a time: a whole-tensor
    product would add a second [V, H] fp32 temporary (1 GiB at V=128256, H=2048) beside
    the saved fp32 accumulator at the peak of backward. One rounding, as eager has."""
    out = torch.empty(grad_weight.shape, dtype=dtype, device=grad_weight.device)
    for start in range(0, grad_weight.shape[0], GRAD_WEIGHT_SLICE):
        rows = slice(start, start + GRAD_WEIGHT_SLICE)
        out[rows] = grad_weight[rows] * grad_loss
    return out


@no_autocast
def _backward(ctx, grad_loss, _grad_hidden_out, _grad_weight_out):
    """The gradients were formed in forward for a unit upstream gradient: scale them."""
    grad_hidden, grad_weight = ctx.saved_tensors
    return (grad_hidden * grad_loss if ctx.need_grad_hidden else None,
            _scaled_grad_weight(grad_weight, grad_loss, ctx.weight_dtype)
            if ctx.need_grad_weight else None,
            None, None, None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


@no_autocast
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, z_loss: float = 0.0,
                         label_smoothing: float = 0.0,
                         chunk_size: Optional[int] = None,
                         num_supervised: Optional[int] = None,
                         softcap: Optional[float] = None,
                         reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked.

    hidden [..., H], weight [V, H] (the lm_head, possibly tied to the embedding, trained
    or frozen), labels [...] already shifted (labels[i] is the target of position i;
    ``ignore_index`` positions are not supervised). Returns ``(loss_sum, n_tokens)``: the
    fp32 sum of the per-token losses over supervised tokens (with ``z_loss *
    logsumexp**2`` per token and PyTorch's label smoothing), and the number of supervised
    tokens as an int64 scalar tensor, without a host sync. Equals
    ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum", ...)``.

    ``chunk_size`` tokens are processed at a time (default: ``default_chunk_size``).
    ``num_supervised``: the number of labels here that are not ``ignore_index``, when the
    caller knows it on the host (the data loader counted it); the op then never syncs
    with the device. It must be exact: a smaller count drops supervised rows.

    ``softcap`` (Gemma 2's ``final_logit_softcapping``; None or 0: off): the loss is of
    ``softcap * tanh(logits / softcap)``, capped per chunk inside the cross-entropy, so
    no capped [tokens, vocab] tensor exists either.

    ``reduction="none"``: the first output is instead the fp32 per-token losses, shaped
    like ``labels`` (0 at ignored positions), and backward takes a gradient per token
    (linear_cross_entropy_tokens.py; ``num_supervised`` is not used there).
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    hidden_size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden states of size "
                         f"{hidden_size} need a weight of shape [vocab, {hidden_size}]")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the output weight is "
                         f"{weight.dtype}; cast one of them")
    check_labels(labels, hidden.shape[:-1], f"hidden states of shape {tuple(hidden.shape)}")
    if num_supervised is not None and not 0 <= num_supervised <= labels.numel():
        raise ValueError(f"num_supervised must be between 0 and the {labels.numel()} labels, "
                         f"got {num_supervised}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden_size)
    labels = labels.reshape(-1)
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    if reduction == "none":
        losses = linear_cross_entropy_tokens(hidden, weight, labels, ignore_index,
                                             float(z_loss), float(label_smoothing), chunk_size,
                                             float(softcap or 0.0))
        return losses.reshape(shape), supervised_count(labels, ignore_index)
    grad_enabled = torch.is_grad_enabled()
    loss, _, _ = _linear_cross_entropy_op(
        hidden, weight, labels, ignore_index, float(z_loss), float(label_smoothing),
        chunk_size,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
        # Traced by torch.compile: the caller wants inductor's code, which cannot reach
        # into the opaque op, so the op compiles its per-chunk reference itself.
        torch.compiler.is_compiling(),
        -1 if num_supervised is None else num_supervised,
        float(softcap or 0.0),
    )
    return loss, supervised_count(labels, ignore_index)
