"""Kernels on against kernels off on the training benchmark's own workloads (issue 18: no
speed may come from skipping work the reference does).

The 55M-parameter benchmark Llama with random weights, LoRA r8 on q and v, one packed
row of 512 demo tokens, fp32, eager: the loss and every adapter gradient of one step,
with the fused kernels and without, on the masked workload (about 14% of the tokens
supervised, where the fused loss drops the ignored rows before its GEMMs) and the
all-supervised one (every token but the last of each packed sample has a label). fp32
differs only by summation order: loss within 1e-5 relative, gradients within 1e-4 of
the largest entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastune.bench.train import write_random_checkpoint
from fastune.config import load_config
from fastune.training.recipe import setup

WORKLOADS = Path(__file__).parents[1] / "benchmarks" / "configs"


def _loss_and_grads(config: Path, checkpoint: Path, out: Path, kernels: str):
    cfg = load_config(config, ["model.dtype=fp32", "compile=false", "batch_size=1", f"model.kernels={kernels}",
                               f"model.checkpoint_dir={checkpoint}", f"output_dir={out}"])
    run = setup(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, as after some training: A's gradient is then not zero
        for name, p in sorted(run.model.named_parameters()):
            if name.endswith("lora_B.weight"):
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    batch = next(iter(run.train_loader))
    count = run.objective.normalizer(batch)
    loss_sum, _, _ = run.objective(run.model, batch, normalizer=count)
    (loss_sum / count).backward()
    grads = {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}
    return float(loss_sum.detach()) / count, count, grads


@pytest.mark.parametrize("workload", ["train_workload", "train_workload_supervised"])
def test_kernels_on_compute_what_kernels_off_compute_on_the_benchmark_workload(tmp_path, workload):
    config = WORKLOADS / f"{workload}.yaml"
    checkpoint = write_random_checkpoint(
        load_config(config, ["model.dtype=fp32"], check_paths=False), tmp_path / "checkpoint")
    on = _loss_and_grads(config, checkpoint, tmp_path / "on", "all")
    off = _loss_and_grads(config, checkpoint, tmp_path / "off", "none")
    supervised = on[1] / 512
    assert on[1] == off[1] and (supervised > 0.9 if workload.endswith("supervised") else supervised < 0.5)
    assert on[0] == pytest.approx(off[0], rel=1e-5)
    assert on[2].keys() == off[2].keys() and len(on[2]) == 2 * 2 * 8  # A and B of q and v, 8 layers
    for name, grad in off[2].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(on[2][name], grad, rtol=0, atol=1e-4 * float(grad.abs().max()), msg=name)
