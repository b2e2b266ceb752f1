"""Greedy packing of samples into rows of ``max_seq_len`` tokens, per epoch.

Samples are taken in the epoch's (shuffled) order and appended to the current
pack until the next one does not fit; then a new pack starts. Order is kept,
nothing is split across packs, and the plan depends only on the lengths and the
order, so every rank computes the same packs. Labels were shifted per sample,
so no label crosses a document boundary; the collate function restarts
position ids at each document and gives the model document ids for a
block-diagonal causal mask.
"""

from __future__ import annotations

import numpy as np


def greedy_pack(lengths: np.ndarray, order: np.ndarray, max_seq_len: int) -> list[np.ndarray]:
    """Sample indices of each pack, in ``order``; each pack holds at most ``max_seq_len``
    tokens. Every sample must fit on its own (the loader checks)."""
    packs, start, used = [], 0, 0
    for k, n in enumerate(lengths[order].tolist()):
        if used + n > max_seq_len:
            packs.append(order[start:k])
            start, used = k, 0
        used += n
    if start < len(order):
        packs.append(order[start:])
    return packs
