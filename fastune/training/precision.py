"""fp16 mixed precision, for cards without bf16 (T4, RTX 20 series, V100).

``model.dtype: fp16`` means: the frozen base in fp16, every trainable parameter (the
adapters) and so its gradient and optimizer state in fp32, and dynamic loss scaling.
The LoRA layers cast their fp32 adapters to the input's dtype at use, so the matmuls
run in fp16 and autograd brings the gradients back to fp32. The loss is multiplied
by the scaler's scale before backward; the gradients are unscaled before clipping;
a step whose gradients hold an inf or NaN is skipped (the scale halves) and counted
in the metric ``skipped_steps``.

Full fine-tuning trains every weight, so it has no frozen fp16 base: it is refused
with fp16 (fp32 master weights for all of them are the fp32 run).

Under FSDP2 the same holds shard by shard: FSDP gathers the fp32 adapters in fp16
(``param_dtype``), the cast the LoRA layer makes in one process, and reduce-scatters
their gradients in fp32. The scaler's inf check runs on the DTensor gradients, whose
handler reduces ``found_inf`` over the ranks (a max), so every rank skips the same steps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastune.errors import ConfigError


def check_precision(dtype: str, trains_base: bool, device: torch.device) -> None:
    """One line for a dtype this run cannot use."""
    if dtype == "fp16" and trains_base:
        raise ConfigError("model.dtype: fp16 keeps a frozen fp16 base under fp32 adapters; full fine-tuning "
                          "has no frozen base: use method=lora (or qlora) with fp16, or model.dtype=fp32")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"model.dtype: bf16, but the {name} has no bf16; use model.dtype=fp16 "
                          "(LoRA methods) or model.dtype=fp32")


def build_grad_scaler(dtype: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """The dynamic loss scaler of an fp16 run (None otherwise)."""
    return torch.amp.GradScaler(device.type) if dtype == "fp16" else None
