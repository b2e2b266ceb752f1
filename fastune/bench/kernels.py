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

How to add an op: write ``_case_<op>(dtype) -> Case`` with realistic shapes (4096
tokens, hidden 2048; vocab 128256 for cross-entropy; rank 16 for LoRA) and add it to
``CASES``. ``fn`` is the public function, ``reference`` the eager reference
implementation, ``truth`` the same math in float64 (it gets the inputs upcast to
float64). Inputs that get gradients are floating-point tensors not in ``frozen``.
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

from fastune.errors import FastuneError

TOKENS, HIDDEN = 4096, 2048


class KernelBenchError(FastuneError):
    """Unknown ops, or a configuration that cannot run (one line)."""


@dataclasses.dataclass
class Case:
    shape: str                    # for the table, e.g. "4096 x 2048"
    inputs: list                  # positional arguments of fn/reference/truth
    fn: Callable                  # public op: compiled in the "compiled" mode
    reference: Callable           # eager reference implementation: the "eager" mode
    truth: Callable               # float64 math on float64 inputs
    frozen: Sequence[int] = ()    # indices of float inputs that get no gradient
    # Smaller inputs for the float64 comparison, where float64 at full size would take
    # minutes (the [tokens, vocab] GEMMs of cross-entropy). None: the timed inputs.
    error_inputs: list | None = None


def _randn(*shape, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _rms64(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _case_rms_norm(dtype) -> Case:
    from fastune.kernels.rms_norm import rms_norm, rms_norm_reference

    x = _randn(2, TOKENS // 2, HIDDEN, dtype=dtype)
    w = _randn(HIDDEN, dtype=dtype, seed=1) * 0.1 + 1
    return Case(f"{TOKENS} x {HIDDEN}", [x, w, 1e-5], rms_norm, rms_norm_reference, _rms64)


def _case_add_rms_norm(dtype) -> Case:
    from fastune.kernels.rms_norm import add_rms_norm, add_rms_norm_reference

    x = _randn(2, TOKENS // 2, HIDDEN, dtype=dtype)
    r = _randn(2, TOKENS // 2, HIDDEN, dtype=dtype, seed=2)
    w = _randn(HIDDEN, dtype=dtype, seed=1) * 0.1 + 1
    return Case(f"{TOKENS} x {HIDDEN}", [x, r, w, 1e-5], add_rms_norm, add_rms_norm_reference,
                lambda x, r, w, eps: (x + r, _rms64(x + r, w, eps)))


def _rope64(q, k, cos, sin):
    def rot(t):
        t1, t2 = t.chunk(2, -1)
        c1, c2 = cos[:, :, None].chunk(2, -1)
        s1, s2 = sin[:, :, None].chunk(2, -1)
        return torch.cat((t1 * c1 - t2 * s1, t2 * c2 + t1 * s2), -1)
    return rot(q), rot(k)


def _case_apply_rope(dtype) -> Case:
    from fastune.kernels.rope import apply_rope, apply_rope_reference

    bsz, seqlen, head_dim = 2, TOKENS // 2, 128
    q = _randn(bsz, seqlen, 16, head_dim, dtype=dtype)
    k = _randn(bsz, seqlen, 8, head_dim, dtype=dtype, seed=1)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim))
    angles = torch.arange(seqlen).double()[:, None] * inv_freq
    emb = torch.cat((angles, angles), -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return Case(f"{TOKENS} tok, q 16x128, k 8x128", [q, k, cos, sin], apply_rope,
                apply_rope_reference, _rope64, frozen=(2, 3))


def _case_swiglu(dtype) -> Case:
    from fastune.kernels.swiglu import swiglu, swiglu_reference

    gate = _randn(2, TOKENS // 2, 8192, dtype=dtype)
    up = _randn(2, TOKENS // 2, 8192, dtype=dtype, seed=1)
    return Case(f"{TOKENS} x 8192", [gate, up], swiglu, swiglu_reference,
                lambda g, u: torch.nn.functional.silu(g) * u)


VOCAB = 128256


def _case_linear_cross_entropy(dtype, weight_trains: bool = True) -> Case:
    """The loss of a Llama 3 head: 4096 tokens, a quarter of them ignored (prompt tokens).
    Eager baseline: F.linear then F.cross_entropy on fp32 logits. Errors: on 256 tokens."""
    from torch.nn.functional import cross_entropy, linear

    from fastune.kernels.linear_cross_entropy import linear_cross_entropy

    def make(tokens, seed):
        hidden = _randn(1, tokens, HIDDEN, dtype=dtype, seed=seed)
        labels = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))
        labels[:, : tokens // 4] = -100
        return hidden, labels

    weight = _randn(VOCAB, HIDDEN, dtype=dtype, scale=0.02, seed=1)
    hidden, labels = make(TOKENS, 0)
    small_hidden, small_labels = make(256, 2)

    def eager(h, w, y):
        return cross_entropy(linear(h, w).float().flatten(0, 1), y.flatten(), reduction="sum")

    return Case(
        f"{TOKENS} x {HIDDEN} -> {VOCAB}", [hidden, weight, labels],
        lambda h, w, y: linear_cross_entropy(h, w, y)[0], eager,
        lambda h, w, y: cross_entropy(linear(h, w).flatten(0, 1), y.flatten(), reduction="sum"),
        frozen=() if weight_trains else (1,), error_inputs=[small_hidden, weight, small_labels])


RANK, LORA_SCALE, INTERMEDIATE = 16, 2.0, 8192  # Llama 3.2 1B MLP: 2048 -> 8192


def _lora64(x, w, a, b, s, bias=None):
    return torch.nn.functional.linear(x, w, bias) + s * (x @ a.T) @ b.T


def _lora_inputs(dtype, tokens, in_features, out_features, seed=0):
    """x [1, tokens, in], A [r, in], B [out, r]: B non-zero, as after some training."""
    return (_randn(1, tokens, in_features, dtype=dtype, seed=seed),
            _randn(RANK, in_features, dtype=dtype, scale=in_features**-0.5, seed=seed + 1),
            _randn(out_features, RANK, dtype=dtype, scale=RANK**-0.5, seed=seed + 2))


def _case_lora_linear(dtype, quantized: bool = False) -> Case:
    """A LoRA q_proj: 4096 tokens, 2048 -> 2048, rank 16, W frozen (NF4 for QLoRA).
    Eager baseline: F.linear(x, W) + s * F.linear(F.linear(x, A), B) with autograd
    (torchao's NF4 linear for an NF4 W). Errors: on 256 tokens."""
    from torchao.quantization import to_nf4

    from fastune.kernels.lora import lora_linear, lora_linear_reference

    weight = _randn(HIDDEN, HIDDEN, dtype=dtype, scale=HIDDEN**-0.5, seed=9)
    weight = to_nf4(weight.to(torch.bfloat16)) if quantized else weight
    x, a, b = _lora_inputs(dtype, TOKENS, HIDDEN, HIDDEN)
    small_x = _lora_inputs(dtype, 256, HIDDEN, HIDDEN, seed=3)[0]
    return Case(f"{TOKENS} x {HIDDEN} -> {HIDDEN}, r {RANK}" + (", NF4 W" if quantized else ""),
                [x, weight, a, b, LORA_SCALE], lora_linear, lora_linear_reference, _lora64,
                frozen=(1,), error_inputs=[small_x, weight, a, b, LORA_SCALE])


def _case_lora_linear_ops(dtype) -> Case:
    """The CUDA path's custom ops (fastune::lora_linear, in-place low-rank add, rank-r
    backward) run on CPU with a dense W, where they use torch.mm only, no Triton."""
    from fastune.kernels.lora import _lora_linear_op, weight_args

    case = _case_lora_linear(dtype)

    def ops(x, w, a, b, s):
        return _lora_linear_op(x, *weight_args(w), a, b, s, None)[0]

    return dataclasses.replace(case, shape=case.shape + ", custom ops", fn=ops)


def _case_lora_mlp(dtype) -> Case:
    """A Llama 3.2 1B MLP with LoRA on gate, up and down: 4096 tokens, 2048 -> 8192 ->
    2048, rank 16. Eager baseline: three LoRA linears and F.silu(g) * u with autograd.
    Errors: on 256 tokens."""
    from fastune.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    def weight(rows, cols, seed):
        return _randn(rows, cols, dtype=dtype, scale=cols**-0.5, seed=seed)

    def adapters(in_features, out_features, seed):
        return list(_lora_inputs(dtype, 1, in_features, out_features, seed)[1:])

    def inputs(x):
        return [x, weight(INTERMEDIATE, HIDDEN, 10), *adapters(HIDDEN, INTERMEDIATE, 11),
                weight(INTERMEDIATE, HIDDEN, 20), *adapters(HIDDEN, INTERMEDIATE, 21),
                weight(HIDDEN, INTERMEDIATE, 30), *adapters(INTERMEDIATE, HIDDEN, 31), LORA_SCALE]

    def truth(x, gw, ga, gb, uw, ua, ub, dw, da, db, s):
        h = torch.nn.functional.silu(_lora64(x, gw, ga, gb, s)) * _lora64(x, uw, ua, ub, s)
        return _lora64(h, dw, da, db, s)

    return Case(f"{TOKENS} x {HIDDEN} -> {INTERMEDIATE} -> {HIDDEN}, r {RANK}",
                inputs(_randn(1, TOKENS, HIDDEN, dtype=dtype)), lora_mlp, lora_mlp_reference,
                truth, frozen=(1, 4, 7), error_inputs=inputs(_randn(1, 256, HIDDEN, dtype=dtype, seed=5)))


CASES: dict[str, Callable[[torch.dtype], Case]] = {
    "rms_norm": _case_rms_norm,
    "add_rms_norm": _case_add_rms_norm,
    "apply_rope": _case_apply_rope,
    "swiglu": _case_swiglu,
    "linear_cross_entropy": _case_linear_cross_entropy,
    "linear_cross_entropy_frozen_w": lambda dtype: _case_linear_cross_entropy(dtype, False),
    "lora_linear": _case_lora_linear,
    "lora_linear_nf4": lambda dtype: _case_lora_linear(dtype, quantized=True),
    "lora_linear_ops": _case_lora_linear_ops,
    "lora_mlp": _case_lora_mlp,
}


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
