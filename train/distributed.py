"""Distributed start-up shared by the entry point and the test workers."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path


def release_cpu_shm_names() -> int:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer name; return how many files were removed.

    On its CPU accelerator, DeepSpeed 0.19 creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    (66 MB per rank) when all ranks run on one machine, maps every rank's buffer, and never unlinks them: each run
    leaves 66 MB per rank in RAM-backed /dev/shm, and a later run on the same port opens the stale buffer with its
    old state. Call on every rank after ``deepspeed.init_distributed`` and a barrier: by then every rank has mapped
    every buffer, so removing the names loses nothing and the memory is freed when the processes end, killed or not.
    """
    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not (addr and port and rank):
        return 0
    path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0


def set_collective_timeout(timeout: timedelta) -> int:
    """Give every process group that exists the run's collective timeout; return how many there are.

    ``deepspeed.init_distributed(timeout=...)`` sets it for the world group only. The groups DeepSpeed creates
    afterwards with ``new_group`` (ZeRO's data-parallel group, which carries the gradient all-reduce) get
    torch's default instead, 30 minutes for gloo and 10 for NCCL, whatever the run asked for. Call after
    ``deepspeed.initialize``.
    """
    import torch.distributed as dist

    c10d = dist.distributed_c10d
    set_timeout = getattr(dist, "set_timeout", None) or c10d._set_pg_timeout  # public from torch 2.12
    groups = list(c10d._world.pg_map)
    for group in groups:
        set_timeout(timeout, group)
    return len(groups)
