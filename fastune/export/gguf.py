"""Export a checkpoint to one GGUF file for llama.cpp, Ollama and LM Studio.

The file is written with the ``gguf`` package (llama.cpp's own Python writer and
quantizers), following the conventions of llama.cpp's ``convert_hf_to_gguf.py``:

- tensor names from ``gguf.TENSOR_NAMES`` (``blk.N.attn_q.weight``, ...), per family
  in ``FAMILIES`` (``fastune.export.gguf_families``, with each family's transforms and
  metadata: Qwen3, Phi-3, Gemma 2 and 3 there); ``output.weight`` is absent when the
  embeddings are tied;
- llama.cpp's ``llama`` architecture rotates adjacent pairs (dims 2i, 2i+1), while
  fastune, like Hugging Face, rotates the two halves of each head (i, i + D/2). The
  rows of Q and K (weights and biases) are therefore reordered per head: output row
  2i takes input row i and row 2i+1 takes row i + D/2 (``to_interleaved``). The
  other architectures use the half-split ("NEOX") rotation and keep them as they are;
- Llama 3.1 rope scaling becomes a ``rope_freqs`` tensor of per-frequency divisors,
  LongRoPE two factor tensors, linear and YaRN scaling the ``rope.scaling`` keys;
- 1-D tensors (norms, biases, rope factors) stay float32 whatever the type; a matrix
  whose rows do not split into the type's blocks falls back to float16.

Weights are streamed: the header (metadata and every tensor's shape and type) is
written first, then each tensor is read, converted and written in turn, so memory
holds one tensor at a time (plus the whole model only when an adapter-only
checkpoint must be merged first). The file is written under a temporary name in
the destination folder and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

import gguf
import numpy as np
import torch

from fastune.checkpoint.layout import CONFIG_NAME
from fastune.errors import FastuneError
from fastune.export.gguf_families import (
    FAMILIES, GGUFFamily, add_rope_scaling, rope_tensors, sliding_layers, yarn_as_llama_cpp,
)
from fastune.export.gguf_vocab import GGUFVocab, read_vocab

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType

# --type -> (tensor type of the matrices, general.file_type)
TYPES = {
    "f32": (Q.F32, F.ALL_F32),
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}

class GGUFExportError(FastuneError):
    """A checkpoint or an option the GGUF export cannot use."""


@dataclasses.dataclass
class ExportResult:
    path: Path
    arch: str
    tensor_types: dict[str, str]  # GGUF tensor name -> its type, in file order
    warnings: list[str]


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K rows (or bias) of ``n_heads`` heads from the half-split rotation layout to
    the adjacent-pairs one: per head, row 2i <- row i and row 2i+1 <- row i + D/2."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``to_interleaved``."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- reading the checkpoint


@dataclasses.dataclass
class _Weights:
    """HF key -> shape of every tensor to export, and a reader for one tensor at a time."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]


def _open_checkpoint(path: Union[str, Path]):
    """(checkpoint folder, its ModelConfig, its weights), merging an adapter-only checkpoint."""
    from fastune.checkpoint.hf import CheckpointError
    from fastune.checkpoint.layout import has_hf_weights
    from fastune.generation import resolve_checkpoint
    from fastune.models.config import ModelConfig

    ckpt = resolve_checkpoint(path)
    raw = json.loads((ckpt / CONFIG_NAME).read_text()) if (ckpt / CONFIG_NAME).is_file() else {}
    if raw.get("quantization_config"):
        raise GGUFExportError(f"{ckpt / CONFIG_NAME}: this checkpoint is quantized; export the checkpoint "
                              "it was quantized from, and choose the GGUF type with --type")
    try:
        if has_hf_weights(ckpt):
            config = ModelConfig.from_json(ckpt)  # a readable config.json of a model_type fastune supports
            _check_family(ckpt, config)
            weights = _safetensors_weights(ckpt, config)
        else:
            config, weights = _merged_weights(ckpt, raw)
            _check_family(ckpt, config)
    except CheckpointError as e:
        raise GGUFExportError(str(e)) from None
    return ckpt, config, weights


def _check_family(ckpt: Path, config) -> None:
    if config.model_type not in FAMILIES:
        raise GGUFExportError(f"{ckpt / CONFIG_NAME}: model_type {config.model_type!r} has no GGUF export; "
                              f"supported: {', '.join(FAMILIES)}")
    family = FAMILIES[config.model_type]
    arch = gguf.MODEL_ARCH_NAMES[family.arch]
    rope_type = config.rope_scaling["rope_type"] if config.rope_scaling else "default"
    if rope_type not in family.rope_types:
        # The metadata written below cannot say it: llama.cpp would rotate wrongly.
        raise GGUFExportError(f"{ckpt / CONFIG_NAME}: llama.cpp's {arch} architecture does not apply "
                              f"{rope_type!r} RoPE scaling")
    if rope_type == "yarn" and not yarn_as_llama_cpp(config):
        raise GGUFExportError(f"{ckpt / CONFIG_NAME}: llama.cpp applies YaRN with whole-dim ramp ends and "
                              "the default attention factor only (no truncate: false, mscale or attention_factor)")
    if family.permute_qk and config.partial_rotary_factor != 1.0:
        raise GGUFExportError(f"{ckpt / CONFIG_NAME}: GGUF export does not write partial rotary for {arch}")
    if family.sliding is not None and sliding_layers(config) != [family.sliding(i) for i in
                                                                  range(config.num_hidden_layers)]:
        raise GGUFExportError(f"{ckpt / CONFIG_NAME}: llama.cpp's {arch} architecture fixes which layers slide, "
                              "and this checkpoint's layer_types differ")


def _warnings(config, family: GGUFFamily) -> list[str]:
    if family.sliding is None and any(sliding_layers(config)) and config.sliding_window:
        return [f"llama.cpp's {gguf.MODEL_ARCH_NAMES[family.arch]} architecture has no sliding window: "
                f"attention differs from fastune's past {config.sliding_window} tokens"]
    return []


def _hf_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint names (fused where the checkpoint fuses them)."""
    from fastune.models.spec import get_spec

    return get_spec(model.config.model_type).adapter.to_hf(model.state_dict(), model.config)


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from fastune.models.spec import get_spec

    with torch.device("meta"):
        model = get_spec(config.model_type).build(config)
    shapes = {k: tuple(v.shape) for k, v in _hf_state(model).items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _safetensors_weights(ckpt: Path, config) -> _Weights:
    """Tensors read lazily from the checkpoint's safetensors files, after checking
    every key and shape against config.json."""
    from safetensors import SafetensorError, safe_open

    from fastune.checkpoint.layout import HF_INDEX as INDEX_NAME, HF_WEIGHTS as WEIGHTS_NAME

    index = ckpt / INDEX_NAME
    try:
        if index.is_file():
            files = {key: ckpt / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        else:
            with safe_open(ckpt / WEIGHTS_NAME, framework="pt") as f:
                files = {key: ckpt / WEIGHTS_NAME for key in f.keys()}
        shapes, stored = _checked_shapes(ckpt, files, _expected_shapes(config), config.model_type)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise GGUFExportError(f"{ckpt}: unreadable weights ({type(e).__name__}: {e})") from None

    def read(key: str) -> torch.Tensor:
        file, file_key = stored[key]
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(file_key)

    return _Weights(shapes, read)


def _checked_shapes(ckpt: Path, files: dict[str, Path], expected: dict[str, tuple[int, ...]], model_type: str):
    """(HF key -> shape, in model order, from the safetensors headers, checked against
    ``expected``; HF key -> (file, key in that file)). A file key in another layout of the
    family (a multimodal Gemma 3's language model) is read under its canonical name, and
    the keys of another model in the file (its vision tower) are skipped."""
    from safetensors import safe_open

    from fastune.models.spec import get_spec

    canonical_key = get_spec(model_type).adapter.canonical_key
    shapes, stored = {}, {}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise GGUFExportError(f"{ckpt}: weight file {file.name!r} not found")
        with safe_open(file, framework="pt") as f:
            for file_key in f.keys():
                key = canonical_key(file_key)
                if key is None or key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and key not in expected):
                    continue  # recomputed from config.json / tied to the embeddings
                if key not in expected:
                    raise GGUFExportError(f"{file}: unexpected key {key!r}; config.json implies no such tensor")
                shapes[key], stored[key] = tuple(f.get_slice(file_key).get_shape()), (file, file_key)
                if shapes[key] != expected[key]:
                    raise GGUFExportError(f"{file}: key {key!r} has shape {list(shapes[key])}, "
                                          f"config.json implies {list(expected[key])}")
    missing = [k for k in expected if k not in shapes]
    if missing:
        raise GGUFExportError(f"{ckpt}: the weights lack key {missing[0]!r}")
    return {k: shapes[k] for k in expected}, stored


def _merged_weights(ckpt: Path, raw: dict):
    """An adapter-only checkpoint: (config, its base model with the adapter merged in, in
    memory), in the dtype of its config.json (fp32 when it has none)."""
    from fastune.generation import load_model

    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    model, _ = load_model(ckpt, dtype=dtype, device="cpu", use_kernels=False)
    state = _hf_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return model.config, _Weights({k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)


# ----------------------------------------------------------------------------- the tensor plan


@dataclasses.dataclass
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order: [rows, columns]
    qtype: gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]  # float32 values, before conversion to qtype


def _gguf_name(hf_key: str, family: GGUFFamily, source: str) -> str:
    stem, _, suffix = hf_key.rpartition(".")
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    pattern, bid = (f"model.layers.{{bid}}.{match.group(2)}", int(match.group(1))) if match else (stem, None)
    tensor = family.tensors.get(pattern)
    if tensor is None or tensor not in gguf.MODEL_TENSORS[family.arch]:
        raise GGUFExportError(f"{source}: tensor {hf_key!r} has no GGUF name for this architecture")
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.{suffix}"


def _tensor_type(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) < 2:
        return Q.F32  # norms and biases: tiny, and llama.cpp keeps them in float32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return Q.F16  # as llama.cpp's converter does for rows that do not split into blocks
    return wanted


def _plan(config, weights: _Weights, family: GGUFFamily, wanted, source: str) -> list[_Tensor]:
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    query, query_scale = ("q_norm" if config.qk_norm else "q_proj"), family.query_scale(config)

    def producer(key: str) -> Callable[[], np.ndarray]:
        module = key.rsplit(".", 2)[-2]

        def produce() -> np.ndarray:
            w = weights.read(key).to(torch.float32)
            if family.permute_qk and module in heads:
                w = to_interleaved(w, heads[module])
            if module.endswith("norm"):
                w = w + family.norm_offset
            if module == query and query_scale != 1.0:
                w = w * query_scale
            return w.contiguous().numpy()

        return produce

    plan = []
    for key, shape in weights.shapes.items():
        name = _gguf_name(key, family, source)
        plan.append(_Tensor(name, shape, _tensor_type(name, shape, wanted), producer(key)))
    for tensor, values in reversed(rope_tensors(config).items()):
        name = gguf.TENSOR_NAMES[tensor] + ".weight"
        plan.insert(0, _Tensor(name, tuple(values.shape), Q.F32, lambda values=values: values))
    return plan


# ----------------------------------------------------------------------------- metadata and writing

Progress = Callable[[int, int, str], None]  # (tensors written, tensors in all, the last one's GGUF name)


def _add_hyperparameters(writer: gguf.GGUFWriter, config, file_type, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    add_rope_scaling(writer, config)
    FAMILIES[config.model_type].hparams(writer, config)


def _tensor_nbytes(shape: tuple[int, ...], qtype) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def _write(out: Path, arch: str, config, vocab: GGUFVocab, plan: list[_Tensor], file_type, name: str,
           progress: Optional[Progress]) -> None:
    writer = gguf.GGUFWriter(out, arch)
    try:
        _add_hyperparameters(writer, config, file_type, name)
        vocab.add_to(writer)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _tensor_nbytes(t.shape, t.qtype),
                                   raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(plan):
            data = gguf.quants.quantize(t.produce(), t.qtype)  # float arrays for F32/F16, else bytes
            if data.nbytes != _tensor_nbytes(t.shape, t.qtype):
                raise AssertionError(f"{t.name}: {data.nbytes} bytes, planned {_tensor_nbytes(t.shape, t.qtype)}")
            writer.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(plan), t.name)
    finally:
        writer.close()


def export_gguf(
    checkpoint: Union[str, Path],
    out: Union[str, Path],
    out_type: str = "f16",
    force: bool = False,
    progress: Optional[Progress] = None,
) -> ExportResult:
    """Write ``checkpoint`` (a checkpoint folder, a run's output_dir, or an
    adapter-only LoRA checkpoint) as one GGUF file ``out`` of type ``out_type``."""
    if out_type not in TYPES:
        raise GGUFExportError(f"--type: unknown GGUF type {out_type!r}; choose one of {', '.join(TYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise GGUFExportError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise GGUFExportError(f"{out} is a directory; name the .gguf file to write")
    ckpt, config, weights = _open_checkpoint(checkpoint)
    family = FAMILIES[config.model_type]
    arch = gguf.MODEL_ARCH_NAMES[family.arch]
    wanted, file_type = TYPES[out_type]
    plan = _plan(config, weights, family, wanted, str(ckpt))
    vocab = read_vocab(ckpt, config.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, arch, config, vocab, plan, file_type, _model_name(ckpt), progress)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    warnings = ([vocab.warning] if vocab.warning else []) + _warnings(config, family)
    return ExportResult(out, arch, {t.name: t.qtype.name for t in plan}, warnings)


def _model_name(ckpt: Path) -> str:
    """general.name: the run's folder for a run's checkpoint (out/epoch_0 -> "out epoch_0")."""
    if re.fullmatch(r"(epoch|step)_\d+", ckpt.name):
        return f"{ckpt.resolve().parent.name} {ckpt.name}"
    return ckpt.resolve().name

