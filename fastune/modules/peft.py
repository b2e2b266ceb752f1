"""Turn a model into a LoRA / DoRA / QLoRA model, and back into plain weights.

The order the training loop uses
--------------------------------
One device (weights loaded before LoRA is applied; simplest and what QLoRA needs):

1. ``model = Transformer(config)`` on the device; load the base weights.
2. ``apply_lora(model, targets, rank, alpha, dropout, use_dora, quantize_base)``:
   wraps the targets, freezes everything else, initializes A and B, sets the
   DoRA magnitudes from the loaded weights, and quantizes to NF4 for QLoRA.
3. To continue from an adapter: ``fastune.checkpoint.peft.load_peft_adapter``.

Meta device (FSDP2, each rank materializes only its shards):

1. ``with torch.device("meta"): model = Transformer(config)``
2. ``apply_lora(model, ..., quantize_base=False)`` (nothing is initialized on meta)
3. ``fully_shard`` the layers and the root; ``model.to_empty(device=...)``;
   ``model.reset_buffers(device)``; load the base weights.
4. ``reset_lora_parameters(model)``, then ``init_dora_magnitudes(model)`` (DoRA),
   or load an adapter instead of both.

``quantize_base_weights(model)`` quantizes loaded, unsharded weights. NF4 from
already-sharded weights would need the loader to quantize each full tensor
before sharding it; that is not done here.

QLoRA choice (as torchtune): every projection inside the decoder layers is NF4,
adapted or not; the embeddings, the norms and an un-adapted ``lm_head`` stay dense.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Iterable, Optional

import torch
from torch import nn

from fastune.models.spec import Fused, all_layer_projections, all_lora_aliases, all_lora_targets, get_spec
from fastune.modules.kernels import enabled_kernels
from fastune.modules.lora import (
    LoRAError,
    LoRALinear,
    NF4Linear,
    check_nf4_weight,
    dequantize,
    lora_scale,
    merge_weight,
)

log = logging.getLogger(__name__)

# The linear layers LoRA can adapt, by their Hugging Face names (also fastune's),
# and the decoder-layer projections QLoRA quantizes: from the model-family specs.
LORA_TARGETS = all_lora_targets()
LAYER_PROJECTIONS = all_layer_projections()
# Other spellings of them (torchtune's "q", "output_proj", "output", ...).
TORCHTUNE_NAMES = all_lora_aliases()
LORA_PARAM_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    """The adapter hyper-parameters shared by every LoRA layer of a model."""

    targets: tuple[str, ...]  # Hugging Face names, in LORA_TARGETS order
    rank: int
    alpha: float
    dropout: float = 0.0
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "default"  # LORA_INITS: PEFT's default, pissa, olora or loftq

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)


def normalize_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Map target names (HF or torchtune spelling) to HF names, in a fixed order."""
    if isinstance(targets, str):
        targets = [targets]
    names = set()
    for target in targets:
        name = TORCHTUNE_NAMES.get(target, target)
        if name not in LORA_TARGETS:
            valid = list(LORA_TARGETS) + list(TORCHTUNE_NAMES)
            close = difflib.get_close_matches(str(target), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LoRAError(
                f"unknown LoRA target {target!r}{hint}; valid targets: {', '.join(LORA_TARGETS)} "
                f"(or torchtune's {', '.join(TORCHTUNE_NAMES)})"
            )
        names.add(name)
    if not names:
        raise LoRAError(f"no LoRA targets given; valid targets: {', '.join(LORA_TARGETS)}")
    return tuple(n for n in LORA_TARGETS if n in names)


def apply_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    use_rslora: bool = False,
    init: str = "default",
) -> None:
    """Replace each targeted ``nn.Linear`` by a ``LoRALinear`` (in place) and freeze
    everything but the adapters. The LoRA layers use the fused op when
    ``apply_kernels`` switched ``lora`` on for the model. PiSSA/OLoRA/LoftQ (``init``)
    work on the dense weights, before QLoRA quantizes the (residual) weights, as PEFT
    advises; LoftQ is for QLoRA only: it fits the adapter to NF4's error."""
    names = normalize_targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LoRAError("LoRA is already applied to this model")
    fused_targets = _check_family_targets(model, names)
    # A fused checkpoint projection (Phi-3's qkv_proj) is adapted as its split parts.
    modules = tuple(p for n in names for p in (fused_targets[n].part_modules if n in fused_targets else (n,)))
    if "lm_head" in names and _lm_head_is_tied(model):
        raise LoRAError(
            "LoRA on lm_head is not supported with tied embeddings (tie_word_embeddings: true): "
            "the merged export would untie them"
        )
    if use_dora and init != "default":
        raise LoRAError(f"LoRA init {init!r} is not supported with DoRA (use init: default)")
    if fused_targets and init != "default":
        # The parts of a fused projection share one A; PiSSA/OLoRA derive A per weight.
        raise LoRAError(f"LoRA init {init!r} is not supported on fused projections "
                        f"({', '.join(fused_targets)}); use init: default")
    fused = "lora" in enabled_kernels(model)
    found = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in modules and isinstance(child, nn.Linear)
    ]
    if not found:
        raise LoRAError(f"LoRA targets {', '.join(names)} match no linear layer of the model")
    if init == "loftq":
        _check_loftq(quantize_base or found[0][2].weight.is_meta, lora_scale(alpha, rank, use_rslora))
    if quantize_base:  # fail before changing anything
        for _, _, child, full_name in _quantizable(model, modules):
            check_nf4_weight(child.weight, full_name)
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, rank, alpha, dropout, use_dora, fused, use_rslora, init))
    for parent, _, _ in found:
        for group in fused_targets.values():
            _share_lora_a(parent, group)
    for key, p in model.named_parameters():
        p.requires_grad_(is_lora_key(key))
    if quantize_base:
        quantize_base_weights(model)
        # QLoRA trains on the dequantized weights: the magnitudes must be their norms.
        init_dora_magnitudes(model)


def _check_loftq(quantized: bool, scale: float) -> None:
    """LoftQ needs the NF4 base (on meta, NF4 is deferred to the load); warns where, as
    in PEFT, the start is s·E_r rather than the NF4 error's rank-r part E_r."""
    if not quantized:
        raise LoRAError("LoRA init 'loftq' fits the adapter to NF4's quantization error: "
                        "use it with QLoRA (method: qlora)")
    if scale != 1.0:
        log.warning("lora.init=loftq with scale %g: as in PEFT, the adapter starts at %g x the NF4 error's "
                    "rank-r part; alpha = rank makes the start exact", scale, scale)


def _check_family_targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, Fused]:
    """The targets must be the family's own checkpoint names, so that the adapter is
    one PEFT can load on that checkpoint. Returns the fused targets by name."""
    config = getattr(model, "config", None)
    if config is None:  # a bare module: any linear layer of these names
        return {}
    spec = get_spec(config.model_type)
    for name in names:
        if name not in spec.lora_targets:
            raise LoRAError(f"LoRA target {name!r} is not a layer of {config.model_type} checkpoints; "
                            f"its targets: {', '.join(spec.lora_targets)}")
    return {f.module: f for f in spec.lora_fused() if f.module in names}


def _share_lora_a(parent: nn.Module, group: Fused) -> None:
    """Make the LoRA layers of ``group``'s parts in ``parent`` share the first part's A:
    then q, k, v together compute exactly PEFT's LoRA on the fused qkv_proj, whose
    B holds the parts' B stacked by rows (see ``fastune.models.phi3``)."""
    layers = [getattr(parent, part, None) for part in group.part_modules]
    if all(isinstance(m, LoRALinear) for m in layers):
        for layer in layers[1:]:
            layer.lora_A = layers[0].lora_A


def quantize_base_weights(model: nn.Module) -> None:
    """QLoRA: store the frozen weights of every LoRA layer and of every decoder-layer
    projection as NF4. Needs loaded (not meta, not sharded) weights. Every weight is
    checked before any is converted, so an error leaves the model as it was."""
    layers = _quantizable(model)
    for _, _, child, full_name in layers:
        check_nf4_weight(child.weight, full_name)
    for parent, name, child, full_name in layers:
        if isinstance(child, LoRALinear):
            child.quantize_base(full_name)
        else:
            setattr(parent, name, NF4Linear(child, full_name))


def _quantizable(model: nn.Module, targets: tuple[str, ...] = ()) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(parent, attribute, layer, weight name) of each layer QLoRA stores as NF4: the
    LoRA layers (or, before apply_lora wraps them, the ``targets``) and the
    decoder-layer projections."""
    found = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            lora = isinstance(child, LoRALinear) and not child.quantized
            if lora or (type(child) is nn.Linear and (name in LAYER_PROJECTIONS or name in targets)):
                full_name = f"{parent_name}.{name}.weight" if parent_name else f"{name}.weight"
                found.append((parent, name, child, full_name))
    return found


def reset_lora_parameters(model: nn.Module) -> None:
    """Initialize A and B of every LoRA layer (after the meta-device model is materialized)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora_parameters()


def init_dora_magnitudes(model: nn.Module) -> None:
    """Set every DoRA magnitude to ‖W + s·B·A‖_row from the loaded base weights
    (NF4 weights are dequantized). Call after the base weights are loaded."""
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.use_dora:
            m.init_dora_magnitude()


def lora_settings(model: nn.Module) -> LoRASettings:
    """The settings ``apply_lora`` used on ``model``, read back from its LoRA layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise LoRAError("the model has no LoRA layers (apply_lora was not called)")
    first = layers[0][1]
    targets = {name.rpartition(".")[2] for name, _ in layers}
    config = getattr(model, "config", None)
    for group in get_spec(config.model_type).lora_fused() if config is not None else ():
        if set(group.part_modules) <= targets:  # adapted together, with one A: the fused target
            targets = (targets - set(group.part_modules)) | {group.module}
    return LoRASettings(
        targets=tuple(t for t in LORA_TARGETS if t in targets),
        rank=first.rank,
        alpha=first.alpha,
        dropout=first.dropout,
        use_dora=first.use_dora,
        use_rslora=first.use_rslora,
        init=first.init,
    )


def is_lora_key(key: str) -> bool:
    """True for the state-dict keys of adapter parameters (A, B, DoRA magnitude)."""
    return key.endswith(LORA_PARAM_SUFFIXES)


def merge_lora(model: nn.Module, state_dict: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """A plain state dict (fastune keys, no adapter keys, no NF4) with every adapter
    merged into its base weight, for the merged Hugging Face export. The model is
    not changed.

    ``state_dict`` defaults to ``model.state_dict()``; under FSDP pass the gathered
    full state dict instead.
    """
    scale = lora_settings(model).scale
    state_dict = model.state_dict() if state_dict is None else state_dict
    merged = {}
    for key, value in state_dict.items():
        if is_lora_key(key):
            continue
        module = key.removesuffix("weight")  # "layers.0.self_attn.q_proj."
        if key.endswith(".weight") and f"{module}lora_A.weight" in state_dict:
            merged[key] = merge_weight(
                value, state_dict[f"{module}lora_A.weight"], state_dict[f"{module}lora_B.weight"],
                scale, state_dict.get(f"{module}lora_magnitude_vector"),
            )
        else:
            merged[key] = dequantize(value)
    return merged


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters count once and
    NF4 weights count their logical number of elements."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _lm_head_is_tied(model: nn.Module) -> bool:
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed_tokens", None)
    return head is not None and embed is not None and head.weight is embed.weight
