"""Swap fastune's fused kernels into a built model, op by op (as Liger-Kernel does).

The model is built with plain formulas (``fastune.models.transformer``).
``apply_kernels(model, ops)`` then changes the class of each module an op covers
to a subclass whose forward calls the fused op; parameters, buffers and state-dict
keys stay as they were. It is the one writer of the kernel choice: it records the
ops it applied on the model, and everything else (``apply_lora`` for new LoRA
layers, ``fastune.training.loss.build_loss`` for the loss) reads that record with
``enabled_kernels(model)``.

Ops (``KERNEL_OPS``):
- ``rms_norm``: RMSNorm and the residual add + RMSNorm of each decoder layer, with
  the family's norm numerics (Llama's, or Gemma's weight offset and fp32 product);
- ``rope``: rotary embedding of q and k in one op;
- ``swiglu``: the gated MLP activation, by the family's: silu(gate) * up (SwiGLU) or
  gelu_tanh(gate) * up (GeGLU, Gemma's ``gelu_pytorch_tanh``); the op keeps its
  first name, which configs spell;
- ``lora``: the LoRA linear forward (no dropout, no DoRA) as one op; with ``swiglu``
  also on, a SiLU MLP whose gate, up and down are all such LoRA layers (one scale, no
  bias) runs as the fused LoRA MLP op (``fused_lora_projections``);
- ``loss``: output projection + cross-entropy fused (read by ``build_loss``).

Call it before ``fully_shard`` and ``torch.compile``: both see the swapped classes.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from fastune import kernels
from fastune.models.spec import LLAMA_NUMERICS, KERNEL_OPS, get_spec, normalize_kernel_ops
from fastune.models.transformer import MLP, Attention, RMSNorm
from fastune.modules.lora import LoRALinear

__all__ = ["KERNEL_OPS", "apply_kernels", "enabled_kernels"]

# The attribute of the model that records the applied ops (a tuple in KERNEL_OPS order).
_RECORD = "fastune_kernels"


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.numerics
        return kernels.rms_norm(x, self.weight, self.eps, n.norm_weight_offset, n.norm_weight_in_fp32)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.numerics
        return kernels.add_rms_norm(x, residual, self.weight, self.eps, n.norm_weight_offset,
                                    n.norm_weight_in_fp32)


class FusedRoPEAttention(Attention):
    def rope(self, q, k, cos, sin):
        return kernels.apply_rope(q, k, cos, sin)


class FusedSwiGLUMLP(MLP):
    """SwiGLU by its kernel; and the whole MLP as the one fused LoRA MLP op when its
    projections allow (``fused_lora_projections``): that op saves gate and up for
    backward and recomputes silu(gate) * up, where three ops in a row also save the
    product (2 instead of 3 [tokens, intermediate] tensors per layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = fused_lora_projections(self)
        if lora is None:
            return super().forward(x)
        gate, up, down = lora
        return kernels.lora_mlp(x, gate.weight, gate.lora_A.weight, gate.lora_B.weight,
                                up.weight, up.lora_A.weight, up.lora_B.weight,
                                down.weight, down.lora_A.weight, down.lora_B.weight, gate.scale)

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return kernels.swiglu(gate, up)


class FusedGeGLUMLP(MLP):
    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return kernels.geglu(gate, up)


def fused_lora_projections(mlp: MLP) -> Optional[tuple[LoRALinear, LoRALinear, LoRALinear]]:
    """(gate, up, down) when the fused LoRA MLP computes exactly what they do: all three
    are LoRA layers on the ``lora`` kernel (``fused``), adapters on, no DoRA, no dropout,
    no bias, one scale. Checked at every forward: ``disable_adapters`` turns it off for
    a block. The MLP itself is ``FusedSwiGLUMLP`` only with the ``swiglu`` op on, which
    the family's activation (SiLU) allows."""
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if all(isinstance(m, LoRALinear) and m.fused and m.adapter_enabled and not m.use_dora
           and m.dropout == 0 and m.bias is None and m.scale == layers[0].scale for m in layers):
        return layers
    return None


# op -> (plain class, fused class)
_SWAPS = {"rms_norm": (RMSNorm, FusedRMSNorm), "rope": (Attention, FusedRoPEAttention)}
# The "swiglu" op's fused MLP, by the MLP's activation.
_FUSED_MLPS = {"silu": FusedSwiGLUMLP, "gelu_pytorch_tanh": FusedGeGLUMLP}


def _fused_class(op: str, module: nn.Module):
    """The class ``op`` swaps ``module`` to, or None."""
    if op == "swiglu" and type(module) is MLP:
        return _FUSED_MLPS[module.activation]
    if op in _SWAPS and type(module) is _SWAPS[op][0]:
        return _SWAPS[op][1]
    return None


def supported_ops(model: nn.Module) -> tuple[str, ...]:
    """The ops whose kernels compute the numerics of ``model``'s family."""
    config = getattr(model, "config", None)
    numerics = get_spec(config.model_type).numerics if config is not None else LLAMA_NUMERICS
    unsupported = set()
    if numerics.activation not in _FUSED_MLPS:
        unsupported.add("swiglu")
    return tuple(op for op in KERNEL_OPS if op not in unsupported)


def apply_kernels(model: nn.Module, ops: Union[str, bool, None, Iterable[str]] = "all") -> tuple[str, ...]:
    """Swap the fused kernels of ``ops`` (``"all"``, ``"none"``, or names from
    KERNEL_OPS; a bool means all or none) into ``model``, in place. Ops whose kernel
    does not compute the family's numerics are left plain. Returns, and records on
    the model, the ops now on (those of earlier calls included)."""
    wanted = set(normalize_kernel_ops(ops)) & set(supported_ops(model))
    for module in model.modules():
        for op in wanted:
            fused = _fused_class(op, module)
            if fused is not None:
                module.__class__ = fused
        if "lora" in wanted and isinstance(module, LoRALinear):
            module.fused = True
    applied = tuple(op for op in KERNEL_OPS if op in wanted or op in enabled_kernels(model))
    setattr(model, _RECORD, applied)
    return applied


def enabled_kernels(model: nn.Module) -> tuple[str, ...]:
    """The ops ``apply_kernels`` switched on for ``model`` (none for a plain model)."""
    return getattr(model, _RECORD, ())
