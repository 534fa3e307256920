"""Checkpoint safety: loads that cannot run code, a 'latest' pointer that never names a partial save.

DeepSpeed 0.19 writes a checkpoint as a folder of torch.save files per tag and loads them with
``torch.load(weights_only=False)``, which unpickles anything, code included. :func:`load_weights_only` makes the
engine load with ``weights_only=True`` instead, allowing only the few plain DeepSpeed classes its checkpoints hold
(loss scaler settings, the ZeRO stage enum, fragment addresses). A file that needs anything else is refused with
a message naming the class; ``--trusted-checkpoint`` loads it the old way.

Saving is two-phase (:class:`Checkpointer`): every rank writes its files under a new tag and fsyncs them, the
ranks exchange how it went, then rank 0 replaces ``latest`` with the new tag atomically (:func:`write_atomically`).
A crash at any point of a save leaves ``latest`` naming the previous complete checkpoint; a rank that cannot write
(a full disk) stops every rank with one message, the partial tag removed and ``latest`` unchanged. A tag ``latest``
names is never written again, and the checkpointer remembers the last *good* tag (finite weights, saved outside a
run of skipped steps) for a run that gives up. After each save only the newest ``keep`` checkpoints stay, besides
the one ``latest`` names and the last good one (:meth:`Checkpointer.prune`).

Resuming: :func:`resume_tag` refuses a ``latest`` that names no checkpoint of the folder (checked before anything
heavy starts, :func:`resume_refusal`); :func:`check_resume_layout` refuses to resume into another precision
and says when ZeRO partitions must be re-sharded for another world size or stage (train/reshard.py). The run
folder's own rules (one job per folder, the shared-folder proof, metrics rewind, atomic small files) are in
train/run_folder.py.
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
from train.exits import ExitCode, refuse
from train.run_folder import write_atomically

DEFAULT_KEEP = 3  # the newest checkpoints kept (--keep-checkpoints); 'latest' and the last good one stay too
TAG = re.compile(r"step(\d+)")  # the tags this project writes
MODEL_FILE = "mp_rank_00_model_states.pt"  # the file DeepSpeed writes in every checkpoint folder


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely; the message says which file and what to do."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint that could not be written (a full disk); every rank raises it, rank 0 with the message."""

    exit_code = ExitCode.SAVE_FAILED


def safe_globals() -> list[Any]:
    """The classes DeepSpeed's ZeRO-0/1/2, bf16 and fp16 checkpoints contain besides tensors and builtins."""
    # Local: deepspeed takes seconds to import, and this module is imported before the command line is checked.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's plain classes allowed; refuse anything else clearly.
    ``mmap``: map the tensors' storage instead of reading it (what is small, e.g. the config, is read at once)."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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


def checkpoint_tags(ckpt_dir: Path, model_file: str = MODEL_FILE) -> list[str]:
    """The checkpoints in ``ckpt_dir`` (folders holding ``model_file``), oldest step first, other names last."""
    found = [d.name for d in ckpt_dir.iterdir() if (d / model_file).is_file()] \
        if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda t: (0, int(m.group(1)), "") if (m := TAG.fullmatch(t)) else (1, 0, t))


def prune_tags(ckpt_dir: Path, keep: int, good_tag: str | None = None, model_file: str = MODEL_FILE) -> list[str]:
    """:meth:`Checkpointer.prune`'s rule for any checkpoint folder (train/ps/run.py's too): the checkpoints beyond the
    newest ``keep`` up to the one 'latest' names are deleted, never that one nor ``good_tag``; tags after 'latest'
    stay; ``keep`` 0 keeps all. Return the tags removed."""
    latest = latest_tag(ckpt_dir)
    match = TAG.fullmatch(latest or "")
    if not keep or match is None:
        return []
    ours = [t for t in checkpoint_tags(ckpt_dir, model_file) if (m := TAG.fullmatch(t)) and int(m.group(1)) <= int(
        match.group(1))]
    removed = [t for t in ours[:-keep] if t not in (latest, good_tag)]
    for tag in removed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return removed


def resume_tag(ckpt_dir: Path, model_file: str = MODEL_FILE) -> str | None:
    """The tag 'latest' names, checked: a plain name of a checkpoint folder inside ``ckpt_dir`` (one that holds
    ``model_file``); None without 'latest'. DeepSpeed joins whatever 'latest' holds to the folder and fails with a
    bare AssertionError."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    if tag in (".", "..") or "/" in tag or "\\" in tag or tag != tag.strip():
        why = "a path, not the name of a checkpoint folder in it (tags are plain names such as step10)"
    elif not (ckpt_dir / tag).is_dir():
        why = "which is not a folder there"
    elif not (ckpt_dir / tag / model_file).is_file():
        why = f"a folder without a model file ({model_file}): not a checkpoint of this run"
    else:
        return tag
    tags = checkpoint_tags(ckpt_dir, model_file)
    raise CheckpointError(
        f"--resume: {ckpt_dir / 'latest'} names {tag!r}, {why}; the checkpoints there: "
        f"{', '.join(tags) if tags else 'none'}. Write one of them into {ckpt_dir / 'latest'}, or start afresh with "
        f"--overwrite")


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

    def __init__(self, engine: Any, out_dir: Path, rank: int, extra_state: Callable[[], dict[str, Any]], *,
                 keep: int = DEFAULT_KEEP):
        self.engine = engine
        self.dir = out_dir / "checkpoints"
        self.rank = rank
        self.extra_state = extra_state
        self.keep = keep  # newest checkpoints kept after each save; 0: all
        self.log: Any = None
        self.good_tag: str | None = None  # the last checkpoint with finite weights saved outside a bad-step streak
        self.last_saved = -1  # the step of the last save (never save the same step twice)

    def save(self, pos: Position, steps_per_epoch: int, *, good: bool = True) -> None:
        """Save ``pos`` on every rank; 'latest' moves to the new tag only after every rank has flushed its files.

        ``good``: the step was not in a streak of skipped steps (a candidate for :attr:`good_tag`). A rank that
        cannot write its files (a full disk, a file-size limit) makes every rank raise :class:`CheckpointSaveError`
        with 'latest' unchanged."""
        if pos.global_step == self.last_saved:  # on disk already, and 'latest' may name it: never rewrite it
            return
        if pos.step_in_epoch >= steps_per_epoch:  # the epoch is complete: resume at the next one's start
            pos = Position(pos.epoch + 1, 0, pos.global_step, pos.samples)
        tag = f"step{pos.global_step}"
        t_save = time.perf_counter()
        error = self._write(tag, pos)
        tensors = [t for t in [*self.engine.module.parameters(), *self.engine.module.buffers()]
                   if t.is_floating_point()]
        finite = bool(torch.stack([t.isfinite().all() for t in tensors]).all())
        outcomes: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(outcomes, (finite, error))  # also: every rank's files are on disk
        failed = {rank: err for rank, (_, err) in enumerate(outcomes) if err}
        if failed:
            self._abandon(tag, failed)
        finite = all(f for f, _ in outcomes)
        if self.rank == 0:
            write_atomically(self.dir / "latest", tag)
        torch.distributed.barrier()
        self.last_saved = pos.global_step
        if good and finite:
            self.good_tag = tag
        removed = self.prune() if self.rank == 0 else []
        if self.log:
            self.log.log({"kind": "checkpoint", "step": pos.global_step, "samples": pos.samples, "tag": tag,
                          "seconds": time.perf_counter() - t_save, "finite": finite, "removed": removed},
                         to_wandb=False)

    def _write(self, tag: str, pos: Position) -> str | None:
        """This rank's files of ``tag``, written and flushed; the error's first line if that failed, else None."""
        try:
            self.engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False,
                                        client_state={**asdict(pos), **self.extra_state()})
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            if isinstance(e, torch.distributed.DistBackendError) or "timeout" in str(e).lower() \
                    or "timed out" in str(e).lower():
                raise  # a collective gave up (cli.run's message), not a write
            torch.distributed.barrier()  # the barrier DeepSpeed's save ends with, which this rank did not reach
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
        try:
            fsync_files(self.dir / tag, [f.name for f in (self.dir / tag).iterdir()
                                         if f"zero_pp_rank_{self.rank}_" in f.name
                                         or (self.rank == 0 and f.name.startswith("mp_rank_"))])  # this rank's
        except OSError as e:  # a full disk may show only when the data reaches it (NFS, fsync)
            return f"{type(e).__name__}: {e}"
        return None

    def _abandon(self, tag: str, failed: dict[int, str]) -> None:
        """Remove the partial ``tag`` (rank 0; it frees the space it took) and stop every rank."""
        if self.rank != 0:
            raise CheckpointSaveError("")
        shutil.rmtree(self.dir / tag, ignore_errors=True)  # 'latest' never names a tag being written
        errors = "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items()))
        previous = latest_tag(self.dir)
        where = (f"'latest' still names {previous}, from which --resume continues" if previous
                 else "no checkpoint was completed before it")
        raise CheckpointSaveError(
            f"checkpoint {tag} could not be written to {self.dir} ({errors}): is the disk full? It was removed; "
            f"{where}. Free space there or keep fewer checkpoints (--keep-checkpoints)")

    def prune(self) -> list[str]:
        """Delete the checkpoints beyond the newest :attr:`keep` up to the one 'latest' names (rank 0, after a save);
        never the one 'latest' names nor the last good one; tags after 'latest' (a run rewound by hand) stay.
        Return the tags removed."""
        return prune_tags(self.dir, self.keep, self.good_tag)

    def resume(self, *, optimizer_states: bool = True) -> tuple[Position, dict[str, Any]]:
        """Load the checkpoint 'latest' names; return its position and everything else it holds.

        ``optimizer_states=False``: the module, schedule, step counters and client state only (DeepSpeed reads them
        on any world size); train/reshard.py then writes the optimizer state into this world's partitions."""
        tag = resume_tag(self.dir)  # a clear message for a 'latest' that names no checkpoint of this folder
        path, client = self.engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=optimizer_states) \
            if tag else (None, None)
        if path is None or client is None:
            refuse(f"--resume: no checkpoint in {self.dir} (the run stopped before its first save, or the "
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


@dataclass(frozen=True)
class Layout:
    """How a run's optimizer state is laid out: ranks, ZeRO stage, precision."""

    world_size: int
    zero_stage: int
    precision: str

    def __str__(self) -> str:
        return f"{self.world_size} rank(s), ZeRO-{self.zero_stage}, {self.precision}"


def config_layout(ds_config: dict[str, Any], world_size: int) -> Layout:
    """The layout of a DeepSpeed config (as saved in every model file) on ``world_size`` ranks."""
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    precision = "bf16" if (ds_config.get("bf16") or {}).get("enabled") else \
        "fp16" if (ds_config.get("fp16") or {}).get("enabled") else "fp32"
    return Layout(world_size, stage, precision)


def saved_layout(ckpt_dir: Path) -> Layout | None:
    """The layout of the checkpoint 'latest' names, as DeepSpeed recorded it in its model file (``ds_config``,
    ``dp_world_size``; read memory-mapped: the weights are not read); None without a checkpoint. A resumed run's
    checkpoints have its own layout, not that of the first start in config.json."""
    tag = resume_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag / MODEL_FILE).is_file():
        return None
    model = load_file(ckpt_dir / tag / MODEL_FILE, map_location="cpu", mmap=True)
    return config_layout(model.get("ds_config") or {}, int(model.get("dp_world_size", 1)))


def check_resume_layout(saved_config: Path, resolved: Resolved) -> tuple[int, int] | None:
    """Refuse to resume any checkpoint into another precision: its optimizer files differ (fp32 ZeRO partitions or
    BF16_Optimizer's fp32 master copies), and a bf16 or fp16 model rounds the fp32 weights it resumes. ``--precision
    auto`` may resolve differently on another machine (train/precision.py measures); the message names the flag that
    resumes as written. Another world size or ZeRO stage is allowed (train/reshard.py re-shards the optimizer state)
    except in fp16, whose loss scaler is not carried yet: return the saved (world size, ZeRO stage) when the
    partitions must be re-sharded, None when DeepSpeed's own load fits. The saved layout is the one the checkpoint
    'latest' names was written in (:func:`saved_layout`; after an elastic resume it differs from config.json's first
    start), config.json's where the checkpoint cannot say (none, or a file the safe loader refuses: the load that
    follows names the file and what to do, and ``--trusted-checkpoint`` still loads it)."""
    try:
        layout = saved_layout(saved_config.parent / "checkpoints")
    except CheckpointError:
        layout = None
    if layout is not None:
        before: dict[str, Any] = asdict(layout)
    else:
        try:
            before = json.loads(saved_config.read_text())["derived"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None  # no record of the layout; DeepSpeed's own checks apply
    now = {"zero_stage": resolved.zero_stage, "world_size": resolved.world_size, "precision": resolved.precision}
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) is not None and before.get(k) != v}
    if "world_size" in changed and max(before.get("zero_stage", 0), resolved.zero_stage) == 0:
        del changed["world_size"]  # without ZeRO every rank holds the whole state
    what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    if "precision" in changed:
        raise ConfigError(f"--resume: the checkpoints in {saved_config.parent} were written in another precision "
                          f"({what}): fp16 and bf16 carry different master and loss-scaler state; resume with "
                          f"--precision {changed['precision'][0]}, or start afresh with --overwrite")
    if changed and resolved.precision == "fp16":
        raise ConfigError(f"--resume: the checkpoints in {saved_config.parent} were written with another layout "
                          f"({what}); re-sharding fp16 checkpoints is not supported yet (the dynamic loss scaler is "
                          f"not carried): resume with the config and rank count of the run, or start afresh with "
                          f"--overwrite")
    if not changed:
        return None
    return int(before.get("world_size", resolved.world_size)), int(before.get("zero_stage", resolved.zero_stage))


def resume_refusal(ckpt_dir: Path) -> str | None:
    """Why ``--resume`` cannot use ``ckpt_dir`` (a broken 'latest', :func:`resume_tag`), or None."""
    try:
        resume_tag(ckpt_dir)
    except CheckpointError as e:
        return str(e)
    return None
