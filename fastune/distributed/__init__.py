"""Multi-process training: FSDP2 under torchrun, with PyTorch's own launcher and collectives.

One concern per module: ``world`` (process group, this rank, collectives),
``fsdp`` (sharding, allocating and loading shards, adapters, gathering the
export), ``loading`` (HF weights into shards), ``resume`` (the DCP resume state),
``saver`` (``CheckpointSaver``), ``launch`` (torchrun). The layers get their
settings as a ``fastune.config.sections.DistributedSection`` and the
``fastune.methods.method.Method``, never the whole config.

``train(cfg)`` is the same function on one process and on N ranks. Launched by
torchrun (``fastune train CONFIG --nproc-per-node N``, which calls
``torch.distributed.run``; or ``torchrun -m fastune.cli train CONFIG``), the
recipe goes through these steps:

1. ``process_group``: joins the job from torchrun's environment (RANK,
   WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). NCCL with one GPU per local rank on
   CUDA, gloo on CPU, and a collective timeout, so a rank left waiting for a
   dead peer fails instead of hanging (torchrun stops the job when a rank dies).
2. ``fastune.methods.build.build_model(..., weights="meta")``: the model and its
   adapters on the meta device, in the training dtype. Nothing is allocated.
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

from fastune.distributed.fsdp import apply_fsdp, gather_full_state_dict, init_adapters, shard_and_load
from fastune.distributed.launch import RankFailed, job_id, launch, torchrun_args
from fastune.distributed.loading import load_hf_weights
from fastune.distributed.resume import (
    DCP_DIR,
    has_resume_state,
    load_full_optimizer_state,
    load_resume_state,
    rng_state_for_rank,
)
from fastune.distributed.saver import CheckpointSaver
from fastune.distributed.world import (
    DistributedError,
    World,
    current_world,
    gather_objects,
    launched_by_torchrun,
    process_group,
    sum_over_ranks,
)

__all__ = [
    "DCP_DIR", "CheckpointSaver", "DistributedError", "RankFailed", "World", "apply_fsdp", "current_world",
    "gather_full_state_dict", "gather_objects", "has_resume_state", "init_adapters", "job_id", "launch",
    "launched_by_torchrun", "load_full_optimizer_state", "load_hf_weights", "load_resume_state",
    "process_group", "rng_state_for_rank", "shard_and_load", "sum_over_ranks", "torchrun_args",
]
