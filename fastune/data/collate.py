"""Batches as dicts of int64 tensors.

Padded batch (one sample per row, right padding)::

    tokens [B, S], labels [B, S]; S = longest sample, rounded up to pad_to_multiple_of

Packed batch (several samples per row, each row exactly ``seq_len`` long)::

    tokens, labels, position_ids, document_ids  [B, seq_len]

Both also hold ``num_tokens``, a 0-dim tensor: the tokens that are not padding
(for throughput; the padding cannot be told from the ids alone).

Padding gets ``pad_id`` tokens and -100 labels. In a packed row the padding is one
more document (positions from 0), so it never attends to, nor is seen by, a real
document, and no row of the attention mask is empty.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from fastune.data.formats import IGNORE_INDEX

Sample = tuple[np.ndarray, np.ndarray]  # (tokens, labels) of one document


def collate_padded(samples: Sequence[Sample], pad_id: int,
                   pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    width = max(len(tokens) for tokens, _ in samples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    tokens = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    for row, (t, y) in enumerate(samples):
        tokens[row, :len(t)] = t
        labels[row, :len(y)] = y
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "num_tokens": torch.tensor(sum(len(t) for t, _ in samples))}


def collate_packed(packs: Sequence[Sequence[Sample]], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    shape = (len(packs), seq_len)
    tokens = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty(shape, dtype=np.int64)
    document_ids = np.empty(shape, dtype=np.int64)
    for row, pack in enumerate(packs):
        start = 0
        for doc, (t, y) in enumerate(pack):
            end = start + len(t)
            tokens[row, start:end] = t
            labels[row, start:end] = y
            position_ids[row, start:end] = np.arange(len(t))
            document_ids[row, start:end] = doc
            start = end
        position_ids[row, start:] = np.arange(seq_len - start)
        document_ids[row, start:] = len(pack)
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids), "document_ids": torch.from_numpy(document_ids),
            "num_tokens": torch.tensor(sum(len(t) for pack in packs for t, _ in pack))}
