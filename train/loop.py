"""The parts of an entry point's run that do not depend on the workload, shared by train/imagenet.py and
train/bert.py (docs/architecture.md, "Where to add: a workload"). An entry point's ``main`` reads:

    world = distributed.init(...)                   # then its data (needed for the training-set size)
    run = loop.build_run(ImageRun, args, cfg, world, num_train=..., probe=..., model=..., data=...)
    pos = loop.begin(run, derived, tag, banner)     # --resume, per-layer trust ratios, config.json and records
    loop.train_epochs(run, pos, num_train, train_one_epoch, epoch_record)  # the epoch loop, saves
    return finish(run, pos)                         # the workload's summary and final weights, then end_run

* :func:`build_run`: the config resolved against this device (precision probe) and data, the run folder claimed,
  the engine built; :class:`RunParts` adds the step guard, the step meter and the checkpointer;
* :func:`begin`: ``--resume`` (layout check, checkpoint, metrics rewind, the run's own checkpoint state), the
  trust-ratio monitor, the banner, config.json and the run's records;
* :func:`train_epochs`: the loop over epochs (Smith et al.'s batch increase when the config schedules one);
* :func:`after_step` and :func:`save_and_exit`: what follows an optimizer step (count, log, per-layer trust ratios
  when due, give up, interval save) and an agreed stop signal;
* :func:`end_run`: the summary record and the records closed.

An entry point subclasses :class:`RunParts` with its data and writes ``train_one_epoch`` (forward, loss, backward
and step in view, between :func:`start_epoch` and :func:`end_epoch`, with :func:`end_micro_step` after each
``engine.step()``) and ``epoch_record`` (with its evaluation), which it hands to :func:`train_epochs`, and, where
it keeps more in a checkpoint, ``client_state``/``load_client_state``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from train import cli, distributed, reshard
from train.checkpoints import Checkpointer, Position, check_resume_layout, resume_refusal
from train.config import Resolved, batch_arithmetic, resolve
from train.data import GlobalBatchSampler
from train.diagnostics import TrustRatioMonitor
from train.engine import build_engine
from train.exits import ExitCode
from train.faults import StepGuard, Verdict
from train.precision import device_precisions
from train.run_folder import claim_run_folder, rewind_metrics
from train.tracking import RunLog, StepMeter, git_commit, progress_bar, write_run_config


@dataclass(kw_only=True)
class RunParts:
    """What every training run holds: the engine, its run folder and the parts that wrap each step. An entry point
    subclasses it with its data (its ``train_one_epoch`` and ``epoch_record`` go to :func:`train_epochs`);
    :func:`build_run` makes one."""

    rate_name: ClassVar[str] = "images_per_sec"  # the step meter's throughput name (samples per second)

    args: argparse.Namespace
    world: distributed.World
    resolved: Resolved
    engine: Any
    ds_config: dict[str, Any]
    run_name: str
    out_dir: Path
    max_steps: int
    guard: StepGuard = field(init=False)
    meter: StepMeter = field(init=False)
    checkpointer: Checkpointer = field(init=False)
    log: RunLog | None = None
    trust_ratios: TrustRatioMonitor | None = None  # --trust-ratio-interval (train/diagnostics.py); None: off
    bar: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch records

    def __post_init__(self) -> None:
        self.guard = step_guard(self.engine, self.args, self.world)
        self.meter = StepMeter(self.engine.device, self.world.size, self.rate_name)
        self.checkpointer = Checkpointer(self.engine, self.out_dir, self.world.rank, self.client_state,
                                         keep=self.args.keep_checkpoints)

    def client_state(self) -> dict[str, Any]:
        """What this run adds to every checkpoint (the Checkpointer asks at each save); a subclass extends it."""
        return {"wandb_id": self.log.wandb_id if self.log else None}

    def load_client_state(self, client: dict[str, Any]) -> None:
        """``--resume``: take back what :meth:`client_state` saved (the wandb id is :func:`begin`'s)."""


R = TypeVar("R", bound=RunParts)


def build_run(run_cls: type[R], args: argparse.Namespace, cfg: dict[str, Any], world: distributed.World, *,
              num_train: int, probe: Callable[[int], float], model: Callable[[Resolved], torch.nn.Module],
              folder: tuple[str, Path] | None = None, steps: int | None = None, **fields: Any) -> R:
    """The config resolved (:func:`resolve_run`), the run folder claimed (:func:`run_folder`, unless the entry point
    claimed it earlier and passes ``folder``), the seed set, ``model(resolved)`` built into a DeepSpeed engine, and
    the run made with the entry point's ``fields``. ``steps``: the run's length when the recipe gives it in steps
    (else the config's epochs); ``--max-steps`` caps either."""
    resolved = resolve_run(args, cfg, world, num_train, probe)
    run_name, out_dir = folder or run_folder(args, world)
    torch.manual_seed(args.seed)
    engine, ds_config = build_engine(resolved, model(resolved), timeout=world.timeout,
                                     trusted_checkpoint=args.trusted_checkpoint, say=world.say)
    return run_cls(args=args, world=world, resolved=resolved, engine=engine, ds_config=ds_config, run_name=run_name,
                   out_dir=out_dir, max_steps=args.max_steps or steps or resolved.total_steps, **fields)


def begin(run: RunParts, derived: dict[str, Any], tag: str, banner: Callable[[], str]) -> Position:
    """Where the run starts: ``--resume`` from its latest checkpoint (:func:`resume_run`, then the run's own
    :meth:`RunParts.load_client_state`), else step 0; the trust-ratio monitor; on rank 0 ``banner()`` printed,
    config.json written (``derived`` beside the config) and the records opened (``tag``: the data's wandb tag)."""
    pos, wandb_id = Position(), None
    if run.args.resume:
        pos, client = resume_run(run)
        wandb_id = client.get("wandb_id")
        run.load_client_state(client)
    run.trust_ratios = TrustRatioMonitor.create(run.engine, run.args.trust_ratio_interval, pos.global_step + 1)
    if run.world.is_main:
        run.world.say(banner())
        run.log = start_log(run.args, run.out_dir, run.run_name, run.resolved, derived, run.ds_config, wandb_id, tag)
        run.checkpointer.log = run.log
    return pos


def train_epochs(run: R, pos: Position, num_train: int, train_one_epoch: Callable[[R, Any, Position], float],
                 epoch_record: Callable[[R, Position, Any, float], Any]) -> None:
    """The loop over epochs from ``pos``: each epoch trained (``train_one_epoch(run, sampler, pos)`` returns the lr
    of its last step), recorded (``epoch_record(run, pos, sampler, lr)``, with the evaluation) and saved, until
    the config's epochs or ``run.max_steps``. Where the config schedules a larger batch for an epoch (Smith et al.
    2018, instead of a smaller lr), the engine accumulates more micro-steps and a sampler for the new batch takes
    over."""
    r, world = run.resolved, run.world
    sampler = GlobalBatchSampler(num_train, r.global_batch, r.micro_batch, world.size, world.rank, run.args.seed)
    for epoch in range(pos.epoch, r.epochs):
        if pos.global_step >= run.max_steps:
            break
        if r.batch_at(epoch) != sampler.global_batch:
            run.engine.set_train_batch_size(r.batch_at(epoch))
            sampler = GlobalBatchSampler(num_train, r.batch_at(epoch), r.micro_batch, world.size, world.rank,
                                         run.args.seed)
            world.say(f"epoch {epoch + 1}: global batch {sampler.global_batch:,} "
                      f"({run.engine.gradient_accumulation_steps()} accumulation steps), "
                      f"{sampler.steps_per_epoch} steps/epoch")
        sampler.set_epoch(epoch, pos.step_in_epoch if epoch == pos.epoch else 0)
        pos.epoch, pos.step_in_epoch = epoch, sampler.start_step
        lr = train_one_epoch(run, sampler, pos)
        epoch_record(run, pos, sampler, lr)
        run.checkpointer.save(pos, sampler.steps_per_epoch, good=run.guard.streak.length == 0)


def resolve_run(args: argparse.Namespace, cfg: dict[str, Any], world: distributed.World, num_train: int,
                probe: Callable[[int], float]) -> Resolved:
    """The config resolved for this device and training set; its notes printed on rank 0. ``probe(micro_batch)``
    times bf16 against fp32 on the workload's model at the run's micro batch (train/precision.py: called only
    where the choice needs it, i.e. ``auto`` precision on a CPU with native bf16)."""
    def probe_at_micro_batch() -> float:  # the batch arithmetic only when probed: resolve() explains bad input
        return probe(batch_arithmetic(cfg.get("train_batch_size"), args.micro_batch or cfg.get(
            "train_micro_batch_size_per_gpu"), None if args.micro_batch else cfg.get("gradient_accumulation_steps"),
            world.size)[1])

    supported, fast, why = device_precisions(world, cfg, args.precision, probe_at_micro_batch)
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


def resume_run(run: RunParts) -> tuple[Position, dict[str, Any]]:
    """``--resume``: load the latest checkpoint (re-sharded by train/reshard.py when the world size or ZeRO stage
    changed); rank 0 rewinds metrics.jsonl to it and keeps its epoch records."""
    out_dir, r = run.out_dir, run.resolved
    saved = check_resume_layout(out_dir / "config.json", r)
    if saved is None:
        pos, client = run.checkpointer.resume()
    else:  # another world size or ZeRO stage: the same global batch, the accumulation re-derived
        run.world.say(f"elastic resume: {saved[0]} rank(s), ZeRO-{saved[1]} -> {r.world_size} rank(s), ZeRO-"
                      f"{r.zero_stage}; global batch {r.global_batch:,} = {r.micro_batch} micro x {r.grad_accum} "
                      f"accumulation x {r.world_size} ranks")
        pos, client = reshard.resume_resharded(run.checkpointer, run.engine, run.world.say)
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


def start_epoch(run: RunParts, sampler: Any, pos: Position) -> float:
    """Before an epoch's first micro-step: the meter's epoch totals cleared, the progress bar (rank 0); returns the
    lr the next step runs at."""
    run.meter.start_epoch()
    run.bar = progress_bar(run.world.is_main, sampler.steps_per_epoch, sampler.start_step,
                           f"epoch {pos.epoch + 1}/{run.resolved.epochs}")
    return run.engine.get_lr()[0]


def end_micro_step(run: RunParts, pos: Position, sampler: Any, loss: torch.Tensor, boundary: bool, lr: float,
                   extra: dict[str, Any] | None = None, tokens_per_sample: int = 0) -> bool:
    """After ``engine.step()``: the step guard's verdict on the micro-step; a completed optimizer step counted
    (:func:`after_step`, which takes ``extra`` and ``tokens_per_sample``), an agreed stop signal acted on
    (:func:`save_and_exit`). True when the run has reached ``max_steps``: the epoch ends there."""
    verdict = run.guard.after_micro(loss, boundary, pos.global_step)
    if verdict.completed:
        after_step(run, pos, sampler, verdict, lr, extra, tokens_per_sample)
    if verdict.signum:
        save_and_exit(run, pos, sampler, verdict)
    return verdict.completed and pos.global_step >= run.max_steps


def end_epoch(run: RunParts) -> None:
    """After an epoch's last micro-step: the progress bar closed."""
    if run.bar is not None:
        run.bar.close()
        run.bar = None


def save_and_exit(run: RunParts, pos: Position, sampler: Any, verdict: Verdict) -> None:
    """A stop signal the ranks agreed on: save the last completed step and exit (the scheduler kills soon)."""
    where = "" if verdict.completed else " (the step under way is dropped: --resume redoes it from its start)"
    run.world.say(f"{run.guard.signal_name}: saving a checkpoint at step {pos.global_step} and stopping{where}; "
                  f"--resume continues")
    if not verdict.completed:
        run.guard.restore_buffers()  # BatchNorm statistics as they were after the last completed step
    run.checkpointer.save(pos, sampler.steps_per_epoch, good=run.guard.streak.length == 0)
    raise SystemExit(ExitCode.for_signal(verdict.signum))


def end_run(run: RunParts, pos: Position, result: dict[str, Any]) -> dict[str, Any]:
    """The summary record and wandb summary (rank 0), the records closed; every rank waits for rank 0."""
    if run.world.is_main and run.log is not None:
        run.log.log({"kind": "summary", "samples": pos.samples, **result})
        run.log.summary(result)
        run.world.say(f"done: {json.dumps(result)}; run folder {run.out_dir}")
    torch.distributed.barrier()
    if run.world.is_main and run.log is not None:
        run.log.close()  # after the barrier: a slow wandb server keeps no other rank waiting in a collective
    return result


def step_guard(engine: Any, args: argparse.Namespace, world: distributed.World) -> StepGuard:
    """The run's StepGuard from its flags (--max-skipped-steps, --inject-nan on rank 0)."""
    return StepGuard(engine, max_skipped_steps=args.max_skipped_steps,
                     inject_nan=args.inject_nan if world.is_main else (), signal_group=distributed.signal_group(world))
