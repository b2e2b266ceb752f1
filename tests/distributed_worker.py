"""Helpers that run inside the torchrun ranks of tests/test_distributed.py.

``python -m torch.distributed.run ... tests/distributed_worker.py A.yaml B.yaml`` trains
each config in turn inside one process group, so a test pays for starting the ranks
(importing torch, transformers, datasets) once, not once per config. An argument
``inf-on-rank-1:CONFIG:OUT.json`` runs ``inf_on_rank_1`` instead of a training run.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from fastune import distributed
from fastune.config import load_config
from fastune.training.recipe import setup, train, train_step


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


def inf_on_rank_1(path: str, out: str) -> None:
    """Two fp16 steps; in the first, one entry of rank 1's gradient shard is made inf just
    before the scaler unscales. Each rank writes to OUT.json.RANK whether its shard of
    that adapter moved at each step, and the scaler's count and scale."""
    run = setup(load_config(path, []))
    adapter = run.model.layers[0].self_attn.q_proj.lora_A.weight
    unscale, poison = run.scaler.unscale_, [os.environ["RANK"] == "1"]

    def poisoned_unscale(optimizer):
        if poison[0]:
            adapter.grad.to_local()[0, 0] = math.inf
        unscale(optimizer)

    run.scaler.unscale_ = poisoned_unscale
    batches, moved, scales = iter(run.train_loader), [], [run.scaler.get_scale()]
    for _ in range(2):
        before = adapter.to_local().clone()
        train_step(run, [next(batches)])
        poison[0] = False
        moved.append(not torch.equal(adapter.to_local(), before))
        scales.append(run.scaler.get_scale())
    record = {"moved": moved, "scales": scales, "skipped_steps": run.skipped_steps}
    with open(f"{out}.{os.environ['RANK']}", "w") as f:
        json.dump(record, f)


def main(args: list[str]) -> None:
    with distributed.process_group("cpu"):
        for arg in args:
            if arg.startswith("inf-on-rank-1:"):
                inf_on_rank_1(*arg.removeprefix("inf-on-rank-1:").split(":"))
            else:
                train(load_config(arg, []))


if __name__ == "__main__":
    main(sys.argv[1:])
