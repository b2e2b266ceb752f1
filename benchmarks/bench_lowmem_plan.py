"""Memory ESTIMATES for consumer cards (fastune issue 17), beside published anchors.

All figures come from ``fastune plan`` (one training step traced on fake tensors,
CUDA code paths; see fastune/bench/plan.py) and ``fastune plan --max-context``; none
is a measurement on a GPU. Only the models' config.json is needed.

    python benchmarks/bench_lowmem_plan.py [ITEM...]      # items: see ITEMS; all by default

Each item writes benchmarks/results/plans/lowmem_<item>.{json,md} as soon as it is
done; the summary benchmarks/results/plan_lowmem.{json,md} is rebuilt from every item
file present.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastune.bench.context import render_max_context, run_max_context
from fastune.bench.plan import render_plan, run_plan
from fastune.bench.report import environment, gib, table, write_report

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CONFIGS = HERE / "configs"
QLORA_8B = str(CONFIGS / "llama3_1_8B_qlora.yaml")
LOWMEM_8B = str(CONFIGS / "llama3_1_8B_qlora_lowmem.yaml")
LOWMEM_3B = str(CONFIGS / "llama3_2_3B_qlora_lowmem.yaml")
# Full fine-tuning: the LoRA config's model and data, method full, batch 1.
FULL = ("method=full", "batch_size=1", "activation_checkpointing=true", "activation_offloading=true",
        "chunked_mlp=1024")
LONG = ("chunked_mlp=4096",)  # fewer chunks per layer at long lengths (a [4096, I] chunk is small)

# name -> (kind, config, overrides, profile, what, anchor text)
ITEMS = {
    "8b_qlora_4090_torchtune_setup": (
        "plan", QLORA_8B, (), "rtx4090",
        "Llama 3.1 8B QLoRA r8, batch 2 x 2048 packed, activation checkpointing (torchtune's setup)",
        "torchtune: 7.4 GiB peak (README, 'Memory and training speed', 1x 4090)"),
    "8b_qlora_4090_lowmem": (
        "plan", LOWMEM_8B, (), "rtx4090",
        "the same + activation offloading + chunked MLP (1024 tokens)",
        "goal of issue 17: at most 6 GiB; torchtune: 7.4 GiB"),
    "8b_full_4090": (
        "plan", "benchmarks/configs/llama3_1_8B_lora.yaml", FULL, "rtx4090",
        "Llama 3.1 8B full fine-tuning, bf16, batch 1 x 2048, checkpointing + offloading + chunked MLP, "
        "torch AdamW (states in bf16, 4 bytes/param)",
        "issue 17: must fit 24 GB with an 8-bit or offloaded optimizer (see the arithmetic below)"),
    "8b_qlora_4090_max_context": (
        "context", LOWMEM_8B, LONG, "rtx4090",
        "Llama 3.1 8B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "Unsloth: about 78K; HF + FA2: about 5.8K (24 GB)"),
    "3b_qlora_4060_lowmem": (
        "plan", LOWMEM_3B, (), "rtx4060",
        "Llama 3.2 3B QLoRA r8, batch 2 x 2048 packed, checkpointing + offloading + chunked MLP (1024)",
        "no published anchor found"),
    "3b_full_4060": (
        "plan", "benchmarks/configs/llama3_2_3B_lora.yaml", FULL + ("dataset.max_seq_len=2048",), "rtx4060",
        "Llama 3.2 3B full fine-tuning, bf16, batch 1 x 2048, checkpointing + offloading + chunked MLP, "
        "torch AdamW", "no published anchor found"),
    "3b_qlora_4060_max_context": (
        "context", LOWMEM_3B, LONG, "rtx4060",
        "Llama 3.2 3B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "no published anchor found"),
    "8b_qlora_4060_max_context": (
        "context", LOWMEM_8B, LONG, "rtx4060",
        "Llama 3.1 8B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "Unsloth: up to 2,900 on 8 GB; HF + FA2: out of memory"),
}


def run_item(name: str) -> None:
    kind, config, overrides, profile, what, anchor = ITEMS[name]
    print(f"{name}: {kind} {config} {' '.join(overrides)} --profile {profile}", flush=True)
    if kind == "plan":
        report = run_plan(config, overrides, profile, check=False)
        markdown = render_plan(report)
    else:
        report = run_max_context(config, overrides, profile, step=1024)
        markdown = render_max_context(report)
    report["item"] = {"name": name, "kind": kind, "what": what, "anchor": anchor}
    write_report(RESULTS / "plans", f"lowmem_{name}", report, markdown)


def summary() -> tuple[dict, str]:
    items = {}
    for name in ITEMS:
        path = RESULTS / "plans" / f"lowmem_{name}.json"
        if path.is_file():
            items[name] = json.loads(path.read_text())
    rows = []
    for name, r in items.items():
        item = r["item"]
        if item["kind"] == "plan":
            c = r["candidates"][0]
            estimate = f"peak {gib(c['peak_bytes'])} GiB, device total {c['device_total_gib']:.2f} GiB"
        else:
            estimate = f"{r['max_seq_len']:,} tokens (device total {r['device_total_gib']:.2f} GiB)"
        rows.append([item["what"], r["profile"]["key"], estimate, item["anchor"], f"`plans/lowmem_{name}.md`"])
    markdown = "\n".join([
        "# Consumer cards: memory ESTIMATES beside published anchors (issue 17)",
        "",
        "Every fastune figure is an ESTIMATE of `fastune plan` (one training step traced on fake tensors, "
        "CUDA code paths; peak = bytes allocated at the peak, device total = peak x 1.10 + 0.6 GiB CUDA "
        "context). Published figures are the peers' measurements of their own implementations.",
        "",
        table(["setup", "profile", "fastune estimate", "published anchor", "details"], rows),
        "",
        f"Reproduce: `python benchmarks/bench_lowmem_plan.py` ({environment()['date']}).",
    ]) + "\n"
    return {"items": items}, markdown


def main(argv: list[str]) -> int:
    for name in argv or list(ITEMS):
        run_item(name)
        data, markdown = summary()
        paths = write_report(RESULTS, "plan_lowmem", data, markdown)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
