"""Kernel benchmark: a thin entry point over ``fastune.bench.kernels`` (the same code as
``fastune bench kernels``) that keeps the committed table in benchmarks/results/.

    python benchmarks/bench_kernels.py                   # all ops
    python benchmarks/bench_kernels.py --ops swiglu      # some ops; merged into the results
    python benchmarks/bench_kernels.py --malloc retain   # glibc keeps freed memory (kernels_retain.*)

How to measure, and how to add an op: see ``fastune/bench/kernels.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastune.bench.kernels import CASES, bench_kernels, chart, render
from fastune.bench.report import write_report

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark fastune kernels (results in benchmarks/results).")
    parser.add_argument("--ops", default=",".join(CASES), help="comma-separated (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--malloc", default="glibc", choices=["glibc", "retain"],
                        help="glibc defaults, or keep freed memory for reuse")
    args = parser.parse_args(argv)
    stem = "kernels" if args.malloc == "glibc" else f"kernels_{args.malloc}"
    previous_file = RESULTS / f"{stem}.json"
    previous = json.loads(previous_file.read_text()) if previous_file.exists() else None
    report = bench_kernels(args.ops.split(","), args.dtype, args.warmup, args.steps, args.malloc,
                           previous=previous, progress=lambda m: print(m, flush=True))
    for path in write_report(RESULTS, stem, report, render(report)):
        print(f"wrote {path}")
    png = chart(report, RESULTS / f"{stem}.png")
    print(f"wrote {png}" if png else "no chart: pip install 'fastune[plot]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
