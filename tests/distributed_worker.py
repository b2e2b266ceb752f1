"""Helpers that run inside the torchrun ranks of tests/test_distributed.py.

``python -m torch.distributed.run ... tests/distributed_worker.py A.yaml B.yaml`` trains
each config in turn inside one process group, so a test pays for starting the ranks
(importing torch, transformers, datasets) once, not once per config.
"""

from __future__ import annotations

import os
import sys

import torch

from fastune import distributed
from fastune.config import load_config
from fastune.training.recipe import train


class AdamWThatKillsRank1(torch.optim.AdamW):
    """AdamW whose rank 1 dies (no cleanup, no exception) at its second step, as a process
    killed by the OOM killer would: for the launcher test."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        if self.steps == 2 and os.environ.get("RANK") == "1":
            os._exit(1)
        return super().step(closure)


def main(paths: list[str]) -> None:
    with distributed.process_group("cpu"):
        for path in paths:
            train(load_config(path, []))


if __name__ == "__main__":
    main(sys.argv[1:])
