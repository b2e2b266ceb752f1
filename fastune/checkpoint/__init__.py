"""Checkpoint I/O: Hugging Face format (config.json + safetensors shards) and atomic writes."""

from fastune.checkpoint.atomic import atomic_directory, remove_directory, sweep_debris
from fastune.checkpoint.hf import (
    CheckpointError,
    from_hf_key,
    load_hf_checkpoint,
    parse_dtype,
    parse_size,
    save_hf_checkpoint,
    to_hf_key,
)

__all__ = [
    "CheckpointError",
    "atomic_directory",
    "from_hf_key",
    "load_hf_checkpoint",
    "parse_dtype",
    "parse_size",
    "save_hf_checkpoint",
    "to_hf_key",
]
