"""Data pipeline throughput on the demo data: tokenize, pack, collate.

    python benchmarks/bench_data.py              # 5 timed repeats per stage
    python benchmarks/bench_data.py --repeats 9

Stages, each run once to warm up and then ``--repeats`` times; the median is
reported:

- tokenize: the 4000 rows of ``fastune/assets/demo/data/train.jsonl`` (already in
  memory) to a ``TokenizedDataset`` with the demo tokenizer (``tokenize_rows``);
- load + tokenize: the same from the file, through ``datasets`` (``load_sft_dataset``,
  arrow cache warm after the warm-up run);
- one epoch of batches from ``SFTDataLoader`` (plan + collate), padded and packed;
- pipeline: tokenize + one packed epoch, back to back, as a training run starts.

Tokens/s counts every token that is not padding (prompt and answer); the
supervised share is reported next to it. One process, one thread of Python: the
machine's other cores are not used (``num_workers=0``). The target is 20x fastune's
training throughput (all tokens) on the training benchmark workload, read from the
committed ``benchmarks/results/train_workload.json``, so that data never starves training.

Results: benchmarks/results/data.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TRAIN_RESULTS = RESULTS / "train_workload.json"


def training_tokens_per_s() -> float:
    """fastune's tokens/s (all tokens) in the committed training benchmark."""
    return json.loads(TRAIN_RESULTS.read_text())["results"]["fastune"]["tokens_per_s"]
BATCH_SIZE, MAX_SEQ_LEN = 16, 128


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from fastune.data import build_dataloader, load_sft_dataset, load_tokenizer, tokenize_rows
    from fastune.data.demo import DEMO_DIR

    tok = load_tokenizer(DEMO_DIR / "tokenizer")
    path = DEMO_DIR / "data" / "train.jsonl"
    rows = [json.loads(line) for line in path.open()]
    cache = tempfile.mkdtemp(prefix="bench_data_")

    def tokenize():
        return tokenize_rows(rows, tok, max_seq_len=MAX_SEQ_LEN)

    def load_and_tokenize():
        return load_sft_dataset(path, tok, max_seq_len=MAX_SEQ_LEN, cache_dir=cache)

    dataset = tokenize()

    def epoch(packed: bool):
        def run():
            loader = build_dataloader(dataset, BATCH_SIZE, seed=0, packed=packed)
            return sum(int(batch["num_tokens"]) for batch in loader)
        return run

    def pipeline():
        ds = tokenize()
        return sum(int(b["num_tokens"]) for b in build_dataloader(ds, BATCH_SIZE, seed=0, packed=True))

    stages = {
        "tokenize (rows in memory)": tokenize,
        "load + tokenize (jsonl via datasets)": load_and_tokenize,
        "epoch of padded batches (plan + collate)": epoch(False),
        "epoch of packed batches (plan + pack + collate)": epoch(True),
        "pipeline: tokenize + packed epoch": pipeline,
    }
    results = []
    for name, fn in stages.items():
        seconds, _ = _median_seconds(fn, args.repeats)
        results.append({"stage": name, "median_s": seconds, "tokens": dataset.num_tokens,
                        "tokens_per_s": dataset.num_tokens / seconds, "samples_per_s": len(dataset) / seconds})
        print(f"{name:50s} {seconds * 1e3:8.1f} ms  {dataset.num_tokens / seconds:12,.0f} tok/s", flush=True)

    meta = {
        "command": "python benchmarks/bench_data.py" + (f" --repeats {args.repeats}" if args.repeats != 5 else ""),
        "data": str(path.relative_to(DEMO_DIR.parent.parent.parent)),
        "tokenizer": "fastune/assets/demo/tokenizer (HF tokenizer.json, byte-level BPE)",
        "rows": len(rows), "samples": len(dataset), "tokens": dataset.num_tokens,
        "supervised_tokens": dataset.num_supervised_tokens, "batch_size": BATCH_SIZE, "max_seq_len": MAX_SEQ_LEN,
        "repeats": args.repeats, "training_tokens_per_s": training_tokens_per_s(),
        "target_tokens_per_s": 20 * training_tokens_per_s(),
        "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "load_average_1min": os.getloadavg()[0],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (RESULTS / "data.md").write_text(_markdown(meta, results))


def _markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        "# Data pipeline throughput",
        "",
        f"`{meta['command']}`: {meta['rows']} rows of `{meta['data']}` ({meta['tokens']:,} tokens, "
        f"{meta['supervised_tokens']:,} supervised) with the demo tokenizer; batch {meta['batch_size']}, "
        f"max_seq_len {meta['max_seq_len']}, num_workers 0. Median of {meta['repeats']} runs after a warm-up; "
        f"torch {meta['torch']}, {meta['cpus']} CPUs "
        f"(1-minute load average {meta['load_average_1min']:.1f} at the end).",
        "",
        "Tokens/s counts all non-padding tokens (prompt and answer). "
        f"Target: >= {meta['target_tokens_per_s']:,.0f} tok/s, 20x fastune's training throughput on "
        f"the training benchmark workload ({meta['training_tokens_per_s']:,.0f} tok/s, all tokens, "
        "`benchmarks/results/train_workload.json`).",
        "",
        "| stage | median ms | tokens/s | samples/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['stage']} | {r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['samples_per_s']:,.0f} |"
              for r in results]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
