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
FULL_2K = FULL + ("dataset.max_seq_len=2048",)
LORA_8B = str(CONFIGS / "llama3_1_8B_lora.yaml")
LORA_3B = str(CONFIGS / "llama3_2_3B_lora.yaml")
LONG = ("chunked_mlp=4096",)  # fewer chunks per layer at long lengths (a [4096, I] chunk is small)

QWEN3_4B = ("model.checkpoint_dir=${asset:model_configs/qwen3_4b}",)  # the 3B configs' setup on Qwen3-4B
EIGHT_BIT = ("optimizer=adamw8bit",)  # torchao's AdamW8bit: 2 bytes/param of state
# torchao's CPUOffloadOptimizer: AdamW state on the CPU, each gradient moved there as it is produced
OFFLOADED = ("optimizer=cpu_offload_adamw", "optimizer.offload_gradients=true")
FULL_8B = "Llama 3.1 8B full fine-tuning, bf16, batch 1 x 2048, checkpointing + offloading + chunked MLP"
FULL_3B = "Llama 3.2 3B full fine-tuning, bf16, batch 1 x 2048, checkpointing + offloading + chunked MLP"
FULL_Q4B = "Qwen3 4B full fine-tuning, bf16, batch 1 x 2048, checkpointing + offloading + chunked MLP"
FULL_ANCHOR = "issue 17: must fit 24 GB with an 8-bit or offloaded optimizer"

# name -> (kind, config, overrides, profile, what, anchor text)
ITEMS = {
    "8b_qlora_4090_torchtune_setup": (
        "plan", QLORA_8B, (), "rtx4090",
        "Llama 3.1 8B QLoRA r8, batch 2 x 2048 packed, activation checkpointing (torchtune's setup)",
        "torchtune: 7.4 GiB peak (README, 'Memory and training speed', 1x 4090)"),
    "8b_qlora_4090_lowmem": (
        "plan", LOWMEM_8B, (), "rtx4090",
        "Llama 3.1 8B QLoRA r8, batch 2 x 2048 packed, torchtune's setup + activation offloading + chunked MLP "
        "(1024 tokens)",
        "goal of issue 17: at most 6 GiB; torchtune: 7.4 GiB (README, 1x 4090)"),
    "8b_full_4090": (
        "plan", LORA_8B, FULL, "rtx4090", f"{FULL_8B}, torch AdamW (states in bf16, 4 bytes/param)", FULL_ANCHOR),
    "8b_full_4090_adamw8bit": (
        "plan", LORA_8B, FULL + EIGHT_BIT, "rtx4090", f"{FULL_8B}, 8-bit AdamW", FULL_ANCHOR),
    "8b_full_4090_cpu_offload": (
        "plan", LORA_8B, FULL + OFFLOADED, "rtx4090", f"{FULL_8B}, CPU-offloaded AdamW and gradients",
        FULL_ANCHOR),
    "8b_qlora_4090_max_context": (
        "context", LOWMEM_8B, LONG, "rtx4090",
        "Llama 3.1 8B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "Unsloth: about 78K; HF + FA2: about 5.8K (24 GB)"),
    "3b_qlora_4060_lowmem": (
        "plan", LOWMEM_3B, (), "rtx4060",
        "Llama 3.2 3B QLoRA r8, batch 2 x 2048 packed, checkpointing + offloading + chunked MLP (1024)",
        "no published anchor found"),
    "3b_full_4060": (
        "plan", LORA_3B, FULL_2K, "rtx4060", f"{FULL_3B}, torch AdamW", "no published anchor found"),
    "3b_full_4060_adamw8bit": (
        "plan", LORA_3B, FULL_2K + EIGHT_BIT, "rtx4060", f"{FULL_3B}, 8-bit AdamW", "no published anchor found"),
    "3b_full_4060_cpu_offload": (
        "plan", LORA_3B, FULL_2K + OFFLOADED, "rtx4060", f"{FULL_3B}, CPU-offloaded AdamW and gradients",
        "no published anchor found"),
    "3b_qlora_4060_max_context": (
        "context", LOWMEM_3B, LONG, "rtx4060",
        "Llama 3.2 3B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "no published anchor found"),
    "8b_qlora_4060_max_context": (
        "context", LOWMEM_8B, LONG, "rtx4060",
        "Llama 3.1 8B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "Unsloth: up to 2,900 on 8 GB; HF + FA2: out of memory"),
    "qwen3_4b_qlora_4060_lowmem": (
        "plan", LOWMEM_3B, QWEN3_4B, "rtx4060",
        "Qwen3 4B QLoRA r8, batch 2 x 2048 packed, checkpointing + offloading + chunked MLP (1024)",
        "no published anchor found"),
    "qwen3_4b_full_4060_adamw8bit": (
        "plan", LORA_3B, QWEN3_4B + FULL_2K + EIGHT_BIT, "rtx4060", f"{FULL_Q4B}, 8-bit AdamW",
        "no published anchor found"),
    "qwen3_4b_full_4060_cpu_offload": (
        "plan", LORA_3B, QWEN3_4B + FULL_2K + OFFLOADED, "rtx4060",
        f"{FULL_Q4B}, CPU-offloaded AdamW and gradients", "no published anchor found"),
    "qwen3_4b_qlora_4060_max_context": (
        "context", LOWMEM_3B, QWEN3_4B + LONG, "rtx4060",
        "Qwen3 4B QLoRA r8, batch 1, checkpointing + offloading + chunked MLP (4096)",
        "no published anchor found"),
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


def where_the_bytes_go(items: dict) -> list[str]:
    """The 8B QLoRA step by category: torchtune's setup against the
    low-memory config, so the cut can be read category by category."""
    if "8b_qlora_4090_lowmem" not in items or "8b_qlora_4090_torchtune_setup" not in items:
        return []
    before = items["8b_qlora_4090_torchtune_setup"]["candidates"][0]
    after = items["8b_qlora_4090_lowmem"]["candidates"][0]
    names = list(before["by_category"])
    row = lambda label, c: [label] + [gib(c["by_category"][k]) for k in names] + [gib(c["peak_bytes"])]  # noqa: E731
    return [
        "# Consumer cards: memory ESTIMATES beside published anchors (issue 17)",
        "",
        "## Where the bytes of Llama 3.1 8B QLoRA go (rtx4090, GiB at the peak)",
        "",
        table(["config"] + [k.replace("_", " ") for k in names] + ["peak"],
              [row("torchtune's setup (`llama3_1_8B_qlora.yaml`)", before),
               row("+ offloading + chunked MLP (`llama3_1_8B_qlora_lowmem.yaml`)", after)]),
        "",
        "Parameters: the NF4 projections plus the bf16 embedding and lm_head (1.0 GiB each). Activations: "
        "with checkpointing, each layer's saved input (batch 2 x 2048 x 4096 bf16 = 32 MiB, 32 layers); "
        "offloading moves them to CPU memory. Temporaries: the layer recomputed in backward, whose MLP "
        "tensors ([4096, 14336] bf16 = 112 MiB each) the chunked MLP cuts to [1024, 14336].",
        "",
        "## Estimates and anchors",
        "",
    ]


def summary() -> tuple[dict, str]:
    items = {}
    for name in ITEMS:
        path = RESULTS / "plans" / f"lowmem_{name}.json"
        if path.is_file():
            items[name] = json.loads(path.read_text())
    rows = []
    for name, r in items.items():
        item = dict(zip(("kind", "config", "overrides", "profile", "what", "anchor"), ITEMS[name]))
        if item["kind"] == "plan":
            c = r["candidates"][0]
            estimate = f"peak {gib(c['peak_bytes'])} GiB, device total {c['device_total_gib']:.2f} GiB"
        else:
            estimate = f"{r['max_seq_len']:,} tokens (device total {r['device_total_gib']:.2f} GiB)"
        rows.append([item["what"], r["profile"]["key"], estimate, item["anchor"], f"`plans/lowmem_{name}.md`"])
    markdown = "\n".join([*where_the_bytes_go(items),
        "Every fastune figure is an ESTIMATE of `fastune plan` (one training step traced on fake tensors, "
        "CUDA code paths; peak = bytes allocated at the peak, device total = peak x 1.10 + 0.6 GiB CUDA "
        "context). Published figures are the peers' measurements of their own implementations.",
        "",
        table(["setup", "profile", "fastune estimate", "published anchor", "details"], rows),
        "",
        "Qwen3 4B rows: the Llama 3.2 3B configs' settings with Qwen3-4B's config.json "
        "(`fastune/assets/model_configs/qwen3_4b`).",
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
