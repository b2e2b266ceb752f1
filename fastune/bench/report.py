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
        "command": _command(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _command() -> str:
    """How this process was started, as a user would type it."""
    program = Path(sys.argv[0]).parts[-2:] if sys.argv and sys.argv[0] else ()
    if program[-1:] == ("fastune",) or program == ("cli", "__main__.py"):  # the entry point, or python -m fastune.cli
        return shlex.join(["fastune", *sys.argv[1:]])
    return shlex.join(["python", sys.argv[0], *sys.argv[1:]])


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


def _label(value: Optional[float]) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def bar_chart(path: str | os.PathLike, title: str, groups: Sequence[str],
              panels: dict[str, dict[str, Sequence[Optional[float]]]]) -> Optional[Path]:
    """Grouped bars as a PNG: one panel per entry of ``panels`` (its y label -> series),
    one group of bars per entry of ``groups``, one bar per series. Returns None,
    drawing nothing, when matplotlib is not installed (``pip install 'fastune[plot]'``)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 0.9 * len(groups) + 2) * len(panels) / 1.5, 4.5),
                             squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels.items()):
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, [0 if v is None else v for v in values], width, label=label)
            ax.bar_label(bars, labels=[_label(v) for v in values], fontsize=7)
        ax.set_xticks(range(len(groups)), groups, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
