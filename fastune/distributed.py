"""Multi-process training: FSDP2 under torchrun, with PyTorch's own launcher and collectives.

``train(cfg)`` is the same function on one process and on N ranks. Launched by
torchrun (``fastune train CONFIG --nproc-per-node N``, which calls
``torch.distributed.run``; or ``torchrun -m fastune.cli train CONFIG``), the
recipe goes through these steps:

1. ``process_group``: joins the job from torchrun's environment (RANK,
   WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). NCCL with one GPU per local rank on
   CUDA, gloo on CPU, and a collective timeout, so a rank left waiting for a
   dead peer fails instead of hanging (torchrun stops the job when a rank dies).
2. ``build_meta_model``: the model and its adapters on the meta device, in the
   training dtype. Nothing is allocated.
3. (recipe) activation checkpointing, then compile: both wrap each layer's
   ``forward`` and must be in place before the layer is sharded.
4. ``shard_and_load``: ``apply_fsdp`` (``fully_shard`` per decoder layer, then
   the root), then each rank allocates only its shards and reads only its own
   rows of each weight, straight from the HF safetensors files.
5. ``init_adapters``: LoRA A/B drawn in full on every rank, exactly as the
   single-process run draws them (same seed), each rank keeping its shard; DoRA
   magnitudes from the loaded weights.

Weight loading: ``torch.distributed.checkpoint`` with its
``HuggingFaceStorageReader`` (present in torch 2.13). ``dcp.load`` plans which
slice of which tensor each rank needs, and the reader copies exactly those rows
out of the safetensors files (``safe_open(...).get_slice``). No rank ever holds
more than its shards, rank 0 holds no full copy, and nothing crosses the
network. The alternative, ``set_model_state_dict(full_state_dict=True,
broadcast_from_rank0=True)``, needs the full tensors on rank 0 and sends every
byte to every rank. The cost: every node must see the checkpoint folder (a
shared filesystem, or a copy per node). QLoRA is the exception: NF4 quantizes
whole tensors, in blocks that sharding must not split, so each decoder layer is
read whole, quantized and sharded before the next is read (one layer in flight;
FSDP2 shards torchao's ``NF4Tensor`` itself).

Loss normalization (docs/architecture.md): the recipe divides each rank's summed
token loss by the supervised-token count of the whole step, all-reduced over
ranks (``sum_over_ranks``), and FSDP sums gradients instead of averaging them
(``apply_fsdp``). Loss and gradients then equal a single process training on
the same global batch.

Checkpoints (``CheckpointSaver``): the resume state is a DCP checkpoint
(``distributed_checkpoint/`` in the checkpoint folder): the trainable
parameters (all of them for full fine-tuning, the adapters otherwise) and the
optimizer state, each rank writing its shards. DCP reshards on load, so a run
resumes on any number of ranks, or in a single process without torchrun. The
export (HF safetensors, merged for LoRA, and the PEFT adapter) is gathered to
rank 0 and written by the same writers as a single-process run. Everything is
staged in a hidden folder and renamed into place by rank 0 once complete; with
``distributed.async_save`` the DCP files are written in the background and the
rename waits for them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import math
import os
import shutil
import uuid
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastune.checkpoint.layout import DCP_DIR, ResumeError
from fastune.errors import FastuneError
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(FastuneError):
    """A multi-process setting that cannot work; the message names the option or key."""


# ----------------------------------------------------------------------------- process group


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job, and the device it computes (and communicates) on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_ENV)


def _device_for(local_rank: int, device: str) -> torch.device:
    """``device`` is the config's (auto, cpu, cuda): a GPU per local rank on CUDA."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedError("device: cuda asked for, but torch sees no CUDA device; use device=cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(f"--nproc-per-node: local rank {local_rank} has no GPU "
                               f"(this node has {torch.cuda.device_count()})")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800) -> Iterator[Optional[World]]:
    """The job this process belongs to, or None outside torchrun (a single process).

    Joins (and at the end leaves) the default process group: NCCL on CUDA, gloo on
    CPU. A process group that already exists (a caller that set one up) is used as
    it is and left open. ``timeout_s`` bounds every collective: it must exceed the
    longest pause of one rank, which is rank 0 writing the HF export of a checkpoint.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_world(device)
        return
    if not launched_by_torchrun():
        yield None
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    compute = _device_for(local_rank, device)
    if compute.type == "cuda":
        torch.cuda.set_device(compute)
    dist.init_process_group(
        # gloo beside NCCL: with fsdp_cpu_offload the shards, gradient norms and export
        # gathers are CPU tensors, whose collectives NCCL cannot run.
        backend="cpu:gloo,cuda:nccl" if compute.type == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=compute if compute.type == "cuda" else None,
    )
    try:
        yield current_world(device)
    finally:
        dist.destroy_process_group()


def current_world(device: str = "auto") -> Optional[World]:
    """The job of the initialized default process group, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, _device_for(local_rank, device))


def sum_over_ranks(tensor: torch.Tensor, world: Optional[World]) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor on this rank's
    device); ``tensor`` itself without a job. Use float64 for counts, so they stay exact."""
    if world is None:
        return tensor
    total = tensor.to(world.device, copy=True)
    dist.all_reduce(total)
    return total


def gather_objects(obj: Any, world: World) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (small picklable values only)."""
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- model


def build_meta_model(cfg) -> nn.Module:
    """The model of ``cfg.model.checkpoint_dir`` on the meta device, in the training dtype,
    with the adapters of a LoRA method (not quantized yet: QLoRA quantizes while loading)."""
    from fastune.checkpoint.hf import parse_dtype
    from fastune.models.config import ModelConfig
    from fastune.models.spec import get_spec
    from fastune.modules.kernels import apply_kernels
    from fastune.modules.peft import apply_lora

    config = ModelConfig.from_json(cfg.model.checkpoint_dir)
    with torch.device("meta"):
        model = get_spec(config.model_type).build(config).to(parse_dtype(cfg.model.dtype))
    apply_kernels(model, list(cfg.model.kernels))
    if cfg.method != "full":
        lora = cfg.lora
        apply_lora(model, list(lora.targets), lora.rank, lora.alpha, lora.dropout, use_dora=cfg.method == "dora")
    return model


def apply_fsdp(
    model: nn.Module,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    prepare_layer: Optional[Callable[[int, nn.Module], None]] = None,
) -> None:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, final norm,
    ``lm_head``), which stays gathered from forward to backward, as the fused loss reads
    ``lm_head.weight`` outside the model's forward.

    Parameters are stored and computed in ``param_dtype`` (the model's dtype, as in a
    single process); gradients are reduce-scattered in ``reduce_dtype``. Gradients
    are summed over ranks, not averaged: the recipe already divides the loss by the
    token count of the global batch. ``cpu_offload`` keeps sharded parameters,
    gradients and optimizer state in host memory (optimizer steps run on the CPU).
    ``prepare_layer(i, layer)`` runs just before layer ``i`` is sharded (QLoRA loads
    and quantizes it there). Apply after activation checkpointing and compile.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    )
    for i, layer in enumerate(model.layers):
        if prepare_layer is not None:
            prepare_layer(i, layer)
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM: the default pre-multiplied sum is NCCL-only (gloo refuses it).
            module.set_force_sum_reduction_for_comms(True)


def shard_and_load(model: nn.Module, cfg, world: World, weights_dir: Optional[Path]) -> None:
    """Shard the meta model over the ranks (``apply_fsdp``), allocate each rank's shards,
    read the base weights from the HF checkpoint ``weights_dir`` (None: they come from
    the resume state instead) and initialize the adapters."""
    from fastune.checkpoint.hf import parse_dtype

    dist_cfg = cfg.distributed
    dtype = parse_dtype(cfg.model.dtype)
    # With CPU offload FSDP keeps the shards in host memory; they are created there.
    home = torch.device("cpu") if dist_cfg.fsdp_cpu_offload else world.device
    prepare = None
    if cfg.method == "qlora":
        def prepare(index: int, layer: nn.Module) -> None:
            _load_and_quantize_layer(layer, f"layers.{index}.", Path(cfg.model.checkpoint_dir), home,
                                     world.world_size)

    apply_fsdp(model, dtype, parse_dtype(dist_cfg.reduce_dtype), dist_cfg.fsdp_reshard_after_forward,
               dist_cfg.fsdp_cpu_offload, prepare)
    _materialize(model, home)
    model.reset_buffers(world.device)
    if weights_dir is not None:
        load_hf_weights(model, weights_dir)
    init_adapters(model, world.device)


def _materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialized) every parameter and buffer still on the meta device,
    leaving those already loaded (QLoRA's NF4 layers) alone."""
    for m in module.modules():
        tensors = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if any(t.is_meta for t in tensors):
            m.to_empty(device=device, recurse=False)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _dense_base_keys(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """HF key -> tensor for the weights of ``module`` an HF checkpoint holds and that are
    not loaded yet: not adapters, not NF4, and no tied ``lm_head`` (the file has none)."""
    from fastune.checkpoint.hf import to_hf_key
    from fastune.modules.peft import is_lora_key

    tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
    out = {}
    for key, tensor in module.state_dict().items():
        if is_lora_key(key) or (tied and key == "lm_head.weight"):
            continue
        if _is_nf4(_local(tensor)):
            continue
        out[to_hf_key(prefix + key)] = tensor
    return out


def load_hf_weights(module: nn.Module, checkpoint_dir: Path, prefix: str = "", whole: bool = False) -> None:
    """Fill ``module``'s base weights (sharded DTensors or plain tensors) from the HF
    safetensors in ``checkpoint_dir``, converting to their dtype. Each rank reads only its
    shards; ``whole=True`` reads plain (unsharded) tensors on every rank independently.
    ``prefix`` is ``module``'s name in the model (``layers.3.``)."""
    import torch.distributed.checkpoint as dcp

    state = _dense_base_keys(module, prefix)
    reader = dcp.HuggingFaceStorageReader(str(checkpoint_dir))
    _check_against_checkpoint(state, reader, checkpoint_dir)
    _dcp_load(state, storage_reader=reader, no_dist=whole or not dist.is_initialized())


def _dcp_load(state: dict[str, Any], no_dist: bool, **kwargs) -> None:
    """``dcp.load``; without its warning for a single-process load, which here is meant."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, no_dist=no_dist, **kwargs)


def _check_against_checkpoint(state: dict[str, torch.Tensor], reader, checkpoint_dir: Path) -> None:
    """A one-line CheckpointError for a missing key or a wrong shape, before reading data
    (``dcp.load`` would fail later with a long planner message)."""
    from fastune.checkpoint.hf import CheckpointError

    stored = reader.read_metadata().state_dict_metadata
    for key, tensor in state.items():
        if key not in stored:
            raise CheckpointError(f"{checkpoint_dir}: missing key {key!r}")
        if tuple(stored[key].size) != tuple(tensor.shape):
            raise CheckpointError(f"{checkpoint_dir}: key {key!r} has shape {list(stored[key].size)}, "
                                  f"config.json implies {list(tensor.shape)}")


def _load_and_quantize_layer(layer: nn.Module, prefix: str, checkpoint_dir: Path, device: torch.device,
                             world_size: int) -> None:
    """QLoRA: allocate one decoder layer whole, read its weights, quantize its projections
    to NF4; FSDP then shards the NF4 tensors. The adapters are initialized later."""
    from fastune.modules.peft import quantize_base_weights

    layer.to_empty(device=device)
    load_hf_weights(layer, checkpoint_dir, prefix, whole=True)
    quantize_base_weights(layer)
    for name, param in layer.named_parameters():
        if _is_nf4(param):
            _check_nf4_shardable(param, prefix + name, world_size)


def _check_nf4_shardable(weight: torch.Tensor, name: str, world_size: int) -> None:
    """FSDP splits an NF4 weight's packed data, block scales and scale factors along rows
    (torchao asserts on an uneven split): each must divide evenly over the ranks."""
    from fastune.modules.lora import NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE, LoRAError

    group = NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE * world_size
    if weight.numel() % group or weight.shape[0] % world_size:
        raise LoRAError(f"QLoRA on {world_size} ranks: {name} {tuple(weight.shape)} cannot be sharded as NF4; "
                        f"it needs rows divisible by {world_size} and a multiple of {group} elements")


@torch.no_grad()
def init_adapters(model: nn.Module, device: torch.device) -> None:
    """Initialize every LoRA adapter as a single-process run does, at any world size.

    A single process builds each ``LoRALinear`` on a real device, which draws from the
    global RNG three times: the init of ``lora_A`` as an ``nn.Linear``, that of
    ``lora_B``, then ``reset_lora_parameters`` (A kaiming-uniform, B zero). On the
    meta device nothing was drawn, so the same draws are made here, in full, on every
    rank (same seed, same values; an adapter is r x (in + out) numbers), and each rank
    keeps its shard. DoRA magnitudes then come from the loaded base weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from fastune.modules.lora import LoRALinear
    from fastune.modules.peft import init_dora_magnitudes

    full = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        dtype = _local(m.lora_A.weight).dtype
        a = torch.empty(m.rank, m.in_features, device=device, dtype=dtype)
        b = torch.empty(m.out_features, m.rank, device=device, dtype=dtype)
        for t in (a, b, a):  # nn.Linear's init of A, of B, then reset_lora_parameters' A
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        full[f"{name}.lora_A.weight"], full[f"{name}.lora_B.weight"] = a, b.zero_()
    if not full:
        return
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    init_dora_magnitudes(model)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, world: World, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict in rank 0's host memory, gathered one tensor at a
    time; an empty dict on the other ranks. Every rank must call it.

    NF4 weights come back dense: each rank dequantizes its own shard (whole NF4 blocks,
    see ``_check_nf4_shardable``) and the dense rows are gathered. The export needs them
    dense anyway, and torchao's NF4 all-gather outside FSDP's own hooks leaves
    collectives unwaited (torch warns about it).
    """
    trainable = {key for key, p in model.named_parameters() if p.requires_grad}
    gathered: dict[int, Optional[torch.Tensor]] = {}  # tied weights are gathered once
    out = {}
    for key, value in model.state_dict().items():
        if trainable_only and key not in trainable:
            continue
        if id(value) not in gathered:
            gathered[id(value)] = _gather(value, keep=world.is_main)
        if world.is_main:
            out[key] = gathered[id(value)]
    return out


def _gather(value: torch.Tensor, keep: bool) -> Optional[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value.to_local()
        if _is_nf4(local):
            value = DTensor.from_local(local.get_original_weight(), value.device_mesh, value.placements,
                                       shape=value.shape, stride=value.stride())
        value = value.full_tensor()
    return value.cpu() if keep else None


def _is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"  # no torchao import for the check


# ----------------------------------------------------------------------------- checkpoints


def has_resume_state(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DCP_DIR).is_dir()


def _resume_options():
    """Trainable parameters only: frozen weights (the base under LoRA, NF4 included) come
    from the HF checkpoint. ``strict=False`` as the frozen keys are absent; ``dcp.load``
    still fails on a missing trainable key, since it loads exactly the keys asked for."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _resume_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_resume_options())
    return {"model": model_state, "optimizer": optim_state}


def load_resume_state(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> None:
    """Load the trainable parameters and the optimizer state from ``ckpt_dir``'s DCP
    checkpoint, resharded for this run's ranks (or unsharded, in a single process)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from fastune.checkpoint.dcp_safe import dcp_reader_kwargs

    state = _resume_state(model, optimizer)
    path = Path(ckpt_dir) / DCP_DIR
    try:
        _dcp_load(state, no_dist=not dist.is_initialized(), **dcp_reader_kwargs(path))
    except CheckpointException as e:  # a BaseException, holding each failed rank's error
        error = next(iter(e.failures.values()))[0]
        if isinstance(error, FastuneError):  # e.g. an unsafe checkpoint file: its own line
            raise error from None
        raise ResumeError(f"resume_from_checkpoint: {path} does not fit this run: {error}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_resume_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Shard a single-process run's ``optimizer.state_dict()`` into this run's optimizer.

    That state names parameters by their index in its param groups. This run's
    optimizer was built by the same ``build_optimizer`` over the same model, so the
    groups list the same parameters in the same order: the indices map to names, and
    ``set_optimizer_state_dict`` shards each full tensor as its parameter is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    groups, index_to_name = [], {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):
        if len(saved["params"]) != len(group["params"]):
            raise ResumeError(f"resume_from_checkpoint: the optimizer state holds {len(saved['params'])} "
                              f"parameters in a group where this run has {len(group['params'])}")
        names = [name_of[id(p)] for p in group["params"]]
        index_to_name.update(zip(saved["params"], names))
        groups.append({**saved, "params": names})
    full = {"state": {index_to_name[i]: value for i, value in state["state"].items()},
            "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full,
                             options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))


def rng_state_for_rank(training_state: dict[str, Any], world: Optional[World]) -> dict[str, Any]:
    """This rank's RNG state from a checkpoint: its own when the world size is unchanged
    (so dropout continues exactly), rank 0's otherwise."""
    per_rank = training_state.get("rng_by_rank")
    if world is not None and per_rank is not None and len(per_rank) == world.world_size:
        return per_rank[world.rank]
    return training_state["rng"]


@dataclasses.dataclass
class _Pending:
    """A checkpoint whose files are staged; rank 0 renames it into place once DCP is done."""

    future: Optional[Future]
    finish: Callable[[], None]
    finished: bool = False


class CheckpointSaver:
    """Saves checkpoints of a sharded run; ``wait()`` before the process ends.

    Per save, every rank: gathers the export state (the recipe does it), writes its
    DCP shards into a hidden staging folder (in the background with ``async_save``,
    from a CPU copy taken first, on a separate gloo group so its collectives never
    interleave with training's). Rank 0 writes the export into the staging folder
    first and, once the DCP files are complete, hands everything to ``commit`` (the
    training's ``save_checkpoint``: same arguments), which renames the folder into
    place atomically and prunes old checkpoints.
    """

    def __init__(self, world: World, async_save: bool = False, *, commit: Callable[..., Path]):
        self.world = world
        self.async_save = async_save
        self.commit = commit
        self._pending: Optional[_Pending] = None
        self._group = None

    def save(
        self,
        output_dir: Path,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        write_export: Callable[[Path], None],
        training_state: dict[str, Any],
        progress: dict[str, Any],
        keep_last_n: Optional[int],
        on_saved: Callable[[Path], None],
    ) -> Path:
        """Write ``output_dir/name``: ``write_export(folder)`` runs on rank 0 only, into an
        empty folder; ``training_state``, ``progress`` as in a single-process checkpoint
        (``training_state`` without the optimizer, which is in the DCP files).
        ``on_saved(path)`` runs on rank 0 once the checkpoint is in place."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save in flight at a time; DCP staging memory is reused
        output_dir = Path(output_dir)
        staging = output_dir / f".{name}.staging-{self._job_token()}"
        if self.world.is_main:
            staging.mkdir(parents=True)
            write_export(staging)  # before the DCP files: the HF writer replaces the folder wholesale
        dist.barrier()
        state = _resume_state(model, optimizer)
        target = str(staging / DCP_DIR)
        if self.async_save:
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            future = dcp.async_save(state, checkpoint_id=target, process_group=self._group)
        else:
            dcp.save(state, checkpoint_id=target)
            future = None
        frozen = copy.deepcopy(training_state)  # the loop moves on while an async save is in flight

        def finish() -> None:
            if not self.world.is_main:
                return
            path = self.commit(output_dir, name, lambda folder: _move_contents(staging, folder),
                               frozen, progress, keep_last_n)
            shutil.rmtree(staging, ignore_errors=True)
            on_saved(path)

        self._pending = _Pending(future, finish)
        if not self.async_save:
            self.wait()
        return output_dir / name

    def wait(self) -> None:
        """Finish the save in flight, if any (rank 0 renames it into place)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
            # Rank 0's DCP save ends after every rank reported its files written; the
            # barrier also keeps the ranks in step before the next save's collectives.
            dist.barrier(group=self._group)
        if not pending.finished:
            pending.finish()

    def finish_if_done(self) -> None:
        """Rank 0, after each step: put a background save whose files are all written in
        place now, so that a crash before the next save cannot leave it staged where
        resume never looks. ``wait()`` still runs the barrier that keeps ranks in step."""
        pending = self._pending
        if (self.world.is_main and pending is not None and not pending.finished
                and pending.future is not None and pending.future.done()
                and pending.future.exception() is None):
            pending.finished = True
            pending.finish()

    def _job_token(self) -> str:
        """A name all ranks agree on for this save's staging folder."""
        return gather_objects(uuid.uuid4().hex[:8] if self.world.is_main else None, self.world)[0]


def _move_contents(source: Path, dest: Path) -> None:
    for entry in source.iterdir():
        os.replace(entry, dest / entry.name)


# ----------------------------------------------------------------------------- launching


def torchrun_args(
    command: Sequence[str],
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: Optional[int] = None,
    rdzv_endpoint: Optional[str] = None,
    rdzv_id: Optional[str] = None,
) -> list[str]:
    """``torch.distributed.run`` arguments that run ``python -m fastune.cli *command`` on
    ``nproc_per_node`` ranks per node. One node: ``--standalone`` (a free local port).
    Several: c10d rendezvous at ``rdzv_endpoint`` (HOST:PORT of any one node), ``rdzv_id``
    naming the job, the same on every node."""
    if nproc_per_node < 1:
        raise DistributedError(f"--nproc-per-node: must be at least 1, got {nproc_per_node}")
    if nnodes < 1:
        raise DistributedError(f"--nnodes: must be at least 1, got {nnodes}")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise DistributedError(f"--node-rank: must be in [0, {nnodes}), got {node_rank}")
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", "--max-restarts=0"]
    if rdzv_endpoint is None:
        if nnodes > 1:
            raise DistributedError("--rdzv-endpoint: required with --nnodes > 1 (HOST:PORT of one node, "
                                   "the same on every node)")
        args.append("--standalone")
    else:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id or 'fastune'}"]
    if node_rank is not None:
        args.append(f"--node-rank={node_rank}")
    return args + ["--module", "fastune.cli", *command]


def job_id(output_dir: str) -> str:
    """A rendezvous id that every node of one run derives alike (from its output_dir)."""
    return "fastune-" + hashlib.sha1(str(output_dir).encode()).hexdigest()[:12]


class RankFailed(Exception):
    """A rank of a launched job failed or died (not an input error: the CLI exits with 1)."""


def launch(args: list[str]) -> None:
    """Run ``torch.distributed.run`` with ``args`` in this process: torchrun's agent starts
    the ranks and, when one fails or dies, stops the others and returns. Raises
    ``RankFailed`` naming the first failed rank and its exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise RankFailed(f"rank {rank} {how}; the job stopped on all ranks (its error is printed above)") from None
