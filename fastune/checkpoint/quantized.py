"""The quantized checkpoint format: torchao's own safetensors serialization, the one
``transformers`` writes and reads for a torchao-quantized model.

On disk, ``model.safetensors`` (``HF_WEIGHTS``) holds the state dict flattened by
torchao's ``flatten_tensor_state_dict``: a quantized weight ``k.weight`` becomes its
plain inner tensors ``k._weight_qdata``, ``k._weight_scale`` (and
``k._weight_zero_point``), and the file's metadata names each tensor's torchao class
and attributes as JSON. ``config.json`` carries transformers' ``TorchAoConfig`` under
``quantization_config`` (``quant_method: torchao``, the torchao config serialized by
``torchao.core.config.config_to_dict``; ``lm_head`` is not converted). So
``AutoModelForCausalLM.from_pretrained(folder)`` loads it as it is, and fastune's
loader rebuilds the tensor subclasses with torchao's ``unflatten_tensor_state_dict``,
which reads JSON metadata and plain tensors only (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fastune.checkpoint.atomic import atomic_directory
from fastune.checkpoint.hf import CheckpointError, from_hf_key, to_hf_key, write_safetensors
from fastune.checkpoint.layout import CONFIG_NAME, HF_WEIGHTS, copy_tokenizer_files
from fastune.errors import FastuneError
from fastune.models.config import ModelConfig
from fastune.models.spec import get_spec
from fastune.models.transformer import Transformer
from fastune.modules.kernels import apply_kernels

QUANT_METHOD = "torchao"
SCHEMES = ("int8wo", "int4wo", "int8dq")


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
        """config.json's ``quantization_config``: transformers' ``TorchAoConfig.to_dict()``."""
        from torchao.core.config import config_to_dict

        return {"quant_method": QUANT_METHOD, "quant_type": {"default": config_to_dict(self.torchao_config())},
                "modules_to_not_convert": ["lm_head"], "include_input_output_embeddings": False,
                "untie_embedding_weights": False}


def is_quantized(checkpoint_dir: Union[str, Path]) -> bool:
    """True for a checkpoint with a torchao ``quantization_config`` (``quantize_checkpoint``'s,
    or transformers')."""
    return _quantization_config(Path(checkpoint_dir)) is not None


def _quantization_config(path: Path) -> Optional[dict]:
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") in (QUANT_METHOD, "fastune-torchao") else None


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    projections = get_spec(model.config.model_type).layer_projections
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in projections]


def save_quantized(model: Transformer, recipe: QuantizationRecipe, out_dir: Union[str, Path],
                   tokenizer_source: Path) -> Path:
    """Write ``model`` (quantized with ``recipe``) to ``out_dir`` (atomically), with the
    tokenizer files of ``tokenizer_source``."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tied = model.config.tie_word_embeddings
    state = {to_hf_key(k, model.config.model_type): v.detach().cpu()
             for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    tensors, metadata = flatten_tensor_state_dict(state)
    config = model.config.to_hf_dict()
    config["quantization_config"] = recipe.to_json()
    config["torch_dtype"] = config["dtype"] = str(recipe.dtype).removeprefix("torch.")
    with atomic_directory(out_dir) as tmp:
        write_safetensors(tmp / HF_WEIGHTS, {k: v.contiguous() for k, v in tensors.items()},
                          metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(tokenizer_source, tmp)
    return Path(out_dir)


def load_quantized(
    path: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    use_kernels: Optional[bool] = None,
    kernels: Union[str, bool, list, None] = "all",
) -> Transformer:
    """Build the quantized ``Transformer`` saved in ``path`` (by ``quantize_checkpoint``, or
    by transformers' ``save_pretrained`` of a torchao model), with the fused ``kernels``
    swapped in (``use_kernels``, when not None, wins: its old boolean spelling)."""
    path, device = Path(path), torch.device(device)
    q = _quantization_config(path)
    if q is None:
        raise QuantizationError(f"{path / CONFIG_NAME}: no quantization_config with quant_method {QUANT_METHOD!r}")
    if q.get("quant_method") != QUANT_METHOD:
        raise QuantizationError(f"{path / CONFIG_NAME}: written by an earlier fastune in its own format; "
                                "quantize the original checkpoint again")
    config = ModelConfig.from_json(path)
    state = _read_torchao_state(path / HF_WEIGHTS)
    with torch.device("meta"):
        model = get_spec(config.model_type).build(config)
    expected = {k: v for k, v in model.state_dict().items() if v.is_meta}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded = {}
    for hf_key, tensor in state.items():
        key = from_hf_key(hf_key, config.model_type)
        if key not in expected:
            raise CheckpointError(f"{path / HF_WEIGHTS}: unexpected key {hf_key!r}")
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path / HF_WEIGHTS}: key {hf_key!r} has shape {list(tensor.shape)}, "
                                  f"config.json implies {list(expected[key].shape)}")
        loaded[key] = tensor.to(device)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{path / HF_WEIGHTS}: missing key {to_hf_key(missing[0], config.model_type)!r}")
    for key, tensor in loaded.items():  # quantized weights replace their module's parameter, as quantize_ does
        module_name, name = key.rsplit(".", 1)
        setattr(model.get_submodule(module_name), name, nn.Parameter(tensor, requires_grad=False))
    model.reset_buffers(device)
    model.tie_weights()
    apply_kernels(model, kernels if use_kernels is None else use_kernels)
    return model.eval()


def _read_torchao_state(file: Path) -> dict[str, torch.Tensor]:
    """HF key -> tensor (a torchao subclass for a quantized weight) from torchao's flattened format."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    if not file.is_file():
        raise CheckpointError(f"{file}: not found")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if not is_metadata_torchao(metadata):
        raise CheckpointError(f"{file}: no torchao metadata (tensor_names) in this safetensors file")
    try:
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: torchao metadata does not match the tensors ({e})") from None
    incomplete = sorted(set(json.loads(metadata["tensor_names"])) - set(state))
    if incomplete:
        raise CheckpointError(f"{file}: the tensors of {incomplete[0]!r} are missing")
    if leftover:
        raise CheckpointError(f"{file}: unexpected key {sorted(leftover)[0]!r}")
    return state
