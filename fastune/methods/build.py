"""``build_model``: the one way a model is built for training, the sharded path, the
planner, generation and quantization: the base model (loaded from an HF folder, or
with random or no weights), then ``method.adapt``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

import torch
from torch import nn

from fastune.methods.method import Method


def build_model(
    checkpoint_dir: Union[str, Path],
    method: Method,
    dtype: Union[str, torch.dtype] = "float32",
    device: Union[str, torch.device, None] = "cpu",
    kernels: Union[str, bool, None, Iterable[str]] = "all",
    weights: str = "load",
    model_config=None,
) -> nn.Module:
    """The model of ``checkpoint_dir`` in ``dtype``, adapted by ``method``.

    ``weights``:

    - ``"load"``: the weights of the HF folder ``checkpoint_dir``, on ``device``.
    - ``"meta"``: no storage at all (the meta device); the sharded path allocates and
      loads each rank's shards later, and QLoRA quantizes then, so NF4 is deferred.
    - ``"random"``: random weights, allocated by the current device context (the
      planner builds under ``FakeTensorMode``); ``device`` is ignored.

    ``model_config`` (a ``ModelConfig``) replaces ``checkpoint_dir/config.json`` for
    ``meta`` and ``random``. ``kernels``: the fused ops swapped in (``apply_kernels``),
    before the method adapts the model, so LoRA layers see the choice. In fp16 the
    trainable parameters are fp32 (``fastune.training.precision``).
    """
    from fastune.checkpoint.hf import load_hf_checkpoint, parse_dtype
    from fastune.models.config import ModelConfig
    from fastune.models.spec import get_spec
    from fastune.modules.kernels import apply_kernels

    dtype = parse_dtype(dtype)
    if weights == "load":
        model = load_hf_checkpoint(checkpoint_dir, dtype=dtype, device=device, kernels=kernels)
        method.adapt(model)
        return _trainable_fp32_under_fp16(model, dtype)
    if weights not in ("meta", "random"):
        raise ValueError(f"weights: expected load, meta or random, got {weights!r}")
    config = model_config if model_config is not None else ModelConfig.from_json(checkpoint_dir)
    spec = get_spec(config.model_type)
    if weights == "meta":
        with torch.device("meta"):
            model = spec.build(config).to(dtype)
        apply_kernels(model, kernels)
        method.adapt(model, quantize=False)
        return _trainable_fp32_under_fp16(model, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype, like a load
    try:
        model = spec.build(config)
    finally:
        torch.set_default_dtype(previous)
    model.reset_buffers()  # the RoPE frequencies stay fp32
    apply_kernels(model, kernels)
    method.adapt(model)
    return _trainable_fp32_under_fp16(model, dtype)


def _trainable_fp32_under_fp16(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """fp16 mixed precision (``fastune.training.precision``): the frozen base stays fp16,
    the trainable parameters (the adapters) go back to fp32."""
    if dtype == torch.float16:
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float16:
                p.data = p.data.float()
    return model
