"""Where a training step's time goes, by kind of work (``fastune bench train --breakdown``).

A few steps run under ``torch.profiler``; each op's *self* time (its time minus that of
the ops it calls) goes to one category, so the categories add up to the time spent in
ops, and what is left of the wall-clock time is Python between them:

- ``optimizer``: every op inside ``Optimizer.step`` / ``Optimizer.zero_grad``;
- ``loss``: every op inside a cross-entropy op (fastune's fused ``linear_cross_entropy``
  with its GEMMs, or ``cross_entropy`` / ``nll_loss`` / ``log_softmax``);
- ``attention``: every op inside scaled-dot-product, flex or fastune's CPU document
  attention (its masks and copies included);
- ``matmul``: the other GEMMs (``mm``, ``addmm``, ``bmm``, ...);
- ``elementwise``: every other op, the kernels that inductor fuses included (their time
  is the self time of the compiled region that runs them);
- ``python``: wall-clock time of the steps minus the time in ops.

A category's FLOPs are those of its GEMMs, counted from the recorded input shapes
(``gemm_flops``: 2·M·N·K, in-place and ``out=`` variants included, which the
profiler's own count misses), and of CPU flash attention (4·B·H·S·S_k·D forward, twice
that backward, as if every key were reached: a causal call skips about half). Its
fraction of the peak is that FLOP/s over the device's peak. Inductor folds the
cross-entropy of an unfused loss into its compiled kernels: there only the
``lm_head`` GEMM is seen, and it counts as ``matmul``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

CATEGORIES = ("matmul", "attention", "loss", "elementwise", "optimizer", "python")
# An op inside one of these (first match from the outermost) belongs to its category.
_ENCLOSING = (
    ("optimizer", ("Optimizer.step#", "Optimizer.zero_grad#")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("attention", ("scaled_dot_product", "flash_attention", "flex_attention", "efficient_attention",
                   "fastune::document_attention")),
)
_MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_")
_FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def gemm_flops(name: str, shapes: list) -> int:
    """FLOPs of one GEMM or CPU flash-attention op from its input shapes (0 for others)."""
    try:
        if name in ("aten::mm",):
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * n * k
        if name in ("aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * n * k
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * n * k
        if name in ("aten::baddbmm", "aten::baddbmm_"):
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2 * b * m * n * k
        if name in (_FLASH, _FLASH + "_backward"):
            q, k = (shapes[0], shapes[1]) if name == _FLASH else (shapes[1], shapes[2])
            batch, heads, seq, dim = q
            return (4 if name == _FLASH else 8) * batch * heads * seq * k[2] * dim
    except (IndexError, TypeError, ValueError):  # an overload with other arguments
        return 0
    return 0


def category(names_outermost_first: list[str]) -> str:
    """The category of an op, given its name and those of the ops around it (the
    outermost first, the op itself last)."""
    for name in names_outermost_first:
        for cat, markers in _ENCLOSING:
            if any(m in name for m in markers):
                return cat
    return "matmul" if names_outermost_first[-1] in _MATMUL else "elementwise"


def _enclosing_names(event) -> list[str]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names[::-1]


def profile_steps(step: Callable[[], object], steps: int, sync: Callable[[], None] = lambda: None) -> dict:
    """Run ``step`` ``steps`` times under the profiler. Returns per step: ``ms`` and
    ``flops`` by category, and ``wall_ms``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_s = time.perf_counter() - started
    return summarize_events(prof.events(), wall_s, steps)


def summarize_events(events, wall_s: float, steps: int) -> dict:
    """Self time and GEMM FLOPs by category, per step. On CUDA an op's time is that of
    the kernels it launched (the host only queues them)."""
    on_cuda = torch.cuda.is_available()
    ms = dict.fromkeys(CATEGORIES, 0.0)
    flops = dict.fromkeys(CATEGORIES, 0)
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        cat = category(_enclosing_names(event))
        ms[cat] += (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / 1e3
        flops[cat] += gemm_flops(event.name, event.input_shapes)
    ms["python"] = max(0.0, wall_s * 1e3 - sum(ms.values()))
    return {"wall_ms": wall_s * 1e3 / steps, "ms": {k: v / steps for k, v in ms.items()},
            "flops": {k: v / steps for k, v in flops.items()}}
