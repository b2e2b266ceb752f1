"""Decode speed: fastune's generation (static KV cache, compiled decode step) against
``transformers`` ``generate`` on the same weights, on this machine's CPU.

    python benchmarks/bench_generate.py                  # both models, bf16
    python benchmarks/bench_generate.py --models bench_llama_55m --new-tokens 256

Models: ``bench_llama_55m`` (the training benchmark's 55M-parameter Llama, vocab
32000, random weights saved once with ``save_pretrained``) and ``demo`` (the
shipped 1.9M-parameter demo model, where per-token overhead is everything).

Configurations, each in its own process (peak RSS belongs to it alone):

- ``hf``: ``model.generate(do_sample=False)``, transformers' default (dynamic) cache, eager;
- ``fastune-eager``: ``Generator(model)``, static KV cache, eager;
- ``fastune-compiled``: ``Generator(model, compile=True)``, the decode step compiled.

Each process loads its model and runs one untimed generation (which compiles);
then the timed generations, ``--repeats`` per configuration, run interleaved in
rounds whose order rotates, one process at a time, so that the load of a shared
machine falls on all configurations alike. Each generates exactly
``--new-tokens`` greedy tokens from the same ``--prompt-tokens`` prompt, batch 1.
**Decode tokens/s** is 1 / the median time of one decode step over all timed
steps: for fastune its per-step wall times, for transformers the intervals
between the tokens its streamer receives. **End-to-end tokens/s** is new tokens /
the median wall time of a whole ``generate`` call (prefill and setup included).
Ratios are against ``hf`` of the same model, from the same run.

Results: benchmarks/results/generate.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("hf", "fastune-eager", "fastune-compiled")
TARGET_RATIO = 2.0


def model_dir(name: str, workdir: Path) -> Path:
    """An HF checkpoint folder for ``name``: the demo model as shipped, or the 55M config
    with random weights (seeded), saved by transformers."""
    if name == "demo":
        return ROOT / "fastune" / "assets" / "demo" / "base_model"
    import torch
    import transformers

    folder = workdir / name
    if not folder.exists():
        config = transformers.AutoConfig.from_pretrained(ROOT / "fastune" / "assets" / "model_configs" / name)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


# --- one configuration, in its own process ---------------------------------------------


class _StepTimes:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def worker(config: str, path: Path, dtype_name: str, prompt_tokens: int, new_tokens: int, threads: int) -> None:
    """Load, warm up, then serve the driver: each ``run`` line on stdin gets one timed
    generation as a JSON line on stdout; ``quit`` gets the peak RSS."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    torch.manual_seed(0)
    prompt = torch.randint(3, 300, (1, prompt_tokens))
    if config == "hf":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

        def run():
            timer = _StepTimes()
            with torch.no_grad():
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=timer,
                                     pad_token_id=0)
            # stamps: the prompt, then each new token; the first token follows prefill.
            steps = [b - a for a, b in zip(timer.stamps[1:], timer.stamps[2:])]
            return out.shape[1] - prompt_tokens, steps
    else:
        import fastune
        from fastune.generation import Generator

        model = fastune.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        generator = Generator(model, compile=config == "fastune-compiled")

        def run():
            out = generator.generate(prompt.tolist(), new_tokens)
            return len(out.tokens[0]), out.step_seconds

    start = time.perf_counter()
    run()  # warm-up (and compilation)
    print(json.dumps({"warmup_seconds": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        start = time.perf_counter()
        produced, steps = run()
        total = time.perf_counter() - start
        assert produced == new_tokens, f"{config} produced {produced} tokens, not {new_tokens}"
        print(json.dumps({"steps": steps, "total": total}), flush=True)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


# --- the driver ------------------------------------------------------------------------


class Worker:
    """One configuration's process, spoken to one JSON line at a time."""

    def __init__(self, config: str, path: Path, args):
        self.config = config
        cmd = [sys.executable, __file__, "--worker", config, "--path", str(path), "--dtype", args.dtype,
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads)]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.warmup_seconds = self._read()["warmup_seconds"]

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.config}: the worker died (run it alone with --worker to see why)")
        return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> float:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        peak = self._read()["peak_rss_mib"]
        self.process.wait()
        return peak


def measure(path: Path, args) -> dict:
    """Every configuration of one model, timed in interleaved rounds (the order rotates),
    so that a change in the machine's load hits all of them alike."""
    workers = [Worker(config, path, args) for config in CONFIGS]
    steps: dict[str, list[float]] = {w.config: [] for w in workers}
    totals: dict[str, list[float]] = {w.config: [] for w in workers}
    for round_ in range(args.repeats):
        for w in workers[round_ % len(workers):] + workers[:round_ % len(workers)]:
            result = w.run()
            steps[w.config] += result["steps"]
            totals[w.config].append(result["total"])
    rows = {}
    for w in workers:
        rows[w.config] = {
            "decode_tokens_per_s": 1 / statistics.median(steps[w.config]),
            "end_to_end_tokens_per_s": args.new_tokens / statistics.median(totals[w.config]),
            "warmup_seconds": w.warmup_seconds,
            "peak_rss_mib": w.close(),
            "timed_steps": len(steps[w.config]),
        }
    return rows


def render(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Generation: decode speed, fastune vs transformers `generate` (CPU)",
        "",
        f"{s['dtype']}, batch 1, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens (greedy), "
        f"{s['repeats']} timed generations each after one untimed, interleaved; {s['threads']} torch thread(s) on "
        f"{report['machine']['cpu_count']} cores, load average {report['machine']['load_average']} at the start "
        "(above the core count, other jobs shared the cores). Each configuration in its own process.",
        "",
        "Decode tokens/s = 1 / median decode step; end-to-end = new tokens / median `generate` time "
        "(prefill included). Ratios against `hf` of the same model, same run.",
        "",
        "| model | config | decode tok/s | ratio | end-to-end tok/s | ratio | warm-up s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, rows in report["models"].items():
        hf = rows["hf"]
        for config, r in rows.items():
            lines.append(
                f"| {model} | {config} | {r['decode_tokens_per_s']:.1f} | "
                f"{r['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.2f}x | {r['end_to_end_tokens_per_s']:.1f} | "
                f"{r['end_to_end_tokens_per_s'] / hf['end_to_end_tokens_per_s']:.2f}x | {r['warmup_seconds']:.1f} | "
                f"{r['peak_rss_mib']:.0f} |")
    lines += ["", f"Target: fastune-compiled decode >= {TARGET_RATIO:g}x hf."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bench_llama_55m,demo")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per configuration, interleaved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per configuration (1: steadiest on a machine shared with other jobs)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.path, args.dtype, args.prompt_tokens, args.new_tokens, args.threads)
        return

    report = {
        "settings": {k: getattr(args, k) for k in ("dtype", "prompt_tokens", "new_tokens", "repeats", "threads")},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average": round(os.getloadavg()[0], 1)},
        "models": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            path = model_dir(name, Path(workdir))
            report["models"][name] = measure(path, args)
            for config, row in report["models"][name].items():
                print(f"{name} {config}: {row['decode_tokens_per_s']:.1f} decode tok/s", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "generate.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
