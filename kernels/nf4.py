"""NF4 dequantization of a torchao ``NF4Tensor`` (the QLoRA base-weight format).

Format (torchao 0.18 ``NF4Tensor``, read from its source): a weight of ``numel``
elements in row-major order is cut into blocks of ``block_size`` elements (64).

- ``quantized_data`` uint8 [numel/2]: two 4-bit codes per byte; element 2j is the
  high nibble of byte j, element 2j+1 the low nibble.
- ``nf4`` [16] (weight dtype): the NF4 code book, ``nf4[c]`` in [-1, 1].
- ``quantized_scalers`` int8 [numel/block_size]: the per-block absmax, double
  quantized: ``q_b = round((absmax_b - mean) * f_k)`` with one factor ``f_k`` per
  ``scaler_block_size`` (256) blocks.
- ``quantization_factor`` [n_blocks/scaler_block_size] and ``scaler_mean`` (0-dim),
  both in the weight dtype.

Dequantization of element e (block b = e // block_size, k = b // scaler_block_size),
every step rounded to the weight dtype d exactly as torchao's eager
``get_original_weight`` rounds it (each op computed in fp32, then rounded to d)::

    s_b = d(d(q_b / f_k) + mean)
    w_e = d(nf4[code_e] * s_b)

and finally cast to the requested output dtype. The result is bit-identical to
``nf4_tensor.to(dtype)``. There is no backward: the base weight is frozen, and
callers re-dequantize in their backward instead of saving the dense weight.

Precision notes for the kernel: division uses ``div_rn`` (IEEE, like torch) rather
than Triton's default approximate fp32 division, and every rounding goes through
``interpreter.cast`` (round to nearest even, also under the interpreter, whose own
fp32->bf16 cast truncates). No step is a multiply followed by an add, so FMA
contraction cannot change the result either.

kernels/ imports nothing from torchao: an NF4 weight is recognised by duck typing
(its class name and inner tensors), so this package stays torch + triton only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastune.kernels.dispatch import use_triton
from fastune.kernels.interpreter import cast
from fastune.kernels.autocast import no_autocast

# Bytes of quantized_data per program: 2048 output elements, 4 KiB of bf16 stores.
_BLOCK_BYTES = 1024
_NUM_WARPS = 4


class NF4Error(ValueError):
    """An NF4 weight in a layout the kernel does not take (one-line message)."""


@triton.jit
def _nf4_dequant_kernel(
    qdata_ptr,  # uint8 [n_bytes], two codes per byte
    qscaler_ptr,  # int8 [n_blocks]
    qfactor_ptr,  # weight dtype [n_scaler_blocks]
    mean_ptr,  # weight dtype, 0-dim
    table_ptr,  # weight dtype [16]
    out_ptr,  # output dtype [2 * n_bytes]
    n_bytes,
    HALF_BLOCK: tl.constexpr,  # block_size // 2: bytes per quantization block
    SCALER_BLOCK: tl.constexpr,  # scaler_block_size
    BLOCK_BYTES: tl.constexpr,
):
    WDTYPE: tl.constexpr = table_ptr.dtype.element_ty
    start = tl.program_id(0).to(tl.int64) * BLOCK_BYTES
    offs = start + tl.arange(0, BLOCK_BYTES)
    mask = offs < n_bytes

    packed = tl.load(qdata_ptr + offs, mask=mask, other=0).to(tl.int32)
    block = offs // HALF_BLOCK
    q_scaler = tl.load(qscaler_ptr + block, mask=mask, other=0).to(tl.float32)
    factor = tl.load(qfactor_ptr + block // SCALER_BLOCK, mask=mask, other=1.0).to(tl.float32)
    mean = tl.load(mean_ptr).to(tl.float32)
    scaler = cast(tl.math.div_rn(q_scaler, factor), WDTYPE).to(tl.float32)
    scaler = cast(scaler + mean, WDTYPE).to(tl.float32)

    high = tl.load(table_ptr + (packed >> 4)).to(tl.float32)
    low = tl.load(table_ptr + (packed & 0xF)).to(tl.float32)
    # Round to the weight dtype (as torchao does), then to the output dtype (as .to() does).
    first = cast(cast(high * scaler, WDTYPE).to(tl.float32), out_ptr.dtype.element_ty)
    second = cast(cast(low * scaler, WDTYPE).to(tl.float32), out_ptr.dtype.element_ty)

    out_offs = 2 * start + tl.arange(0, 2 * BLOCK_BYTES)
    values = tl.interleave(first, second)
    # int64: 2 * n_bytes overflows int32 from 2**30 packed bytes (2**31 weights) on.
    tl.store(out_ptr + out_offs, values, mask=out_offs < 2 * n_bytes.to(tl.int64))


def dequantize_parts(parts: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Dense weight in ``dtype`` from the inner tensors of an NF4 weight (``nf4_parts``),
    through the Triton kernel. Other ``fastune::`` ops call it directly inside their
    own (already opaque) implementations."""
    qdata, qscalers, qfactor, mean, table = parts
    block_size, scaler_block_size, rows, cols = meta
    out = torch.empty(rows, cols, dtype=dtype, device=qdata.device)
    n_bytes = qdata.numel()
    grid = (triton.cdiv(n_bytes, _BLOCK_BYTES),)
    _nf4_dequant_kernel[grid](
        qdata, qscalers, qfactor, mean, table, out, n_bytes,
        HALF_BLOCK=block_size // 2, SCALER_BLOCK=scaler_block_size,
        BLOCK_BYTES=_BLOCK_BYTES, num_warps=_NUM_WARPS,
    )
    return out


@torch.library.custom_op("fastune::nf4_dequantize", mutates_args=())
def _nf4_dequantize_op(parts: list[torch.Tensor], meta: list[int], dtype: torch.dtype) -> torch.Tensor:
    return dequantize_parts(parts, meta, dtype)


@_nf4_dequantize_op.register_fake
def _(parts, meta, dtype):
    return parts[0].new_empty(meta[2], meta[3], dtype=dtype)


def is_nf4(weight: torch.Tensor) -> bool:
    """True for a torchao ``NF4Tensor`` (duck-typed, so kernels/ never imports torchao)."""
    return type(weight).__name__ == "NF4Tensor" and hasattr(weight, "quantized_data")


def nf4_parts(weight: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """The plain tensors and integers that describe an NF4 weight, in the form the
    ``fastune::`` ops take: ([quantized_data, quantized_scalers, quantization_factor,
    scaler_mean, nf4], [block_size, scaler_block_size, rows, cols])."""
    if weight.dim() != 2 or not weight.is_contiguous() or weight.block_size % 2:
        raise NF4Error(
            f"NF4 weight must be a contiguous 2-D NF4Tensor with an even block_size, got "
            f"shape {tuple(weight.shape)}, stride {weight.stride()}, block_size {weight.block_size}"
        )
    parts = [weight.quantized_data, weight.quantized_scalers, weight.quantization_factor,
             weight.scaler_mean, weight.nf4]
    return parts, [weight.block_size, weight.scaler_block_size, *weight.shape]


@no_autocast
def nf4_dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense copy of an NF4 weight in ``dtype`` (default: its own), equal bit for bit
    to ``weight.to(dtype)``: the Triton kernel on CUDA, torchao's dequantization elsewhere."""
    dtype = dtype or weight.dtype
    if use_triton(weight):
        return _nf4_dequantize_op(*nf4_parts(weight), dtype)
    return weight.to(dtype)


def aot_specs() -> list[dict]:
    """The dequant kernel as launched for a bf16 QLoRA weight (torchao's default blocks)."""
    return [
        dict(
            name="nf4_dequant bf16 block 64/256",
            kernel=_nf4_dequant_kernel,
            signature={
                "qdata_ptr": "*u8", "qscaler_ptr": "*i8", "qfactor_ptr": "*bf16",
                "mean_ptr": "*bf16", "table_ptr": "*bf16", "out_ptr": "*bf16", "n_bytes": "i32",
                "HALF_BLOCK": "constexpr", "SCALER_BLOCK": "constexpr", "BLOCK_BYTES": "constexpr",
            },
            constexprs={"HALF_BLOCK": 32, "SCALER_BLOCK": 256, "BLOCK_BYTES": _BLOCK_BYTES},
            num_warps=_NUM_WARPS,
            multiple_of_16=["n_bytes"],  # numel / 2 of any Llama projection
        )
    ]
