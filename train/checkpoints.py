"""Checkpoint safety: loads that cannot run code, a 'latest' pointer that never names a partial save.

DeepSpeed 0.19 writes a checkpoint as a folder of torch.save files per tag and loads them with
``torch.load(weights_only=False)``, which unpickles anything, code included. :func:`load_weights_only` makes the
engine load with ``weights_only=True`` instead, allowing only the few plain DeepSpeed classes its checkpoints hold
(loss scaler settings, the ZeRO stage enum, fragment addresses). A file that needs anything else is refused with
a message naming the class; ``--trusted-checkpoint`` loads it the old way.

Saving is two-phase (:class:`Checkpointer`): every rank writes its files under a new tag and fsyncs them, an
all-reduce, then rank 0 replaces ``latest`` with the new tag atomically (:func:`write_atomically`). A crash at any
point of a save leaves ``latest`` naming the previous complete checkpoint. A tag ``latest`` names is never written
again, and the checkpointer remembers the last *good* tag (finite weights, saved outside a run of skipped steps)
for a run that gives up.

The run folder: :func:`claim_run_folder` never lets a run write into another run's folder unless asked
(``--resume`` continues it, ``--overwrite`` replaces it); :func:`check_resume_layout` refuses to resume ZeRO
partitions into another stage or world size; :func:`rewind_metrics` drops the records a crash made us redo.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError, Resolved


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


@dataclass
class Position:
    """Where a run is: what a checkpoint records and ``--resume`` restores."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0  # optimizer steps since the run's start
    samples: int = 0  # training samples seen since the run's start


class Checkpointer:
    """Saves and restores a DeepSpeed engine with the two-phase protocol above; one per rank.

    ``extra_state()`` returns what the workload adds to each checkpoint (e.g. the wandb run id); ``log`` (rank 0's
    RunLog, or None) receives one ``checkpoint`` record per save.
    """

    def __init__(self, engine: Any, out_dir: Path, rank: int, extra_state: Callable[[], dict[str, Any]]):
        self.engine = engine
        self.dir = out_dir / "checkpoints"
        self.rank = rank
        self.extra_state = extra_state
        self.log: Any = None
        self.good_tag: str | None = None  # the last checkpoint with finite weights saved outside a bad-step streak
        self.last_saved = -1  # the step of the last save (never save the same step twice)

    def save(self, pos: Position, steps_per_epoch: int, *, good: bool = True) -> None:
        """Save ``pos`` on every rank; 'latest' moves to the new tag only after every rank has flushed its files.

        ``good``: the step was not in a streak of skipped steps (a candidate for :attr:`good_tag`)."""
        if pos.global_step == self.last_saved:  # on disk already, and 'latest' may name it: never rewrite it
            return
        if pos.step_in_epoch >= steps_per_epoch:  # the epoch is complete: resume at the next one's start
            pos = Position(pos.epoch + 1, 0, pos.global_step, pos.samples)
        tag = f"step{pos.global_step}"
        t_save = time.perf_counter()
        self.engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False,
                                    client_state={**asdict(pos), **self.extra_state()})
        fsync_files(self.dir / tag, [f.name for f in (self.dir / tag).iterdir()
                                     if f"zero_pp_rank_{self.rank}_" in f.name
                                     or (self.rank == 0 and f.name.startswith("mp_rank_"))])  # what this rank wrote
        tensors = [t for t in [*self.engine.module.parameters(), *self.engine.module.buffers()]
                   if t.is_floating_point()]
        finite = torch.stack([t.isfinite().all() for t in tensors]).all().float().view(1)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)  # also: every rank's files are on disk
        if self.rank == 0:
            write_atomically(self.dir / "latest", tag)
        torch.distributed.barrier()
        self.last_saved = pos.global_step
        if good and finite.item() == 1.0:
            self.good_tag = tag
        if self.log:
            self.log.log({"kind": "checkpoint", "step": pos.global_step, "samples": pos.samples, "tag": tag,
                          "seconds": time.perf_counter() - t_save, "finite": finite.item() == 1.0}, to_wandb=False)

    def resume(self) -> tuple[Position, dict[str, Any]]:
        """Load the checkpoint 'latest' names; return its position and everything else it holds."""
        path, client = self.engine.load_checkpoint(str(self.dir))
        if path is None:
            raise SystemExit(f"--resume: no checkpoint in {self.dir} (the run stopped before its first save, or the "
                             f"folder is not a run); pass --overwrite instead of --resume to start this run afresh")
        pos = Position(client["epoch"], client["step_in_epoch"], client["global_step"], client["samples"])
        scheduler = self.engine.lr_scheduler
        if hasattr(scheduler, "last_batch_iteration"):  # re-apply the lr of the restored position
            scheduler.step(scheduler.last_batch_iteration)
        self.good_tag = latest_tag(self.dir)
        self.last_saved = pos.global_step
        return pos, client

    def fall_back_to_good(self) -> str | None:
        """Point 'latest' back at the last good checkpoint (rank 0); return its path, None without one."""
        if self.good_tag is None:
            return None
        if self.rank == 0 and latest_tag(self.dir) != self.good_tag:
            write_atomically(self.dir / "latest", self.good_tag)  # not a checkpoint saved within the streak
        return str(self.dir / self.good_tag)


def claim_run_folder(out_dir: Path, rank: int, *, resume: bool, overwrite: bool) -> None:
    """Rank 0 claims the run folder and every rank learns the answer (a refusal stops them all, with the reason)."""
    refusal = claim_output_dir(out_dir, resume=resume, overwrite=overwrite) if rank == 0 else None
    refused = torch.tensor([1.0 if refusal else 0.0])
    torch.distributed.broadcast(refused, src=0)  # every rank stops, not only rank 0 (alone on a node it would hang)
    if refused.item():
        raise SystemExit(refusal or f"rank 0 cannot use the run folder {out_dir}; its message says why")


def claim_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Never write into another run's folder unless asked (--resume continues it, --overwrite replaces it).

    Returns why the folder cannot be used, or None once it is ready."""
    if out_dir.exists() and not out_dir.is_dir():
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


def check_resume_layout(saved_config: Path, resolved: Resolved) -> None:
    """Refuse to resume a ZeRO checkpoint into another stage or world size (its partitions would not fit)."""
    try:
        before = json.loads(saved_config.read_text())["derived"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return  # no record of the layout; DeepSpeed's own checks apply
    now = {"zero_stage": resolved.zero_stage, "world_size": resolved.world_size}
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) is not None and before.get(k) != v}
    if "world_size" in changed and max(before.get("zero_stage", 0), resolved.zero_stage) == 0:
        del changed["world_size"]  # without ZeRO every rank holds the whole state
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume: the checkpoints in {saved_config.parent} were written with another layout "
                          f"({what}); resume with the config and rank count of the run, or start afresh with "
                          f"--overwrite")


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
