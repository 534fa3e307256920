"""The parts of an entry point's run that do not depend on the workload, shared by train/imagenet.py and
train/bert.py (docs/architecture.md, "Where to add: a workload").

* :func:`resolve_run` and :func:`run_folder`: the config resolved against this device and data, the run folder
  claimed;
* :func:`resume_run`: ``--resume`` (layout check, checkpoint, metrics rewind, the wandb id);
* :func:`start_log`: config.json and the run's records;
* :func:`after_step` and :func:`save_and_exit`: what follows an optimizer step (count, log, per-layer trust ratios
  when due, give up, interval save)
  and an agreed stop signal;
* :func:`end_run`: the summary record and the records closed.

Each takes the entry point's run object (a subclass of :class:`RunParts`, the parts every run holds, to which the
entry point adds its data and model-specific parts), so an entry point's ``train_one_epoch`` keeps forward, loss,
backward and step in view and calls these in one line each.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train import cli, distributed
from train.checkpoints import Checkpointer, Position, check_resume_layout, resume_refusal
from train.config import Resolved, resolve
from train.diagnostics import TrustRatioMonitor
from train.exits import ExitCode
from train.faults import StepGuard, Verdict
from train.precision import device_precisions
from train.run_folder import claim_run_folder, rewind_metrics
from train.tracking import RunLog, StepMeter, git_commit, write_run_config


@dataclass(kw_only=True)
class RunParts:
    """What every training run holds: the engine and the parts that wrap each step (an entry point subclasses it
    with its data)."""

    args: argparse.Namespace
    world: distributed.World
    resolved: Resolved
    engine: Any
    guard: StepGuard
    meter: StepMeter
    checkpointer: Checkpointer
    max_steps: int
    log: RunLog | None = None
    trust_ratios: TrustRatioMonitor | None = None  # --trust-ratio-interval (train/diagnostics.py); None: off
    bar: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records


def resolve_run(args: argparse.Namespace, cfg: dict[str, Any], world: distributed.World, num_train: int,
                probe: Callable[[], float]) -> Resolved:
    """The config resolved for this device (precision by ``probe``, see train/precision.py) and training set;
    its notes printed on rank 0."""
    supported, fast, why = device_precisions(world, cfg, args.precision, probe)
    resolved = resolve(cfg, world_size=world.size, num_train=num_train, epochs=args.epochs,
                       micro_batch=args.micro_batch, precision=args.precision, supported_precisions=supported,
                       fast_precisions=fast, precision_reason=why)
    for note in resolved.notes:
        world.say(note)
    return resolved


def run_folder(args: argparse.Namespace, world: distributed.World) -> tuple[str, Path]:
    """The run's name and folder (``--run-name``/``--output-dir``), claimed for this run on every rank."""
    out_dir = cli.run_dir(args)
    run_name = args.run_name or f"{Path(args.deepspeed_config).stem}-seed{args.seed}"
    claim_run_folder(out_dir, world.rank, resume=args.resume, overwrite=args.overwrite,
                     resume_check=lambda d: resume_refusal(d / "checkpoints"))
    return run_name, out_dir


def resume_run(run: RunParts, out_dir: Path) -> tuple[Position, dict[str, Any]]:
    """``--resume``: load the latest checkpoint; rank 0 rewinds metrics.jsonl to it and keeps its epoch records."""
    check_resume_layout(out_dir / "config.json", run.resolved)
    pos, client = run.checkpointer.resume()
    if run.world.is_main:  # metrics.jsonl keeps what led to the checkpoint and drops what a crash made us redo
        run.history = [r for r in rewind_metrics(out_dir / "metrics.jsonl", pos.global_step) if r["kind"] == "epoch"]
    tag = run.checkpointer.good_tag
    run.world.say(f"resumed from {run.checkpointer.dir / tag if tag else run.checkpointer.dir}: epoch {pos.epoch}, "
                  f"step {pos.global_step}")
    return pos, client


def start_log(args: argparse.Namespace, out_dir: Path, run_name: str, resolved: Resolved, derived: dict[str, Any],
              ds_config: dict[str, Any], wandb_id: str | None, tag: str) -> RunLog:
    """Write config.json and open the run's records (rank 0); ``tag`` names the data (a wandb tag)."""
    summary_cfg = {"run_name": run_name, "group": args.wandb_group, "config_file": str(args.deepspeed_config),
                   "args": vars(args), "derived": derived, "training": resolved.training,
                   "optimizer": resolved.optimizer, "scheduler": resolved.scheduler, "deepspeed": ds_config,
                   "git_commit": git_commit()}
    write_run_config(out_dir, summary_cfg, resumed=args.resume)  # the first start's config.json is kept
    return RunLog(out_dir, use_wandb=not args.no_wandb, project=args.wandb_project, group=args.wandb_group,
                  name=run_name, tags=[f"batch-{resolved.global_batch}", str(resolved.optimizer["type"]).lower(),
                                       tag], config=summary_cfg, resume_id=wandb_id,
                  timeout=min(args.wandb_timeout, args.dist_timeout * 30))  # the others wait in a collective


def after_step(run: RunParts, pos: Position, sampler: Any, verdict: Verdict, lr: float,
               extra: dict[str, Any] | None = None, tokens_per_sample: int = 0) -> None:
    """Count the step; log it when due (always when bad); stop after too many bad steps; interval saves.

    ``extra`` joins the step record; ``tokens_per_sample`` > 0 adds ``tokens_per_sec`` (a language model's rate)."""
    pos.global_step, pos.step_in_epoch, pos.samples = pos.global_step + 1, pos.step_in_epoch + 1, \
        pos.samples + sampler.global_batch
    run.meter.steps += 1
    if run.bar is not None:
        run.bar.update(1)
    if (pos.global_step % run.args.log_interval == 0 or pos.global_step >= run.max_steps or verdict.bad
            or pos.step_in_epoch == sampler.steps_per_epoch or verdict.give_up or verdict.signum):
        rec = run.meter.step_record(step=pos.global_step, epoch=pos.epoch + pos.step_in_epoch / sampler.steps_per_epoch,
                                    samples=pos.samples, lr=lr, batch=sampler.global_batch, engine=run.engine,
                                    **(extra or {}))
        if tokens_per_sample:
            rec["tokens_per_sec"] = rec[run.meter.rate_name] * tokens_per_sample
        if run.log:
            run.log.log(rec)
        if run.bar is not None:
            rate = rec["tokens_per_sec"] if tokens_per_sample else rec[run.meter.rate_name]
            run.bar.set_postfix(loss="nan" if rec["loss"] is None else f"{rec['loss']:.3f}", lr=f"{lr:.4g}",
                                **{"tok_s" if tokens_per_sample else "img_s": f"{rate:.0f}"})
    if run.trust_ratios is not None:
        run.trust_ratios.after_step(pos.global_step, pos.samples, run.log)
    if verdict.give_up:
        message = run.guard.streak.message(pos.global_step, run.checkpointer.fall_back_to_good())
        if run.world.is_main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        torch.distributed.barrier()
        raise SystemExit(ExitCode.BAD_STEPS)
    if run.args.save_interval and pos.global_step % run.args.save_interval == 0 and pos.global_step < run.max_steps:
        run.checkpointer.save(pos, sampler.steps_per_epoch, good=run.guard.streak.length == 0)


def save_and_exit(run: RunParts, pos: Position, sampler: Any, verdict: Verdict) -> None:
    """A stop signal the ranks agreed on: save the last completed step and exit (the scheduler kills soon)."""
    where = "" if verdict.completed else " (the step under way is dropped: --resume redoes it from its start)"
    run.world.say(f"{run.guard.signal_name}: saving a checkpoint at step {pos.global_step} and stopping{where}; "
                  f"--resume continues")
    if not verdict.completed:
        run.guard.restore_buffers()  # BatchNorm statistics as they were after the last completed step
    run.checkpointer.save(pos, sampler.steps_per_epoch, good=run.guard.streak.length == 0)
    raise SystemExit(ExitCode.for_signal(verdict.signum))


def end_run(run: RunParts, out_dir: Path, pos: Position, result: dict[str, Any]) -> dict[str, Any]:
    """The summary record and wandb summary (rank 0), the records closed; every rank waits for rank 0."""
    if run.world.is_main and run.log is not None:
        run.log.log({"kind": "summary", "samples": pos.samples, **result})
        run.log.summary(result)
        run.world.say(f"done: {json.dumps(result)}; run folder {out_dir}")
    torch.distributed.barrier()
    if run.world.is_main and run.log is not None:
        run.log.close()  # after the barrier: a slow wandb server keeps no other rank waiting in a collective
    return result


def step_guard(engine: Any, args: argparse.Namespace, world: distributed.World) -> StepGuard:
    """The run's StepGuard from its flags (--max-skipped-steps, --inject-nan on rank 0)."""
    return StepGuard(engine, max_skipped_steps=args.max_skipped_steps,
                     inject_nan=args.inject_nan if world.is_main else (), signal_group=distributed.signal_group(world))
