"""The training step against the matmul roofline (issue 18): both workloads, four rows.

Workloads: ``train_workload.yaml`` (packed demo data, prompts masked: about 14% of the
tokens supervised) and ``train_workload_supervised.yaml`` (the same, every token
supervised). Rows: LoRA r8 on q, v; LoRA r8 on every projection; full fine-tuning;
LoRA on q, v with a 128k vocabulary (``bench_llama_55m_v128k``). Each row is one
``fastune bench train`` run (``fastune.bench.train``): fastune with kernels on, fastune
compiled with kernels off, HF + PEFT compiled and eager, each in its own process, the
timed steps interleaved, then ``--breakdown`` steps under the profiler.

    python benchmarks/bench_step.py --dtype bf16                 # the issue's setting
    python benchmarks/bench_step.py --dtype fp32 --rows lora_qv  # a CPU without bf16 matmuls

Pin it to one core for steady numbers (``taskset -c 0`` with ``OMP_NUM_THREADS=1``);
``MALLOC_MMAP_THRESHOLD_=65536`` makes the peak RSS repeat from run to run, but slows the
steps (every buffer over 64 KiB is mapped afresh).
Results: ``benchmarks/results/step_<workload>_<row>.{json,md}`` and ``step_summary.{json,md}``
(made from every row report of that dtype; ``--summary-only`` remakes it alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastune.bench.report import table, write_report
from fastune.bench.train import bench_train
from fastune.bench.train_report import render

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WORKLOADS = {"masked": HERE / "configs" / "train_workload.yaml",
             "supervised": HERE / "configs" / "train_workload_supervised.yaml"}
ALL_PROJECTIONS = "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
ROWS = {
    "lora_qv": [],
    "lora_all": [ALL_PROJECTIONS],
    "full": ["method=full"],
    "lora_qv_128k": ["model.checkpoint_dir=${asset:model_configs/bench_llama_55m_v128k}"],
}
KERNELS_OFF = "kernels off:model.kernels=none"


def summary_row(workload: str, row: str, report: dict) -> dict:
    """The figures of the issue's goals from one row's report. ``gemm_fraction``: the GEMM
    FLOPs fastune really ran in a step (the profiled steps' count, ``--breakdown``) over
    the median step time of the timed steps, as a fraction of the measured matmul peak.
    ``model_fraction``: the model's FLOPs (prompt rows of the LM head included, which
    fastune skips) the same way; it can pass 100% on the masked workload."""
    results = report["results"]
    on, off, hf = results["fastune"], results["fastune, kernels off"], results["hf+peft compiled"]
    peak = report["profile"][f"peak_{'bf16' if report['dtype'] == 'bf16' else 'fp32'}_flops"]
    gemm_flops = sum(on["breakdown"]["flops"].values()) if "breakdown" in on else None
    return {
        "workload": workload, "row": row,
        "tokens_per_s": {name: r["tokens_per_s"] for name, r in results.items()},
        "vs_hf_compiled": on["tokens_per_s"] / hf["tokens_per_s"],
        "kernels_on_vs_off": on["tokens_per_s"] / off["tokens_per_s"],
        "gemm_fraction": None if gemm_flops is None else gemm_flops / on["median_step_s"] / peak,
        "model_fraction": on["fraction_of_peak_flops"],
        "peak_rss_mib": {name: r["memory"]["process_peak_rss_mib"] for name, r in results.items()},
        "environment": report["environment"],
    }


def summarize(dtype: str) -> list[dict]:
    """The summary rows of every row report of ``dtype`` in RESULTS."""
    rows = []
    for workload in WORKLOADS:
        for row in ROWS:
            path = RESULTS / f"step_{workload}_{row}.json"
            if path.exists() and (report := json.loads(path.read_text()))["dtype"] == dtype:
                rows.append(summary_row(workload, row, report))
    return rows


def render_summary(rows: list[dict], dtype: str) -> str:
    body = [[r["workload"], r["row"], f"{r['tokens_per_s']['fastune']:,.0f}",
             f"{r['tokens_per_s']['fastune, kernels off']:,.0f}", f"{r['tokens_per_s']['hf+peft compiled']:,.0f}",
             f"{r['tokens_per_s']['hf+peft eager']:,.0f}", f"**{r['vs_hf_compiled']:.2f}x**",
             f"{r['kernels_on_vs_off']:.2f}x", _percent(r["gemm_fraction"]), _percent(r["model_fraction"]),
             f"{r['peak_rss_mib']['fastune']:,.0f} / {r['peak_rss_mib']['hf+peft compiled']:,.0f}"] for r in rows]
    env = rows[0]["environment"]
    commands = dict.fromkeys(r["environment"]["command"] for r in rows)  # each row's own, in order
    return "\n".join([
        f"# Training step against the roofline ({dtype})", "",
        "tokens/s of all non-padding tokens; each row one `fastune bench train` run (its own report "
        "`step_<workload>_<row>.md` has the phases and the breakdown by kind of work). "
        "% of peak, GEMM: the GEMM FLOPs fastune ran per step over its median step time, as a fraction "
        "of the measured matmul peak; model: the same with the model's FLOPs (`summary_row`).", "",
        table(["workload", "row", "fastune", "kernels off", "HF+PEFT compiled", "HF+PEFT eager",
               "vs HF compiled", "kernels on / off", "% of peak, GEMM", "% of peak, model",
               "peak RSS MiB fastune / HF compiled"], body),
        "", f"Machine: {env['machine']}, torch {env['torch']}, {env['threads']} threads; rows measured "
        f"{', '.join(sorted({r['environment']['date'] for r in rows}))}. Reproduce (the rows' commands): "
        + "; ".join(f"`{c}`" for c in commands), ""])


def _percent(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--breakdown", type=int, default=2)
    parser.add_argument("--summary-only", action="store_true", help="rewrite step_summary from the row reports")
    args = parser.parse_args(argv)
    for workload in [] if args.summary_only else args.workloads.split(","):
        for row in args.rows.split(","):
            print(f"== {workload} / {row}", flush=True)
            report = bench_train(str(WORKLOADS[workload]), [f"model.dtype={args.dtype}", *ROWS[row]], ["hf"],
                                 args.steps, args.warmup, args.rounds, random_init=True, profile_key=None,
                                 variants=[KERNELS_OFF], progress=lambda m: print(m, flush=True),
                                 breakdown_steps=args.breakdown)
            write_report(RESULTS, f"step_{workload}_{row}", report, render(report))
    summary = summarize(args.dtype)
    write_report(RESULTS, "step_summary", {"dtype": args.dtype, "rows": summary}, render_summary(summary, args.dtype))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
