"""The run folder: one job per folder, never another run's folder, one folder for every node, small files written
atomically, and metrics rewound to the checkpoint a run resumes from.

:func:`claim_run_folder` locks the folder for one job (:func:`lock_run_folder`), never lets a run write into another
run's folder unless asked (``--resume`` continues it, ``--overwrite`` replaces it, :func:`claim_output_dir`) and
proves that every rank sees the same folder (:func:`check_shared_folder`). :func:`write_atomically` writes a small
file (``latest``, config.json, metrics after a rewind) so that a reader sees the old or the new content, never a
partial one; :func:`rewind_metrics` drops the records a crash made the run redo. Checkpoints themselves are
train/checkpoints.py's.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError
from train.exits import refuse


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one (``bytes``: as they
    are, e.g. a ``torch.save`` into memory)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def claim_run_folder(out_dir: Path, rank: int, *, resume: bool, overwrite: bool,
                     resume_check: Callable[[Path], str | None] | None = None) -> None:
    """Rank 0 locks and claims the run folder and every rank learns the answer (a refusal stops them all, with the
    reason); then every rank proves it sees the same folder (:func:`check_shared_folder`). With ``resume``,
    ``resume_check(out_dir)`` may refuse too (train.checkpoints.resume_refusal: a broken 'latest' is refused
    before anything heavy starts)."""
    refusal = claim_folder(out_dir, resume=resume, overwrite=overwrite, resume_check=resume_check) if rank == 0 \
        else None
    answer = [refusal]
    torch.distributed.broadcast_object_list(answer, src=0)  # every rank stops, not only rank 0
    if answer[0]:
        refuse(answer[0] if rank == 0 else f"rank 0 cannot use the run folder {out_dir}; its message says why")
    check_shared_folder(out_dir, rank)


def claim_folder(out_dir: Path, *, resume: bool, overwrite: bool,
                 resume_check: Callable[[Path], str | None] | None = None) -> str | None:
    """One process's claim of the run folder (rank 0 in :func:`claim_run_folder`; train/downpour.py's coordinator,
    which has no process group): the lock (:func:`lock_run_folder`), the folder (:func:`claim_output_dir`), then
    with ``resume`` ``resume_check(out_dir)``. Returns why the folder cannot be used, or None once it is this run's."""
    refusal = lock_run_folder(out_dir) or claim_output_dir(out_dir, resume=resume, overwrite=overwrite)
    if refusal is None and resume and resume_check is not None:
        refusal = resume_check(out_dir)
    return refusal


_LOCKS: dict[Path, int] = {}  # run folder -> the open lock file, held until the process ends


def lock_run_folder(out_dir: Path) -> str | None:
    """Take an exclusive ``flock`` on ``out_dir/.lock`` for the life of this process (rank 0): a second job on the
    same folder, started at the same moment or later, is refused. flock works on local file systems and on NFS v4
    (and v3 with lockd); the kernel releases the lock when the process ends, killed or not.

    Returns why the folder cannot be used, or None once it is locked."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--output-dir {out_dir} exists and is not a folder; choose another --output-dir"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ".lock"
    if path.resolve() in _LOCKS:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return (f"--output-dir {out_dir} is in use by another job ({holder}; lock {path}); wait for it to end, "
                f"or choose another --output-dir / --run-name")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _LOCKS[path.resolve()] = fd
    return None


def check_shared_folder(out_dir: Path, rank: int) -> None:
    """Every rank must see the run folder rank 0 claimed (ZeRO ranks write their own checkpoint files there and
    --resume reads them back): rank 0 writes a random token into it, every rank reads it after a collective, and
    all stop with a message naming the ranks and hosts that do not see it. Without this, a folder local to each
    node trains unnoticed, and its --resume waits out --dist-timeout."""
    token = [secrets.token_hex(16) if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    probe = out_dir / f".shared-check-{token[0]}"  # a new name: no cached lookup of an older one can answer
    if rank == 0:
        write_atomically(probe, str(token[0]))
    torch.distributed.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    answers: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(answers, (socket.gethostname(), seen))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"{r} ({host})" for r, (host, ok) in enumerate(answers) if not ok]
    if blind:
        raise ConfigError(
            f"--output-dir {out_dir} is not one folder shared by every node: rank(s) {', '.join(blind)} do not see "
            f"the file rank 0 ({answers[0][0]}) wrote there. Every rank writes its checkpoint files into the run "
            f"folder and --resume reads them all back: give --output-dir a path on a file system every node mounts "
            f"(NFS, Lustre, GPFS)")


def claim_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Never write into another run's folder unless asked (--resume continues it, --overwrite replaces it).

    Returns why the folder cannot be used, or None once it is ready."""
    if out_dir.exists() and not out_dir.is_dir():  # also in lock_run_folder (this is also called alone)
        return f"--output-dir {out_dir} exists and is not a folder; choose another --output-dir"
    cfg = out_dir / "config.json"
    if cfg.exists() and not (resume or overwrite):
        return (f"{out_dir} already holds a run ({cfg}); pass --resume to continue it, --overwrite to replace it, "
                f"or choose another --output-dir / --run-name")
    if overwrite and not resume:
        for name in ("metrics.jsonl", "model.pt", "config.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # else --resume could load the old run
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def rewind_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records of steps up to ``step`` (the checkpoint resumed from); return them."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the crash
            continue
        if rec.get("kind") != "summary" and rec.get("step", 0) <= step:
            kept.append(rec)
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept
