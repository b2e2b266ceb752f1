"""The memory planner where it can be checked, and where it can be compared.

1. On this CPU: ``fastune plan``'s estimate (a training step on fake tensors) against
   the same step on real tensors with random weights, both measured by the
   dispatch-level ``MemoryTracker``, for the offline demo config and the training
   benchmark's workload.
2. Estimates for published setups, next to torchtune's published peak memory:
   Llama 3.2 3B LoRA (batch 2 x 4096, bf16), Llama 3.1 8B LoRA and QLoRA (batch 2 x
   2048 packed) on an RTX 4090. Only the models' config.json is needed
   (fastune/assets/model_configs/).

    python benchmarks/bench_plan.py          # a few minutes

Results: benchmarks/results/plan.{json,md}.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastune.bench.plan import render_plan, run_plan
from fastune.bench.report import environment, gib, table, write_report

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CHECKED = {  # config -> what it is
    "demo": "offline demo (fastune train demo)",
    "benchmarks/configs/train_workload.yaml": "training benchmark workload",
}
# torchtune's published peak memory for the same setups (GiB).
PUBLISHED = {
    "benchmarks/configs/llama3_2_3B_lora.yaml": (
        "Llama 3.2 3B LoRA r64 (q, v, o, MLP), batch 2 x 4096, bf16, activation checkpointing",
        8.5, "torchtune, as cited in fastune issue 7 (primary source not located offline)"),
    "benchmarks/configs/llama3_1_8B_lora.yaml": (
        "Llama 3.1 8B LoRA r8 (q, v, o, MLP), batch 2 x 2048 packed, bf16, activation checkpointing",
        16.2, "torchtune README, 'Memory and training speed': Llama 3.1 8B LoRA, 1x 4090, 16.2 GiB "
              "(batch size 2, packed to 2048, compile)"),
    "benchmarks/configs/llama3_1_8B_qlora.yaml": (
        "Llama 3.1 8B QLoRA r8 (q, k, v, o, MLP), batch 2 x 2048 packed, bf16, activation checkpointing",
        7.4, "torchtune README, 'Memory and training speed': Llama 3.1 8B QLoRA, 1x 4090, 7.4 GiB "
             "(batch size 2, packed to 2048, compile)"),
}


def main() -> int:
    report = {"environment": environment(), "checked": {}, "published": {}}
    for config, what in CHECKED.items():
        print(f"checking {config}", flush=True)
        plan = run_plan(config, (), "cpu", check=True)
        report["checked"][config] = {"what": what, "verification": plan["verification"]}
        write_report(RESULTS / "plans", f"plan_{Path(config).stem}_cpu", plan, render_plan(plan))
    for config, (what, published, source) in PUBLISHED.items():
        print(f"planning {config}", flush=True)
        plan = run_plan(config, (), "rtx4090", check=False)
        first = plan["candidates"][0]
        report["published"][config] = {"what": what, "estimate": first, "torchtune_gib": published,
                                       "source": source}
        write_report(RESULTS / "plans", f"plan_{Path(config).stem}_rtx4090", plan, render_plan(plan))
    paths = write_report(RESULTS, "plan", report, render(report))
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def render(report: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    rows = [[f"`{config}` ({c['what']})", mib(c["verification"]["estimate"]["peak_bytes"]),
             mib(c["verification"]["measured"]["peak_bytes"]), f"{c['verification']['relative_error']:+.2%}"]
            for config, c in report["checked"].items()]
    published = [[p["what"], gib(p["estimate"]["peak_bytes"]), f"{p['estimate']['device_total_gib']:.2f}",
                  f"{p['torchtune_gib']:.1f}", p["source"]] for p in report["published"].values()]
    method = next(iter(report["checked"].values()))["verification"]["method"]
    return "\n".join([
        "# Memory planner: checked on this CPU, compared with published numbers",
        "",
        "## 1. Estimate against a real step (this CPU)",
        "",
        f"Method: {method}. The estimate runs the step on fake tensors; the measurement runs it "
        "on real tensors. Both count the bytes of live tensor storages (not RSS).",
        "",
        table(["config", "estimate MiB", "measured MiB", "estimate / measured - 1"], rows),
        "",
        "## 2. Published setups on an RTX 4090 (24 GiB): ESTIMATES, not measurements",
        "",
        "fastune's estimate is its own training step (its kernels and fused loss, the CUDA code "
        "paths traced on fake tensors) at the peak of a steady-state step, as the CUDA allocator "
        "would count it (max allocated); device total adds a 10% allocator margin and 0.6 GiB of "
        "CUDA context. torchtune's figures are its own measurements of its own implementation.",
        "",
        table(["setup", "fastune estimate, peak allocated GiB", "fastune estimate, device total GiB",
               "torchtune published peak GiB", "source of the published figure"], published,
              align="lrrrl"),
        "",
        "Per-category tables and assumptions: `benchmarks/results/plans/`.",
        "",
        f"Machine: {report['environment']['machine']}, torch {report['environment']['torch']}, "
        f"{report['environment']['date']}. Reproduce: `python benchmarks/bench_plan.py`",
    ]) + "\n"


if __name__ == "__main__":
    sys.exit(main())
