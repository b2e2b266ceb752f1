"""Reports: every command writes ``<name>.json`` and ``<name>.md``; bench also ``<name>.png``.

The JSON holds everything measured (and the command that reproduces it); the
markdown is the table a person reads; the PNG (matplotlib, the optional extra
``fastune[plot]``) is drawn where a chart reads faster than a table.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

GIB = 1024**3


def environment() -> dict[str, Any]:
    """The machine and software a result was measured on."""
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "command": "fastune " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("fastune")
        else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table; ``align`` holds one of "l"/"r" per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def write_report(out_dir: str | os.PathLike, name: str, data: dict, markdown: str) -> list[Path]:
    """Write ``out_dir/name.json`` and ``out_dir/name.md``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md_path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return [json_path, md_path]


def bar_chart(path: str | os.PathLike, title: str, groups: Sequence[str], series: dict[str, Sequence[float]],
              ylabel: str) -> Optional[Path]:
    """Grouped bars (one group per entry of ``groups``, one bar per series) as a PNG.
    Returns None, drawing nothing, when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v if v is not None else 0 for v in values], width, label=label)
        ax.bar_label(bars, labels=[f"{v:.3g}" if v is not None else "" for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
