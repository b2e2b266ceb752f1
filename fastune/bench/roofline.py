"""``fastune bench kernels --roofline PROFILE``: the bytes each kernel moves at a realistic
shape (Llama-3.1-8B, 8192 tokens, bf16), the least bytes its op needs, and the time both
take at the profile's memory bandwidth. No kernel runs: the ops are traced on fake
tensors with their Triton paths forced (their fake implementations), and every op is
counted at its boundary by ``fastune.bench.counting.OpCounter`` (each input read once,
each output written once).

What a kernel moves inside beyond its boundary is added from the kernel's own
accounting, ``_internal_bytes`` (checked against op counts of the kernel's loop on meta
tensors by tests/test_roofline.py). The floor is the op's inputs read once and its
outputs written once; where a kernel moves more, the ``why`` column says why.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch

from fastune.bench.counting import OpCounter

TOKENS, HIDDEN, INTERMEDIATE, VOCAB = 8192, 4096, 14336, 128256
Q_HEADS, KV_HEADS, HEAD_DIM, RANK = 32, 8, 128, 16
BF16 = torch.bfloat16


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    forward: int  # bytes
    backward: int
    floor: int  # least bytes forward + backward
    flops: float  # forward + backward
    why: str = ""

    def seconds(self, bandwidth: float, peak_flops: float) -> tuple[float, float, float]:
        """(at the bandwidth, floor at the bandwidth, FLOPs at peak)."""
        return ((self.forward + self.backward) / bandwidth, self.floor / bandwidth,
                self.flops / peak_flops)


def _boundary_bytes(run: Callable[[], tuple], inputs: list[torch.Tensor]) -> tuple[int, int]:
    """(forward, backward) bytes of every op dispatched, read + written. Backward
    returns the inputs' gradients (``autograd.grad``: no accumulation into ``.grad``,
    which is the optimizer's business, not the kernel's)."""
    with OpCounter() as fwd:
        out = run()
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    upstream = [torch.empty_like(o) for o in outs]
    with OpCounter() as bwd:
        torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], upstream)

    def total(counter):
        return sum(r.bytes_read() + r.bytes_written() for r in counter.records)

    return total(fwd), total(bwd)


def _fake(*shape, grad=True, dtype=BF16):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def lce_internal_bytes(n_tokens: int, hidden: int, vocab: int, chunk: int, item: int,
                       weight_trains: bool) -> int:
    """What ``linear_cross_entropy``'s loop moves on CUDA beyond its boundary: per chunk,
    the logits GEMM reads h_c and W and writes the [C, V] logits; the cross-entropy kernel
    reads them twice and writes the gradient in place; dh_c = G_c W reads G_c and W and
    writes dh_c; with W trained, dW += G_c^T h_c reads G_c and h_c and reads and writes
    the fp32 accumulator (8 bytes per element)."""
    n_chunks = -(-n_tokens // chunk)
    logits = n_tokens * vocab * item
    total = logits * 4 + logits  # GEMM write, CE 2 reads + write, dh GEMM read
    total += n_chunks * 2 * vocab * hidden * item + 2 * n_tokens * hidden * item
    total += n_tokens * 4 + n_tokens * 8  # per-row losses, labels
    if weight_trains:
        total += logits + n_tokens * hidden * item + n_chunks * 8 * vocab * hidden
    return total


def _lora_inside(n: int, d_in: int, d_out: int) -> tuple[int, int]:
    """(forward, backward) bytes of the LoRA op's own GEMMs (it runs torch matmuls
    inside, which a dispatch mode outside the op cannot see), counted on meta tensors."""
    from fastune.kernels.lora import lora_backward_2d, lora_forward_2d

    def meta(*shape):
        return torch.empty(*shape, dtype=BF16, device="meta")

    x, w, a, b = meta(n, d_in), meta(d_out, d_in), meta(RANK, d_in), meta(d_out, RANK)
    with OpCounter() as fwd:
        _, xa = lora_forward_2d(x, w, a, b, 2.0)
    with OpCounter() as bwd:
        lora_backward_2d(meta(n, d_out), x, xa, w, a, b, 2.0, True, True)
    return tuple(sum(r.bytes_read() + r.bytes_written() for r in c.records)
                 for c in (fwd, bwd))


def _rows() -> list[Row]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastune.kernels import (add_rms_norm, apply_rope, cross_entropy, geglu,
                                 linear_cross_entropy, rms_norm, swiglu)
    from fastune.kernels.dispatch import force_triton
    from fastune.kernels.linear_cross_entropy import default_chunk_size

    T, H, I, V = TOKENS, HIDDEN, INTERMEDIATE, VOCAB
    th = T * H * 2
    rows = []
    with FakeTensorMode(), force_triton():
        def add(op, shape, run, inputs, floor, flops=0.0, why="", internal=0):
            fwd, bwd = _boundary_bytes(run, inputs)
            rows.append(Row(op, shape, fwd + internal, bwd, floor, flops, why))

        x, w = _fake(T, H), _fake(H)
        add("rms_norm", f"{T} x {H}", lambda: rms_norm(x, w), [x, w],
            # fwd: x, w in, y, rstd out; bwd: dy, x, w, rstd in, dx, dw out
            2 * th + 2 * H + 4 * T + 3 * th + 2 * H + 4 * T + 2 * H)
        r = _fake(T, H)
        add("add_rms_norm", f"{T} x {H}", lambda: add_rms_norm(x, r, w), [x, r, w],
            # fwd: x, r, w in, the sum, y, rstd out; bwd: ds, dy, sum, w, rstd in, dx out
            4 * th + 2 * H + 4 * T + 4 * th + 2 * H + 4 * T + 2 * H,
            why="backward returns dx and dresidual as two tensors (the same values)")
        q, k = _fake(1, T, Q_HEADS, HEAD_DIM), _fake(1, T, KV_HEADS, HEAD_DIM)
        cos, sin = _fake(1, T, HEAD_DIM, grad=False), _fake(1, T, HEAD_DIM, grad=False)
        qk = (Q_HEADS + KV_HEADS) * T * HEAD_DIM * 2
        cs = 2 * T * HEAD_DIM * 2
        add("apply_rope", f"q {T}x{Q_HEADS}x{HEAD_DIM}, k {KV_HEADS} heads",
            lambda: apply_rope(q, k, cos, sin), [q, k], 2 * (2 * qk + cs))
        g, u = _fake(T, I), _fake(T, I)
        ti = T * I * 2
        add("swiglu", f"{T} x {I}", lambda: swiglu(g, u), [g, u], 3 * ti + 5 * ti)
        add("geglu", f"{T} x {I}", lambda: geglu(g, u), [g, u], 3 * ti + 5 * ti)
        wq, a, b = _fake(H, H, grad=False), _fake(RANK, H), _fake(H, RANK)
        # fwd: x, W, A, B in, y, xa out; bwd: dy, x, xa, W, A, B in, dx, dA, dB out
        lora_floor = (th + H * H * 2 + th) + (3 * th + H * H * 2) + 4 * T * RANK * 2
        fwd, bwd = _lora_inside(T, H, H)
        rows.append(Row("lora_linear (q_proj, r16)", f"{T} x {H} -> {H}", fwd, bwd, lora_floor,
                        2 * T * H * H * 3 + 12 * T * H * RANK,
                        "torch GEMMs inside the op: x is read again for x A^T, y again for "
                        "the rank-r update; dy three times, dx twice in backward"))
        logits = _fake(T, V)
        labels = torch.zeros(T, dtype=torch.int64)
        tv = T * V * 2
        add("cross_entropy", f"{T} x {V}", lambda: cross_entropy(logits, labels)[0],
            [logits], 2 * tv, internal=tv,
            why=(f"a {V * 2 // 1024} KiB row does not fit on chip: pass 2 reads it again; "
                 "backward scales the buffer in place by the upstream gradient (1.0), "
                 "which a consumer could fold in"))
        chunk = default_chunk_size(T, V)
        for trains in (False, True):
            hw = _fake(V, H, grad=trains)
            floor = th + V * H * 2 + th + (V * H * 2 if trains else 0)
            add(f"linear_cross_entropy ({'W trained' if trains else 'W frozen'})",
                f"{T} x {H} @ {V} x {H}, {-(-T // chunk)} chunks",
                lambda: linear_cross_entropy(x, hw, labels)[0], [x, hw], floor,
                flops=(6 if trains else 4) * T * H * V,
                internal=lce_internal_bytes(T, H, V, chunk, 2, trains),
                why=("[chunk, V] logits go through HBM (a GEMM + CE kernel fused on chip "
                     "would not write them); W is read again per chunk, and with W "
                     "trained the fp32 dW accumulator is read and written per chunk "
                     "(8 B/element; fewer, larger chunks would move less)"))
    return rows


def roofline(profile_key: str) -> dict:
    from fastune.bench.profiles import ProfileError, load_profile

    profile = load_profile(profile_key)
    if not profile.memory_bandwidth or not profile.peak_bf16_flops:
        raise ProfileError(f"--roofline: profiles/{profile_key}.yaml has no memory_bandwidth "
                           "or peak_bf16_flops (a GPU profile is needed)")
    out = []
    for row in _rows():
        at_bw, floor_s, flop_s = row.seconds(profile.memory_bandwidth, profile.peak_bf16_flops)
        out.append({**dataclasses.asdict(row), "ms": at_bw * 1e3, "floor_ms": floor_s * 1e3,
                    "flop_ms": flop_s * 1e3,
                    # 1%: labels, per-row statistics and the like
                    "at_floor": row.forward + row.backward <= 1.01 * row.floor})
    return {"profile": profile.key, "device": profile.name,
            "bandwidth": profile.memory_bandwidth, "peak_bf16_flops": profile.peak_bf16_flops,
            "shape": f"Llama-3.1-8B, {TOKENS} tokens, bf16", "rows": out}


def render(report: dict) -> str:
    gb = 1e9
    lines = [f"# Kernel roofline: {report['device']} ({report['bandwidth'] / gb:.0f} GB/s, "
             f"{report['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16)", "",
             f"{report['shape']}. Bytes counted at op boundaries on fake tensors plus each "
             "kernel's own accounting of what it moves inside (fastune/bench/roofline.py).", "",
             "| op | shape | fwd GB | bwd GB | floor GB | ms at bandwidth | floor ms | "
             "FLOP ms | at floor | why not |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        bound = ""
        if r["flops"]:
            bound = f" ({'compute' if r['flop_ms'] >= r['ms'] else 'bandwidth'}-bound here)"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['forward'] / gb:.3f} | {r['backward'] / gb:.3f} "
            f"| {r['floor'] / gb:.3f} | {r['ms']:.2f} | {r['floor_ms']:.2f} | "
            f"{r['flop_ms']:.2f} | {'yes' if r['at_floor'] else 'no'} | "
            f"{'' if r['at_floor'] else r['why'] + bound} |")
    return "\n".join(lines) + "\n"


def main(profile_key: str) -> tuple[str, str]:
    """(markdown table, JSON) of ``roofline(profile_key)``."""
    report = roofline(profile_key)
    return render(report), json.dumps(report, indent=1)
