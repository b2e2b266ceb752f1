"""Post-training weight quantization with torchao, saved in torchao's own safetensors
serialization (``fastune.checkpoint.quantized``), which transformers loads as it is.

Schemes (torchao's own short names), applied to every linear layer of the decoder
(attention and MLP projections). The embedding, the norms and ``lm_head`` stay in
the model dtype: ``lm_head`` is often tied to the embedding, and the output
projection is the layer most sensitive to quantization.

- ``int8wo``: int8 weights, one scale per output channel; activations stay in the
  model dtype (``Int8WeightOnlyConfig``).
- ``int4wo``: int4 weights with a scale per group of ``group_size`` input
  channels (``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup)``).
  torchao's ``Int4WeightOnlyConfig`` layouts need CUDA (tile-packed, mslk) or XPU;
  the Intx tensor runs and serializes anywhere, so the checkpoint loads on any
  device, but it keeps one int4 value per byte: the file is about int8's size.
- ``int8dq``: int8 weights as in ``int8wo``, and activations quantized to int8
  per token on the fly, so the matmul runs in int8
  (``Int8DynamicActivationInt8WeightConfig``).

Each of the three loads in transformers (``AutoModelForCausalLM.from_pretrained``)
with logits equal to fastune's quantized model's (tests/test_quantize.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import torch

from fastune.checkpoint.quantized import (
    QuantizationError,
    QuantizationRecipe,
    decoder_linears,
    is_quantized,
    save_quantized,
)
from fastune.models.transformer import Transformer

__all__ = ["DEFAULT_GROUP_SIZE", "QuantizationError", "QuantizationRecipe", "disk_size", "quantize_checkpoint",
           "quantize_model"]

DEFAULT_GROUP_SIZE = 128  # int4wo; divides the hidden and MLP sizes of every Llama-family model


def quantize_model(model: Transformer, recipe: QuantizationRecipe) -> Transformer:
    """Quantize ``model``'s decoder linear layers in place (torchao ``quantize_``)."""
    from torchao.quantization import quantize_

    if recipe.group_size is not None:
        linears = decoder_linears(model)
        for name, module in linears:
            if module.in_features % recipe.group_size:
                common = math.gcd(*(m.in_features for _, m in linears))
                raise QuantizationError(
                    f"group_size: {recipe.group_size} does not divide the {module.in_features} input "
                    f"features of {name}; use {common & -common} or another divisor of {common}"
                )
    names = {name for name, _ in decoder_linears(model)}
    quantize_(model, recipe.torchao_config(), filter_fn=lambda module, fqn: fqn in names)
    return model


def quantize_checkpoint(
    source: Union[str, Path],
    out_dir: Union[str, Path],
    recipe: QuantizationRecipe,
    device: Union[str, torch.device] = "cpu",
) -> Path:
    """Load ``source`` (a checkpoint or a run's output_dir, see ``fastune.generation.load``),
    quantize it and write ``out_dir`` (atomically) with its tokenizer files.
    ``fastune generate`` and ``fastune eval`` load the result."""
    from fastune.generation.load import load_model, resolve_checkpoint

    if is_quantized(resolve_checkpoint(source)):
        raise QuantizationError(f"{source}: already quantized; quantize the original checkpoint")
    model, ckpt = load_model(source, dtype=recipe.dtype, device=device)
    quantize_model(model, recipe)
    return save_quantized(model, recipe, out_dir, tokenizer_source=ckpt)


def disk_size(path: Union[str, Path]) -> int:
    """Bytes of the weight files (*.safetensors) in a checkpoint folder."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
