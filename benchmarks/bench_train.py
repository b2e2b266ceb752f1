"""Training benchmark (issue 4's workload): a thin entry point over ``fastune.bench.train``
(the same code as ``fastune bench train``) that writes the committed results.

Workload (benchmarks/configs/train_workload.yaml): a 55M-parameter Llama (vocab 32000,
hidden 512, intermediate 1408, 8 layers, 8 heads, 2 KV heads) with random weights, LoRA
r8 on q and v, pure bf16, batch 4 x 512 tokens of packed demo data, AdamW. fastune
(kernels + compile), fastune compiled without its kernels, fastune eager, HF + PEFT eager
and HF + PEFT compiled, each in its own process, the timed steps interleaved:

    python benchmarks/bench_train.py                  # about 20 minutes on 2 idle cores
    python benchmarks/bench_train.py --steps 10 compile=false

Results: benchmarks/results/train_workload.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastune.bench.report import write_report
from fastune.bench.train import bench_train
from fastune.bench.train_report import chart, render

HERE = Path(__file__).parent
CONFIG = HERE / "configs" / "train_workload.yaml"
RESULTS = HERE / "results"
# fastune with compile but without its kernels: on CPU the kernels' reference paths cost
# time: the fused loss runs its cross-entropy eagerly inside its opaque custom op.
VARIANTS = ["compiled, no kernels:model.use_kernels=false"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the workload config")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    config = CONFIG.relative_to(Path.cwd()) if CONFIG.is_relative_to(Path.cwd()) else CONFIG
    report = bench_train(str(config), args.overrides, ["eager", "hf"], args.steps, args.warmup, args.rounds,
                         random_init=True, profile_key=None, variants=VARIANTS,
                         progress=lambda m: print(m, flush=True))
    for path in write_report(RESULTS, "train_workload", report, render(report)):
        print(f"wrote {path}")
    png = chart(report, RESULTS / "train_workload.png")
    print(f"wrote {png}" if png else "no chart: pip install 'fastune[plot]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
