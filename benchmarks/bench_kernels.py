"""Kernel benchmark on CPU: each op's forward + backward, ``torch.compile`` of the public
function (the reference path, fused by inductor) against the eager reference.

Every (op, mode) runs in a fresh subprocess, which
1. builds the inputs (bf16 by default) and, for ``compiled``, compiles the function;
2. runs ``--warmup`` steps, then times ``--steps`` steps and reports the median;
3. measures peak memory of one more step: it switches glibc malloc to mmap every
   block >= 64 KiB (so freed tensors leave RSS at once), trims the heap, resets the
   peak-RSS mark (``/proc/self/clear_refs``) and reports VmHWM - VmRSS. Inputs
   exist before the mark, so the figure is what one step adds: activations saved
   for backward, outputs, gradients and temporaries;
4. compares its outputs and input gradients with a float64 computation of the
   same math, as max |error| / max |truth| per tensor.
Speedups are ratios of medians measured in the same run of this script.

    python benchmarks/bench_kernels.py                   # all ops
    python benchmarks/bench_kernels.py --ops swiglu      # some ops; merged into the results
    python benchmarks/bench_kernels.py --malloc retain   # glibc keeps freed memory

Results: benchmarks/results/kernels.json and kernels.md (``--malloc retain``:
kernels_retain.*). By default glibc malloc returns every freed block of more
than ~32 MiB to the OS, so each step page-faults its large tensors in again
(system time that is often larger than the arithmetic here); ``retain`` sets
M_MMAP_THRESHOLD and M_TRIM_THRESHOLD so that freed memory is reused instead,
as a training process can do for itself.

How to add an op: write a function ``_case_<op>() -> Case`` with realistic shapes
(4096 tokens, hidden 2048; vocab 128256 for cross-entropy; rank 16 for LoRA) and
add it to ``CASES``. ``fn`` is the public function (what gets compiled),
``reference`` the eager reference implementation, ``truth`` the same math in
float64 (it gets the inputs upcast to float64). Inputs that should get gradients
are floating-point tensors not listed in ``frozen``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

RESULTS = Path(__file__).parent / "results"
MODES = ("eager", "compiled")
TOKENS, HIDDEN = 4096, 2048


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


# ---------------------------------------------------------------- measuring (child process)

def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _retain_freed_memory() -> None:
    """glibc: serve large blocks from the heap and never trim it, so freed memory
    is reused without page faults."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB from the heap
    libc.mallopt(-1, 1 << 62)  # M_TRIM_THRESHOLD: never shrink the heap


def _release_freed_memory() -> None:
    """Make RSS track live memory: mmap every block >= 64 KiB (freed -> unmapped at
    once, no dynamic threshold) and return the heap's free space to the OS."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak then also counts memory the allocator keeps


class _Step:
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
        self.grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]

    def __call__(self):
        for t in self.leaves:
            t.grad = None
        outs = _as_tuple(self.fn(*self.args))
        torch.autograd.backward(outs, self.grads)
        return outs


def _errors(case: Case, step: _Step) -> dict[str, float]:
    """max |value - truth| / max |truth| for each output and each input gradient."""
    if case.error_inputs is not None:
        step = _Step(dataclasses.replace(case, inputs=case.error_inputs), step.fn)
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


def run_worker(op: str, mode: str, dtype: torch.dtype, warmup: int, steps: int, malloc: str) -> dict:
    if malloc == "retain":
        _retain_freed_memory()
    case = CASES[op](dtype)
    fn = case.reference if mode == "eager" else torch.compile(case.fn, fullgraph=True)
    step = _Step(case, fn)
    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0  # includes compilation in "compiled" mode
    for _ in range(warmup):
        step()
    load_avg = os.getloadavg()[0]
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    for t in step.leaves:
        t.grad = None
    _release_freed_memory()
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM peak mark
    outs = step()
    peak_kib = _status_kib("VmHWM") - rss_before
    del outs
    return dict(op=op, mode=mode, shape=case.shape, dtype=str(dtype).replace("torch.", ""),
                median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
                cpu_median_ms=1e3 * statistics.median(cpu_times), load_avg=load_avg,
                date=time.strftime("%Y-%m-%d %H:%M"),
                first_step_s=first_s, steps=steps, warmup=warmup,
                peak_rss_delta_mib=peak_kib / 1024, errors=_errors(case, step))


# ---------------------------------------------------------------- driving (parent process)

def _run_child(op: str, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", op, mode, "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--malloc", args.malloc]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{op}/{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _markdown(data: dict) -> str:
    meta = data["meta"]
    lines = [
        "# Kernel benchmark (CPU)",
        "",
        f"Forward + backward per step, {meta['dtype']}, median of {meta['steps']} steps after "
        f"{meta['warmup']} warm-up steps; each (op, mode) in its own process. "
        "`compiled` is `torch.compile(fullgraph=True)` of the public op (on CPU its reference "
        "path, fused by inductor); `eager` is the reference implementation run eagerly. "
        "Peak = peak RSS added by one step (activations, outputs, gradients, temporaries). "
        "Error = worst over outputs and input gradients of max|err| / max|truth| against "
        "float64.",
        "",
        "The build machine is shared: `load` is the 1-minute load average when the timed steps "
        "began. Above the core count, wall times stretch; the CPU-time speedup (process user + "
        "system time, all threads) is then the steadier figure.",
        "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, "
        f"malloc: {meta['malloc']}. Ops can come from several runs (each row's date is in the "
        f"JSON); the last run: `{meta['command']}`",
        "",
        "| op | shape | eager ms | compiled ms | speedup | speedup, CPU time | load "
        "| eager peak MiB | compiled peak MiB | eager error | compiled error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op, modes in data["results"].items():
        e, c = modes["eager"], modes["compiled"]
        # Entries written before CPU time and load were recorded show "-" there.
        cpu = (f"{e['cpu_median_ms'] / c['cpu_median_ms']:.2f}x" if "cpu_median_ms" in e and "cpu_median_ms" in c
               else "-")
        load = f"{e['load_avg']:.1f} / {c['load_avg']:.1f}" if "load_avg" in e and "load_avg" in c else "-"
        lines.append(
            f"| {op} | {e['shape']} | {e['median_ms']:.2f} | {c['median_ms']:.2f} | "
            f"{e['median_ms'] / c['median_ms']:.2f}x | {cpu} | "
            f"{load} | {e['peak_rss_delta_mib']:.0f} | "
            f"{c['peak_rss_delta_mib']:.0f} | {max(e['errors'].values()):.1e} | "
            f"{max(c['errors'].values()):.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark fastune kernels on CPU.")
    parser.add_argument("--ops", default=",".join(CASES), help="comma-separated (default: all)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--malloc", default="glibc", choices=["glibc", "retain"],
                        help="glibc defaults, or keep freed memory for reuse (see the module docstring)")
    parser.add_argument("--worker", nargs=2, metavar=("OP", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        op, mode = args.worker
        print(json.dumps(run_worker(op, mode, getattr(torch, args.dtype), args.warmup, args.steps,
                                    args.malloc)))
        return 0
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; known: {', '.join(CASES)}")
    results = {}
    for op in ops:
        results[op] = {}
        for mode in MODES:
            r = _run_child(op, mode, args)
            results[op][mode] = r
            print(f"{op:14} {mode:9} {r['median_ms']:9.2f} ms  cpu {r['cpu_median_ms']:9.2f} ms  "
                  f"peak {r['peak_rss_delta_mib']:7.0f} MiB  max rel err {max(r['errors'].values()):.1e}  "
                  f"load {r['load_avg']:.1f}", flush=True)
    # Merge into the results file as it is now (other runs may have written other ops).
    stem = "kernels" if args.malloc == "glibc" else f"kernels_{args.malloc}"
    out_json = RESULTS / f"{stem}.json"
    data = json.loads(out_json.read_text()) if out_json.exists() else {"results": {}}
    if data.get("meta", {}).get("dtype", args.dtype) != args.dtype:
        data["results"] = {}  # never mix dtypes in one table
    data["results"].update(results)
    data["meta"] = dict(
        dtype=args.dtype, warmup=args.warmup, steps=args.steps, malloc=args.malloc, torch=torch.__version__,
        threads=torch.get_num_threads(), machine=f"{platform.machine()} {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d"),
        command="python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    RESULTS.mkdir(exist_ok=True)
    out_json.write_text(json.dumps(data, indent=1) + "\n")
    out_json.with_suffix(".md").write_text(_markdown(data))
    print(f"wrote {out_json} and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
