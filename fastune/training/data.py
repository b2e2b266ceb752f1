"""The training run's data: the train and validation loaders of ``cfg.dataset`` and
the exact-match evaluation examples."""

from __future__ import annotations

from typing import Optional

import torch

from fastune import distributed
from fastune.config import instantiate
from fastune.config.sections import DataSection, DatasetSection
from fastune.data import (
    SFTDataLoader,
    TokenizedDataset,
    build_dataloader,
    holdout_split,
    load_sft_dataset,
    prompt_answer_pairs,
)
from fastune.data.preference import is_preference_format, load_preference_dataset
from fastune.training.run import TrainingError


def build_data(section: DataSection, tokenizer, device: torch.device, world: Optional[distributed.World] = None,
               ) -> tuple[SFTDataLoader, Optional[SFTDataLoader]]:
    """(train loader, validation loader or None) for ``section.dataset``: the built-in
    loader (source / data_files, format, ...) or a ``_component_`` called with the
    tokenizer that returns a ``TokenizedDataset``. Under torchrun each rank gets its
    own share of both splits."""
    data = section.dataset
    if data.component is not None:
        train_set, val_set = instantiate(data.component, tokenizer=tokenizer), None
    else:
        # Both splits' files are looked up before either is read, so a missing one fails fast.
        train_source = _split_source(data, data.split)
        val_source = None if data.val_split is None else _split_source(data, data.val_split)
        train_set = _load_split(data, train_source, tokenizer)
        val_set = None
        if val_source is not None:
            val_set = _load_split(data, val_source, tokenizer)
        elif data.val_fraction is not None:
            train_set, val_set = holdout_split(train_set, data.val_fraction, seed=section.seed)
    options = dict(seed=section.seed, packed=data.packed, num_workers=section.num_workers,
                   pin_memory=device.type == "cuda")
    if world is not None:
        options.update(rank=world.rank, world_size=world.world_size)
    train_loader = build_dataloader(train_set, section.batch_size, shuffle=data.shuffle, **options)
    val_loader = None if val_set is None else build_dataloader(val_set, section.batch_size, shuffle=False, **options)
    return train_loader, val_loader


def _load_split(data: DatasetSection, source: tuple[str, str], tokenizer) -> TokenizedDataset:
    """One split of the built-in dataset: ``source`` is ``(path or name, split in it)``."""
    source, split_in_source = source
    if is_preference_format(data.format):
        return load_preference_dataset(source, tokenizer, format=data.format, split=split_in_source,
                                       column_map=data.column_map, max_seq_len=data.max_seq_len,
                                       max_prompt_len=data.max_prompt_len)
    return load_sft_dataset(
        source, tokenizer, format=data.format, split=split_in_source, column_map=data.column_map,
        train_on_input=data.train_on_input, max_seq_len=data.max_seq_len, truncation=data.truncation,
    )


def _split_source(data: DatasetSection, split: str) -> tuple[str, str]:
    """(path or name, split in it) of a split. With ``data_files``, the split's file
    (a mapping names a file per split; a single path is the training split)."""
    files = data.data_files
    if files is None:
        return data.source, split
    if not isinstance(files, dict):
        files = {"train": files}
    if split not in files:
        raise TrainingError(f"dataset.data_files: no file for split {split!r} (has {', '.join(files)})")
    chosen = files[split]
    if not isinstance(chosen, str):
        if len(chosen) != 1:
            raise TrainingError(f"dataset.data_files.{split}: give one file per split, got {len(chosen)}")
        chosen = chosen[0]
    return chosen, "train"  # a single file holds one split, which `datasets` calls train


def build_exact_match_examples(section: DataSection, tokenizer) -> Optional[list[tuple[list[int], str]]]:
    """(prompt ids, expected answer) pairs for exact-match evaluation, or None when off."""
    if section.exact_match_source is None:
        return None
    pairs = prompt_answer_pairs(section.exact_match_source, tokenizer, format=section.dataset.format,
                                column_map=section.dataset.column_map)
    limit = section.exact_match_max_examples
    return pairs[:limit] if limit else pairs
