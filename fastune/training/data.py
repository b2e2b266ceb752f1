"""The training run's data: the train and validation loaders of ``cfg.dataset`` and
the exact-match evaluation examples."""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig

from fastune import distributed
from fastune.config import instantiate
from fastune.config.schema import COMPONENT
from fastune.data import (
    SFTDataLoader,
    TokenizedDataset,
    build_dataloader,
    holdout_split,
    load_sft_dataset,
    prompt_answer_pairs,
)
from fastune.training.run import TrainingError


def build_data(cfg: DictConfig, tokenizer, device: torch.device, world: Optional[distributed.World] = None,
               ) -> tuple[SFTDataLoader, Optional[SFTDataLoader]]:
    """(train loader, validation loader or None) for ``cfg.dataset``: the built-in
    loader (source / data_files, format, ...) or a ``_component_`` called with the
    tokenizer that returns a ``TokenizedDataset``. Under torchrun each rank gets its
    own share of both splits."""
    data = cfg.dataset
    if COMPONENT in data:
        train_set, val_set = instantiate(data, tokenizer=tokenizer), None
    else:
        # Both splits' files are looked up before either is read, so a missing one fails fast.
        train_source = _split_source(data, data.split)
        val_source = None if data.val_split is None else _split_source(data, data.val_split)
        train_set = _load_split(data, train_source, tokenizer)
        val_set = None
        if val_source is not None:
            val_set = _load_split(data, val_source, tokenizer)
        elif data.val_fraction is not None:
            train_set, val_set = holdout_split(train_set, data.val_fraction, seed=cfg.seed)
    options = dict(seed=cfg.seed, packed=data.get("packed", False), num_workers=cfg.num_workers,
                   pin_memory=device.type == "cuda")
    if world is not None:
        options.update(rank=world.rank, world_size=world.world_size)
    train_loader = build_dataloader(train_set, cfg.batch_size, shuffle=data.get("shuffle", True), **options)
    val_loader = None if val_set is None else build_dataloader(val_set, cfg.batch_size, shuffle=False, **options)
    return train_loader, val_loader


def _load_split(data: DictConfig, source: tuple[str, str], tokenizer) -> TokenizedDataset:
    """One split of the built-in dataset: ``source`` is ``(path or name, split in it)``."""
    source, split_in_source = source
    return load_sft_dataset(
        source, tokenizer, format=data.format, split=split_in_source, column_map=data.column_map,
        train_on_input=data.train_on_input, max_seq_len=data.max_seq_len, truncation=data.truncation,
    )


def _split_source(data: DictConfig, split: str) -> tuple[str, str]:
    """(path or name, split in it) of a split. With ``data_files``, the split's file
    (a mapping names a file per split; a single path is the training split)."""
    files = data.data_files
    if files is None:
        return data.source, split
    if not isinstance(files, DictConfig):
        files = {"train": files}
    if split not in files:
        raise TrainingError(f"dataset.data_files: no file for split {split!r} (has {', '.join(files)})")
    chosen = files[split]
    if not isinstance(chosen, str):
        if len(chosen) != 1:
            raise TrainingError(f"dataset.data_files.{split}: give one file per split, got {len(chosen)}")
        chosen = chosen[0]
    return chosen, "train"  # a single file holds one split, which `datasets` calls train


def build_exact_match_examples(cfg: DictConfig, tokenizer) -> Optional[list[tuple[list[int], str]]]:
    """(prompt ids, expected answer) pairs for exact-match evaluation, or None when off."""
    em = cfg.eval_exact_match
    if em.source is None:
        return None
    pairs = prompt_answer_pairs(em.source, tokenizer, format=cfg.dataset.format,
                                column_map=cfg.dataset.get("column_map"))
    return pairs[:em.max_examples] if em.max_examples else pairs
