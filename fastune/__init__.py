"""fastune: performance-first fine-tuning of Llama-family LLMs on native PyTorch.

``import fastune`` stays cheap (the CLI imports it for ``--version``): torch and
the model code are imported on first use of the names below.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from fastune.lazy import lazy_attributes

__version__ = "0.1.0"

if TYPE_CHECKING:
    import torch

    from fastune.checkpoint import CheckpointError
    from fastune.models import ConfigError, ModelConfig, Transformer

# Public name -> module it lives in, imported on first attribute access (PEP 562).
_LAZY = {
    "ConfigError": "fastune.models.config",
    "ModelConfig": "fastune.models.config",
    "Transformer": "fastune.models.transformer",
    "CheckpointError": "fastune.checkpoint.hf",
}

__all__ = ["CheckpointError", "ConfigError", "ModelConfig", "Transformer",
           "from_pretrained", "save_pretrained", "__version__"]


__getattr__ = lazy_attributes(__name__, _LAZY)


def from_pretrained(
    path: Union[str, Path],
    dtype: Union[str, "torch.dtype"] = "float32",
    device: Union[str, "torch.device"] = "cpu",
    kernels: Union[str, bool, list, None] = "all",
    use_kernels: Optional[bool] = None,
) -> "Transformer":
    """Load a local Hugging Face checkpoint directory (config.json + safetensors)
    as a fastune ``Transformer`` with weights in ``dtype`` on ``device``; a LoRA
    run's checkpoint folder gives its merged model.

    ``kernels``: the fused ops to swap in (``all``, ``none``, or a list from
    ``fastune.models.spec.KERNEL_OPS``); ``use_kernels`` is its old boolean
    spelling, which wins when not None.
    Raises ``ConfigError`` or ``CheckpointError`` with one line naming the file and key.
    """
    from fastune.checkpoint import load_hf_checkpoint
    from fastune.checkpoint.layout import model_folder

    return load_hf_checkpoint(model_folder(path), dtype=dtype, device=device,
                              kernels=kernels if use_kernels is None else use_kernels)


def save_pretrained(
    model: "Transformer",
    out_dir: Union[str, Path],
    source_dir: Union[str, Path, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    dtype: Union[str, "torch.dtype", None] = None,
) -> Path:
    """Save ``model`` as a Hugging Face checkpoint in ``out_dir`` (replaced atomically),
    copying tokenizer and generation files from ``source_dir`` when given."""
    from fastune.checkpoint import save_hf_checkpoint

    return save_hf_checkpoint(model, model.config, out_dir, source_dir=source_dir,
                              max_shard_size=max_shard_size, dtype=dtype)
