"""``fastune bench train``'s numbers: the model FLOPs of a step, each configuration's
medians and rates, the ratios against fastune, and the markdown and chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from fastune.bench.train_worker import PHASES


def model_flops_per_step(cfg, model_config, tokens_shape: tuple[int, int]) -> float:
    """Model FLOPs of one optimizer step (all micro-batches), by the formula of the
    model family's spec (``ModelSpec.model_flops``)."""
    from fastune.models.spec import get_spec

    from fastune.methods.method import method_from_config

    rows, seq = tokens_shape
    lora = method_from_config(cfg).lora  # None: full fine-tuning, the base weights train
    return get_spec(model_config.model_type).model_flops(
        model_config, rows, seq, cfg.gradient_accumulation_steps, full=lora is None,
        lora_targets=() if lora is None else list(lora.targets), lora_rank=0 if lora is None else lora.rank)


def summarize(results: dict, cfg, model_config, profile) -> None:
    """Medians and rates of each configuration, added to its entry."""
    peak = profile.peak_flops(cfg.model.dtype)
    for entry in results.values():
        timed = entry["steps"]
        median_s = statistics.median(s["seconds"] for s in timed)
        # Rows of padded batches differ in length: FLOPs per step, averaged over the timed steps.
        flops = statistics.mean(model_flops_per_step(cfg, model_config, tuple(s["shape"])) for s in timed)
        entry.update(
            median_step_s=median_s,
            tokens_per_s=statistics.mean(s["tokens"] for s in timed) / median_s,
            supervised_tokens_per_s=statistics.mean(s["supervised"] for s in timed) / median_s,
            phases_median_ms={p: 1e3 * statistics.median(s["phases"][p] for s in timed) for p in PHASES},
            model_flops_per_step=flops,
            model_flops_per_s=flops / median_s,
            fraction_of_peak_flops=None if not peak else flops / median_s / peak,
        )


def ratios(results: dict) -> dict[str, dict[str, float]]:
    """fastune against each other configuration, from this run's numbers: tokens/s
    ratio (> 1: fastune faster) and peak-memory ratio (< 1: fastune smaller)."""
    base = results["fastune"]
    out = {}
    for name, other in results.items():
        if name == "fastune":
            continue
        memory_key = "cuda_max_allocated_mib" if "cuda_max_allocated_mib" in base["memory"] else "process_peak_rss_mib"
        out[name] = {"tokens_per_s": base["tokens_per_s"] / other["tokens_per_s"],
                     "peak_memory": base["memory"][memory_key] / other["memory"][memory_key],
                     "memory_measure": memory_key}
    return out


def render(report: dict) -> str:
    """The report as markdown."""
    from fastune.bench.report import table

    profile, results = report["profile"], report["results"]
    cuda = profile["kind"] == "cuda"
    peak = profile.get(f"peak_{'bf16' if report['dtype'] in ('bf16', 'bfloat16') else 'fp32'}_flops")
    shape = next(iter(results.values()))["steps"][0]["shape"]
    lines = [
        f"# Training benchmark: {report['config']}",
        "",
        f"{report['steps']} timed steps per configuration after {report['warmup']} warm-up steps, "
        f"interleaved in {report['rounds']} rounds, each configuration in its own process; batch "
        f"{shape[0]} x {shape[1]} tokens, {report['dtype']}"
        f"{', random weights' if report['random_init'] else ''}. Run {report['run_id']}.",
        "",
        "tokens/s = mean tokens per step / median step time: `all` counts every non-padding token "
        "(prompt included), `supervised` only tokens with a label (torchtune's tokens/s). Phases are "
        "medians (ms): forward includes the loss, backward includes gradient clipping. "
        + ("Peak memory: CUDA max allocated. " if cuda else
           "Peak RSS: of the whole process (setup and compile included) / during the timed steps. ")
        + f"Peak {report['dtype']} FLOP/s of {profile['name']}: "
        + (f"{peak / 1e12:.3g} TFLOP/s ({profile['sources'].get('peak_bf16_flops' if report['dtype'] == 'bf16' else 'peak_fp32_flops', '')})"
           if peak else "unknown") + "; model FLOPs per step as `fastune.bench.train_report.model_flops_per_step` counts them.",
        "",
    ]
    header = ["configuration", "tok/s all", "tok/s supervised", "step ms", "data", "forward", "backward",
              "optimizer", "peak MiB" if cuda else "peak RSS MiB (process / steps)", "% of peak FLOP/s",
              "first loss", "fastune speedup", "fastune memory ratio"]
    rows = []
    for name, r in results.items():
        ph, mem = r["phases_median_ms"], r["memory"]
        memory = (f"{mem['cuda_max_allocated_mib']:.0f}" if cuda
                  else f"{mem['process_peak_rss_mib']:.0f} / {mem['steps_peak_rss_mib']:.0f}")
        ratio = report["ratios"].get(name)
        rows.append([name, f"{r['tokens_per_s']:,.0f}", f"{r['supervised_tokens_per_s']:,.0f}",
                     f"{1e3 * r['median_step_s']:.0f}", f"{ph['data']:.1f}", f"{ph['forward']:.0f}",
                     f"{ph['backward']:.0f}", f"{ph['optimizer']:.1f}", memory,
                     "-" if r["fraction_of_peak_flops"] is None else f"{100 * r['fraction_of_peak_flops']:.1f}%",
                     "-" if r["first_loss"] is None else f"{r['first_loss']:.4f}",
                     "-" if ratio is None else f"{ratio['tokens_per_s']:.2f}x",
                     "-" if ratio is None else f"{ratio['peak_memory']:.2f}"])
    lines.append(table(header, rows))
    lines += _breakdown_lines(results, peak)
    loads = [s["load_avg"] for r in results.values() for s in r["steps"]]
    env = report["environment"]
    lines += ["", "`fastune speedup` = fastune tok/s / that configuration's tok/s; `fastune memory ratio` = "
              "fastune peak / that configuration's peak (process peak RSS on CPU), both from this run.",
              "", f"Machine: {env['machine']}, torch {env['torch']}, {env['threads']} threads, {env['date']}; "
              f"1-minute load average during the timed steps {min(loads):.1f} to {max(loads):.1f} "
              "(above the core count, other processes shared the CPU; the interleaved "
              "configurations wait in their own processes). "
              f"Reproduce: `{env['command']}`"]
    return "\n".join(lines) + "\n"


def _breakdown_lines(results: dict, peak: Optional[float]) -> list[str]:
    """The ``--breakdown`` table: ms per step by category, and the GEMM FLOP/s of each
    category as a fraction of the peak."""
    from fastune.bench.breakdown import CATEGORIES
    from fastune.bench.report import table

    profiled = {name: r["breakdown"] for name, r in results.items() if "breakdown" in r}
    if not profiled:
        return []
    rows = []
    for name, b in profiled.items():
        cells = []
        for cat in CATEGORIES:
            ms, flops = b["ms"][cat], b["flops"][cat]
            fraction = f", {100 * flops / (ms / 1e3) / peak:.0f}%" if flops and ms and peak else ""
            cells.append(f"{ms:.0f} ({100 * ms / b['wall_ms']:.0f}%{fraction})")
        rows.append([name, f"{b['wall_ms']:.0f}", *cells])
    return ["", "Where the time goes (`--breakdown`, `fastune.bench.breakdown`): ms per step under the "
            "profiler (share of the step, and where the category ran GEMMs, their FLOP/s as a fraction of "
            "the peak). Self time of ops by category; `python` is the rest of the wall-clock time.", "",
            table(["configuration", "step ms (profiled)", *CATEGORIES], rows)]


def chart(report: dict, path: Path) -> Optional[Path]:
    from fastune.bench.report import bar_chart

    results = report["results"]
    memory_key = "cuda_max_allocated_mib" if report["profile"]["kind"] == "cuda" else "process_peak_rss_mib"
    return bar_chart(path, f"fastune bench train: {Path(report['config']).name}", list(results),
                     {"tokens/s (all tokens)": {"tokens/s": [r["tokens_per_s"] for r in results.values()]},
                      "peak memory, MiB": {memory_key: [r["memory"][memory_key] for r in results.values()]}})
