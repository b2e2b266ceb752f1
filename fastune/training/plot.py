"""The metrics of a run as a chart: loss and validation loss, learning rate and
tokens/s against the global step, in ``output_dir/logs/training.png``.

Whatever ``metric_logger`` a run uses, ``HistoryLogger`` also appends every logged
record to ``output_dir/logs/history.jsonl`` (a resumed run continues the file; for a
step logged twice, the later line wins), and draws the chart at every checkpoint
and at the end. ``fastune plot OUTPUT_DIR [OTHER_DIR ...]`` draws it again, one
colour per run. matplotlib is optional (``pip install 'fastune[plot]'``): without
it the history is still written and the chart is skipped with one line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from fastune.errors import FastuneError
from fastune.training.loggers import MetricLogger, scalar

log = logging.getLogger(__name__)

LOG_DIR = "logs"
HISTORY = "history.jsonl"
CHART = "training.png"
# (panel title, metrics drawn in it)
PANELS = (("loss", ("loss", "val_loss")), ("learning rate", ("lr",)), ("tokens/s", ("tokens_per_second",)))


class PlotError(FastuneError):
    """A run folder with nothing to plot, or a chart that cannot be drawn."""


def history_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / LOG_DIR / HISTORY


def chart_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / LOG_DIR / CHART


def read_history(output_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] sorted by step, for the metrics of ``PANELS``; a step
    logged twice (a resumed run) keeps its later value. Unreadable lines (a crash
    mid-write) are skipped."""
    path = history_path(output_dir)
    if not path.is_file():
        raise PlotError(f"{output_dir}: no {LOG_DIR}/{HISTORY}; is it the output_dir of a fastune training run?")
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name in (m for _, metrics in PANELS for m in metrics):
            if isinstance(record.get(name), (int, float)) and isinstance(record.get("step"), int):
                series.setdefault(name, {})[record["step"]] = float(record[name])
    return {name: sorted(points.items()) for name, points in series.items()}


def plot_runs(output_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Optional[Path]:
    """Draw the runs of ``output_dirs`` into one PNG at ``out``, one colour per run (and
    dashes for the validation loss). None when matplotlib is not installed."""
    histories = {str(d): read_history(d) for d in output_dirs}
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    for i, (label, history) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        for ax, (title, metrics) in zip(axes, PANELS):
            for metric in metrics:
                points = history.get(metric, [])
                if points:
                    steps, values = zip(*points)
                    name = f"{label}: {metric}" if len(histories) > 1 else metric
                    ax.plot(steps, values, color=colour, linestyle="--" if metric.startswith("val") else "-",
                            marker="o" if metric.startswith("val") or len(points) == 1 else None,
                            markersize=3, label=name)
    for ax, (title, _) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (title == "loss" or len(histories) > 1):
            ax.legend(fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


class HistoryLogger(MetricLogger):
    """Passes everything on to ``inner`` and keeps the history and chart of the run in
    ``output_dir/logs`` (see the module docstring)."""

    def __init__(self, inner: MetricLogger, output_dir: str | os.PathLike):
        self.inner = inner
        self.output_dir = Path(output_dir)
        self._path = history_path(output_dir)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path, "a", encoding="utf-8")
        self._warned = False

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        self._file.write(json.dumps({"step": step, **{k: scalar(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()
        self.inner.log_dict(metrics, step)

    def log_config(self, cfg) -> None:
        self.inner.log_config(cfg)

    def log_checkpoint(self, path, metadata) -> None:
        self.inner.log_checkpoint(path, metadata)
        self.draw()

    def draw(self) -> Optional[Path]:
        """The chart of the run so far; None (said once) without matplotlib."""
        try:
            drawn = plot_runs([self.output_dir], chart_path(self.output_dir))
        except PlotError:
            return None
        if drawn is None and not self._warned:
            self._warned = True
            log.info("no metrics chart: matplotlib is not installed (pip install 'fastune[plot]')")
        return drawn

    def close(self) -> None:
        self._file.close()
        self.inner.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        self.inner.__exit__(exc_type, exc, tb)


def keep_history(logger: MetricLogger, output_dir: str | os.PathLike) -> MetricLogger:
    """``logger`` wrapped in a ``HistoryLogger`` on rank 0 (env ``RANK``), as it is elsewhere."""
    return HistoryLogger(logger, output_dir) if int(os.environ.get("RANK", "0")) == 0 else logger
