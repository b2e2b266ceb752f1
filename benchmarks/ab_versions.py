"""Two versions of fastune, A/B, as ratios in one run: ``fastune bench train`` or
``fastune bench kernels`` run by each version's own ``fastune`` executable, alternated
(A, B, B, A, ...), each run its own process, so that drift of a shared machine hits both.

    # the old version: a checkout and a venv of its own
    git worktree add /tmp/old 309a0da && python -m venv /tmp/old-venv
    /tmp/old-venv/bin/pip install torch==2.13.0 && /tmp/old-venv/bin/pip install -e /tmp/old
    python benchmarks/ab_versions.py train --old /tmp/old-venv/bin/fastune:/tmp/old \\
        --new "$(which fastune):." --rounds 5 --steps 8
    python benchmarks/ab_versions.py kernels --old ... --new ... --rounds 2 \\
        --ops rms_norm,add_rms_norm,apply_rope,swiglu,lora_linear,lora_mlp

Each side is EXECUTABLE:ROOT (ROOT: its checkout, for the train workload's config).
fp32 by default (a CPU without a bf16 matmul cannot time bf16). Pin the whole command
to one core (``taskset -c 0``, ``OMP_NUM_THREADS=1``) when the machine runs other work.
Prints per-run figures and median ratios new/old; writes nothing in the repo.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import subprocess
import sys
import tempfile


def run_train(exe: str, root: str, args) -> dict:
    out = tempfile.mkdtemp(prefix="ab_train_")
    subprocess.run([exe, "bench", "train", f"{root}/benchmarks/configs/train_workload.yaml",
                    f"model.dtype={args.dtype}", f"output_dir={out}/run", "--random-init", "--rounds", "1",
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out],
                   check=True, capture_output=True, cwd=tempfile.gettempdir())
    result = json.load(open(glob.glob(f"{out}/train_*.json")[0]))["results"]["fastune"]
    return {"tokens/s": result["tokens_per_s"], "peak RSS MiB": result["memory"]["process_peak_rss_mib"],
            "first loss": result["first_loss"]}


def run_kernels(exe: str, root: str, args) -> dict:
    out = tempfile.mkdtemp(prefix="ab_kernels_")
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    subprocess.run([exe, "bench", "kernels", "--dtype", dtype, "--ops", args.ops, "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--out", out],
                   check=True, capture_output=True, cwd=tempfile.gettempdir())
    results = json.load(open(f"{out}/kernels.json"))["results"]
    return {f"{op} compiled ms": r["compiled"]["median_ms"] for op, r in results.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["train", "kernels"])
    parser.add_argument("--old", required=True, help="EXECUTABLE:ROOT of the old version")
    parser.add_argument("--new", required=True, help="EXECUTABLE:ROOT of the new version")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--ops", default="rms_norm,add_rms_norm,apply_rope,swiglu,lora_linear,lora_mlp")
    args = parser.parse_args(argv)
    run = run_train if args.bench == "train" else run_kernels
    sides = {"old": args.old.split(":", 1), "new": args.new.split(":", 1)}
    figures: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            figures[side].append(run(*sides[side], args))
            print(f"round {r} {side}: " + ", ".join(f"{k} {v:.6g}" for k, v in figures[side][-1].items()),
                  flush=True)
    for key in figures["old"][0]:
        old = statistics.median(f[key] for f in figures["old"])
        new = statistics.median(f[key] for f in figures["new"])
        print(f"median {key}: old {old:.6g}, new {new:.6g}, new/old {new / old:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
