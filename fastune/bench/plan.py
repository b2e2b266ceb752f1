"""``fastune plan``: peak GPU memory of a training config, estimated with no GPU and no weights.

Method: build the config's model from its ``config.json`` under ``FakeTensorMode``
(tensors with shapes, dtypes and storages of the right size, but no data), then
run one real training step on it: forward and loss on a worst-case batch
(``batch_size`` rows of ``max_seq_len`` tokens), backward, gradient clipping and
the optimizer step, with the same builders the recipe uses (LoRA/DoRA/QLoRA,
activation checkpointing, the loss, the optimizer). ``MemoryTracker``
(``fastune.training.memory_tracker``) follows every storage the step creates and frees, and
reports the bytes live at the peak by category.

For a GPU profile the trace takes the CUDA code paths where they change memory:
fastune's ops dispatch to their Triton custom ops, whose fake implementations
allocate exactly the kernels' outputs and saved tensors; attention with windows,
softcaps or documents holds what FlexAttention holds (``planning_cuda_memory``);
AdamW is the fused implementation (no work buffers); activation offloading moves saved tensors off
the device; every storage is rounded up to the caching allocator's 512 bytes.
What it cannot know is listed in ``ASSUMPTIONS`` and printed with every plan.

On CPU the estimate can be checked: ``verify`` runs the same step on real tensors
(random weights) under the same tracker and compares the peaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fastune.bench.plan_offload import offloading_hooks
from fastune.bench.plan_options import (counted_state, dtype_for_profile, free_grads_in_backward,
                                         optimizer_for_trace, reference_copy)
from fastune.bench.profiles import Profile
from fastune.checkpoint.layout import CONFIG_NAME
from fastune.errors import FastuneError
from fastune.models.config import ModelConfig
from fastune.models.spec import describe_kernels
from fastune.training.memory_tracker import MemoryReport, MemoryTracker

GIB = 1024**3
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes
CUDA_CONTEXT_GIB = 0.6  # CUDA context, cuBLAS and kernel images: outside the allocator
FRAGMENTATION = 0.10  # reserved over allocated memory that a plan keeps free

ASSUMPTIONS = {
    "cuda": [
        "Estimated from one training step traced on fake CPU tensors, taking the CUDA code paths "
        "(Triton custom ops, fused AdamW, activation offloading, 512-byte allocator rounding).",
        "Worst-case batch: every row holds max_seq_len tokens. With gradient accumulation the "
        "peak of one micro-batch is the peak of the step (gradients are accumulated in place).",
        "Attention memory is that of PyTorch's CPU flash-attention kernel (saves the output and "
        "the log-sum-exp, no [S, S] scores), which matches CUDA's flash and memory-efficient "
        "kernels and FlexAttention (sliding windows, softcaps, packed documents); a CUDA "
        "fallback to the math kernel would hold [B, H, S, S] scores.",
        "Eager memory: torch.compile (compile=true) usually needs less, as inductor fuses "
        "element-wise temporaries.",
        "Memory an op allocates and frees inside its kernel (cuBLAS/flash workspaces) is not "
        "seen; nor are allocator caching and fragmentation, covered by a "
        f"{FRAGMENTATION:.0%} margin, and the CUDA context, {CUDA_CONTEXT_GIB} GiB assumed.",
        "Weights are loaded straight into the training dtype (no fp32 copy at load time); the "
        "peak of loading and quantizing is not part of the plan.",
    ],
    "cpu": [
        "Estimated from one training step traced on fake CPU tensors, on the same code paths "
        "as a CPU run (reference ops, foreach AdamW).",
        "Worst-case batch: every row holds max_seq_len tokens.",
        "Counts tensor storages only: not the Python process, libraries, the data loader, or "
        "memory the allocator keeps after a free (peak RSS is higher).",
    ],
}

FEATURES = {
    "activation_checkpointing": "recomputes each decoder layer's forward during backward: only the "
                                "layer inputs are kept (about one extra forward pass of compute)",
    "activation_offloading": "copies saved activations to pinned CPU memory on a side CUDA stream "
                             "(costs PCIe bandwidth; CUDA only)",
    "qlora": "stores the frozen decoder projections in NF4, about 0.5 byte per weight, "
             "dequantized for each matmul (slower; small quality cost)",
    "batch_size": "fewer rows per micro-batch, with gradient accumulation keeping the "
                  "optimizer step's batch (same loss and gradients; less throughput per step)",
    "max_seq_len": "shorter rows: longer samples are truncated (or packed into shorter rows)",
}


class PlanError(FastuneError):
    """A config or profile the planner cannot plan for (one line)."""


# ----------------------------------------------------------------------------- one traced step


@dataclasses.dataclass(frozen=True)
class Target:
    """Which code paths the traced step takes."""

    device: str  # "cuda" or "cpu": kernels, optimizer implementation, offloading
    fake: bool = True  # False: real tensors with random weights (to verify on CPU)

    @property
    def round_to(self) -> int:
        return CUDA_BLOCK if self.device == "cuda" else 1


def build_model(cfg: DictConfig, model_config: ModelConfig) -> nn.Module:
    """The config's model with random weights (on fake tensors: none at all), built and
    adapted by ``fastune.methods.build.build_model`` as training builds the loaded one."""
    from fastune.methods.build import build_model as build
    from fastune.methods.method import method_from_config

    return build(cfg.model.checkpoint_dir, method_from_config(cfg), cfg.model.dtype,
                 kernels=list(cfg.model.kernels), weights="random", model_config=model_config)


def worst_case_batch(cfg: DictConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """``batch_size`` rows of ``max_seq_len`` tokens, every position supervised; packed
    configs also get position and document ids (two documents per row). A preference
    objective runs chosen and rejected in one forward: twice the rows."""
    rows = cfg.batch_size * (2 if cfg.get("objective", "sft") != "sft" else 1)
    shape = (rows, cfg.dataset.get("max_seq_len", 2048))
    batch = {"tokens": torch.randint(0, vocab_size, shape), "labels": torch.randint(0, vocab_size, shape)}
    if cfg.dataset.get("packed", False):
        half = shape[1] // 2
        batch["position_ids"] = torch.arange(shape[1]).remainder(half).expand(shape).contiguous()
        batch["document_ids"] = (torch.arange(shape[1]) >= half).long().expand(shape).contiguous()
    return batch


def trace_step(cfg: DictConfig, model_config: ModelConfig, target: Target) -> MemoryReport:
    """Peak memory of one training step of ``cfg`` (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastune.kernels.dispatch import force_triton
    from fastune.models.attention import planning_cuda_memory
    from fastune.modules.chunked import apply_chunked_mlp
    from fastune.training.memory import apply_activation_checkpointing
    from fastune.training.optim import build_optimizer
    from fastune.training.loss import build_loss

    with contextlib.ExitStack() as stack:
        if target.fake:
            stack.enter_context(FakeTensorMode())
        if target.device == "cuda" and cfg.model.kernels:
            stack.enter_context(force_triton())  # the ops' Triton paths (their fake impls here)
        if target.fake and target.device == "cuda":  # FlexAttention's memory, not the CPU blocked path's
            stack.enter_context(planning_cuda_memory())
        model = build_model(cfg, model_config)
        apply_chunked_mlp(model, cfg.get("chunked_mlp"))
        ac = cfg.activation_checkpointing
        apply_activation_checkpointing(model, "full" if ac is True else ac)
        loss_fn = build_loss(model, cfg.loss)
        optimizer = build_optimizer(optimizer_for_trace(cfg), model, torch.device(target.device),
                                    _lora_plus_ratio(cfg))
        batch = worst_case_batch(cfg, model_config.vocab_size)
        offload = target.fake and target.device == "cuda" and cfg.activation_offloading

        _create_optimizer_state(model, optimizer)
        free_grads_in_backward(cfg, model)

        tracker = MemoryTracker(round_to=target.round_to)
        reference = reference_copy(cfg, model)  # full fine-tuning DPO/IPO: a frozen copy
        tracker.track_existing([*model.parameters(), *model.buffers(), *reference], "parameters")
        counted = counted_state(cfg, model, target.device)  # alive through the step, as the real state
        tracker.track_existing(_optimizer_tensors(optimizer) + counted, "optimizer_state")
        tracker.track_existing(batch.values(), "activations")
        with tracker:
            grads = _step(model, loss_fn, optimizer, batch, cfg.clip_grad_norm, tracker,
                          offloading_hooks(model) if offload else contextlib.nullcontext())
        return tracker.finish(model, optimizer, grads)


def _lora_plus_ratio(cfg: DictConfig) -> Optional[float]:
    from fastune.methods.method import method_from_config

    lora = method_from_config(cfg).lora
    return None if lora is None else lora.lora_plus_lr_ratio


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients, so that the traced step is a steady-state
    step: from the second step on, the optimizer state is held through forward and
    backward, and the first step's peak would miss it."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _step(model, loss_fn: Callable, optimizer, batch, max_norm, tracker: MemoryTracker, forward_context):
    """The memory-relevant part of ``fastune.training.loop.train_step`` for one
    micro-batch, in phases; returns the gradients (before ``zero_grad`` drops them)."""
    from fastune.training.recipe import clip_gradients

    model.train()
    with tracker.phase("forward"), forward_context:
        hidden = model(batch["tokens"], position_ids=batch.get("position_ids"),
                       document_ids=batch.get("document_ids"), return_hidden=True)
        loss_sum, _ = loss_fn(hidden, batch["labels"])
    with tracker.phase("backward"):
        (loss_sum / batch["labels"].numel()).backward()
    with tracker.phase("optimizer"):
        clip_gradients(model, max_norm)
        optimizer.step()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        optimizer.zero_grad(set_to_none=True)
    return grads


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Candidate:
    """A variant of the config: the overrides that make it, and its estimate."""

    overrides: dict[str, Any]
    features: list[str]
    memory: Optional[MemoryReport] = None
    device_total_gib: float = 0.0
    fits: bool = False

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items()) or "(as configured)"


def with_overrides(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, value in overrides.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def device_total_gib(peak_bytes: int, profile: Profile) -> float:
    """What the device must hold for a traced peak: on CUDA the allocator's margin and
    the context come on top; on CPU the peak as it is."""
    if profile.kind != "cuda":
        return peak_bytes / GIB
    return peak_bytes * (1 + FRAGMENTATION) / GIB + CUDA_CONTEXT_GIB


def evaluate(cfg: DictConfig, model_config: ModelConfig, profile: Profile, candidate: Candidate) -> Candidate:
    target = Target("cuda" if profile.kind == "cuda" else "cpu")
    candidate.memory = trace_step(with_overrides(cfg, candidate.overrides), model_config, target)
    candidate.device_total_gib = device_total_gib(candidate.memory.peak_bytes, profile)
    candidate.fits = candidate.device_total_gib <= profile.memory_gib
    return candidate


def candidates(cfg: DictConfig, profile: Profile) -> list[Candidate]:
    """Variants to try when the config does not fit, in the order the planner prefers
    them: those that change nothing about the result first (activation checkpointing,
    offloading, smaller micro-batches with accumulation), then QLoRA (numerics), then
    shorter sequences (data)."""
    ac = {} if cfg.activation_checkpointing else {"activation_checkpointing": True}
    ac_features = ["activation_checkpointing"] if ac else []
    out = []
    if ac:
        out.append(Candidate(dict(ac), list(ac_features)))
    if profile.kind == "cuda" and not cfg.activation_offloading:
        out.append(Candidate({**ac, "activation_offloading": True}, ac_features + ["activation_offloading"]))
    from fastune.methods.method import method_from_config

    methods = [({}, [])]
    lighter = method_from_config(cfg).lighter_variant()
    if lighter is not None:
        methods.append(({"method": lighter}, [lighter]))
    accumulation = cfg.gradient_accumulation_steps
    for method, method_features in methods:
        if method:
            out.append(Candidate({**ac, **method}, ac_features + method_features))
        batch = cfg.batch_size // 2
        while batch >= 1:
            steps = accumulation * math.ceil(cfg.batch_size / batch)
            out.append(Candidate({**ac, **method, "batch_size": batch, "gradient_accumulation_steps": steps},
                                 ac_features + method_features + ["batch_size"]))
            batch //= 2
    seq = cfg.dataset.max_seq_len // 2
    best_method = methods[-1][0]
    while seq >= 256:
        out.append(Candidate({**ac, **best_method, "batch_size": 1,
                              "gradient_accumulation_steps": accumulation * cfg.batch_size,
                              "dataset.max_seq_len": seq},
                             ac_features + methods[-1][1] + ["batch_size", "max_seq_len"]))
        seq //= 2
    return out


def plan(cfg: DictConfig, model_config: ModelConfig, profile: Profile,
         progress: Callable[[str], None] = lambda _: None) -> dict:
    """The estimate for ``cfg`` as configured and, when it does not fit, the first
    variant (in ``candidates`` order) that does. Returns the report as a dict."""
    if profile.memory_gib is None:
        raise PlanError(f"profile {profile.name!r}: no memory size to plan against")
    cfg = dtype_for_profile(cfg, profile)
    progress("tracing the config as configured")
    evaluated = [evaluate(cfg, model_config, profile, Candidate({}, []))]
    if not evaluated[0].fits:
        for candidate in candidates(cfg, profile):
            progress(f"tracing {candidate.label}")
            evaluated.append(evaluate(cfg, model_config, profile, candidate))
            if candidate.fits:
                break
    recommended = next((c for c in evaluated if c.fits), None)
    return {
        "profile": profile.as_dict(),
        "settings": _settings(cfg),
        "model": _model_summary(model_config),
        "candidates": [_candidate_dict(c) for c in evaluated],
        "recommended": None if recommended is None else recommended.label,
        "features": {f: FEATURES[f] for c in evaluated for f in c.features},
        "assumptions": ASSUMPTIONS["cuda" if profile.kind == "cuda" else "cpu"],
    }


def _settings(cfg: DictConfig) -> dict[str, Any]:
    from fastune.methods.method import method_from_config

    lora = method_from_config(cfg).lora
    return {
        "method": cfg.method, "dtype": cfg.model.dtype, "kernels": list(cfg.model.kernels),
        "batch_size": cfg.batch_size, "max_seq_len": cfg.dataset.get("max_seq_len"),
        "packed": cfg.dataset.get("packed", False),
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "activation_checkpointing": cfg.activation_checkpointing,
        "activation_offloading": cfg.activation_offloading,
        "chunked_mlp": cfg.get("chunked_mlp"),
        "lora": None if lora is None else OmegaConf.to_container(cfg.lora),
        "optimizer": cfg.optimizer.get("_component_"),
    }


def _model_summary(c: ModelConfig) -> dict[str, Any]:
    return {k: getattr(c, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "head_dim", "tie_word_embeddings")}


def _candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "label": c.label, "overrides": c.overrides, "features": c.features,
        "peak_bytes": c.memory.peak_bytes, "by_category": c.memory.by_category,
        "phase_at_peak": c.memory.phase_at_peak,
        "device_total_gib": c.device_total_gib, "fits": c.fits,
    }


# ----------------------------------------------------------------------------- checking on CPU


def verify(cfg: DictConfig, model_config: ModelConfig) -> dict[str, Any]:
    """The CPU estimate (fake tensors) against the same step on real tensors with random
    weights, both measured by ``MemoryTracker``: the check that the fake trace allocates
    what a real step allocates."""
    torch.manual_seed(0)
    estimate = trace_step(cfg, model_config, Target("cpu", fake=True))
    measured = trace_step(cfg, model_config, Target("cpu", fake=False))
    return {
        "estimate": estimate.as_dict(), "measured": measured.as_dict(),
        "relative_error": estimate.peak_bytes / measured.peak_bytes - 1,
        "method": "peak of live tensor storages during one training step (forward, backward, "
                  "clipping, AdamW step), tracked at the aten dispatch level (MemoryTracker): "
                  "fake tensors for the estimate, real tensors with random weights for the "
                  "measurement; parameters, buffers and the batch counted from the start",
    }


# ----------------------------------------------------------------------------- the command


def load_inputs(config: str, overrides: tuple[str, ...], profile_key: Optional[str]):
    """(config, the model's ``ModelConfig``, ``Profile``) for a plan; only the model's
    config.json must exist."""
    from fastune.bench.profiles import load_profile
    from fastune.config import load_config

    cfg = load_config(config, overrides, check_paths=False)
    checkpoint = Path(cfg.model.checkpoint_dir)
    if not (checkpoint / CONFIG_NAME).is_file() and not checkpoint.is_file():
        raise PlanError(f"model.checkpoint_dir: no {CONFIG_NAME} in {checkpoint}; the planner needs only that file "
                        "(override model.checkpoint_dir with a folder that holds it, e.g. "
                        "'${asset:model_configs/llama3_1_8b}')")
    model_config = ModelConfig.from_json(checkpoint)
    if profile_key is None:
        if cfg.device != "cpu":
            raise PlanError(f"{config}: device is {cfg.device!r}: name the GPU to plan for with --profile "
                            "(`fastune plan --help` lists the profiles)")
        profile_key = "cpu"
    return cfg, model_config, load_profile(profile_key)


def run_plan(config: str, overrides: tuple[str, ...], profile_key: Optional[str], check: bool,
             progress: Callable[[str], None] = lambda _: None) -> dict:
    """``fastune plan``: load the config (its files need not exist: only the model's
    config.json is read), plan it for the profile and, with ``check``, verify the CPU
    estimate against a real step."""
    from fastune.bench.report import environment

    cfg, model_config, profile = load_inputs(config, overrides, profile_key)
    if check and profile.kind != "cpu":
        raise PlanError("--verify: only a CPU plan can be checked here (use --profile cpu)")
    report = {"config": str(config), "overrides": list(overrides), "environment": environment(),
              **plan(cfg, model_config, profile, progress)}
    if check:
        progress("running the same step on real tensors")
        report["verification"] = verify(cfg, model_config)
    return report


def render_plan(report: dict) -> str:
    """The plan as markdown: the table by category, the recommendation, the features
    each setting turns on, the assumptions, and the CPU check when there is one."""
    from fastune.bench.report import gib, table

    profile, s, m = report["profile"], report["settings"], report["model"]
    memory = profile["memory_gib"]
    lora = "" if s["lora"] is None else f" rank {s['lora']['rank']} on {', '.join(s['lora']['targets'])}"
    lines = [
        f"# Memory plan: {report['config']} on {profile['name']}",
        "",
        f"Model: {m['model_type']}, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}, {m['num_attention_heads']} heads "
        f"({m['num_key_value_heads']} KV), vocab {m['vocab_size']}. "
        f"Training: {s['method']}{lora}, {s['dtype']}, kernels {describe_kernels(s['kernels'])}, "
        f"batch {s['batch_size']} x {s['max_seq_len']} tokens{' (packed)' if s['packed'] else ''}, "
        f"activation checkpointing {s['activation_checkpointing']}, "
        f"offloading {s['activation_offloading']}.",
        "",
        f"Device memory: {memory:.1f} GiB ({profile['sources'].get('memory_gib', '')}).",
        "",
        "Estimates in GiB: bytes live at the peak of one steady-state training step, by category "
        "(ESTIMATES from a trace on fake tensors, not measurements on the device).",
        "",
    ]
    rows = []
    for c in report["candidates"]:
        cat = c["by_category"]
        rows.append([c["label"], gib(cat["parameters"]), gib(cat["gradients"]), gib(cat["optimizer_state"]),
                     gib(cat["activations"]), gib(cat["temporary"]), gib(c["peak_bytes"]),
                     f"{c['device_total_gib']:.2f}", "yes" if c["fits"] else "no"])
    total = "device total" if profile["kind"] == "cuda" else "total"
    lines.append(table(["settings", "parameters", "gradients", "optimizer state", "activations",
                        "temporary", "peak", total, f"fits {memory:.0f} GiB"], rows))
    lines += ["", "Recommended: " + (f"`{report['recommended']}`" if report["recommended"]
                                     else "nothing tried fits; use a bigger device or several (FSDP2)."), ""]
    if report["features"]:
        lines += ["What each setting turns on:", ""]
        lines += [f"- {name}: {text}" for name, text in report["features"].items()] + [""]
    if profile["kind"] == "cuda":
        lines += [f"Device total = peak x {1 + FRAGMENTATION:.2f} (allocator margin) + {CUDA_CONTEXT_GIB} GiB "
                  "(CUDA context).", ""]
    lines += ["Assumptions:", ""] + [f"- {a}" for a in report["assumptions"]]
    if "verification" in report:
        v = report["verification"]
        mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
        lines += ["", "## Check on this CPU (MiB)", "",
                  table(["", "peak"] + [k.replace("_", " ") for k in v["estimate"]["by_category"]],
                        [[name, mib(v[name]["peak_bytes"])] + [mib(b) for b in v[name]["by_category"].values()]
                         for name in ("estimate", "measured")]),
                  "", f"Estimate / measured - 1 = {v['relative_error']:+.2%}. Method: {v['method']}."]
    lines += ["", f"Reproduce: `{report['environment']['command']}`"]
    return "\n".join(lines) + "\n"
