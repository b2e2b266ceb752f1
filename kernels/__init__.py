"""Triton kernels with reference PyTorch implementations, imported as ``fastune.kernels``.

This package depends on torch and triton only, never on the rest of fastune.
Each op is a plain function that runs the Triton kernel on CUDA tensors (or under
``dispatch.force_triton()``) and its reference implementation elsewhere.
Add an op's public functions below, one import line per op file.
"""

from fastune.kernels.cross_entropy import cross_entropy
from fastune.kernels.geglu import geglu
from fastune.kernels.linear_cross_entropy import linear_cross_entropy
from fastune.kernels.linear_cross_entropy_tokens import linear_cross_entropy_tokens_reference
from fastune.kernels.lora import lora_linear
from fastune.kernels.lora_mlp import lora_mlp
from fastune.kernels.nf4 import nf4_dequantize
from fastune.kernels.rms_norm import add_rms_norm, rms_norm
from fastune.kernels.rope import apply_rope
from fastune.kernels.swiglu import swiglu

__all__ = ["add_rms_norm", "apply_rope", "cross_entropy", "geglu", "linear_cross_entropy",
           "linear_cross_entropy_tokens_reference", "lora_linear", "lora_mlp", "nf4_dequantize",
           "rms_norm", "swiglu"]
