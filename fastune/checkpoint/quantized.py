"""The quantized checkpoint format: its recipe, and saving and loading it.

On disk (safetensors cannot hold tensor subclasses, and weights are never
pickled): a quantized weight ``W`` of HF key ``k`` is stored as its plain inner
tensors ``k.qdata`` (int8; for ``int4wo`` two values packed per uint8 byte),
``k.scale`` and ``k.zero_point``, in ``quantized_model.safetensors``.
``config.json`` records the scheme under ``quantization_config`` with
``quant_method: fastune-torchao``. Loading builds each quantized layer by
quantizing an all-zero weight of the right shape with the same torchao config
(which gives the tensor subclass and its metadata), then copies the stored
tensors into it. The file name keeps ``transformers`` (which skips an unknown
quant_method) from loading the checkpoint as a random-initialized model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn

from fastune.checkpoint.atomic import atomic_directory
from fastune.checkpoint.hf import CheckpointError, parse_dtype, to_hf_key, write_safetensors
from fastune.checkpoint.layout import CONFIG_NAME, QUANTIZED_WEIGHTS, copy_tokenizer_files
from fastune.errors import FastuneError
from fastune.models.config import ModelConfig
from fastune.models.spec import get_spec
from fastune.models.transformer import Transformer
from fastune.modules.kernels import apply_kernels
from fastune.modules.peft import LAYER_PROJECTIONS

QUANT_METHOD = "fastune-torchao"
SCHEMES = ("int8wo", "int4wo", "int8dq")
_INNER = ("qdata", "scale", "zero_point")
# The decoder-layer projections (every family's, from its spec).
_QUANTIZED_LAYERS = LAYER_PROJECTIONS


class QuantizationError(FastuneError, ValueError):
    """A scheme, group size or checkpoint that cannot be quantized or loaded."""


@dataclasses.dataclass(frozen=True)
class QuantizationRecipe:
    scheme: str
    dtype: torch.dtype = torch.bfloat16  # of the activations, scales and unquantized weights
    group_size: Optional[int] = None  # int4wo only

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"scheme: unknown {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if (self.group_size is not None) != (self.scheme == "int4wo"):
            raise QuantizationError(f"group_size: set for int4wo, and only for it (scheme {self.scheme})")

    def torchao_config(self):
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup

        if self.scheme == "int8wo":
            return Int8WeightOnlyConfig()
        if self.scheme == "int8dq":
            return Int8DynamicActivationInt8WeightConfig()
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))

    def to_json(self) -> dict:
        import torchao

        return {"quant_method": QUANT_METHOD, "scheme": self.scheme, "group_size": self.group_size,
                "dtype": str(self.dtype).removeprefix("torch."), "modules": list(_QUANTIZED_LAYERS),
                "torchao_version": torchao.__version__}

    @classmethod
    def from_json(cls, d: dict, source: str) -> "QuantizationRecipe":
        try:
            return cls(scheme=d["scheme"], dtype=parse_dtype(d["dtype"]), group_size=d.get("group_size"))
        except KeyError as e:
            raise QuantizationError(f"{source}: quantization_config lacks key {e.args[0]!r}") from None


def is_quantized(checkpoint_dir: Union[str, Path]) -> bool:
    """True for a checkpoint written by ``quantize_checkpoint``."""
    return _quantization_config(Path(checkpoint_dir)) is not None


def _quantization_config(path: Path) -> Optional[dict]:
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    projections = get_spec(model.config.model_type).layer_projections
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in projections]


def save_quantized(model: Transformer, recipe: QuantizationRecipe, out_dir: Union[str, Path],
                   tokenizer_source: Path) -> Path:
    """Write ``model`` (quantized with ``recipe``) to ``out_dir`` (atomically), with the
    tokenizer files of ``tokenizer_source``."""
    tensors = _flat_tensors(model, recipe)
    config = model.config.to_hf_dict()
    config["quantization_config"] = recipe.to_json()
    config["torch_dtype"] = config["dtype"] = str(recipe.dtype).removeprefix("torch.")
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tmp / QUANTIZED_WEIGHTS, tensors)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(tokenizer_source, tmp)
    return Path(out_dir)


def _flat_tensors(model: Transformer, recipe: QuantizationRecipe) -> dict[str, torch.Tensor]:
    """HF key -> plain tensor; quantized weights split into their inner tensors."""
    tied = model.config.tie_word_embeddings
    out = {}
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        hf_key = to_hf_key(key, model.config.model_type)
        if type(value) is torch.Tensor:  # not a torchao subclass
            out[hf_key] = value.detach().cpu().contiguous()
            continue
        for inner in _INNER:
            tensor = getattr(value, inner).detach().cpu().contiguous()
            if inner == "qdata" and recipe.scheme == "int4wo":
                tensor = pack_int4(tensor)
            out[f"{hf_key}.{inner}"] = tensor
    return out


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 with two values per byte
    (element 2i in the low nibble, 2i+1 in the high nibble)."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: int8 values in [-8, 7]."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.int8)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def load_quantized(
    path: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    use_kernels: Optional[bool] = None,
    kernels: Union[str, bool, list, None] = "all",
) -> Transformer:
    """Build the quantized ``Transformer`` saved by ``quantize_checkpoint`` in ``path``,
    with the fused ``kernels`` swapped in (``use_kernels``, when not None, wins: its
    old boolean spelling)."""
    from torchao.quantization import quantize_

    path, device = Path(path), torch.device(device)
    q = _quantization_config(path)
    if q is None:
        raise QuantizationError(f"{path / CONFIG_NAME}: no quantization_config with quant_method {QUANT_METHOD!r}")
    recipe = QuantizationRecipe.from_json(q, str(path / CONFIG_NAME))
    config = ModelConfig.from_json(path)
    tensors = _read_all(path / QUANTIZED_WEIGHTS)
    with torch.device("meta"):
        model = get_spec(config.model_type).build(config)
    for name, linear in decoder_linears(model):
        prefix = to_hf_key(f"{name}.weight")
        linear.weight = nn.Parameter(torch.zeros(linear.weight.shape, dtype=recipe.dtype, device=device),
                                     requires_grad=False)
        quantize_(linear, recipe.torchao_config())
        for inner in _INNER:
            _copy_inner(linear.weight, inner, tensors.pop(f"{prefix}.{inner}", None), recipe, f"{prefix}.{inner}", path)
    plain = {}
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    for hf_key, tensor in tensors.items():
        key = hf_key if hf_key == "lm_head.weight" else hf_key.removeprefix("model.")
        if key not in expected:
            raise CheckpointError(f"{path / QUANTIZED_WEIGHTS}: unexpected key {hf_key!r}")
        plain[key] = tensor.to(device=device, dtype=recipe.dtype)
    missing = sorted(expected - set(plain))
    if missing:
        raise CheckpointError(f"{path / QUANTIZED_WEIGHTS}: missing key {to_hf_key(missing[0])!r}")
    model.load_state_dict(plain, strict=False, assign=True)
    model.reset_buffers(device)
    model.tie_weights()
    apply_kernels(model, kernels if use_kernels is None else use_kernels)
    return model.eval()


def _copy_inner(weight, inner: str, stored: Optional[torch.Tensor], recipe: QuantizationRecipe,
                key: str, path: Path) -> None:
    if stored is None:
        raise CheckpointError(f"{path / QUANTIZED_WEIGHTS}: missing key {key!r}")
    if inner == "qdata" and recipe.scheme == "int4wo":
        stored = unpack_int4(stored)
    target = getattr(weight, inner)
    if stored.shape != target.shape or stored.dtype != target.dtype:
        raise CheckpointError(f"{path / QUANTIZED_WEIGHTS}: key {key!r} is {stored.dtype} {list(stored.shape)}, "
                              f"config.json implies {target.dtype} {list(target.shape)}")
    target.copy_(stored)


def _read_all(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    with safe_open(file, framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}
