"""Run records: metrics.jsonl in the run folder, and wandb on rank 0 (online when logged in, else offline).

Every record goes to both with one step axis, ``samples`` (training samples seen), the axis DeepSpeed's own
monitor uses, so wandb never drops a record as out of order. A wandb failure prints one warning and turns wandb
off for the rest of the run; training never depends on it. A wandb server that does not answer costs at most
``timeout`` seconds at the start (then the run logs offline, for ``wandb sync`` later) and at the end. Nothing
secret (API keys, the environment) is written to the run folder.

:func:`write_run_config` writes config.json once, for the run's first start; every ``--resume`` adds a line to
resumes.jsonl beside it (arguments, host, world size, commit), so the settings a run started with are never lost.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from train.checkpoints import latest_tag
from train.exits import ExitCode
from train.run_folder import write_atomically


def git_commit() -> str | None:
    """The commit of the code being run, with '-dirty' when the tree has changes; None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def wandb_logged_in() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or a netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def write_run_config(out_dir: Path, config: dict[str, Any], *, resumed: bool = False,
                     checkpoint: str | None = None) -> None:
    """config.json for a run's first start (atomically); on a resume that finds one, keep it and append this
    start's record to resumes.jsonl: the checkpoint resumed from (``checkpoint``, else the tag checkpoints/latest
    names), its arguments, host, world size and commit."""
    path = out_dir / "config.json"
    if not resumed or not path.exists():
        write_atomically(path, json.dumps(config, indent=2, default=str) + "\n")
        return
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "checkpoint": checkpoint or latest_tag(out_dir / "checkpoints"),
              "host": socket.gethostname(),
              "world_size": config.get("derived", {}).get("world_size"), "git_commit": config.get("git_commit"),
              "args": config.get("args"), "precision": config.get("derived", {}).get("precision")}
    with open(out_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def error_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """A classifier's figure from its epoch records (Goyal et al.: the median top-1 error of the last 5 epochs), with
    the last record's top-1 and top-5 errors, for the summary record; empty without epoch records."""
    if not history:
        return {}
    return {"final_val_top1_error": history[-1]["val_top1_error"],
            "final_val_top5_error": history[-1]["val_top5_error"],
            "median5_val_top1_error": statistics.median([h["val_top1_error"] for h in history[-5:]])}


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finish_wandb(exit_code: int) -> bool:
    """Finish this process's open wandb run with the process's exit code; return whether one was open.

    :meth:`RunLog.close` finishes a run that ends normally. The other ways out (a signal, too many bad steps, a hung
    rank, a full disk, an exception) leave it open, and :func:`train.distributed.exit_process` skips wandb's atexit
    hook that would finish it: without this call the run's last records are not uploaded and wandb shows it
    crashed. A failure here costs one warning line (metrics.jsonl is complete)."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    try:
        run.finish(exit_code=exit_code)
    except Exception as e:  # noqa: BLE001 (any wandb failure must leave the exit as it is)
        print(f"WARNING: wandb failed to finish ({type(e).__name__}: {e}); metrics.jsonl is complete",
              file=sys.stderr, flush=True)
    return True


class RunLog:
    """Writes records to ``metrics.jsonl`` and to wandb. Create it on rank 0 only."""

    def __init__(self, out_dir: Path, *, use_wandb: bool, project: str, group: str | None, name: str,
                 tags: list[str], config: dict[str, Any], resume_id: str | None = None, timeout: float = 60.0):
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self.wandb = None
        self.wandb_id: str | None = None
        if use_wandb:
            try:
                import wandb

                # wandb checks the mode itself (WANDB_MODE may hold any string): Any, not its Literal
                mode: Any = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
                start: dict[str, Any] = dict(project=project, group=group, name=name, tags=tags, config=config,
                                             dir=str(out_dir), id=resume_id, resume="allow" if resume_id else None)
                settings: dict[str, Any] = dict(console="off", x_disable_stats=True, silent=True, init_timeout=timeout,
                                finish_timeout=timeout)
                try:
                    self.wandb = wandb.init(mode=mode, settings=wandb.Settings(**settings), **start)
                except Exception as e:  # noqa: BLE001 (wandb raises CommError, TimeoutError, UsageError...)
                    if mode != "online":
                        raise
                    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
                    print(f"WARNING: the wandb server {url} did not answer within {timeout:g} s "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); logging offline to "
                          f"{out_dir / 'wandb'} (upload later with `wandb sync`)", file=sys.stderr, flush=True)
                    self.wandb = wandb.init(mode="offline", settings=wandb.Settings(**settings), **start)
                self.wandb_id = self.wandb.id
                wandb.define_metric("samples")
                wandb.define_metric("*", step_metric="samples")
            except Exception as e:  # noqa: BLE001 (any wandb failure must leave training running)
                self._wandb_failed("start", e)

    def _wandb_failed(self, what: str, e: Exception) -> None:
        print(f"WARNING: wandb failed to {what} ({type(e).__name__}: {e}); continuing without wandb "
              f"(metrics.jsonl is still written)", file=sys.stderr, flush=True)
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=ExitCode.BUG)  # the wandb run, not ours, failed
            except Exception:  # noqa: BLE001
                pass
        self.wandb = None

    def log(self, record: dict[str, Any], to_wandb: bool = True, wandb_extra: dict[str, float] | None = None) -> None:
        """Append ``record`` to metrics.jsonl; to wandb its numbers as ``<kind>/<key>``, and ``wandb_extra`` as
        given (e.g. per-layer scalars of a record whose list wandb would not take)."""
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None and to_wandb:
            try:
                prefix = record.get("kind", "step")
                data = {f"{prefix}/{k}": v for k, v in record.items()
                        if k not in ("kind", "samples") and isinstance(v, (int, float)) and v is not None}
                data.update(wandb_extra or {})
                data["samples"] = record["samples"]
                self.wandb.log(data, step=record["samples"])
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("log", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            try:
                for k, v in values.items():
                    self.wandb.summary[k] = _clean(v)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("write the summary", e)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("finish", e)


class StepMeter:
    """Training loss and accuracy of the steps between two records, without a host synchronisation per micro-step.

    Sums stay on the device and are read, all-reduced over ranks (the global batch's loss, not rank 0's share), only
    when a record is written. ``add`` takes the micro-batch's mean loss and its count of correct predictions out of
    ``count`` (images for a classifier, masked tokens for a language model); a non-finite loss is counted apart.
    """

    def __init__(self, device: Any, world_size: int, rate_name: str = "images_per_sec"):
        self.device, self.world_size, self.rate_name = device, world_size, rate_name
        self.start_epoch()

    def start_epoch(self) -> None:
        zeros = torch.zeros(2, device=self.device, dtype=torch.float64)
        self.interval, self.epoch = zeros, zeros.clone()  # [sum of finite losses, their count]
        self.correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self.seen = 0  # samples of this rank this epoch
        self.counted = 0  # what the accuracy counts (samples or tokens) on this rank this epoch
        self.micro = self.steps = 0  # micro-batches and optimizer steps since the last record
        self.t_epoch = self.t_log = time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int, samples: int) -> None:
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self.interval += torch.stack([torch.where(finite, loss, 0.0), finite]).double()
        self.correct += correct
        self.counted += count
        self.seen += samples
        self.micro += 1

    def step_record(self, *, step: int, epoch: float, samples: int, lr: float, batch: int, engine: Any,
                    **extra: Any) -> dict[str, Any]:
        """The ``step`` record of the steps since the last one (one all-reduce)."""
        now = time.perf_counter()
        sums = self.interval.clone()
        torch.distributed.all_reduce(sums)
        loss_sum, finite = sums.tolist()
        rec = {"kind": "step", "step": step, "epoch": epoch, "samples": samples,
               "loss": loss_sum / finite if finite else None, "lr": lr,
               self.rate_name: self.steps * batch / max(now - self.t_log, 1e-9), "global_batch": batch,
               "loss_scale": engine.optimizer.loss_scale if engine.fp16_enabled() else None,
               "skipped_steps": engine.skipped_steps,
               "nonfinite_losses": int(self.micro * self.world_size - finite),  # every rank runs as many micro-batches
               **extra}
        self.epoch += self.interval
        self.interval.zero_()
        self.t_log, self.steps, self.micro = now, 0, 0
        return rec

    def epoch_totals(self, skipped: int = 0) -> dict[str, float]:
        """Loss, error (%) and counts of the whole epoch over all ranks (one all-reduce)."""
        totals = torch.cat([self.epoch + self.interval, self.correct.view(1),
                            torch.tensor([self.counted, self.seen, skipped], dtype=torch.float64,
                                         device=self.device)])
        torch.distributed.all_reduce(totals)
        loss_sum, finite, correct, counted, seen, skipped_all = totals.tolist()
        seconds = time.perf_counter() - self.t_epoch
        return {"train_loss": loss_sum / max(1.0, finite), "train_error": 100 * (1 - correct / max(1.0, counted)),
                "seen": seen, "skipped": skipped_all, "epoch_time": seconds,
                self.rate_name: seen / max(seconds, 1e-9)}


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar of optimizer steps on rank 0 (None elsewhere); sparse updates when stderr is not a terminal."""
    if not enabled:
        return None
    from tqdm import tqdm  # only rank 0 draws

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)
