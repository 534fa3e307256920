"""Rank 0's life in a Downpour run: the run folder claimed (train/run_folder.py), the shards given the initial model
(or the checkpointed state), the replicas released, then watched (deaths noted, step and epoch records written,
checkpoints saved) until every replica is done or dead, and the run finished. The parameter server's checkpoint,
checkpoints/ps.pt, is written atomically and flushed (train/run_folder.py's :func:`write_atomically`).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed import rpc

from train.checkpoints import CheckpointError
from train.config import ConfigError
from train.exits import ExitCode, fail, refuse
from train.models import build_model
from train.ps import calls, coordinator, records
from train.ps import shard as ps
from train.ps.coordinator import Coordinator, ShardPinger
from train.ps.records import State
from train.ps.setup import COORDINATOR, RunFailed, Setup, describe, failure_report, role_of
from train.run_folder import claim_folder, rewind_metrics, write_atomically


def coordinate(setup: Setup, world_size: int, procs: dict[int, Any], run_name: str, out_dir: Path) -> dict[str, Any]:
    """Rank 0: start the shards, release the replicas, record until every replica is done or dead, finish."""
    args = setup.args
    if procs:
        torch.set_num_threads(1)
    refusal = None if procs else claim_folder(out_dir, resume=args.resume, overwrite=args.overwrite)
    calls.set_timeout(args.rpc_timeout)
    c = coordinator.start(setup)
    rpc.init_rpc(COORDINATOR, rank=0, world_size=world_size, rpc_backend_options=calls.rpc_options(setup))
    pinger = ShardPinger(c)
    pinger.start()
    try:
        if refusal:
            refuse(refusal)
        torch.manual_seed(args.seed)
        model = build_model(setup.cfg["model"], 10, 1, 28)
        state = State(next_log=args.log_interval, next_save=args.save_interval or 0)
        checkpoint = out_dir / "checkpoints" / "ps.pt"
        saved = load_checkpoint(checkpoint, setup) if args.resume and checkpoint.exists() else None
        start_shards(model, setup, saved)
        wandb_id = None
        if saved:
            c.start_steps, c.steps = list(saved["replica_steps"]), list(saved["replica_steps"])
            state.epochs_logged, wandb_id = saved["epochs_logged"], saved.get("wandb_id")
            state.wall_before, state.taus_all = saved["wall_time"], list(saved["taus"])
            state.samples_log = state.samples_epoch = c.samples
            state.history = [r for r in rewind_metrics(out_dir / "metrics.jsonl", sum(c.steps))
                             if r["kind"] == "epoch"]
            state.next_log = (sum(c.steps) // args.log_interval + 1) * args.log_interval
            print(f"resumed from {checkpoint}: replica steps {c.steps}, {c.samples:,} samples", flush=True)
        print(describe(setup), flush=True)
        log = records.start_log(setup, out_dir, run_name, wandb_id, checkpoint.name if saved else None)
        with c.cond:
            c.ready = True
            c.last_seen = [time.monotonic()] * setup.W  # every replica's heartbeat started before init_rpc returned
            c.cond.notify_all()
        try:
            watch(c, setup, state, log, model, procs, out_dir)
            records.last_record(c, setup, state, log, model)
            save_checkpoint(c, setup, state, log, out_dir)
            return records.finish(c, setup, state, log, model, out_dir)
        except (RunFailed, calls.RpcFailed) as e:
            log.close()
            with c.cond:
                why = str(e) if isinstance(e, RunFailed) else "\n".join(
                    [f"error: the Downpour run failed: {e}", *(f"error: {k}: {v}" for k, v in c.errors.items())])
            fail(why, ExitCode.ROLE_FAILED)
    finally:
        pinger.halt.set()
        with c.cond:
            c.failed = not c.ready  # replicas still waiting to start are told to go
            c.cond.notify_all()
        for i in range(setup.S):
            try:
                rpc.rpc_sync(ps.shard_name(i), ps.rpc_stop, timeout=10)
            except Exception:  # noqa: BLE001 (a dead shard cannot be stopped)
                pass
        rpc.shutdown(graceful=False)


def start_shards(model: torch.nn.Module, setup: Setup, saved: dict[str, Any] | None) -> None:
    """Give every shard its slice of the initial model (then, on --resume, the checkpointed state)."""
    flat, buffers = ps.flatten(list(model.parameters())), dict(model.named_buffers())
    options = {"optimizer": setup.cfg["optimizer"], "lr": float(setup.cfg["lr"]),
               "initial_accumulator_value": float(setup.cfg["initial_accumulator_value"])}
    for i, ((a, b), names) in enumerate(zip(setup.bounds, setup.buffer_shards, strict=True)):
        calls.call(ps.shard_name(i), ps.rpc_create, i, {ps.FLAT: flat[a:b].clone()},
                   {n: buffers[n].detach() for n in names}, options)
        if saved:
            calls.call(ps.shard_name(i), ps.rpc_load, saved["shards"][i])


def load_checkpoint(path: Path, setup: Setup) -> dict[str, Any]:
    """``--resume``: checkpoints/ps.pt read back (tensors and plain values only, unless --trusted-checkpoint)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=not setup.args.trusted_checkpoint)
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}; start afresh with --overwrite") from None
    if len(saved["shards"]) != setup.S or len(saved["replica_steps"]) != setup.W:
        raise ConfigError(f"--resume: {path} holds {len(saved['shards'])} shards and {len(saved['replica_steps'])} "
                          f"replicas, this run has S = {setup.S}, W = {setup.W}; resume with the run's config")
    return saved


def save_checkpoint(c: Coordinator, setup: Setup, state: State, log: Any, out_dir: Path) -> None:
    """The parameter server's state (every shard's parameters, accumulators, version) and the replicas' steps.

    Taken while the replicas run: a push in flight may be in a shard's state before its replica's report reached
    the coordinator, so a resumed replica may redo a step or two (asynchronous SGD takes that in its stride)."""
    with c.cond:
        steps = list(c.steps)
    shards = [calls.call(ps.shard_name(i), ps.rpc_state) for i in range(setup.S)]
    path = out_dir / "checkpoints" / "ps.pt"
    path.parent.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"shards": shards, "replica_steps": steps, "epochs_logged": state.epochs_logged,
                "wall_time": state.wall(), "taus": state.taus_all, "wandb_id": log.wandb_id}, buffer)
    write_atomically(path, buffer.getvalue())  # ps.pt.tmp, flushed, renamed: a crash leaves the last whole one


def watch(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module, procs: dict[int, Any],
          out_dir: Path) -> None:
    """Until every replica is done or dead: note deaths, write step and epoch records, save checkpoints."""
    args, epoch_samples = setup.args, setup.steps_per_epoch * setup.round_batch
    while True:
        with c.cond:
            c.cond.wait(timeout=0.2)
            check_alive(c, setup, procs)
            total, samples, all_done = sum(c.steps), c.samples, all(map(c.finished, range(setup.W)))
        if all_done:
            return
        if samples >= (state.epochs_logged + 1) * epoch_samples / args.evals_per_epoch:
            records.epoch_record(c, setup, state, log, model)
            save_checkpoint(c, setup, state, log, out_dir)
        elif total >= state.next_log:
            records.step_record(c, setup, state, log)
            state.next_log = (total // args.log_interval + 1) * args.log_interval
        if args.save_interval and total >= state.next_save:
            save_checkpoint(c, setup, state, log, out_dir)
            state.next_save = (total // args.save_interval + 1) * args.save_interval


def check_alive(c: Coordinator, setup: Setup, procs: dict[int, Any]) -> None:
    """A replica process that exited without saying done, or (on other machines) went silent, is dead."""
    for rank, p in procs.items():
        role, index = role_of(rank, setup)
        if p.exitcode is None:
            continue
        how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
        if role == "shard":
            c.errors.setdefault(f"shard {index}", f"its process died ({how})")
        elif not c.finished(index):
            mark_dead(c, index, f"its process died ({how}) after step {c.steps[index]}")
    for j in range(setup.W):  # heartbeats: also where no exit code is visible (other machines, torchrun)
        if not c.finished(j) and time.monotonic() - c.last_seen[j] > setup.args.replica_timeout:
            mark_dead(c, j, f"no heartbeat for --replica-timeout {setup.args.replica_timeout:g} s, after step "
                            f"{c.steps[j]}")
    report = failure_report(c.errors, sum(c.dead), setup.W, setup.max_dead)
    if report:
        raise RunFailed(report)


def mark_dead(c: Coordinator, j: int, why: str) -> None:
    c.dead[j] = True
    c.errors[f"replica {j}"] = why
    print(f"replica {j} is lost: {why}; {sum(c.dead)} of {c.setup.W} lost, --max-dead-replicas "
          f"{c.setup.max_dead}", flush=True)
    c.cond.notify_all()
