"""Training checkpoints: what a fine-tuning run leaves in ``output_dir``, and resume.

Each checkpoint is a folder ``output_dir/epoch_N`` (end of epoch N, 0-based like
torchtune) or ``output_dir/step_N`` (after optimizer step N), written to a hidden
temporary folder and renamed into place, so resume never finds half of one:

- full fine-tuning: ``config.json`` and ``model*.safetensors`` (+ index), the model
  in HF format, loadable by ``transformers``;
- LoRA/DoRA/QLoRA: ``adapter_model.safetensors`` + ``adapter_config.json`` at the
  top, which ``peft.PeftModel.from_pretrained``, vLLM and transformers load, and the
  merged model in HF format in ``merged/``, left out with
  ``save_adapter_weights_only`` (why a folder of its own: ``fastune.checkpoint.layout``);
- the tokenizer files of the source checkpoint;
- ``training_state.pt``: optimizer, lr scheduler, RNG states, data loader
  position. Plain tensors and containers only, read with ``weights_only=True``.
  Full fine-tuning resumes its weights from the HF safetensors above, LoRA from
  the adapter;
- ``trainer_state.json``: epochs run and global step in readable form (used to
  find the latest checkpoint without unpickling anything);
- under FSDP2, ``distributed_checkpoint/`` (DCP): read through
  ``fastune.checkpoint.dcp_safe``, whose unpickler resolves DCP's metadata classes
  only, with non-tensor items read ``weights_only`` too.

So nothing resume reads can run code: safetensors, JSON and ``weights_only`` pickles.
Nor does resume build anything from a config found in output_dir: the components
come from the config the run was started with.

The file and folder names are ``fastune.checkpoint.layout``'s. The recipe
(``fastune.training.recipe.save_checkpoint``) decides what goes in; this module
writes the folders, prunes old ones and reads the state back for resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from fastune.checkpoint import atomic_directory, remove_directory, sweep_debris
from fastune.checkpoint.layout import (
    TRAINER_STATE,
    TRAINING_STATE,
    ResumeError,
    checkpoint_dirs,
    is_checkpoint_name,
    list_checkpoints,
    read_trainer_state,
)

log = logging.getLogger(__name__)


def damaged_checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Folders named like checkpoints that resume cannot use (no or unreadable trainer_state.json)."""
    intact = set(checkpoint_dirs(output_dir))
    return sorted(p for p in Path(output_dir).glob("*_*")
                  if p.is_dir() and is_checkpoint_name(p.name) and p not in intact)


def sweep_output_dir(output_dir: Path) -> None:
    """At the start of a run (rank 0): remove what killed runs left in ``output_dir``,
    temporary, replaced and half-pruned folders (see ``fastune.checkpoint.atomic``) and the
    staging folders of sharded saves; no save is in flight before training starts."""
    if int(os.environ.get("RANK", "0")) != 0 or not Path(output_dir).is_dir():
        return
    removed = sweep_debris(output_dir)
    for staging in Path(output_dir).glob(".*.staging-*"):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    if removed:
        log.info("removed %d folder(s) left by an interrupted run in %s", len(removed), output_dir)



def resolve_resume(resume_from: Optional[str], output_dir: Path) -> Optional[Path]:
    """The checkpoint folder to resume from: ``None`` (fresh run), a path, or ``"auto"``
    (the latest checkpoint in ``output_dir``; a fresh run when there is none).

    Sweeps ``output_dir`` of interrupted saves first. Damaged checkpoints with no intact
    one block a run, as intact ones block a fresh run: it would write over them."""
    sweep_output_dir(output_dir)
    existing = checkpoint_dirs(output_dir)
    damaged = damaged_checkpoint_dirs(output_dir) if not existing else []
    if damaged and (not resume_from or str(resume_from) == "auto"):
        names = ", ".join(p.name for p in damaged)
        raise ResumeError(
            f"output_dir: {output_dir} holds only damaged checkpoints ({names}: no readable {TRAINER_STATE}); "
            "move or delete them to start afresh, or pick another output_dir"
        )
    if not resume_from:
        return None
    if str(resume_from) == "auto":
        return existing[-1] if existing else None
    path = Path(resume_from)
    if not path.is_dir():
        raise ResumeError(f"resume_from_checkpoint: {path} is not a directory")
    for name in (TRAINING_STATE, TRAINER_STATE):
        if not (path / name).is_file():
            raise ResumeError(
                f"resume_from_checkpoint: {path} has no {name}; "
                "it is not a fastune training checkpoint"
            )
    step = read_trainer_state(path)["global_step"]
    later = [p for later_step, _, p in list_checkpoints(output_dir) if later_step > step]
    if later:
        # Pruning (keep_last_n) would delete the new checkpoints first, and a later
        # resume_from_checkpoint=auto would pick the abandoned run's.
        raise ResumeError(
            f"resume_from_checkpoint: {path} is at step {step}, but {output_dir} holds {later[-1].name} "
            "of a later step; move the later checkpoints away, or write to another output_dir"
        )
    return path


def save_checkpoint(
    output_dir: Path,
    name: str,
    write_model: Callable[[Path], None],
    training_state: dict[str, Any],
    progress: dict[str, Any],
    keep_last_n: Optional[int] = None,
) -> Path:
    """Write checkpoint ``output_dir/name`` atomically and prune old ones.

    ``write_model(folder)`` writes the HF files and adapter into the temporary folder.
    ``progress`` (plain JSON: epoch, global_step, ...) becomes trainer_state.json.
    """
    dest = Path(output_dir) / name
    with atomic_directory(dest) as tmp:
        write_model(tmp)
        torch.save(training_state, tmp / TRAINING_STATE)
        (tmp / TRAINER_STATE).write_text(json.dumps(progress, indent=2) + "\n")
    if keep_last_n:
        for old in checkpoint_dirs(output_dir)[:-keep_last_n]:
            if old != dest:
                try:  # renamed to a hidden name first: a kill midway leaves no half checkpoint
                    remove_directory(old)
                except OSError as e:  # the new checkpoint is safe: a failed cleanup must not end the run
                    log.warning("keep_last_n: could not delete %s (%s); delete it by hand", old, e)
    return dest


def load_training_state(ckpt_dir: Path) -> dict[str, Any]:
    file = Path(ckpt_dir) / TRAINING_STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; the message is what matters
        raise ResumeError(f"{file}: cannot load training state ({type(e).__name__}: {e})") from None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values
    (numpy's key array becomes an int64 tensor, so ``weights_only`` loading accepts it)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
