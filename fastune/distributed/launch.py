"""Launching a job: the ``torch.distributed.run`` (torchrun) arguments for ``fastune
train --nproc-per-node N``, and running torchrun's agent in this process."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from fastune.distributed.world import DistributedError


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
