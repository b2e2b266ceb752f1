"""FSDP2: sharding the model over the ranks, allocating and loading each rank's shards,
initializing the adapters as a single process does, and gathering the full state
dict for the export."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from fastune.distributed.loading import _is_nf4, _load_and_quantize_layer, _local, load_hf_weights
from fastune.distributed.world import World


def apply_fsdp(
    model: nn.Module,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    prepare_layer: Optional[Callable[[int, nn.Module], None]] = None,
) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, final norm,
    ``lm_head``), which stays gathered from forward to backward, as the fused loss reads
    ``lm_head.weight`` outside the model's forward.

    Parameters are stored and computed in ``param_dtype`` (the model's dtype, as in a
    single process); gradients are reduce-scattered in ``reduce_dtype``. Gradients
    are summed over ranks, not averaged: the recipe already divides the loss by the
    token count of the global batch. ``cpu_offload`` keeps sharded parameters,
    gradients and optimizer state in host memory (optimizer steps run on the CPU).
    ``prepare_layer(i, layer)`` runs just before layer ``i`` is sharded (QLoRA loads
    and quantizes it there). Apply after activation checkpointing and compile.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    )
    for i, layer in enumerate(model.layers):
        if prepare_layer is not None:
            prepare_layer(i, layer)
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM: the default pre-multiplied sum is NCCL-only (gloo refuses it).
            module.set_force_sum_reduction_for_comms(True)


def shard_and_load(model: nn.Module, method, section, world: World, weights_dir: Optional[Path]) -> None:
    """Shard the meta model over the ranks (``apply_fsdp``), allocate each rank's shards,
    read the base weights from the HF checkpoint ``weights_dir`` (None: they come from
    the resume state instead) and initialize the adapters.

    ``method``: the ``fastune.methods.method.Method`` (an NF4 base is read, quantized
    and sharded layer by layer); ``section``: the config's ``DistributedSection``.
    """
    from fastune.checkpoint.hf import parse_dtype

    dtype = parse_dtype(section.model.dtype)
    # With CPU offload FSDP keeps the shards in host memory; they are created there.
    home = torch.device("cpu") if section.fsdp_cpu_offload else world.device
    prepare = None
    if method.nf4_base:
        def prepare(index: int, layer: nn.Module) -> None:
            _load_and_quantize_layer(layer, f"layers.{index}.", section.model.checkpoint_dir, home,
                                     world.world_size)

    apply_fsdp(model, dtype, parse_dtype(section.reduce_dtype), section.fsdp_reshard_after_forward,
               section.fsdp_cpu_offload, prepare)
    _materialize(model, home)
    model.reset_buffers(world.device)
    if weights_dir is not None:
        load_hf_weights(model, weights_dir)
    init_adapters(model, world.device)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialized) every parameter and buffer still on the meta device,
    leaving those already loaded (QLoRA's NF4 layers) alone."""
    for m in module.modules():
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if any(t.is_meta for t in tensors):
            m.to_empty(device=device, recurse=False)


@torch.no_grad()
def init_adapters(model: nn.Module, device: torch.device) -> None:
    """Initialize every LoRA adapter as a single-process run does, at any world size.

    A single process builds each ``LoRALinear`` on a real device, which draws from the
    global RNG three times: the init of ``lora_A`` as an ``nn.Linear``, that of
    ``lora_B``, then ``reset_lora_parameters`` (A kaiming-uniform, B zero). On the
    meta device nothing was drawn, so the same draws are made here, in full, on every
    rank (same seed, same values; an adapter is r x (in + out) numbers), and each rank
    keeps its shard. DoRA magnitudes then come from the loaded base weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from fastune.modules.lora import LoRAError, LoRALinear
    from fastune.modules.peft import init_dora_magnitudes

    full = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        if m.init != "default":  # PiSSA/OLoRA/LoftQ factor the full weight: not shard by shard
            raise LoRAError(f"lora.init={m.init}: not supported with FSDP (sharded weights); use one device")
        dtype = _local(m.lora_A.weight).dtype
        a = torch.empty(m.rank, m.in_features, device=device, dtype=dtype)
        b = torch.empty(m.out_features, m.rank, device=device, dtype=dtype)
        for t in (a, b, a):  # nn.Linear's init of A, of B, then reset_lora_parameters' A
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        full[f"{name}.lora_A.weight"], full[f"{name}.lora_B.weight"] = a, b.zero_()
    if not full:
        return
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    init_dora_magnitudes(model)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, world: World, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict in rank 0's host memory, gathered one tensor at a
    time; an empty dict on the other ranks. Every rank must call it.

    NF4 weights come back dense: each rank dequantizes its own shard (whole NF4 blocks,
    see ``_check_nf4_shardable``) and the dense rows are gathered. The export needs them
    dense anyway, and torchao's NF4 all-gather outside FSDP's own hooks leaves
    collectives unwaited (torch warns about it).
    """
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    gathered: dict[int, Optional[torch.Tensor]] = {}  # tied weights are gathered once
    out = {}
    for key, value in model.state_dict().items():
        if trainable_only and key not in trainable:
            continue
        if id(value) not in gathered:
            gathered[id(value)] = _gather(value, keep=world.is_main)
        if world.is_main:
            out[key] = gathered[id(value)]
    return out


def _gather(value: torch.Tensor, keep: bool) -> Optional[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value.to_local()
        if _is_nf4(local):
            value = DTensor.from_local(local.get_original_weight(), value.device_mesh, value.placements,
                                       shape=value.shape, stride=value.stride())
        value = value.full_tensor()
    return value.cpu() if keep else None
