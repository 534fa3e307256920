"""Checkpoint safety: loads that cannot run code, a 'latest' pointer that never names a partial save.

DeepSpeed 0.19 writes a checkpoint as a folder of torch.save files per tag and loads them with
``torch.load(weights_only=False)``, which unpickles anything, code included. :func:`load_weights_only` makes the
engine load with ``weights_only=True`` instead, allowing only the few plain DeepSpeed classes its checkpoints hold
(loss scaler settings, the ZeRO stage enum, fragment addresses). A file that needs anything else is refused with
a message naming the class; ``--trusted-checkpoint`` loads it the old way.

Saving is two-phase (train/imagenet.py): every rank writes its files under a new tag, a barrier, then rank 0
replaces ``latest`` with the new tag atomically (:func:`write_atomically`). A crash at any point of a save leaves
``latest`` naming the previous complete checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely; the message says which file and what to do."""


def safe_globals() -> list[Any]:
    """The classes DeepSpeed's ZeRO-0/1/2, bf16 and fp16 checkpoints contain besides tensors and builtins."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's plain classes allowed; refuse anything else clearly."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:  # truncated or corrupt: torch's zip reader, pickle, the OS
        raise CheckpointError(f"cannot read checkpoint file {path}: {str(e).splitlines()[0]}; the file is truncated "
                              f"or corrupt. Write an earlier tag into checkpoints/latest to resume from it, or start "
                              f"afresh with --overwrite") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        reason = f"it refers to {found.group(1)}" if found else str(e).split("WeightsUnpickler error:")[-1].strip()
        raise CheckpointError(
            f"checkpoint file {path} holds more than tensors and plain DeepSpeed state ({reason.splitlines()[0]}); "
            f"loading it could run arbitrary code. If you wrote it yourself or trust its source, pass "
            f"--trusted-checkpoint") from None


def load_weights_only(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read every file (model, optimizer partitions) through :func:`load_file`."""
    engine.checkpoint_engine.load = load_file


def write_atomically(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_files(tag_dir: Path, names: list[str]) -> None:
    """Flush the named files of a checkpoint to disk (each rank flushes what it wrote, also on shared storage)."""
    for name in names:
        path = tag_dir / name
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag 'latest' names, or None before the first complete checkpoint."""
    try:
        return (ckpt_dir / "latest").read_text().strip() or None
    except FileNotFoundError:
        return None
