"""Optimizers that save memory: torchao's low-bit AdamW states, torchao's CPU-offloaded
AdamW for one GPU, and the optimizer step run inside backward.

- ``optimizer=adamw8bit | adamw4bit | adamw_fp8`` (``torchao.optim.AdamW8bit`` ...):
  both Adam moments block-quantized (8-bit, 4-bit, fp8), each block with an fp32
  scale (and each 8-bit or 4-bit moment with its fp32 code book). torchao quantizes a tensor only when it has at least 4096 elements and a
  whole number of blocks; the others keep fp32 moments. The states are tensor
  subclasses that torchao registers as safe globals, so ``training_state.pt`` still
  loads with ``torch.load(weights_only=True)`` once ``torchao.optim`` is imported
  (``build_optimizer`` imports it before a resume reads the state).
- ``optimizer=cpu_offload_adamw`` (``cpu_offload_adamw`` below): torchao's
  ``CPUOffloadOptimizer``; parameters of 4096 elements or more keep their AdamW state
  and step on the CPU. CUDA only (torchao's rule). With ``optimizer.offload_gradients:
  true`` each gradient leaves the GPU as soon as backward has formed it.
- ``optimizer_in_backward: true`` (``OptimizerInBackward``): one optimizer per
  trainable parameter, stepped by the parameter's post-accumulate-grad hook, which
  then frees the gradient: at most one parameter's gradient exists at a time. The
  gradient norm is still logged (summed in the hooks); it cannot be clipped.

``check_optimizer_config`` refuses, in one line each, what these cannot do.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from fastune.errors import ConfigError

TORCHAO_LOW_BIT = {
    # component -> (bytes per moment element, elements per block with one fp32 scale,
    #               fp32 entries of the code book each quantized moment carries)
    "torchao.optim.AdamW8bit": (1.0, 256, 256),
    "torchao.optim.AdamW4bit": (0.5, 128, 16),
    "torchao.optim.AdamWFp8": (1.0, 256, 0),
}
CPU_OFFLOAD = "fastune.training.memory_optim.cpu_offload_adamw"
QUANTIZE_MIN_NUMEL = 4096  # torchao (after bitsandbytes): smaller tensors keep fp32 moments
OFFLOAD_MIN_NUMEL = 4096  # CPUOffloadOptimizer's default minimal_size


def cpu_offload_adamw(params: Iterable, lr: float = 1e-3, weight_decay: float = 0.01,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      offload_gradients: bool = False) -> torch.optim.Optimizer:
    """torchao's ``CPUOffloadOptimizer`` around ``torch.optim.AdamW`` (fused on the CPU)."""
    if not torch.cuda.is_available():
        raise ConfigError("optimizer: cpu_offload_adamw offloads a CUDA GPU's optimizer state to the CPU, "
                          "and torch sees no CUDA device; on the CPU use optimizer=adamw")
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=offload_gradients, lr=lr,
                               weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def check_optimizer_config(cfg, sharded: bool) -> None:
    """One line for each combination the optimizer cannot run."""
    component = cfg.optimizer.get("_component_")
    if sharded and component == CPU_OFFLOAD:
        raise ConfigError("optimizer: cpu_offload_adamw is for one GPU; under torchrun use "
                          "distributed.fsdp_cpu_offload: true")
    if component == CPU_OFFLOAD and cfg.optimizer.get("offload_gradients") and cfg.gradient_accumulation_steps != 1:
        raise ConfigError("optimizer.offload_gradients: true frees each GPU gradient once it is copied to the CPU, "
                          "so it needs gradient_accumulation_steps: 1, not "
                          f"{cfg.gradient_accumulation_steps}")
    if sharded and component in TORCHAO_LOW_BIT:
        raise ConfigError(f"optimizer: {component} under torchrun: fastune's sharded checkpoints do not "
                          "save torchao's quantized states yet; use optimizer=adamw with FSDP")
    if not cfg.optimizer_in_backward:
        return
    if sharded:
        raise ConfigError("optimizer_in_backward: true is for one process: FSDP2 sets the sharded gradients "
                          "after backward, where no per-parameter hook sees them")
    if cfg.gradient_accumulation_steps != 1:
        raise ConfigError("optimizer_in_backward: true steps in every backward, so it needs "
                          f"gradient_accumulation_steps: 1, not {cfg.gradient_accumulation_steps}")
    if cfg.clip_grad_norm is not None:
        raise ConfigError("optimizer_in_backward: true applies each gradient before the global norm is "
                          "known, so it cannot clip it: set clip_grad_norm: null")
    if component == CPU_OFFLOAD:
        raise ConfigError("optimizer_in_backward: true with cpu_offload_adamw: the offloaded optimizer "
                          "already steps from backward hooks; drop one of them")
    if cfg.model.dtype == "fp16":
        raise ConfigError("optimizer_in_backward: true with model.dtype: fp16: loss scaling must see every "
                          "gradient before any step; use one of them")


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per trainable parameter, stepped from that parameter's
    post-accumulate-grad hook, which then frees the gradient.

    ``step`` and ``zero_grad`` do nothing (the hooks did both). ``param_groups`` are the
    inner optimizers' groups, so a learning-rate scheduler drives them all, and
    ``state_dict`` holds every inner optimizer's, in parameter order. Like torchao's
    CPUOffloadOptimizer, it does not call ``Optimizer.__init__`` (it has no defaults of
    its own)."""

    def __init__(self, groups: list[dict[str, Any]], make: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]):
        self.optimizers: list[torch.optim.Optimizer] = []
        self._hooks = []
        self._grad_sq: Optional[torch.Tensor] = None
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                optimizer = make([{"params": [p], **options}])
                self.optimizers.append(optimizer)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(optimizer)))

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step_and_free(p: torch.Tensor) -> None:
            square = p.grad.detach().float().pow(2).sum()
            self._grad_sq = square if self._grad_sq is None else self._grad_sq + square
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step_and_free

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for optimizer in self.optimizers for g in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def take_grad_norm(self) -> torch.Tensor:
        """The norm of all gradients applied since the last call (the step's)."""
        norm = torch.zeros(()) if self._grad_sq is None else self._grad_sq.sqrt()
        self._grad_sq = None
        return norm

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_parameter"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimizer state for {len(states)} parameters, this model trains "
                             f"{len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)


def state_bytes(component: Optional[str], p: torch.Tensor, device_kind: str) -> Optional[int]:
    """Bytes of optimizer state that ``component`` keeps on the training device for the
    trainable ``p`` (AdamW's two moments; an unquantized moment has ``p``'s dtype, as
    torchao's ``zeros_like``), for the planner; None for an optimizer whose state the
    planner traces instead."""
    n = p.numel()
    if component in TORCHAO_LOW_BIT:
        per_element, block, code_book = TORCHAO_LOW_BIT[component]
        if n >= QUANTIZE_MIN_NUMEL and n % block == 0:
            return 2 * (math.ceil(n * per_element) + 4 * (n // block) + 4 * code_book)
        return 2 * p.element_size() * n
    if component == CPU_OFFLOAD:
        if device_kind == "cuda" and n >= OFFLOAD_MIN_NUMEL:
            return 0  # on the host
        return 2 * p.element_size() * n
    return None


def counted_in_planner(component: Optional[str]) -> bool:
    return component in TORCHAO_LOW_BIT or component == CPU_OFFLOAD


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]
