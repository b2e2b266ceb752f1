"""``fastune plan --max-context``: the longest sequence that fits a device, by bisection
on fake-tensor plans.

The config is traced (``fastune.bench.plan.trace_step``) with one row of L tokens
(``batch_size: 1``, everything else as configured), and L is searched in multiples of
``step`` tokens: doubled from the config's ``max_seq_len`` until a trace does not fit,
then bisected. A plan's memory grows with L (activations, the loss chunks, attention
with a flash kernel is linear in L), so the bisection finds the largest multiple of
``step`` that fits. The result is an ESTIMATE; the peers' published figures are their
own measurements of their own implementations, printed beside it.
"""

from __future__ import annotations

from typing import Callable, Optional

from fastune.bench.plan import Candidate, _settings, evaluate, load_inputs

# Published longest contexts, by model config name (fastune/assets/model_configs/).
PEERS = {
    "llama3_1_8b": [
        ("Unsloth", "QLoRA on all linear layers, batch 1", 24, 78_000,
         "about 78K, as cited in fastune issue 17 (Unsloth's Llama 3.1 8B context table, unsloth.ai/blog/llama3-3)"),
        ("Hugging Face + FA2", "the same setup", 24, 5_800, "about 5.8K, same citation"),
        ("Unsloth", "QLoRA on all linear layers, batch 1", 8, 2_900,
         "unsloth.ai/blog/llama3-3: 'up to 2,900 context lengths' on 8 GB, where HF + FA2 is out of memory"),
    ],
}
MAX_TOKENS = 1 << 20  # stop doubling here (1M tokens)


def max_context(cfg, model_config, profile, step: int = 512,
                progress: Callable[[str], None] = lambda _: None) -> dict:
    """The largest multiple of ``step`` tokens (batch 1) whose plan fits ``profile``,
    with every traced length and its device total (GiB).

    A bracketing search: [low, high] holds the longest length known to fit and the
    shortest known not to. Each next length is where the straight line through the two
    nearest traced points meets the device's memory (a plan grows about linearly with
    the length, so this lands next to the answer in a few traces), kept strictly inside
    the bracket; a repeated guess falls back to bisection (or doubling while nothing is
    known not to fit). It ends when high - low = step."""
    traced: dict[int, Candidate] = {}

    def fits(tokens: int) -> bool:
        if tokens not in traced:
            progress(f"tracing 1 x {tokens} tokens")
            candidate = Candidate({"batch_size": 1, "dataset.max_seq_len": tokens}, [])
            traced[tokens] = evaluate(cfg, model_config, profile, candidate)
        return traced[tokens].fits

    low, high = 0, None
    tokens = max(step, cfg.dataset.max_seq_len // step * step)
    while tokens <= MAX_TOKENS:
        if fits(tokens):
            low = tokens
        else:
            high = tokens
        if high is not None and high - low <= step:
            break
        tokens = _next_length(traced, low, high, profile.memory_gib, step)
    capped = high is None or high - low > step
    best = traced.get(low)
    return {
        "max_seq_len": low,
        "step": step,
        "capped_at": MAX_TOKENS if capped else None,
        "device_total_gib": None if best is None else best.device_total_gib,
        "by_category": None if best is None else best.memory.by_category,
        "traced": {str(t): round(c.device_total_gib, 3) for t, c in sorted(traced.items())},
    }


def _next_length(traced: dict, low: int, high: Optional[int], memory_gib: float, step: int) -> int:
    points = sorted(traced, key=lambda t: (abs(t - low), t))[:2] if high is None else [low, high]
    points = [t for t in points if t in traced]
    guess = None
    if len(points) == 2 and points[0] != points[1]:
        (t1, t2), (m1, m2) = points, (traced[points[0]].device_total_gib, traced[points[1]].device_total_gib)
        slope = (m2 - m1) / (t2 - t1)
        if slope > 0:
            guess = int(t1 + (memory_gib - m1) / slope) // step * step
    upper = MAX_TOKENS + step if high is None else high - step
    if guess is None or guess in traced or not low + step <= guess <= upper:
        guess = max(low + step, min(guess if guess is not None else 0, upper))
        if guess in traced or guess > upper:
            guess = 2 * low if high is None else (low + high) // 2 // step * step
    return guess


def peers_for(model_config_path: str) -> list[tuple]:
    name = str(model_config_path).rstrip("/").rpartition("/")[2]
    return PEERS.get(name, [])


def run_max_context(config: str, overrides: tuple[str, ...], profile_key: Optional[str], step: int = 512,
                    progress: Callable[[str], None] = lambda _: None) -> dict:
    """``fastune plan --max-context``: the search for the config on the profile, and the
    published figures for the same model."""
    from fastune.bench.report import environment

    cfg, model_config, profile = load_inputs(config, overrides, profile_key)
    result = max_context(cfg, model_config, profile, step, progress)
    peers = [dict(zip(("who", "setup", "memory_gb", "max_context", "source"), p))
             for p in peers_for(cfg.model.checkpoint_dir)]
    return {"config": str(config), "overrides": list(overrides), "environment": environment(),
            "profile": profile.as_dict(), "settings": {**_settings(cfg), "batch_size": 1}, **result,
            "peers": peers}


def render_max_context(report: dict) -> str:
    from fastune.bench.report import table

    profile, s = report["profile"], report["settings"]
    lines = [
        f"# Longest context: {report['config']} on {profile['name']} ({profile['memory_gib']:.0f} GiB)",
        "",
        f"ESTIMATE (fake-tensor plans, batch 1): {report['max_seq_len']:,} tokens fit "
        f"(multiples of {report['step']}; device total {report['device_total_gib'] or 0:.2f} GiB"
        f"{'; the search stops at this many' if report['capped_at'] else ''}). "
        f"Settings: {s['method']}, {s['dtype']}, activation checkpointing {s['activation_checkpointing']}, "
        f"offloading {s['activation_offloading']}, chunked MLP {s['chunked_mlp']}.",
        "",
        table(["tokens traced", "device total GiB"], [[k, f"{v:.2f}"] for k, v in report["traced"].items()]),
    ]
    if report["peers"]:
        lines += ["", "Published figures for the same model (their measurements, their setups):", "",
                  table(["who", "setup", "GPU memory (GB)", "longest context", "source"],
                        [[p["who"], p["setup"], p["memory_gb"], f"{p['max_context']:,}", p["source"]]
                         for p in report["peers"]])]
    lines += ["", f"Reproduce: `{report['environment']['command']}`"]
    return "\n".join(lines) + "\n"
