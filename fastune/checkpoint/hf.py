"""Hugging Face checkpoints: ``config.json`` plus safetensors shards, to and from a
fastune ``Transformer``.

Key mapping: the family's ``StateDictAdapter`` (``fastune.models.spec``); for the
Llama-style decoders the HF key is ``"model." + fastune key``, except
``lm_head.weight``, which is the same in both. No tensor is permuted (fastune uses
HF's RoPE layout); an adapter may split fused HF tensors on load and fuse on save.

Loading builds the model on the meta device, checks every key and shape in the
shard headers before reading any data, then reads tensor by tensor into the
model, so the full weights exist once, in the requested dtype, on the requested
device. Saving validates the state dict against the config, writes shards into
a temporary folder and renames it into place (``atomic_directory``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fastune.checkpoint.atomic import atomic_directory
from fastune.errors import FastuneError
from fastune.checkpoint.layout import CONFIG_NAME, HF_INDEX, HF_WEIGHTS, copy_tokenizer_files
from fastune.models.config import ModelConfig
from fastune.models.spec import StateDictAdapter, get_spec
from fastune.models.transformer import Transformer
from fastune.modules.kernels import apply_kernels

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
# Older Llama checkpoints stored RoPE's inverse frequencies as a persistent
# buffer; fastune (like transformers) recomputes them from config.json.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LM_HEAD = "lm_head.weight"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

StateDict = Mapping[str, torch.Tensor]


class CheckpointError(FastuneError, ValueError):
    """A checkpoint that cannot be read or written; the message names the file and key."""


def to_hf_key(key: str, model_type: str = "llama") -> str:
    """The HF name of one fastune key (not of a part of a fused tensor)."""
    return get_spec(model_type).adapter.to_hf_key(key)


def from_hf_key(key: str, model_type: str = "llama") -> str:
    return get_spec(model_type).adapter.from_hf_key(key)


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``torch.bfloat16``, ``"bfloat16"``, ``"bf16"`` or ``"torch.bfloat16"`` -> torch.bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise CheckpointError(f"dtype: unsupported value {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10**9) or ``"500MiB"`` (2**20), as HF reads them."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size).lower())
    if match is None or float(match.group(1)) <= 0:
        raise CheckpointError(f"max_shard_size: cannot read {size!r}; use bytes or a size like '5GB'")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


# ----------------------------------------------------------------------------- loading


def load_hf_checkpoint(
    path: Union[str, Path],
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Union[str, torch.device] = "cpu",
    kernels: Union[str, bool, list[str], None] = "all",
) -> Transformer:
    """Build a ``Transformer`` from an HF checkpoint directory, with the fused
    ``kernels`` swapped in (``apply_kernels``: all, none, or a list of ops).

    Raises ``ConfigError`` for an unusable config.json and ``CheckpointError``
    for anything wrong with the weights; nothing is loaded partially.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory (download it first with `fastune download`)")
    config = ModelConfig.from_json(path)
    spec = get_spec(config.model_type)
    dtype, device = parse_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = spec.build(config)
    plan, ignored = _plan_load(path, _expected_shapes(model, config), config.tie_word_embeddings, spec.adapter)
    if ignored:  # a multimodal checkpoint: say that only its language model is used
        under = sorted({p.rstrip(".") for p in spec.adapter.ignored if any(k.startswith(p) for k in ignored)})
        log.info("%s: loading the language model only; the vision tower is ignored (%d tensors under %s)",
                 path, len(ignored), ", ".join(under))
    for file, keys in plan.items():
        model.load_state_dict(_read_tensors(file, keys, dtype, device, config), strict=False, assign=True)
    model.reset_buffers(device)
    model.tie_weights()
    apply_kernels(model, kernels)
    return model


def _expected_shapes(model: nn.Module, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape, for every parameter the config implies (lm_head included even when tied)."""
    hf = get_spec(config.model_type).adapter.to_hf(model.state_dict(), config)
    return {k: tuple(v.shape) for k, v in hf.items()}


def _plan_load(path: Path, expected: dict[str, tuple[int, ...]], tied: bool,
               adapter: StateDictAdapter) -> tuple[dict[Path, list[tuple[str, str]]], list[str]]:
    """(shard file -> (key in the file, HF key) pairs to read from it, the keys the
    adapter ignores), after checking every key and shape against the config. Reads
    headers only."""
    files, source = _weight_files(path)
    plan: dict[Path, list[tuple[str, str]]] = {}
    ignored = []
    for file, file_keys in files.items():
        with _open(file) as f:
            present = set(f.keys())
            for file_key in file_keys:
                if file_key not in present:
                    raise CheckpointError(f"{file}: key {file_key!r} listed in {HF_INDEX} is not in this shard")
                key = adapter.canonical_key(file_key)
                if key is None:
                    ignored.append(file_key)
                    continue
                if key.endswith(_IGNORED_SUFFIXES) or (tied and key == _LM_HEAD):
                    continue
                if key not in expected:
                    raise CheckpointError(f"{file}: unexpected key {key!r}; config.json implies no such parameter")
                shape = tuple(f.get_slice(file_key).get_shape())
                if shape != expected[key]:
                    raise CheckpointError(
                        f"{file}: key {file_key!r} has shape {list(shape)}, "
                        f"config.json implies {list(expected[key])}"
                    )
                plan.setdefault(file, []).append((file_key, key))
    found = {k for keys in plan.values() for _, k in keys}
    missing = [k for k in expected if k not in found and not (tied and k == _LM_HEAD)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more}")
    return plan, ignored


def _weight_files(path: Path) -> tuple[dict[Path, list[str]], Path]:
    """(shard file -> HF keys it should hold, the file that lists them) for a
    sharded or a single-file checkpoint."""
    index, single = path / HF_INDEX, path / HF_WEIGHTS
    if index.is_file():
        files: dict[Path, list[str]] = {}
        for key, name in _read_weight_map(index).items():
            files.setdefault(path / name, []).append(key)
        for file, keys in files.items():
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {file.name!r} (holding key {keys[0]!r}) not found")
        return files, index
    if single.is_file():
        with _open(single) as f:
            return {single: list(f.keys())}, single
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(
            f"{path}: only safetensors weights are loaded (found .bin/.pt files); "
            f"convert them to {HF_WEIGHTS} with transformers' save_pretrained"
        )
    raise CheckpointError(f"{path}: no {HF_WEIGHTS} or {HF_INDEX} in this directory")


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid index file ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: key 'weight_map' missing or empty")
    return weight_map


@contextlib.contextmanager
def _open(file: Path) -> Iterator:
    """``safe_open``, with a corrupt or truncated file reported as a CheckpointError."""
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from None
    with handle as f:
        yield f


def _read_tensors(file: Path, keys: list[tuple[str, str]], dtype: torch.dtype, device: torch.device,
                  config: ModelConfig) -> dict[str, torch.Tensor]:
    """fastune key -> tensor copied out of the shard into fresh memory (a fused HF
    tensor gives several).

    ``safe_open`` maps the whole file, and every page a copy touches stays in
    this process's RSS until the file is closed. Reopening the file per tensor
    (a header parse, cheap) bounds that extra to one tensor instead of a shard,
    which for a single-file checkpoint would double peak memory. The explicit
    copy also means no parameter stays backed by the file's mapping.
    """
    adapter = get_spec(config.model_type).adapter
    out = {}
    for file_key, key in keys:
        with _open(file) as f:
            out.update(adapter.from_hf(key, f.get_tensor(file_key).to(device=device, dtype=dtype, copy=True), config))
    return out


# ----------------------------------------------------------------------------- saving


def save_hf_checkpoint(
    state_dict_or_model: Union[StateDict, nn.Module],
    config: ModelConfig,
    out_dir: Union[str, Path],
    source_dir: Union[str, Path, None] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    dtype: Union[str, torch.dtype, None] = None,
) -> Path:
    """Write an HF checkpoint that ``transformers`` ``from_pretrained`` loads as it is.

    ``state_dict_or_model`` holds fastune keys (``layers.0.mlp.up_proj.weight``):
    a ``Transformer``, merged LoRA weights, or full tensors gathered from FSDP.
    Tensors may live on any device; each shard is moved to CPU only while it is
    written. ``dtype`` defaults to the embedding's dtype; one dtype is used for
    all tensors, as config.json can state only one. With tied embeddings
    ``lm_head.weight`` is not written (transformers re-ties it).
    Tokenizer and generation files are copied from ``source_dir`` if given.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if source_dir is not None and not Path(source_dir).is_dir():
        raise CheckpointError(f"{source_dir}: source_dir is not a directory")
    if isinstance(state_dict_or_model, nn.Module):
        state_dict_or_model = state_dict_or_model.state_dict()
    tensors = _hf_tensors(state_dict_or_model, config, out_dir)
    dtype = parse_dtype(dtype) if dtype is not None else tensors[to_hf_key("embed_tokens.weight", config.model_type)].dtype
    shards = _plan_shards(tensors, parse_size(max_shard_size), dtype.itemsize)
    names = _shard_names(len(shards))
    with atomic_directory(out_dir) as tmp:
        for name, keys in zip(names, shards):
            write_safetensors(tmp / name, {k: tensors[k].detach().to("cpu", dtype).contiguous() for k in keys})
        if len(shards) > 1:
            _write_index(tmp / HF_INDEX, tensors, shards, names, dtype.itemsize)
        _write_json(tmp / CONFIG_NAME, _config_dict(config, dtype))
        if source_dir is not None:
            copy_tokenizer_files(Path(source_dir), tmp)
    return out_dir


def _hf_tensors(state_dict: StateDict, config: ModelConfig, out_dir: Path) -> dict[str, torch.Tensor]:
    """HF key -> tensor, in model order, after checking names and shapes (fastune keys,
    before any fusing) against ``config``."""
    spec = get_spec(config.model_type)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in spec.build(config).state_dict().items()}
    tied = config.tie_word_embeddings
    given = {k: v for k, v in state_dict.items() if not (tied and k == _LM_HEAD)}
    for key, tensor in given.items():
        if key not in expected:
            raise CheckpointError(f"{out_dir}: state dict key {key!r} is not a parameter of this model")
        if tuple(tensor.shape) != expected[key]:
            raise CheckpointError(
                f"{out_dir}: state dict key {key!r} has shape {list(tensor.shape)}, "
                f"the config implies {list(expected[key])}"
            )
        if tensor.is_meta:
            raise CheckpointError(f"{out_dir}: state dict key {key!r} is on the meta device")
    missing = [k for k in expected if k not in given and not (tied and k == _LM_HEAD)]
    if missing:
        raise CheckpointError(f"{out_dir}: state dict lacks key {missing[0]!r}")
    return spec.adapter.to_hf({k: given[k] for k in expected if k in given}, config)


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int, itemsize: int) -> list[list[str]]:
    """Greedy, in model order: a shard is closed when the next tensor would overflow it.
    A tensor larger than ``max_bytes`` gets a shard of its own (as in HF)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [HF_WEIGHTS]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file that transformers, PEFT and other users can read; ``metadata``
    is added to the header (torchao's description of quantized tensors)."""
    # transformers refuses files whose metadata does not say format "pt".
    try:
        save_file(tensors, str(file), metadata={**(metadata or {}), "format": "pt"})
    except SafetensorError as e:  # a full disk ("File too large") or a quota: the file, in one line
        raise CheckpointError(f"{file}: cannot write ({e})") from None
    # safetensors creates files readable by the owner only (0600); give them the
    # umask's permissions, as the folder has, so another user (a serving job) can read them.
    file.chmod(file.parent.stat().st_mode & 0o666)


def _write_index(
    file: Path, tensors: dict[str, torch.Tensor], shards: list[list[str]], names: list[str], itemsize: int
) -> None:
    total = sum(t.numel() for t in tensors.values())
    weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
    _write_json(file, {"metadata": {"total_size": total * itemsize, "total_parameters": total},
                       "weight_map": weight_map})


def _config_dict(config: ModelConfig, dtype: torch.dtype) -> dict:
    d = config.to_hf_dict()
    name = str(dtype).removeprefix("torch.")
    d["torch_dtype"] = name  # read by transformers 4.x
    d["dtype"] = name  # read by transformers 5.x
    return d


def _write_json(file: Path, obj: dict) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

