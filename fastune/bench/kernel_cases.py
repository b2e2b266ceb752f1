"""The cases of ``fastune bench kernels`` (``fastune.bench.kernels`` measures them).

How to add an op: write ``_case_<op>(dtype) -> Case`` with realistic shapes (4096
tokens, hidden 2048; vocab 128256 for cross-entropy; rank 16 for LoRA) and add it to
``CASES``. ``fn`` is the public function, ``reference`` the eager reference
implementation, ``truth`` the same math in float64 (it gets the inputs upcast to
float64). Inputs that get gradients are floating-point tensors not in ``frozen``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

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


GEMMA_HIDDEN, GEMMA_INTERMEDIATE, GEMMA_VOCAB, GEMMA_SOFTCAP = 2304, 9216, 256000, 30.0  # Gemma 2 2B


def _gelu_tanh64(g):
    return 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)))


def _case_add_rms_norm_gemma(dtype) -> Case:
    """Gemma 2 2B's residual add + norm: scale (1 + w), the product in fp32."""
    from fastune.kernels.rms_norm import add_rms_norm, add_rms_norm_reference

    x = _randn(2, TOKENS // 2, GEMMA_HIDDEN, dtype=dtype)
    r = _randn(2, TOKENS // 2, GEMMA_HIDDEN, dtype=dtype, seed=2)
    w = _randn(GEMMA_HIDDEN, dtype=dtype, scale=0.1, seed=1)  # Gemma stores the scale minus 1
    return Case(f"{TOKENS} x {GEMMA_HIDDEN}", [x, r, w, 1e-6],
                lambda x, r, w, eps: add_rms_norm(x, r, w, eps, 1.0, True),
                lambda x, r, w, eps: add_rms_norm_reference(x, r, w, eps, 1.0, True),
                lambda x, r, w, eps: (x + r, _rms64(x + r, 1 + w, eps)))


def _case_geglu(dtype) -> Case:
    """Gemma 2 2B's MLP gate: gelu_tanh(gate) * up over 4096 tokens x 9216."""
    from fastune.kernels.geglu import geglu, geglu_reference

    gate = _randn(2, TOKENS // 2, GEMMA_INTERMEDIATE, dtype=dtype)
    up = _randn(2, TOKENS // 2, GEMMA_INTERMEDIATE, dtype=dtype, seed=1)
    return Case(f"{TOKENS} x {GEMMA_INTERMEDIATE}", [gate, up], geglu, geglu_reference,
                lambda g, u: _gelu_tanh64(g) * u)


VOCAB = 128256


def _case_linear_cross_entropy(dtype, weight_trains: bool = True, gemma: bool = False) -> Case:
    """The loss of a Llama 3 head: 4096 tokens, a quarter of them ignored (prompt tokens).
    Eager baseline: F.linear then F.cross_entropy on fp32 logits. Errors: on 256 tokens.
    ``gemma``: Gemma 2 2B's head (vocab 256000) with final-logit softcapping at 30, on
    logits of std ~10 so that the cap bites; eager caps the fp32 logits first."""
    from torch.nn.functional import cross_entropy, linear

    from fastune.kernels.linear_cross_entropy import linear_cross_entropy

    hidden_size, vocab = (GEMMA_HIDDEN, GEMMA_VOCAB) if gemma else (HIDDEN, VOCAB)
    softcap = GEMMA_SOFTCAP if gemma else None

    def make(tokens, seed):
        hidden = _randn(1, tokens, hidden_size, dtype=dtype, seed=seed)
        labels = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
        labels[:, : tokens // 4] = -100
        return hidden, labels

    weight = _randn(vocab, hidden_size, dtype=dtype, scale=0.2 if gemma else 0.02, seed=1)
    hidden, labels = make(TOKENS, 0)
    small_hidden, small_labels = make(256, 2)

    def loss(logits, y):
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")

    return Case(
        f"{TOKENS} x {hidden_size} -> {vocab}" + (f", softcap {softcap:g}" if gemma else ""),
        [hidden, weight, labels], lambda h, w, y: linear_cross_entropy(h, w, y, softcap=softcap)[0],
        lambda h, w, y: loss(linear(h, w).float(), y), lambda h, w, y: loss(linear(h, w), y),
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
    "geglu": _case_geglu,
    "add_rms_norm_gemma": _case_add_rms_norm_gemma,
    "linear_cross_entropy": _case_linear_cross_entropy,
    "linear_cross_entropy_frozen_w": lambda dtype: _case_linear_cross_entropy(dtype, False),
    "linear_cross_entropy_softcap": lambda dtype: _case_linear_cross_entropy(dtype, gemma=True),
    "lora_linear": _case_lora_linear,
    "lora_linear_nf4": lambda dtype: _case_lora_linear(dtype, quantized=True),
    "lora_linear_ops": _case_lora_linear_ops,
    "lora_mlp": _case_lora_mlp,
}
