"""How the memory planner counts the memory-saving options that it cannot trace as they
run: torchao's optimizers, the optimizer step in backward, and fp16 on cards without bf16.

- torchao's low-bit AdamW compiles its step, and CPUOffloadOptimizer needs CUDA: neither
  runs on fake tensors. The traced step uses a stateless SGD in their place, and their
  state is counted from its layout (``fastune.training.memory_optim.state_bytes``:
  block-quantized moments plus an fp32 scale per block; fp32 moments for tensors under
  4096 elements; nothing on the GPU for an offloaded tensor).
- ``optimizer_in_backward`` (and ``cpu_offload_adamw`` with ``offload_gradients``):
  each gradient is freed by a post-accumulate-grad hook in the traced backward, as the
  training step frees it after its parameter's update (or its copy to the host).
- A profile whose card has no bf16 (``bf16: false``: T4, RTX 2080) plans a bf16 LoRA
  config in fp16, as training there must run it; full fine-tuning in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fastune.training.memory_optim import CPU_OFFLOAD, counted_in_planner, state_bytes


def optimizer_for_trace(cfg: DictConfig) -> dict[str, Any]:
    """The optimizer section the traced step builds: the config's, or a stateless SGD
    standing in for an optimizer whose state ``counted_state`` counts."""
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    if counted_in_planner(node.get("_component_")):
        return {"_component_": "torch.optim.SGD", "lr": node.get("lr", 1e-3)}
    return node


def counted_state(cfg: DictConfig, model: nn.Module, device: str) -> list[torch.Tensor]:
    """Byte buffers as large as the counted optimizer's state of each trainable parameter
    (none for a traced optimizer); allocated in the current mode (fake while planning)."""
    component = cfg.optimizer.get("_component_")
    if not counted_in_planner(component):
        return []
    sizes = [state_bytes(component, p, device) for p in model.parameters() if p.requires_grad]
    return [torch.empty(n, dtype=torch.uint8) for n in sizes if n]


def reference_copy(cfg: DictConfig, model: nn.Module) -> list[torch.Tensor]:
    """The frozen reference model a full fine-tuning DPO/IPO run keeps beside the policy
    (``Method.reference_model``), as buffers of its parameters' sizes, allocated in the
    current mode; none for LoRA methods (their reference is the model with adapters
    off) or other objectives. The reference's own forward runs under ``no_grad`` and is
    not traced: its transient activations are below the policy's."""
    from fastune.methods.method import method_from_config
    from fastune.training.preference import NEEDS_REFERENCE

    if cfg.get("objective", "sft") not in NEEDS_REFERENCE or method_from_config(cfg).lora is not None:
        return []
    return [torch.empty_like(p, requires_grad=False) for p in model.parameters()]


def free_grads_in_backward(cfg: DictConfig, model: nn.Module) -> None:
    """With ``optimizer_in_backward``, or ``cpu_offload_adamw`` with ``offload_gradients``:
    each gradient freed (applied, or copied to the host) as soon as it is complete."""
    offloaded = cfg.optimizer.get("_component_") == CPU_OFFLOAD and cfg.optimizer.get("offload_gradients", False)
    if not (cfg.get("optimizer_in_backward", False) or offloaded):
        return

    def free(p: torch.Tensor) -> None:
        p.grad = None

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(free)


def dtype_for_profile(cfg: DictConfig, profile) -> DictConfig:
    """``cfg`` as it must run on ``profile``'s card: bf16 on a card without bf16 becomes
    fp16 for LoRA methods (frozen fp16 base) and fp32 for full fine-tuning."""
    if getattr(profile, "bf16", True) or cfg.model.dtype != "bf16":
        return cfg
    from fastune.methods.method import method_from_config

    out = OmegaConf.create(OmegaConf.to_container(cfg))
    out.model.dtype = "fp32" if method_from_config(cfg).lora is None else "fp16"
    return out
