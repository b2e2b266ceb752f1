"""What fastune writes on disk, and where: the one place that names the files and
folders of a checkpoint and of a training run's ``output_dir``.

A training run's ``output_dir``::

    config.yaml                 the resolved config (``RUN_CONFIG``)
    epoch_N/  step_N/           checkpoints (``checkpoint_name``); full fine-tuning's hold:
        config.json             the model config, HF format (``CONFIG_NAME``)
        model.safetensors       or ``model-0000i-of-0000n.safetensors`` + the index
                                (``HF_WEIGHTS``, ``HF_INDEX``): the weights
        tokenizer files         copied from the source checkpoint (``TOKENIZER_FILES``)
        training_state.pt       optimizer, scheduler, RNG, loader position (``TRAINING_STATE``)
        trainer_state.json      epochs run and global step, readable (``TRAINER_STATE``)
        distributed_checkpoint/ a sharded run's trainable weights and optimizer (``DCP_DIR``)

A LoRA method's checkpoint holds two views of the same fine-tune::

    epoch_N/
        adapter_config.json     the PEFT adapter at the top (``ADAPTER_CONFIG``,
        adapter_model.safetensors  ``ADAPTER_WEIGHTS``): what ``PeftModel.from_pretrained(base,
                                epoch_N)`` and vLLM's ``LoRARequest(..., epoch_N)`` read, and
                                transformers' ``from_pretrained(epoch_N)`` too (base + adapter)
        merged/                 the merged model in HF format (``MERGED_DIR``), left out with
                                ``save_adapter_weights_only``
        tokenizer files, training_state.pt, trainer_state.json, distributed_checkpoint/

The merged weights sit in a folder of their own because transformers treats a folder
holding both ``config.json`` and ``adapter_config.json`` as a model with an embedded
adapter: it would load the merged weights and apply the adapter on top, twice.
Checkpoints written before this layout keep the merged model at the top and the
adapter in ``adapter/`` (``ADAPTER_DIR``); ``adapter_folder`` and ``model_folder``
read both.

A quantized checkpoint (``fastune.checkpoint.quantized``) holds ``config.json`` with a
torchao ``quantization_config``, ``model.safetensors`` in torchao's serialization and
the tokenizer files, as transformers writes a torchao-quantized model.

Every reader and writer (training, distributed, generation, eval, quantize, hub)
takes these names from here; this module reads only the small JSON progress file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

from fastune.errors import FastuneError

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
CONFIG_NAME = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"
ADAPTER_DIR = "adapter"  # the adapter's folder in checkpoints of the earlier layout (read, not written)
TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
DCP_DIR = "distributed_checkpoint"
REPO_ID_FILE = "original_repo_id.json"  # written by ``fastune download``: the Hub repo of a base model
# Copied verbatim from the source checkpoint into every checkpoint written, when present.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    REPO_ID_FILE,
)
# Only for resuming, and about twice the model's size: not part of a published model.
RESUME_ONLY_FILES = (TRAINING_STATE, f"{DCP_DIR}/*")

_CHECKPOINT_NAME = re.compile(r"(epoch|step)_(\d+)")


class ResumeError(FastuneError):
    """A checkpoint that a run cannot resume from; the message names the path."""


def checkpoint_name(kind: Literal["epoch", "step"], n: int) -> str:
    """``epoch_N`` (end of epoch N, 0-based) or ``step_N`` (after optimizer step N)."""
    if kind not in ("epoch", "step"):
        raise ValueError(f"checkpoint kind {kind!r}: expected 'epoch' or 'step'")
    return f"{kind}_{n}"


def is_checkpoint_name(name: str) -> bool:
    """True for ``epoch_N``/``step_N``; temporary folders (leading dot) never match."""
    return _CHECKPOINT_NAME.fullmatch(name) is not None


def has_hf_weights(ckpt_dir: Path) -> bool:
    """A single safetensors file or a shard index (not an adapter-only checkpoint)."""
    return (Path(ckpt_dir) / HF_WEIGHTS).is_file() or (Path(ckpt_dir) / HF_INDEX).is_file()


def adapter_folder(ckpt_dir: Path) -> Optional[Path]:
    """The folder holding a checkpoint's PEFT adapter: the checkpoint itself, or
    ``adapter/`` in the earlier layout; None when it holds no adapter."""
    for folder in (Path(ckpt_dir), Path(ckpt_dir) / ADAPTER_DIR):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    return None


def model_folder(ckpt_dir: Path) -> Path:
    """The folder whose ``config.json`` and weights are a checkpoint's model: ``merged/``
    of a LoRA checkpoint, else the checkpoint itself."""
    merged = Path(ckpt_dir) / MERGED_DIR
    return merged if (merged / CONFIG_NAME).is_file() else Path(ckpt_dir)


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    file = Path(ckpt_dir) / TRAINER_STATE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{file}: cannot read training progress ({e})") from None


def list_checkpoints(output_dir: Path) -> list[tuple[int, bool, Path]]:
    """(global step, is an epoch checkpoint, folder) of the complete checkpoints in
    ``output_dir``, oldest first (an epoch checkpoint after a step checkpoint of the same
    step). A checkpoint is complete once its trainer_state.json is in place."""
    found = []
    for path in Path(output_dir).glob("*_*"):
        if path.is_dir() and is_checkpoint_name(path.name) and (path / TRAINER_STATE).is_file():
            try:
                progress = read_trainer_state(path)
            except ResumeError as e:  # one damaged folder must not hide the good ones
                log.warning("%s; skipping it", e)
                continue
            found.append((progress["global_step"], path.name.startswith("epoch"), path))
    return sorted(found)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (see ``list_checkpoints``)."""
    return [path for *_, path in list_checkpoints(output_dir)]


def copy_tokenizer_files(source_dir: Path, dest: Path) -> None:
    """Copy the tokenizer (and generation/provenance) files of ``source_dir`` into ``dest``."""
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(dest) / name)
