"""pytest-benchmark suite of whole training steps, for developers: fastune's recipe step
and the HF + PEFT step of ``fastune bench train`` on the training benchmark's workload
(random weights), in this one process. For the reported numbers (each configuration in
its own process, interleaved, peak memory, FLOP/s, ratios from one run) use
``fastune bench train`` or ``python benchmarks/bench_train.py``.

    python -m pytest benchmarks/test_train.py
    python -m pytest benchmarks/test_train.py -k "fastune" --benchmark-autosave
"""

from pathlib import Path

import pytest

from fastune.bench.train import write_random_checkpoint
from fastune.bench.train_worker import FastuneRunner, HFRunner
from fastune.config import load_config

CONFIG = Path(__file__).parent / "configs" / "train_workload.yaml"
VARIANTS = {
    "fastune": ("fastune", []),
    "fastune eager": ("fastune", ["model.use_kernels=false", "compile=false"]),
    "hf+peft eager": ("hf", []),
    "hf+peft compiled": ("hf", []),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = load_config(CONFIG, check_paths=False)
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("workload") / "checkpoint"), cfg.tokenizer


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_step(benchmark, checkpoint, tmp_path, name):
    kind, overrides = VARIANTS[name]
    path, tokenizer = checkpoint
    cfg = load_config(CONFIG, overrides + [f"model.checkpoint_dir={path}", f"tokenizer={tokenizer}",
                                           f"output_dir={tmp_path / 'out'}"])
    runner = FastuneRunner(cfg) if kind == "fastune" else HFRunner(cfg, compile=name.endswith("compiled"))
    benchmark.group = "training step"
    benchmark.pedantic(runner.step, rounds=5, warmup_rounds=3)
