"""LoRA, DoRA and QLoRA linear layers.

``LoRALinear`` takes the place of an ``nn.Linear`` (same attribute name in the
parent, same ``weight``/``bias`` keys) and adds a trainable low-rank update.
Its parameter names are PEFT's (``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector``), so an adapter exports to PEFT by a key prefix only.

LoRA (Hu et al. 2021), with frozen W [out, in], A [r, in], B [out, r],
s = alpha / r:

    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ

DoRA (Liu et al. 2024), as PEFT computes it, with a trainable magnitude m [out]
and g = m / ‖W + s·B·A‖_row, where the row norm is detached from the graph
(paper §4.3: it is treated as a constant, so no gradient flows through it):

    y = x Wᵀ + b + (g - 1) ⊙ (x' Wᵀ) + g ⊙ s · (x' Aᵀ) Bᵀ,   x' = dropout(x)

Without dropout x' = x and this is g ⊙ (x (W + s·B·A)ᵀ) + b. With dropout the
frozen path sees x and the adapter path x', exactly as in PEFT, so that loss
curves match PEFT's under the same random state.

rsLoRA (Kalajdzievski 2023, PEFT's ``use_rslora``): s = alpha / sqrt(r), so that the
update's scale does not shrink as the rank grows.

PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) initializations, computed as
PEFT computes them (``init_lora_weights: pissa | olora``), start the adapter on the
principal part of W and move that part out of the frozen weight:

    PiSSA: W = U S Vᵀ,  B₀ = U_r √(S_r / s),  A₀ = √(S_r / s) V_rᵀ
    OLoRA: W = Q R,     B₀ = Q_r,             A₀ = R_r
    both:  W_res = W - s · B₀ A₀  becomes the frozen weight (y is unchanged at init)

The initial A₀, B₀ are kept (non-persistent buffers) so that the trained adapter can
be written against the original W, as PEFT's ``path_initial_model_for_weight_conversion``
does: ΔW = s(BA - B₀A₀) = s [B | -B₀][A ; A₀], a plain rank-2r LoRA.

LoftQ (Li et al. 2023), for QLoRA, with one alternation (PEFT's ``loftq_iter: 1``):
the adapter starts on the best rank-r correction of NF4's error on W, and the
frozen weight stays NF4(W), the plain QLoRA base:

    E = W - deq(NF4(W)) = U S Vᵀ,   B₀ = U_r √S_r,   A₀ = √S_r V_rᵀ

As in PEFT, s is not divided out, so y at init is deq(NF4(W)) + s·E_r: the NF4
error exactly corrected to rank r when s = 1 (alpha = r). NF4 is taken in W's dtype,
the dtype QLoRA quantizes, so E is the error of the base the run trains on.

QLoRA: the frozen W may be a torchao ``NF4Tensor``. ``F.linear`` dispatches to
torchao's NF4 linear (dequantize, matmul; the backward gives only dx), and
``W.to(dtype)`` dequantizes where DoRA and merging need the dense weight.

``disable_adapters(model)`` (and ``LoRALinear.disable_adapter()``) switches the
adapters off for a block: the layers compute their frozen base alone.

With ``fused`` (set by ``apply_kernels``'s ``lora`` op; no dropout, no DoRA) the LoRA forward is the fused op
``fastune.kernels.lora.lora_linear`` (custom ops that never form dW and keep the
intermediates at rank r on CUDA; the same formula in plain torch elsewhere).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastune.errors import FastuneError

# NF4 packs weights in blocks of 64 values, and the blocks' scales in groups of
# 256 blocks, so a quantized weight needs a multiple of 64 * 256 elements.
NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256


# How A and B start: PEFT's default (B = 0), from W (PiSSA, OLoRA), or from NF4's error on W (LoftQ).
LORA_INITS = ("default", "pissa", "olora", "loftq")
# The inits that move part of W into the adapter (the frozen weight becomes W - s·B₀A₀).
RESIDUAL_INITS = ("pissa", "olora")


class LoRAError(FastuneError, ValueError):
    """A LoRA setting or adapter file that fastune cannot use (one-line message)."""


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA (as PEFT)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank (optionally DoRA) update.

    Wraps ``base``: its weight and bias become the frozen ``weight``/``bias``
    (shared, not copied). On the meta device nothing is initialized; call
    ``reset_lora_parameters()`` and ``init_dora_magnitude()`` once real.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        fused: bool = False,
        use_rslora: bool = False,
        init: str = "default",
    ):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if init not in LORA_INITS:
            raise LoRAError(f"LoRA init must be one of {', '.join(LORA_INITS)}, got {init!r}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = lora_scale(alpha, rank, use_rslora)
        self.init = init
        self.dropout = dropout
        self.use_dora = use_dora
        self.quantized = False  # set by quantize_base()
        self.weight = base.weight
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        # nn.Identity when p == 0 (as PEFT), so no mask is drawn and no RNG consumed.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, **factory))
        self.fused = fused
        self.adapter_enabled = True  # False inside disable_adapters(): the frozen layer alone
        if not self.weight.is_meta:
            self.reset_lora_parameters()
            if use_dora:
                self.init_dora_magnitude()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter
        is a no-op; or PiSSA/OLoRA/LoftQ (see the module docstring)."""
        if self.init == "default":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        else:
            self._init_from_weight()

    @torch.no_grad()
    def _init_from_weight(self) -> None:
        """PiSSA / OLoRA: A₀, B₀ from W in fp32, then W_res = W - s·B₀A₀ in W's dtype.
        LoftQ: A₀, B₀ from NF4's error on W; W is unchanged (QLoRA quantizes it next)."""
        if self.quantized:
            raise LoRAError(f"LoRA init {self.init!r} needs the dense weight: initialize before quantizing")
        from torch.distributed.tensor import DTensor

        if self.weight.is_meta or isinstance(self.weight.data, DTensor):
            raise LoRAError(f"LoRA init {self.init!r} needs the loaded, unsharded weight (not with FSDP)")
        weight = self.weight.float()
        r = self.rank
        if self.init == "loftq":
            a, b = _svd_factors(weight - dequantize(to_nf4_checked(self.weight, "weight")).float(), r)
        elif self.init == "pissa":
            a, b = _svd_factors(weight, r, self.scale)
        else:  # olora
            q, rr = torch.linalg.qr(weight)
            a, b = rr[:r], q[:, :r]
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        if self.init not in RESIDUAL_INITS:
            return
        self.weight.copy_(weight - self.scale * (b @ a))
        # The initial adapter, in the adapter's dtype, for the export against the original W.
        self.register_buffer("initial_A", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("initial_B", self.lora_B.weight.detach().clone(), persistent=False)

    @torch.no_grad()
    def init_dora_magnitude(self) -> None:
        """m = ‖W + s·B·A‖_row, so that a fresh DoRA adapter is a no-op. Needs the loaded W."""
        weight = self._dense_weight(self.weight.dtype)
        self.lora_magnitude_vector.copy_(torch.linalg.norm(self._adapted_weight(weight), dim=1))

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # For an NF4Tensor, .to(dtype) dequantizes; for a dense weight it casts or is a no-op.
        return self.weight.to(dtype)

    def _adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s·B·A in the dtype of the dense ``weight``."""
        delta = self.lora_B.weight.to(weight.dtype) @ self.lora_A.weight.to(weight.dtype)
        return weight + self.scale * delta

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the layer is its frozen base (NF4 included), as if LoRA had
        never been applied; the adapter is back on afterwards, even on error."""
        previous, self.adapter_enabled = self.adapter_enabled, False
        try:
            yield
        finally:
            self.adapter_enabled = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_enabled:
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            return self._dora_forward(x)
        if self.fused and self.dropout == 0:  # the fused op has no dropout
            from fastune.kernels.lora import lora_linear

            return lora_linear(x, self.weight, *self._adapter(x.dtype), self.scale, self.bias)
        lora_a, lora_b = self._adapter(x.dtype)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.lora_dropout(x), lora_a), lora_b) * self.scale

    def _adapter(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in the input's dtype: under fp16 mixed precision they are fp32 parameters
        over an fp16 base (autograd casts their gradients back); otherwise a no-op."""
        return self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._dense_weight(x.dtype)
        with torch.no_grad():  # the norm is a constant for autograd (DoRA §4.3, as PEFT)
            norm = torch.linalg.norm(self._adapted_weight(weight), dim=1)
        gain = self.lora_magnitude_vector.to(x.dtype) / norm
        base = F.linear(x, weight)
        dropping = self.training and self.dropout > 0
        x_lora = self.lora_dropout(x) if dropping else x
        # The frozen part of the DoRA correction sees the adapter's (dropped-out)
        # input; without dropout it is the base output itself.
        base_lora = F.linear(x_lora, weight) if dropping else base
        lora_a, lora_b = self._adapter(x.dtype)
        lora = F.linear(F.linear(x_lora, lora_a), lora_b) * self.scale
        y = base + (gain - 1) * base_lora + gain * lora
        return y if self.bias is None else y + self.bias

    def quantize_base(self, name: str = "weight") -> None:
        """Store the frozen W as NF4 (QLoRA). Needs the real (loaded) weight."""
        self.weight = nn.Parameter(to_nf4_checked(self.weight, name), requires_grad=False)
        self.quantized = True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha}, dropout={self.dropout}, use_dora={self.use_dora}, "
            f"use_rslora={self.use_rslora}, init={self.init}, quantized={self.quantized}"
        )


def _svd_factors(matrix: torch.Tensor, rank: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A₀ = √(S_r/s) V_rᵀ and B₀ = U_r √(S_r/s) from matrix = U S Vᵀ, so s·B₀A₀ is its best rank-r part."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Turn off every LoRA/DoRA adapter of ``model`` for the block: the model then
    computes its frozen base (a preference objective's reference pass runs the
    policy model this way, with no second copy in memory)."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, LoRALinear):
                stack.enter_context(m.disable_adapter())
        yield


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4 (QLoRA's non-adapted projections).

    Keeps ``weight``/``bias`` keys of ``nn.Linear``; the bias (Qwen2) stays dense."""

    def __init__(self, linear: nn.Linear, name: str = "weight"):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(to_nf4_checked(linear.weight, name), requires_grad=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4=True"


def check_nf4_weight(weight: torch.Tensor, name: str) -> None:
    """A clear error for a weight that torchao's ``to_nf4`` cannot quantize."""
    if weight.is_meta:
        raise LoRAError(f"QLoRA: {name} is on the meta device; quantize after the base weights are loaded")
    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE
    if weight.numel() % group:
        raise LoRAError(
            f"QLoRA: {name} {tuple(weight.shape)} has {weight.numel()} elements; NF4 needs a "
            f"multiple of {group} (blocks of {NF4_BLOCK_SIZE}, scales in groups of {NF4_SCALER_BLOCK_SIZE})"
        )


def to_nf4_checked(weight: torch.Tensor, name: str) -> torch.Tensor:
    """torchao's ``to_nf4`` after ``check_nf4_weight``."""
    check_nf4_weight(weight, name)
    from torchao.quantization import to_nf4  # imported here: torchao is slow to import

    return to_nf4(weight.detach(), NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE)


@torch.no_grad()
def merge_weight(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    magnitude: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weight of the plain linear layer equal to a LoRA/DoRA layer, computed in
    fp32 and returned in the base dtype (NF4 is dequantized):

        W' = W + s·B·A,   or for DoRA   W' = m / ‖W + s·B·A‖_row ⊙ (W + s·B·A).
    """
    dense = dequantize(weight)
    merged = dense.float() + scale * (lora_b.float() @ lora_a.float())
    if magnitude is not None:
        merged = (magnitude.float() / torch.linalg.norm(merged, dim=1))[:, None] * merged
    return merged.to(dense.dtype)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A dense copy of an NF4 weight in its original dtype; other tensors unchanged."""
    if getattr(weight, "get_original_weight", None) is not None:
        return weight.get_original_weight()
    return weight

