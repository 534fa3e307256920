"""Rank 0's life in a Downpour run: the run folder claimed (train/run_folder.py), the shards given the initial model
(or the checkpointed state), the replicas released, then watched (deaths noted, step and epoch records written,
checkpoints saved) until every replica is done or dead, and the run finished; SIGTERM (or SIGINT) saves a
checkpoint and exits 128 + N. A checkpoint is a consistent cut of the shards (train/ps/shard.py: every replica step
it counts is in every shard, no later one), written as checkpoints/step<N>/ps.pt (N: the replicas' steps summed)
and named by checkpoints/latest, both atomically and fsynced (train/run_folder.py's :func:`write_atomically`); the
newest ``--keep-checkpoints`` are kept by the synchronous runs' rule (train/checkpoints.py's :func:`prune_tags`).
"""

from __future__ import annotations

import io
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed import rpc

from train.checkpoints import CheckpointError, prune_tags, resume_tag
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
    stop = catch_stop_signals()
    try:
        if refusal:
            refuse(refusal)
        torch.manual_seed(args.seed)
        model = build_model(setup.cfg["model"], 10, 1, 28)
        state = State(next_log=args.log_interval, next_save=args.save_interval or 0)
        tag = resume_tag(out_dir / "checkpoints", MODEL_FILE) if args.resume else None
        checkpoint = out_dir / "checkpoints" / str(tag) / MODEL_FILE
        saved = load_checkpoint(checkpoint, setup) if tag else None
        start_shards(model, setup, saved)
        wandb_id = None
        if saved:
            c.start_steps, c.steps = list(saved["replica_steps"]), list(saved["replica_steps"])
            state.epochs_logged, wandb_id = saved["epochs_logged"], saved.get("wandb_id")
            state.wall_before, state.taus_all = saved["wall_time"], list(saved["taus"])
            state.dropped, state.last_saved = saved["dropped"], str(tag)
            state.samples_log = state.samples_epoch = c.samples
            state.history = [r for r in rewind_metrics(out_dir / "metrics.jsonl", sum(c.steps))
                             if r["kind"] == "epoch"]
            state.next_log = (sum(c.steps) // args.log_interval + 1) * args.log_interval
            print(f"resumed from {checkpoint}: replica steps {c.steps}, {c.samples:,} samples", flush=True)
        print(describe(setup), flush=True)
        log = records.start_log(setup, out_dir, run_name, wandb_id, tag)
        with c.cond:
            c.ready = True
            c.last_seen = [time.monotonic()] * setup.W  # every replica's heartbeat started before init_rpc returned
            c.cond.notify_all()
        try:
            if watch(c, setup, state, log, model, procs, out_dir, stop):
                name = signal.Signals(stop.signum).name
                print(f"{name}: saving a checkpoint and stopping; --resume continues", flush=True)
                save_checkpoint(c, setup, state, log, out_dir)
                log.close()
                with c.cond:  # the replicas learn it from their next heartbeat and leave quietly
                    c.stopping = True
                    c.cond.wait_for(lambda: all(c.finished(j) or j in c.told_to_stop for j in range(setup.W)),
                                    timeout=2 * args.heartbeat + 1)
                raise SystemExit(ExitCode.for_signal(stop.signum))
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
            c.stopping = True  # and the others, through their heartbeat
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
    """``--resume``: the checkpoint that checkpoints/latest names (step<N>/ps.pt) read back (tensors and plain
    values only, unless --trusted-checkpoint)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=not setup.args.trusted_checkpoint)
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}; start afresh with --overwrite") from None
    if len(saved["shards"]) != setup.S or len(saved["replica_steps"]) != setup.W:
        raise ConfigError(f"--resume: {path} holds {len(saved['shards'])} shards and {len(saved['replica_steps'])} "
                          f"replicas, this run has S = {setup.S}, W = {setup.W}; resume with the run's config")
    return saved


MODEL_FILE = "ps.pt"  # a Downpour checkpoint folder's one file


class StopSignal:
    """SIGTERM or SIGINT (a preempted job) noted for the watch loop, which saves and exits 128 + N."""

    def __init__(self) -> None:
        self.signum, self.event = 0, threading.Event()

    def __call__(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.event.set()


def catch_stop_signals() -> StopSignal:
    stop = StopSignal()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return stop


def consistent_cut(setup: Setup, dead: list[bool]) -> tuple[list[dict[str, Any]], dict[int, int], list[int], int]:
    """Every shard's state at one cut (train/ps/shard.py): pushes held, the cut set at the last step any shard took
    from each replica, every shard brought to it; then the held pushes go on. A replica counted lost (``dead``) may
    have died between its sends to two shards: its cut is the last step every shard took, so the cut does not wait
    for a push that will never come (a shard that took that replica's last push keeps it). (states, the cut, the
    staleness of the pushes taken since the last drain, the pushes dropped since.)"""
    names = [ps.shard_name(i) for i in range(setup.S)]
    try:
        held = [calls.call(n, ps.rpc_hold) for n in names]
        cut = {j: (min if dead[j] else max)(h.get(j, 0) for h in held) for j in set().union(*held)}
        futures = [calls.call_async(n, ps.rpc_cut, cut, calls.timeout() / 2) for n in names]
        answers = [calls.wait(f, n, "a checkpoint's cut") for n, f in zip(names, futures, strict=True)]
    finally:
        failed = None
        for n in names:  # every shard that answers is released, also after one that does not
            try:
                calls.call(n, ps.rpc_release)
            except calls.RpcFailed as e:
                failed = failed or e
        if failed is not None:
            raise failed
    return [a[0] for a in answers], cut, [t for a in answers for t in a[1]], sum(a[2] for a in answers)


def save_checkpoint(c: Coordinator, setup: Setup, state: State, log: Any, out_dir: Path) -> None:
    """The parameter server's state at a consistent cut (every shard's parameters, accumulators, version, the steps
    it holds of each replica) and the replicas' steps at that cut; the staleness and dropped pushes up to it."""
    t0 = time.perf_counter()
    with c.cond:
        dead = list(c.dead)
    shards, cut, taus, dropped = consistent_cut(setup, dead)
    held = time.perf_counter() - t0  # the pushes waited at most this long
    for group in (state.taus_interval, state.taus_epoch, state.taus_all):
        group.extend(taus)
    state.dropped += dropped
    steps = [cut.get(j, 0) for j in range(setup.W)]
    tag = f"step{sum(steps)}"
    folder = out_dir / "checkpoints"
    if state.last_saved == tag:
        return
    (folder / tag).mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"shards": shards, "replica_steps": steps, "epochs_logged": state.epochs_logged,
                "wall_time": state.wall(), "taus": state.taus_all, "dropped": state.dropped,
                "wandb_id": log.wandb_id}, buffer)
    write_atomically(folder / tag / MODEL_FILE, buffer.getvalue())  # a crash leaves the last whole one
    write_atomically(folder / "latest", tag)
    state.last_saved = tag
    removed = prune_tags(folder, setup.args.keep_checkpoints, model_file=MODEL_FILE)
    log.log({"kind": "checkpoint", "step": sum(steps), "tag": tag, "replica_steps": steps,
             "shard_versions": [s["version"] for s in shards], "removed": removed, "cut_seconds": held,
             "seconds": time.perf_counter() - t0}, to_wandb=False)


def watch(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module, procs: dict[int, Any],
          out_dir: Path, stop: StopSignal) -> bool:
    """Until every replica is done or dead (False) or a stop signal came (True): note deaths, write step and epoch
    records, save checkpoints."""
    args, epoch_samples = setup.args, setup.steps_per_epoch * setup.round_batch
    while True:
        with c.cond:
            c.cond.wait(timeout=0.2)
            check_alive(c, setup, procs)
            total, samples, all_done = sum(c.steps), c.samples, all(map(c.finished, range(setup.W)))
        if all_done or stop.event.is_set():
            return not all_done
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
