"""Checkpoint I/O: the on-disk layout (``layout``), Hugging Face format (config.json +
safetensors shards), PEFT adapters, quantized checkpoints and atomic writes.

The names below are imported on first use (PEP 562), so that reading the layout
(``fastune.checkpoint.layout``, used by the CLI and the Hub code) does not import torch.
"""

from fastune.lazy import lazy_attributes

# Public name -> module it lives in.
_LAZY = {
    "atomic_directory": "fastune.checkpoint.atomic",
    "remove_directory": "fastune.checkpoint.atomic",
    "sweep_debris": "fastune.checkpoint.atomic",
    "CheckpointError": "fastune.checkpoint.hf",
    "from_hf_key": "fastune.checkpoint.hf",
    "load_hf_checkpoint": "fastune.checkpoint.hf",
    "parse_dtype": "fastune.checkpoint.hf",
    "parse_size": "fastune.checkpoint.hf",
    "save_hf_checkpoint": "fastune.checkpoint.hf",
    "to_hf_key": "fastune.checkpoint.hf",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
