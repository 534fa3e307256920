"""Distributed start-up shared by the entry points and the test workers: one process or many, CPU or GPU.

:func:`init` is what an entry point calls first: it makes a plain ``python train/x.py`` a world of one, gives a CPU
rank its share of the cores, makes a GPU rank's current device its ``LOCAL_RANK``, starts DeepSpeed's process
group with the run's collective timeout, frees DeepSpeed's CPU shared-memory names, and returns the :class:`World`
(rank, size, printing on rank 0 only).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch


def free_port() -> int:
    """A TCP port free on this host now (the kernel picks it; another process may take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Let plain ``python train/<entry>.py`` run as a world of one (the launcher sets these for its ranks)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))


def launched_world_size() -> int:
    """The number of ranks the launcher started (deepspeed/torchrun: WORLD_SIZE, mpirun: OMPI_COMM_WORLD_SIZE), read
    before the process group exists; 1 for plain ``python``."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


@dataclass
class World:
    """This rank's place in the job."""

    rank: int
    size: int
    device_type: str  # "cpu", "cuda", ...
    timeout: timedelta

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cpu(self) -> bool:
        return self.device_type == "cpu"

    def say(self, *msg: Any) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(*msg, flush=True)


def init(timeout_minutes: float) -> World:
    """Start the process group (DeepSpeed's backend for the accelerator) with the run's collective timeout."""
    single_process_env()
    import deepspeed  # heavy: imported once the command line has been checked
    from deepspeed.accelerator import get_accelerator

    device_type = get_accelerator().device_name()
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the node's cores shared among its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    if device_type != "cpu":
        # Before the first collective: init_distributed binds NCCL to cuda:LOCAL_RANK but leaves the current device
        # at 0 (only deepspeed.initialize sets it), so the run-folder claim's broadcast, barrier and all_gather
        # before build_engine would put every rank's tensors on device 0.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(timeout=timeout)
    world = World(torch.distributed.get_rank(), torch.distributed.get_world_size(), device_type, timeout)
    if world.on_cpu:
        torch.distributed.barrier()  # every rank has mapped every shared-memory buffer
        release_cpu_shm_names()
    return world


def initialized() -> bool:
    """Whether this process has a default process group now."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown() -> bool:
    """Destroy every process group of this rank; return whether there was one to destroy.

    Call when no collective is pending on any rank (a run that finished, or a fault every rank met). A process that
    exits with its gloo group alive leaves the group's C++ worker threads to interpreter finalisation, which
    aborts some exits with "terminate called without an active exception" (SIGABRT, exit -6; pytorch/pytorch issue
    190489); torch's docs ask for ``destroy_process_group()`` at the end of every trainer. The call stops the
    threads only where nothing else holds the group. DeepSpeed does, so an entry point also ends through
    :func:`exit_process`.
    """
    if not initialized():
        return False
    torch.distributed.destroy_process_group()
    return True


def exit_process(code: int | str | None) -> NoReturn:
    """End this process now with ``code`` (as ``sys.exit`` reads it), without interpreter finalisation.

    Call last, once every output is written and closed. :func:`shutdown` is not enough in a DeepSpeed process: its
    engine, ZeRO optimizer, parameters (``_dp_group``) and ``deepspeed.utils.groups`` keep references to the gloo
    groups, so their C++ threads (gloo_tcp_loop, pt_gloo_runloop) are still running after
    ``destroy_process_group()`` and a garbage collection (measured: 2 groups, 6 threads on every rank of a ZeRO-2
    run). During finalisation, a native thread that takes the GIL (to drop a tensor's Python object) is ended by
    CPython (bpo-36427), and its C++ stack reports "terminate called without an active exception": SIGABRT, exit -6,
    for a run that had finished (pytorch/pytorch issue 190489; here about 1 in several hundred rank exits of the
    suite, and two failed CI runs). ``os._exit`` skips finalisation; atexit handlers do not run, so Python's and
    C's stdio and logging are flushed here, and an open wandb run must be finished before
    (:func:`train.tracking.finish_wandb`; :func:`train.cli.entry` does both).
    """
    status = exit_code(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # what native code wrote through C stdio (buffered when piped)
    except (OSError, AttributeError):
        pass
    os._exit(status)


def exit_code(code: int | str | None) -> int:
    """The exit status ``sys.exit(code)`` gives: None 0, an int itself, anything else printed to stderr and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr, flush=True)
    return 1


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
    dist = torch.distributed
    c10d = dist.distributed_c10d
    set_timeout = getattr(dist, "set_timeout", None) or c10d._set_pg_timeout  # public from torch 2.12
    groups = list(c10d._world.pg_map)
    for group in groups:
        set_timeout(timeout, group)
    return len(groups)


def signal_group(world: World) -> Any:
    """The process group for agreeing on stop signals between micro-steps: a CPU all-reduce with no device sync.

    On a CPU job the world group already is one (None); on GPUs a gloo group beside NCCL. Call on every rank."""
    if world.on_cpu or torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo", timeout=world.timeout)
