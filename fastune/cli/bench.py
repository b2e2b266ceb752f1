"""``fastune plan`` and ``fastune bench kernels|train``: memory plans and measurements."""

from __future__ import annotations

from pathlib import Path

import click

from fastune.cli.group import CONFIG_HELP, Group, debug_option


def _write(out_dir: str, name: str, data: dict, markdown: str) -> None:
    from fastune.bench.report import write_report

    click.echo(markdown)
    for path in write_report(out_dir, name, data, markdown):
        click.echo(f"wrote {path}")


@click.command(epilog=CONFIG_HELP)
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | ~KEY]...")
@click.option("--profile", default=None,
              help="Device to plan for: a file name in profiles/ (rtx4060, rtx3090, rtx4090, rtx5090, t4, rtx2080, "
                   "l4, a10g, a100_40gb, a100_80gb, h100_sxm, h200, cpu); default cpu when the config's device is cpu.")
@click.option("--verify", is_flag=True, help="CPU only: also run the step on real tensors and compare the peaks.")
@click.option("--max-context", "max_context", is_flag=True,
              help="Search the longest sequence (batch 1) that fits the profile, beside published figures.")
@click.option("--out", default="fastune_reports", show_default=True, help="Folder for plan_*.json and .md.")
@debug_option
def plan(config: str, overrides: tuple[str, ...], profile: str | None, verify: bool, max_context: bool,
         out: str) -> None:
    """Estimate the peak GPU memory of training CONFIG, with no GPU and no weights.

    One training step (forward, backward, optimizer) of the config's model runs on
    fake tensors; only the model's config.json is read. Prints memory by category
    and, when the config does not fit, the first variant that does (activation
    checkpointing or offloading, smaller micro-batches, QLoRA, shorter sequences).

    \b
    Examples:
      fastune plan llama3_2/1B_lora --profile rtx4090
      fastune plan my_config.yaml batch_size=8 --profile a100_40gb
      fastune plan demo --verify
      fastune plan benchmarks/configs/llama3_1_8B_qlora.yaml --profile rtx4090 --max-context
    """
    from fastune.bench.plan import render_plan, run_plan

    if max_context:
        from fastune.bench.context import render_max_context, run_max_context

        report = run_max_context(config, overrides, profile, progress=lambda m: click.echo(m, err=True))
        stem = Path(config).stem.replace("/", "_")
        _write(out, f"context_{stem}_{report['profile']['key']}", report, render_max_context(report))
        return

    report = run_plan(config, overrides, profile, verify, progress=lambda m: click.echo(m, err=True))
    stem = Path(config).stem.replace("/", "_")
    _write(out, f"plan_{stem}_{report['profile']['key']}", report, render_plan(report))


@click.group(cls=Group)
def bench() -> None:
    """Measure speed and memory: fused kernels, or whole training steps against baselines."""


@bench.command(name="kernels")
@click.option("--ops", default=None, help="Comma-separated ops (default: all).")
@click.option("--dtype", default="bfloat16", type=click.Choice(["bfloat16", "float32"]), show_default=True)
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first.")
@click.option("--steps", default=10, show_default=True, help="Timed steps; the median is reported.")
@click.option("--out", default="fastune_reports", show_default=True, help="Folder for kernels.json, .md, .png.")
@click.option("--roofline", "roofline_profile", default=None, metavar="PROFILE",
              help="Print bytes moved vs the byte floor per kernel at Llama-3.1-8B shapes "
                   "for a GPU profile (rtx4090, h100_sxm, ...) instead of timing.")
@debug_option
def bench_kernels(ops: str | None, dtype: str, warmup: int, steps: int, out: str,
                  roofline_profile: str | None) -> None:
    """Each fused op's forward, backward and full step: median time, peak memory and
    max error against float64, for each implementation (CUDA: Triton, eager,
    torch.compile of the reference; CPU: compiled and eager), each in its own process.

    Rows of ops not run this time are kept from OUT/kernels.json (same device and dtype).
    """
    import json

    if roofline_profile:
        from fastune.bench.roofline import main as roofline

        click.echo(roofline(roofline_profile)[0])
        return

    from fastune.bench.kernels import bench_kernels as run, chart, render

    previous = Path(out) / "kernels.json"  # other ops' rows of an earlier run are kept
    report = run(ops.split(",") if ops else None, dtype, warmup, steps,
                 previous=json.loads(previous.read_text()) if previous.exists() else None,
                 progress=lambda m: click.echo(m, err=True))
    _write(out, "kernels", report, render(report))
    png = chart(report, Path(out) / "kernels.png")
    click.echo(f"wrote {png}" if png else "no chart: pip install 'fastune[plot]'")


@bench.command(name="train", epilog=CONFIG_HELP)
@click.argument("config")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE | ~KEY]...")
@click.option("--steps", default=20, show_default=True, help="Timed optimizer steps per configuration.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps first (compilation happens here).")
@click.option("--rounds", default=5, show_default=True, help="The timed steps run interleaved in this many rounds.")
@click.option("--compare", multiple=True, type=click.Choice(["eager", "hf", "hf-eager", "hf-compiled"]),
              help="Add a baseline: eager = fastune without kernels and compile; hf = transformers + PEFT, "
                   "eager and compiled. Repeatable.")
@click.option("--variant", "variants", multiple=True, metavar="NAME:KEY=VALUE,...",
              help="Add fastune with more overrides, e.g. 'no kernels:model.use_kernels=false'. Repeatable.")
@click.option("--random-init", is_flag=True, help="Random weights from the checkpoint's config.json (no weights needed).")
@click.option("--profile", default=None, help="Device profile for the peak FLOP/s (default: this CPU, measured, or the local GPU).")
@click.option("--breakdown", default=0, show_default=True, metavar="STEPS",
              help="Then profile this many more steps of each configuration and report time by kind of work "
                   "(matmul, attention, loss, elementwise, optimizer, Python) and each one's fraction of peak.")
@click.option("--out", default="fastune_reports", show_default=True, help="Folder for train_*.json, .md, .png.")
@debug_option
def bench_train(config: str, overrides: tuple[str, ...], steps: int, warmup: int, rounds: int,
                compare: tuple[str, ...], variants: tuple[str, ...], random_init: bool, profile: str | None,
                breakdown: int, out: str) -> None:
    """Train CONFIG for a few steps and report tokens/s, peak memory, the fraction of
    peak FLOP/s and a phase breakdown, against baselines measured in the same run.

    \b
    Examples:
      fastune bench train demo --compare eager
      fastune bench train my_config.yaml --compare eager --compare hf --steps 30
      fastune bench train my_config.yaml --variant "checkpointing:activation_checkpointing=true"
      fastune bench train my_config.yaml --compare hf --breakdown 3
    """
    from fastune.bench.train import bench_train as run
    from fastune.bench.train_report import chart, render

    report = run(config, list(overrides), list(compare), steps, warmup, rounds, random_init, profile,
                 list(variants), progress=lambda m: click.echo(m, err=True), breakdown_steps=breakdown)
    stem = f"train_{Path(config).stem}"
    _write(out, stem, report, render(report))
    png = chart(report, Path(out) / f"{stem}.png")
    click.echo(f"wrote {png}" if png else "no chart: pip install 'fastune[plot]'")
