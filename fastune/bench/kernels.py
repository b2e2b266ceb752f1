"""``fastune bench kernels``: each fused op against its eager reference (and torch.compile).

For every (op, implementation), in a fresh process (``python -m fastune.bench.kernels
--worker OP MODE``):

1. build the op's inputs (realistic shapes, bf16 by default) on the device, and
   compile the function for the ``compiled`` mode;
2. run ``warmup`` steps, then time ``steps`` steps of forward + backward with fixed
   upstream gradients, the device synchronized between the two: the medians of the
   forward, the backward and the full step are reported, and the CPU time of the step;
3. measure the peak memory one more step adds (``fastune.bench.measure.PeakMemory``:
   CUDA allocator peak, or peak RSS on CPU): activations saved for backward, outputs,
   gradients and temporaries; the inputs exist before;
4. compare its outputs and input gradients with a float64 computation of the same
   math, as max |error| / max |truth| per tensor, next to eager's error, so that speed
   never hides a numerics regression.

Implementations (modes):

- CUDA: ``triton`` (the public op: its Triton kernel), ``eager`` (the reference in
  plain PyTorch) and ``compiled`` (``torch.compile(fullgraph=True)`` of the reference);
- CPU: ``compiled`` (``torch.compile`` of the public op, whose CPU path is the
  reference, fused by inductor) and ``eager``.

Speedups are ratios of medians measured in the same run. ``malloc="retain"`` (CPU)
makes glibc keep freed memory for reuse instead of returning blocks over ~32 MiB to
the OS and page-faulting them back every step.

The cases (inputs, reference, float64 truth per op) are in ``fastune.bench.kernel_cases``;
how to add one is said there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from fastune.bench.kernel_cases import CASES, Case
from fastune.errors import FastuneError


class KernelBenchError(FastuneError):
    """Unknown ops, or a configuration that cannot run (one line)."""


def modes(device: str) -> tuple[str, ...]:
    return ("triton", "eager", "compiled") if device == "cuda" else ("eager", "compiled")


# ---------------------------------------------------------------- measuring (child process)

def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _on(device: torch.device, values: Optional[list]) -> Optional[list]:
    return None if values is None else [v.to(device) if torch.is_tensor(v) else v for v in values]


def build_case(op: str, dtype: torch.dtype, device: str) -> Case:
    """The op's case with its inputs on ``device``."""
    case = CASES[op](dtype)
    dev = torch.device(device)
    return dataclasses.replace(case, inputs=_on(dev, case.inputs), error_inputs=_on(dev, case.error_inputs))


class Step:
    """One forward + backward of ``fn`` on leaf inputs with fixed upstream gradients."""

    def __init__(self, case: Case, fn: Callable):
        self.fn = fn
        self.args = [t.clone().requires_grad_(i not in case.frozen)
                     if torch.is_tensor(t) and t.is_floating_point() else t
                     for i, t in enumerate(case.inputs)]
        self.leaves = [t for t in self.args if torch.is_tensor(t) and t.requires_grad]
        with torch.no_grad():
            outs = _as_tuple(case.reference(*self.args))
        gen = torch.Generator().manual_seed(7)
        self.grads = [torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in outs]

    def forward(self):
        for t in self.leaves:
            t.grad = None
        return _as_tuple(self.fn(*self.args))

    def backward(self, outs) -> None:
        torch.autograd.backward(outs, self.grads)

    def __call__(self):
        outs = self.forward()
        self.backward(outs)
        return outs


def _errors(case: Case, step: Step) -> dict[str, float]:
    """max |value - truth| / max |truth| for each output and each input gradient."""
    if case.error_inputs is not None:
        step = Step(dataclasses.replace(case, inputs=case.error_inputs), step.fn)
    outs = step()
    got = list(outs) + [t.grad for t in step.leaves]
    names = [f"out{i}" for i in range(len(outs))]
    names += [f"d_arg{i}" for i, t in enumerate(step.args) if torch.is_tensor(t) and t.requires_grad]
    args64 = [t.detach().double().requires_grad_(t.requires_grad)
              if torch.is_tensor(t) and t.is_floating_point() else t for t in step.args]
    outs64 = _as_tuple(case.truth(*args64))
    torch.autograd.backward(outs64, [g.double() for g in step.grads])
    want = list(outs64) + [t.grad for t in args64 if torch.is_tensor(t) and t.requires_grad]
    return {n: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for n, a, b in zip(names, got, want)}


def _retain_freed_memory() -> None:
    """glibc: serve blocks up to 1 GiB from the heap and never trim it, so freed memory
    is reused without page faults."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 62)  # M_TRIM_THRESHOLD


def implementation(case: Case, mode: str, device: str) -> Callable:
    """The function a mode times: the reference, the public op, or a compiled one."""
    if mode == "eager":
        return case.reference
    if mode == "triton":
        return case.fn
    # CUDA: compile the reference, the compiler's best against the Triton kernel;
    # CPU: compile the public op, whose CPU path is the reference.
    return torch.compile(case.reference if device == "cuda" else case.fn, fullgraph=True)


def run_worker(op: str, mode: str, device: str, dtype: torch.dtype, warmup: int, steps: int,
               malloc: str = "glibc") -> dict:
    """Measure one (op, mode) in this process (see the module docstring)."""
    from fastune.bench.measure import PeakMemory, synchronize

    if malloc == "retain":
        _retain_freed_memory()
    dev = torch.device(device)
    case = build_case(op, dtype, device)
    step = Step(case, implementation(case, mode, device))
    t0 = time.perf_counter()
    step()
    synchronize(dev)
    first_s = time.perf_counter() - t0  # includes compilation in the compiled mode
    for _ in range(warmup):
        step()
    load_avg = os.getloadavg()[0]
    fwd, bwd, full, cpu = [], [], [], []
    for _ in range(steps):
        synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        outs = step.forward()
        synchronize(dev)
        t1 = time.perf_counter()
        step.backward(outs)
        synchronize(dev)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        full.append(t2 - t0)
        cpu.append(time.process_time() - c0)
        del outs
    for t in step.leaves:
        t.grad = None
    with PeakMemory(dev) as peak:
        outs = step()
    del outs
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return dict(op=op, mode=mode, shape=case.shape, dtype=str(dtype).replace("torch.", ""), device=device,
                forward_ms=ms(fwd), backward_ms=ms(bwd), median_ms=ms(full), min_ms=1e3 * min(full),
                cpu_median_ms=ms(cpu), load_avg=load_avg, date=time.strftime("%Y-%m-%d %H:%M"),
                first_step_s=first_s, steps=steps, warmup=warmup, peak_mib=peak.mib,
                errors=_errors(case, step))


# ---------------------------------------------------------------- driving (parent process)

def bench_kernels(ops: Optional[Sequence[str]], dtype: str = "bfloat16", warmup: int = 3, steps: int = 10,
                  malloc: str = "glibc", previous: Optional[dict] = None,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """Run every (op, mode) in its own process; returns the report. Results of other
    ops in ``previous`` (an earlier report of the same device, dtype and malloc) are
    kept, so that a run of a few ops updates a full table."""
    from fastune.bench.measure import python_module_cmd, run_child
    from fastune.bench.report import environment

    ops = list(ops or CASES)
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        raise KernelBenchError(f"--ops: unknown op {unknown[0]!r}; known: {', '.join(CASES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = dict(device=device, dtype=dtype, warmup=warmup, steps=steps, malloc=malloc)
    same = previous and all(previous.get("meta", {}).get(k) == v for k, v in meta.items() if k in ("device", "dtype", "malloc"))
    results = dict(previous["results"]) if same else {}
    for op in ops:
        results[op] = {}
        for mode in modes(device):
            r = run_child(python_module_cmd("fastune.bench.kernels", "--worker", op, mode, "--device", device,
                                            "--dtype", dtype, "--warmup", str(warmup), "--steps", str(steps),
                                            "--malloc", malloc))
            results[op][mode] = r
            progress(f"{op:30} {mode:9} fwd {r['forward_ms']:9.2f} ms  bwd {r['backward_ms']:9.2f} ms  "
                     f"full {r['median_ms']:9.2f} ms  peak {r['peak_mib']:7.0f} MiB  "
                     f"max rel err {max(r['errors'].values()):.1e}  load {r['load_avg']:.1f}")
    return {"meta": {**meta, **environment()}, "results": results}


def _speedups(device: str) -> list[tuple[str, str]]:
    """(fast, baseline) pairs whose time ratio the table shows."""
    return [("triton", "eager"), ("triton", "compiled")] if device == "cuda" else [("compiled", "eager")]


def _range(values) -> str:
    values = sorted(set(values))
    return f"{values[0]}" if len(values) == 1 else f"{values[0]} to {values[-1]}"


def render(report: dict) -> str:
    from fastune.bench.report import table

    meta = report["meta"]
    device, names = meta["device"], modes(meta["device"])
    what = ("`triton` is the public op (its Triton kernel), `eager` the reference implementation, "
            "`compiled` `torch.compile(fullgraph=True)` of the reference" if device == "cuda" else
            "`compiled` is `torch.compile(fullgraph=True)` of the public op (on CPU its reference path, "
            "fused by inductor); `eager` is the reference implementation run eagerly")
    lines = [
        f"# Kernel benchmark ({device.upper()})",
        "",
        f"{meta['dtype']}; medians of {_range(r['steps'] for m in report['results'].values() for r in m.values())} "
        f"steps after {_range(r['warmup'] for m in report['results'].values() for r in m.values())} warm-up "
        "steps (per row in the JSON); each "
        f"(op, mode) in its own process. {what}. fwd / bwd / full = forward, backward (with fixed "
        "upstream gradients), and both, in ms. Peak = "
        + ("CUDA max allocated" if device == "cuda" else "peak RSS") +
        " added by one step (activations, outputs, gradients, temporaries), MiB. Error = worst over "
        "outputs and input gradients of max|err| / max|truth| against float64: each implementation's "
        "next to eager's.",
        "",
    ]
    if device == "cpu":
        lines += ["On a shared machine `load` (the 1-minute load average when the timed steps began, per mode) "
                  "shows how much wall times may stretch; the CPU-time speedup (user + system time of the "
                  "process, all threads) is then the steadier figure.", ""]
    header = ["op", "shape"] + [f"{m} fwd / bwd / full" for m in names]
    header += [f"speedup {a} vs {b}" for a, b in _speedups(device)]
    if device == "cpu":
        header += ["speedup, CPU time", "load"]
    header += [f"{m} peak" for m in names] + [f"{m} error" for m in names]
    rows = []
    for op, r in report["results"].items():
        row = [op, r[names[0]]["shape"]]
        row += [f"{r[m]['forward_ms']:.2f} / {r[m]['backward_ms']:.2f} / {r[m]['median_ms']:.2f}" for m in names]
        row += [f"{r[b]['median_ms'] / r[a]['median_ms']:.2f}x" for a, b in _speedups(device)]
        if device == "cpu":
            row += [f"{r['eager']['cpu_median_ms'] / r['compiled']['cpu_median_ms']:.2f}x",
                    " / ".join(f"{r[m]['load_avg']:.1f}" for m in names)]
        row += [f"{r[m]['peak_mib']:.0f}" for m in names]
        row += [f"{max(r[m]['errors'].values()):.1e}" for m in names]
        rows.append(row)
    lines.append(table(header, rows, align="ll" + "r" * (len(header) - 2)))
    lines += ["", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, malloc "
              f"{meta['malloc']}, {meta['date']} (rows may come from earlier runs: each has its date in the "
              f"JSON). Last command: `{meta['command']}`"]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> Optional[Path]:
    """Speedup over eager (full step) and peak memory, per op and mode."""
    from fastune.bench.report import bar_chart

    names = modes(report["meta"]["device"])
    results = report["results"]
    ops = list(results)
    speed = {m: [results[op]["eager"]["median_ms"] / results[op][m]["median_ms"] for op in ops]
             for m in names if m != "eager"}
    peak = {m: [results[op][m]["peak_mib"] for op in ops] for m in names}
    return bar_chart(path, f"fastune bench kernels ({report['meta']['device']}, {report['meta']['dtype']})", ops,
                     {"speedup over eager, forward + backward": speed, "peak MiB added by a step": peak})


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="One (op, mode) of fastune bench kernels, in this process.")
    parser.add_argument("--worker", nargs=2, metavar=("OP", "MODE"), required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--malloc", default="glibc", choices=["glibc", "retain"])
    args = parser.parse_args(argv)
    op, mode = args.worker
    print(json.dumps(run_worker(op, mode, args.device, getattr(torch, args.dtype), args.warmup, args.steps,
                                args.malloc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
