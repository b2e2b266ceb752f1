"""Peak memory while loading an HF checkpoint: fastune against a naive loader and transformers.

Writes a random, shallow but wide Llama checkpoint of a few hundred MB into a
temporary folder (sharded, and as one file), then loads it in a fresh
subprocess per configuration and repeat. Each child

1. loads a small checkpoint with the same loader (warm-up: one-time imports
   and lazy initialization, e.g. torch._dynamo, which meta-device init pulls
   in; reported separately as ``warmup_delta_bytes``),
2. resets its peak-RSS mark (``/proc/self/clear_refs``),
3. loads the big checkpoint and reads every weight once (transformers leaves
   weights as views of the file's mapping, paged in on first use; that must
   count as loading too),
4. reports peak RSS delta = VmHWM after - VmRSS before,

as a ratio to the checkpoint's size on disk and to the loaded weights' size
(they differ when loading casts fp32 to bf16). A loader that holds the
weights once scores about 1.0; one that reads whole files and then copies
them into a model scores about 2.0.

    python benchmarks/load_memory.py            # ~530 MB fp32 checkpoint
    python benchmarks/load_memory.py --layers 2 --repeats 1   # quicker

Results: benchmarks/results/load_memory.{json,md}. Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# name -> (checkpoint layout, loader, dtype to load in)
CONFIGS = {
    "fastune, sharded, fp32": ("sharded", "fastune", "float32"),
    "fastune, single file, fp32": ("single", "fastune", "float32"),
    "fastune, sharded, fp32 -> bf16": ("sharded", "fastune", "bfloat16"),
    "naive (load_file + load_state_dict), sharded, fp32": ("sharded", "naive", "float32"),
    "transformers from_pretrained, sharded, fp32": ("sharded", "transformers", "float32"),
}


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def load(loader: str, path: str, dtype):
    if loader == "fastune":
        import fastune

        return fastune.from_pretrained(path, dtype=dtype)
    if loader == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # "naive": what a loader written without care does: whole files in memory, then copy.
    from safetensors.torch import load_file

    from fastune.checkpoint import from_hf_key
    from fastune.models import ModelConfig, Transformer

    state_dict = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state_dict.update({from_hf_key(k): v for k, v in load_file(file).items()})
    model = Transformer(ModelConfig.from_json(path)).to(dtype)
    model.load_state_dict(state_dict)
    return model


def child(loader: str, path: str, dtype_name: str, warmup_path: str) -> None:
    """Runs in a fresh process: warm up, load once, print one JSON line."""
    import gc

    from fastune.checkpoint import parse_dtype

    dtype = parse_dtype(dtype_name)
    start_rss = _status_kib("VmRSS")
    load(loader, warmup_path, dtype)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    model = load(loader, path, dtype)
    # Read every weight once: transformers keeps weights as views of the file's
    # mapping, paged in on first use, which must count as loading too.
    for p in model.parameters():
        p.detach().sum()
    seconds = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({
        "peak_delta_bytes": (_status_kib("VmHWM") - before) * 1024,
        "final_delta_bytes": (_status_kib("VmRSS") - before) * 1024,
        "warmup_delta_bytes": (before - start_rss) * 1024,
        "weight_bytes": weight_bytes,
        "seconds": seconds,
    }))


def make_checkpoints(root: Path, args) -> dict[str, Path]:
    from fastune.checkpoint import save_hf_checkpoint
    from fastune.models import ModelConfig

    config = ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
        num_key_value_heads=args.hidden // 128, head_dim=128,
    )
    paths = {"sharded": root / "sharded", "single": root / "single", "warmup": root / "warmup"}
    state_dict = _random_weights(config)
    save_hf_checkpoint(state_dict, config, paths["sharded"], max_shard_size=args.shard_size)
    save_hf_checkpoint(state_dict, config, paths["single"], max_shard_size=2**62)
    small = dataclasses.replace(config, vocab_size=256, intermediate_size=256, num_hidden_layers=1)
    save_hf_checkpoint(_random_weights(small), small, paths["warmup"])
    return paths


def _random_weights(config) -> dict:
    import torch

    from fastune.models import Transformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}


def run_child(loader: str, path: Path, dtype: str, warmup_path: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", loader, str(path), dtype, str(warmup_path)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {loader} {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # loader, path, dtype, warm-up path
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-size", default="128MB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="fastune_load_memory_") as tmp:
        paths = make_checkpoints(Path(tmp), args)
        for name, (layout, loader, dtype) in CONFIGS.items():
            runs = [run_child(loader, paths[layout], dtype, paths["warmup"]) for _ in range(args.repeats)]
            ckpt = checkpoint_bytes(paths[layout])
            peak = statistics.median(r["peak_delta_bytes"] for r in runs)
            rows.append({
                "config": name,
                "checkpoint_files": len(list(paths[layout].glob("*.safetensors"))),
                "checkpoint_bytes": ckpt,
                "weight_bytes": runs[0]["weight_bytes"],
                "peak_delta_bytes_median": peak,
                "peak_delta_over_checkpoint": peak / ckpt,
                "peak_delta_over_weights": peak / runs[0]["weight_bytes"],
                "final_delta_over_weights": statistics.median(r["final_delta_bytes"] for r in runs)
                / runs[0]["weight_bytes"],
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "warmup_delta_bytes_median": statistics.median(r["warmup_delta_bytes"] for r in runs),
                "runs": runs,
            })
            print(f"{name}: peak delta {peak / 2**20:.0f} MiB = {peak / ckpt:.2f}x checkpoint", flush=True)
    write_results(rows, args)


def write_results(rows: list[dict], args) -> None:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(["python benchmarks/load_memory.py", *sys.argv[1:]]),
        "model": {"vocab": args.vocab, "hidden": args.hidden, "intermediate": args.intermediate,
                  "layers": args.layers, "dtype_on_disk": "float32"},
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "measure": "peak RSS delta = VmHWM after load - VmRSS before load, one fresh process per run",
    }
    (RESULTS / "load_memory.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        "# Peak memory while loading a checkpoint",
        "",
        f"`{meta['command']}`: a random Llama (vocab {args.vocab}, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.layers} layers) saved in fp32; "
        f"sharded at {args.shard_size}. Median of {args.repeats} fresh processes per row; torch {torch.__version__}.",
        "",
        "Peak delta = peak RSS during the load minus RSS before it, measured after a warm-up load "
        "of a small checkpoint with the same loader (one-time imports and lazy init, shown as "
        "'warm-up MiB', are excluded). 1.0x of the loaded weights is the floor.",
        "",
        "| config | files | checkpoint MiB | loaded weights MiB | peak delta MiB "
        "| peak / checkpoint | peak / weights | load s | warm-up MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['checkpoint_files']} | {r['checkpoint_bytes'] / 2**20:.0f} "
            f"| {r['weight_bytes'] / 2**20:.0f} | {r['peak_delta_bytes_median'] / 2**20:.0f} "
            f"| {r['peak_delta_over_checkpoint']:.2f}x | {r['peak_delta_over_weights']:.2f}x "
            f"| {r['seconds_median']:.2f} | {r['warmup_delta_bytes_median'] / 2**20:.0f} |"
        )
    (RESULTS / "load_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
