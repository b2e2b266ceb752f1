"""Preference pairs: rows of a preference format (``data/formats.py``: ``preference``,
``chat_preference``) to samples with the fields ``chosen_tokens``, ``chosen_labels``,
``rejected_tokens``, ``rejected_labels``.

Each side is the prompt messages plus that side's answer, rendered with the tokenizer's
chat format; only the answer (and the token closing it) is supervised, the prompt is
masked. Labels are shifted as for SFT (``formats.shift_labels``).

Truncation, per side: the prompt keeps its last ``max_prompt_len`` tokens (its end is
what the answer follows), then the sequence keeps its first ``max_seq_len`` tokens (the
answer is cut at its end). An answer with no supervised token left is a one-line error
naming the row, as are a missing field and identical answers.

A pair's two sides are stored padded to one length (pad id, labels -100), so the four
fields share the ``TokenizedDataset`` offsets; the collators pad them further to the
batch's width. Packing is not supported (each pair is one row of the batch).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np

from fastune.data.datasets import (DataFiles, TokenizedDataset, _iter_rows, _row_context,
                                   _split_files, load_rows)
from fastune.data.errors import DataError
from fastune.data.formats import FORMATS, get_format, resolve_columns, shift_labels
from fastune.data.tokenizer_base import Tokenizer

logger = logging.getLogger(__name__)

FIELDS = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")


def is_preference_format(name: str) -> bool:
    return name in FORMATS and FORMATS[name].preference


def _side(prompt, answer, tokenizer: Tokenizer, max_prompt_len: Optional[int], max_seq_len: int,
          where: str, side: str) -> tuple[list[int], list[int]]:
    ids, mask = tokenizer.tokenize_messages(list(prompt) + list(answer))
    n_prompt = mask.index(False) if False in mask else len(mask)
    if max_prompt_len is not None and n_prompt > max_prompt_len:
        ids, mask = ids[n_prompt - max_prompt_len:], mask[n_prompt - max_prompt_len:]
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    tokens = np.asarray(ids, dtype=np.int32)
    labels = shift_labels(tokens, np.asarray(mask), np.asarray([0, len(ids)]))
    if (labels == -100).all():
        raise DataError(f"{where}: the {side} answer is empty after truncation to "
                        f"max_seq_len={max_seq_len} (prompt of {n_prompt} tokens; "
                        f"set dataset.max_prompt_len or raise max_seq_len)")
    return ids, labels.tolist()


def tokenize_pairs(rows: Iterable[Mapping[str, Any]], tokenizer: Tokenizer, *, format: str,
                   columns: Optional[Mapping[str, str]] = None, source: str = "<rows>",
                   max_seq_len: int = 2048, max_prompt_len: Optional[int] = None
                   ) -> TokenizedDataset:
    """Tokenize in-memory preference rows (dicts); see the module docstring."""
    spec = get_format(format, source)
    if not spec.preference:
        raise DataError(f"{source}: format {format!r} is not a preference format")
    fields = {name: [] for name in FIELDS}
    offsets = [0]
    n_rows = 0
    for n_rows, row in enumerate(rows, start=1):
        if columns is None:
            columns = resolve_columns(format, None, list(row), source)
        where = f"{source} row {n_rows}"
        with _row_context(source, n_rows):
            sample = spec.to_sample(row, columns)
            sides = {side: _side(sample["prompt"], sample[side], tokenizer, max_prompt_len,
                                 max_seq_len, where, side) for side in ("chosen", "rejected")}
        width = max(len(ids) for ids, _ in sides.values())
        for side, (ids, labels) in sides.items():
            pad = width - len(ids)
            fields[f"{side}_tokens"] += ids + [tokenizer.pad_id] * pad
            fields[f"{side}_labels"] += labels + [-100] * pad
        offsets.append(offsets[-1] + width)
    if n_rows == 0:
        raise DataError(f"{source}: the dataset is empty (0 rows)")
    logger.info("%s: %d preference pairs", source, n_rows)
    return TokenizedDataset({k: np.asarray(v, dtype=np.int32) for k, v in fields.items()},
                            np.asarray(offsets, dtype=np.int64), source=source,
                            max_seq_len=max_seq_len, pad_id=tokenizer.pad_id)


def load_preference_dataset(source: Union[str, Path], tokenizer: Tokenizer, *, format: str,
                            split: str = "train", data_files: DataFiles = None,
                            column_map: Optional[Mapping[str, str]] = None,
                            max_seq_len: int = 2048, max_prompt_len: Optional[int] = None,
                            ) -> TokenizedDataset:
    """Load ``source`` (see ``datasets.load_rows``) and tokenize its pairs."""
    rows = load_rows(source, split, data_files=data_files)
    name = ", ".join(map(str, _split_files(data_files, split))) if data_files is not None else str(source)
    if len(rows) == 0:
        raise DataError(f"{name}: the dataset is empty (0 rows)")
    columns = resolve_columns(format, column_map, rows.column_names, name)
    rows = rows.select_columns(sorted(set(columns.values())))
    return tokenize_pairs(_iter_rows(rows), tokenizer, format=format, columns=columns, source=name,
                          max_seq_len=max_seq_len, max_prompt_len=max_prompt_len)
