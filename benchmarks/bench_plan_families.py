"""Memory ESTIMATES of every shipped Qwen3, Gemma 2, Gemma 3 and Phi config on three
consumer cards (fastune issue 12): ``fastune plan`` (one training step traced on fake
tensors, CUDA code paths; see fastune/bench/plan.py), with each model's config.json
from fastune/assets/model_configs/. None of these figures is a measurement on a GPU.

    python benchmarks/bench_plan_families.py [CONFIG...]   # shipped config names; all by default

Each (config, profile) plan is added to benchmarks/results/plan_families.json as soon as
it is done, and the markdown is rebuilt from it; plans already in the json are not
redone (delete the json to start over).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastune.bench.plan import run_plan
from fastune.bench.report import environment, gib, table, write_report
from fastune.config import shipped_config_names

RESULTS = Path(__file__).parent / "results"
FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3_5", "phi4")
PROFILES = ("rtx4090", "rtx3090", "rtx4060")
# config folder/size -> its model's config.json in fastune/assets/model_configs/
ASSETS = {
    "qwen3/0.6B": "qwen3_0_6b", "qwen3/1.7B": "qwen3_1_7b", "qwen3/4B": "qwen3_4b", "qwen3/8B": "qwen3_8b",
    "gemma2/2B": "gemma2_2b", "gemma2/9B": "gemma2_9b", "gemma3/1B": "gemma3_1b", "gemma3/4B": "gemma3_4b",
    "phi3_5/mini": "phi3_5_mini", "phi4/mini": "phi4_mini",
}


def family_configs() -> list[str]:
    return [n for n in shipped_config_names() if n.split("/")[0] in FAMILIES]


def override(name: str) -> str:
    return f"model.checkpoint_dir=${{asset:model_configs/{ASSETS[name.rsplit('_', 1)[0]]}}}"


def summarize(report: dict) -> dict:
    """What the table needs of one plan: the config as shipped, and the first variant that fits."""
    first = report["candidates"][0]
    chosen = next((c for c in report["candidates"] if c["fits"]), None)
    return {"memory_gib": report["profile"]["memory_gib"], "settings": report["settings"],
            "as_configured": {k: first[k] for k in ("peak_bytes", "device_total_gib", "fits", "by_category")},
            "recommended": report["recommended"],
            "recommended_device_total_gib": None if chosen is None else chosen["device_total_gib"],
            "traced": [c["label"] for c in report["candidates"]]}


def render(data: dict) -> str:
    plans = data["plans"]
    names = [n for n in family_configs() if any(f"{n} {p}" in plans for p in PROFILES)]
    rows, misfits = [], []
    for name in names:
        row = [f"`{name}`"]
        for profile in PROFILES:
            s = plans.get(f"{name} {profile}")
            if s is None:
                row.append("not run")
                continue
            a = s["as_configured"]
            row.append(f"{gib(a['peak_bytes'])} / {a['device_total_gib']:.2f} {'fits' if a['fits'] else '**no**'}")
            if not a["fits"]:
                fix = (f"`{s['recommended']}` ({s['recommended_device_total_gib']:.2f} GiB)" if s["recommended"]
                       else "nothing the planner tries fits")
                misfits.append([f"`{name}`", profile, f"{a['device_total_gib']:.2f} > {s['memory_gib']:.0f}", fix])
        rows.append(row)
    env = data.get("environment", {})
    cards = ", ".join(f"{p}: {next(s['memory_gib'] for k, s in plans.items() if k.endswith(' ' + p)):.0f} GiB"
                      for p in PROFILES if any(k.endswith(" " + p) for k in plans))
    summary = [f"- {p}: " + (", ".join(row[0] for row in misfits if row[1] == p) or "every config fits")
               for p in PROFILES]
    return "\n".join([
        "# Qwen3, Gemma 2/3 and Phi configs on consumer cards: memory ESTIMATES",
        "",
        "Every figure is an ESTIMATE of `fastune plan` (one training step traced on fake tensors, CUDA code "
        "paths, the model's config.json from `fastune/assets/model_configs/`), not a measurement on a GPU. "
        "Peak = bytes allocated at the peak of a steady-state step; device total = peak x 1.10 + 0.6 GiB of "
        f"CUDA context, compared with the card's memory ({cards}). Each "
        "config as shipped (its batch, sequence length, LoRA rank and activation checkpointing); attention "
        "with sliding windows or softcaps (Gemma) counted as FlexAttention holds it.",
        "",
        "## Estimated peak / device total, GiB, as shipped",
        "",
        table(["config", *PROFILES], rows, align="l" + "r" * len(PROFILES)),
        "",
        "## Configs that do not fit a card as shipped (estimates)",
        "",
        *summary,
        "",
        "With the first variant the planner finds that fits (activation checkpointing or offloading, "
        "smaller micro-batches with more accumulation, QLoRA, shorter sequences; estimates too).",
        "",
        table(["config", "profile", "estimated device total > card, GiB", "first variant that fits (estimate)"],
              misfits, align="llrl") if misfits else "Every config fits every card.",
        "",
        f"Machine: {env.get('machine', '?')}, torch {env.get('torch', '?')}, {env.get('date', '?')}. "
        "Reproduce: `python benchmarks/bench_plan_families.py`; one plan: "
        "`fastune plan qwen3/8B_lora --profile rtx4060 'model.checkpoint_dir=${asset:model_configs/qwen3_8b}'`.",
    ]) + "\n"


def main(argv: list[str]) -> int:
    path = RESULTS / "plan_families.json"
    data = json.loads(path.read_text()) if path.is_file() else {"plans": {}}
    for profile in PROFILES:  # a card at a time, so that a partial run covers whole columns
        for name in argv or family_configs():
            key = f"{name} {profile}"
            if key in data["plans"]:
                continue
            print(f"planning {key}", flush=True)
            data["plans"][key] = summarize(run_plan(name, (override(name),), profile, check=False))
            data["environment"] = environment()  # of the latest plan
            write_report(RESULTS, "plan_families", data, render(data))
    print("\n".join(f"wrote {p}" for p in write_report(RESULTS, "plan_families", data, render(data))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
