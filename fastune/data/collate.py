"""Batches as dicts of int64 tensors, one per named field of the samples.

A sample is a dict of token-aligned fields (``tokens`` and ``labels`` for
supervised fine-tuning; another objective may carry others). Every field is padded
the same way: fields named ``labels`` or ``*_labels`` with -100, the others with
``pad_id``.

Padded batch (one sample per row, right padding)::

    tokens [B, S], labels [B, S], ...; S = longest sample, rounded up to pad_to_multiple_of

Packed batch (several samples per row, each row exactly ``seq_len`` long)::

    tokens, labels, ..., position_ids, document_ids  [B, seq_len]

Both also hold ``num_tokens``, a 0-dim tensor: the tokens that are not padding
(for throughput; the padding cannot be told from the ids alone), counted over the
fields named ``tokens`` or ``*_tokens``.

In a packed row the padding is one more document (positions from 0), so it never
attends to, nor is seen by, a real document, and no row of the attention mask is empty.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from fastune.data.formats import IGNORE_INDEX

Sample = Mapping[str, np.ndarray]  # the named fields of one document, all of its length


def pad_value(field: str, pad_id: int) -> int:
    return IGNORE_INDEX if field == "labels" or field.endswith("_labels") else pad_id


def _num_tokens(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.tensor(sum(len(values) for sample in samples for name, values in sample.items()
                            if name == "tokens" or name.endswith("_tokens")))


def collate_padded(samples: Sequence[Sample], pad_id: int,
                   pad_to_multiple_of: Optional[int] = None) -> dict[str, torch.Tensor]:
    width = max(len(values) for sample in samples for values in sample.values())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = {}
    for name in samples[0]:
        out = np.full((len(samples), width), pad_value(name, pad_id), dtype=np.int64)
        for row, sample in enumerate(samples):
            out[row, :len(sample[name])] = sample[name]
        batch[name] = torch.from_numpy(out)
    batch["num_tokens"] = _num_tokens(samples)
    return batch


def collate_packed(packs: Sequence[Sequence[Sample]], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    shape = (len(packs), seq_len)
    names = list(packs[0][0])
    fields = {name: np.full(shape, pad_value(name, pad_id), dtype=np.int64) for name in names}
    position_ids = np.empty(shape, dtype=np.int64)
    document_ids = np.empty(shape, dtype=np.int64)
    for row, pack in enumerate(packs):
        start = 0
        for doc, sample in enumerate(pack):
            end = start + len(sample["tokens"])
            for name in names:
                fields[name][row, start:end] = sample[name]
            position_ids[row, start:end] = np.arange(end - start)
            document_ids[row, start:end] = doc
            start = end
        position_ids[row, start:] = np.arange(seq_len - start)
        document_ids[row, start:] = len(pack)
    return {**{name: torch.from_numpy(values) for name, values in fields.items()},
            "position_ids": torch.from_numpy(position_ids), "document_ids": torch.from_numpy(document_ids),
            "num_tokens": _num_tokens([sample for pack in packs for sample in pack])}
