"""Scaling from 1 to 2 CPU ranks with FSDP2 (gloo): tokens/s per rank and communication share.

    python benchmarks/bench_distributed.py                 # 3 warm-up + 10 timed steps
    python benchmarks/bench_distributed.py --steps 20

Workload: the shipped demo (``configs/demo.yaml``: the 1.6M-parameter Llama, its
tokenizer and data), packed into rows of 128 tokens, 16 rows per rank per step, fp32,
eager (no compile), full fine-tuning and LoRA (rank 16 on every projection). Weak
scaling: each rank trains the same per-rank batch, so 2 ranks do twice the work of 1
per step.

Each layout runs in its own process tree:

- ``1 proc x 1 thread`` and ``1 proc x 2 threads``: the single-process recipe, no
  process group (``OMP_NUM_THREADS`` 1 or 2);
- ``2 ranks x 1 thread``: ``torch.distributed.run --nproc-per-node 2``, FSDP2 over gloo.

Per layout: the median wall time of a training step (``train_step``: forward, backward,
gradient clipping, optimizer step; batches are fetched before the clock starts), after
the warm-up steps. Tokens/s counts every non-padding token (prompt and answer) of the
step on one rank. Communication share: on rank 0, over 3 more steps under
``torch.profiler``, the summed duration of the gloo collectives (its ``gloo:*`` events:
FSDP's all-gathers and reduce-scatters, and the recipe's two small all-reduces per
step) over the wall time of those steps. Gloo runs collectives on its own threads; a
collective's duration includes waiting for the other rank to arrive.

This machine has 2 cores: 2 ranks of 1 thread use the same cores as 1 process of 2
threads, so total throughput cannot scale past that; the numbers show the overhead
of sharding and gloo, not a speed-up. Results: benchmarks/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LAYOUTS = {  # name -> (ranks, threads per rank)
    "1 proc x 1 thread": (1, 1),
    "1 proc x 2 threads": (1, 2),
    "2 ranks x 1 thread": (2, 1),
}
METHODS = ("full", "lora")
PROFILED_STEPS = 3


def _overrides(method: str, output_dir: str) -> list[str]:
    return [
        f"output_dir={output_dir}", f"method={method}", "dataset.packed=true", "dataset.val_split=null",
        "eval_exact_match.source=null", "batch_size=16", "compile=false", "log_peak_memory_stats=false",
        "device=cpu", "save_every_n_steps=null",
    ]


def worker(method: str, warmup: int, steps: int, out: Path) -> None:
    """Runs inside each rank (or the single process): times ``train_step`` on real batches."""
    import itertools

    import torch

    from fastune import distributed
    from fastune.config import load_config
    from fastune.training.recipe import setup, train_step

    with tempfile.TemporaryDirectory() as tmp, distributed.process_group("cpu") as world:
        cfg = load_config("demo", _overrides(method, tmp))
        run = setup(cfg)
        pad = run.tokenizer.pad_id
        batches = itertools.cycle(list(itertools.islice(iter(run.train_loader), warmup + steps + PROFILED_STEPS)))
        seconds, tokens = [], []
        for i in range(warmup + steps):
            batch = next(batches)
            started = time.perf_counter()
            train_step(run, [batch])
            if i >= warmup:
                seconds.append(time.perf_counter() - started)
                tokens.append(int((batch["tokens"] != pad).sum()))
        comm, profiled = _communication_seconds(run, [next(batches) for _ in range(PROFILED_STEPS)], train_step)
        if world is None or world.is_main:
            step = statistics.median(seconds)
            out.write_text(json.dumps({
                "method": method, "ranks": 1 if world is None else world.world_size,
                "threads_per_rank": torch.get_num_threads(), "median_step_s": step,
                "tokens_per_step_per_rank": statistics.median(tokens),
                "tokens_per_s_per_rank": statistics.median(tokens) / step,
                "communication_share": comm / profiled, "timed_steps": steps, "warmup_steps": warmup,
            }))


def _communication_seconds(run, batches, train_step) -> tuple[float, float]:
    """(seconds inside gloo collectives, wall seconds) over ``batches``, one step each."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for batch in batches:
            train_step(run, [batch])
        wall = time.perf_counter() - started
    comm = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("gloo:")) / 1e6
    return comm, wall


def _launch(layout: str, method: str, warmup: int, steps: int) -> dict:
    ranks, threads = LAYOUTS[layout]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), "--worker", method, "--warmup", str(warmup),
                  "--steps", str(steps), "--out", str(out)]
        if ranks == 1:
            command = [sys.executable, *script]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={ranks}", *script]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return {"layout": layout, **json.loads(out.read_text())}


def _markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# FSDP2 scaling on CPU (gloo): 1 vs 2 ranks",
        "",
        f"`{meta['command']}` on {meta['machine']}; torch {meta['torch']}; 1-minute load average "
        f"{meta['load_average_before']:.1f} before, {meta['load_average_after']:.1f} after (above the "
        "core count, other processes shared the cores). Demo model (1.6M parameters), "
        "packed rows of 128 tokens, batch 16 per rank, fp32, eager. Median of "
        f"{meta['steps']} steps after {meta['warmup']} warm-up steps; each layout in its own processes. "
        "Tokens/s counts all non-padding tokens of one rank.",
        "",
        "| method | layout | step (s) | tokens/s per rank | tokens/s, all ranks | per rank vs 1 proc x 1 thread "
        "| communication share |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        base = next(r for r in rows if r["layout"] == "1 proc x 1 thread")["tokens_per_s_per_rank"]
        for r in rows:
            per_rank = r["tokens_per_s_per_rank"]
            lines.append(f"| {method} | {r['layout']} | {r['median_step_s']:.3f} | {per_rank:,.0f} | "
                         f"{per_rank * r['ranks']:,.0f} | {per_rank / base:.2f}x | {r['communication_share']:.0%} |")
    lines += [
        "",
        "Read the per-rank column as weak-scaling efficiency: a rank of the 2-rank job against one "
        "process with the same batch and one thread. 2 ranks of 1 thread run on the same 2 cores as "
        "1 process of 2 threads, so this measures the cost of sharding (an all-gather before each "
        "layer, a reduce-scatter after its backward) and of gloo on one host, not a speed-up; "
        "the 1 process x 2 threads row is what the same 2 cores give without sharding. When other "
        "processes share the cores (see the load average), OpenMP's 2 threads wait on each other "
        "and that row slows down most. On GPUs with NCCL the collectives overlap compute, which "
        "gloo on CPU barely does.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.warmup, args.steps, args.out)
        return

    import torch

    load_before = os.getloadavg()[0]
    results = []
    for method in METHODS:
        for layout in LAYOUTS:
            result = _launch(layout, method, args.warmup, args.steps)
            print(f"{method:5} {layout:20} {result['median_step_s']:.3f} s/step  "
                  f"{result['tokens_per_s_per_rank']:,.0f} tok/s per rank  "
                  f"communication {result['communication_share']:.0%}", flush=True)
            results.append(result)
    meta = {
        "command": "python benchmarks/bench_distributed.py" + (f" --steps {args.steps}" if args.steps != 10 else ""),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
        # Other processes on the machine skew every number; the 1-minute load average says how much.
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (RESULTS / "distributed.md").write_text(_markdown(results, meta))
    print(f"wrote {RESULTS / 'distributed.md'}")


if __name__ == "__main__":
    main()
