"""A Downpour model replica: its whole life (:func:`run_replica`), its training loop (fetch every n_fetch steps,
forward and backward, push the accumulated gradient every n_push steps, :func:`train_replica`) and its heartbeat.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from torch.distributed import rpc

from train.data import GlobalBatchSampler
from train.faults import BadStepStreak
from train.models import build_model
from train.ps import calls, coordinator
from train.ps import shard as ps
from train.ps.setup import COORDINATOR, Setup, inject_fault, load_data, replica_name


class Heartbeat(threading.Thread):
    """A replica's heartbeat: every --heartbeat s, in every state, it tells the coordinator it lives; it learns when
    the coordinator counts the replica as lost or does not answer (:meth:`check` then raises in the caller)."""

    def __init__(self, j: int, setup: Setup) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{j}")
        self.j, self.every, self.why, self.halt = j, setup.args.heartbeat, "", threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                alive = calls.call(COORDINATOR, coordinator.coord_heartbeat, self.j)
            except calls.RpcFailed as e:
                self.why = str(e)
                return
            if not alive:
                self.why = "the coordinator counts this replica as lost (it heard nothing within --replica-timeout)"
                return

    def check(self) -> None:
        if self.why:
            raise RuntimeError(self.why)


def _poll(heartbeat: Heartbeat, to: str, func: Any, *args: Any) -> Any:
    """Call ``func`` until it answers something other than None (each answer comes within a second or so)."""
    while (answer := calls.call(to, func, *args)) is None:
        heartbeat.check()
    return answer


def run_replica(rank: int, world_size: int, j: int, setup: Setup) -> None:
    """A replica's whole life; an exception is reported to the coordinator (one line) before the process fails."""
    torch.set_num_threads(1)
    calls.set_timeout(setup.args.rpc_timeout)
    rpc.init_rpc(replica_name(j), rank=rank, world_size=world_size, rpc_backend_options=calls.rpc_options(setup))
    heartbeat = Heartbeat(j, setup)
    heartbeat.start()
    try:
        train_replica(j, setup, heartbeat)
    except Exception as e:
        lines = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"
        try:
            rpc.rpc_sync(COORDINATOR, coordinator.coord_failed, args=(j, error), timeout=min(10.0, calls.timeout()))
        except Exception:  # noqa: BLE001, S110 (the coordinator is gone: it learns from the exit code, if at all)
            pass
        rpc.shutdown(graceful=False)
        raise
    heartbeat.halt.set()
    rpc.shutdown(graceful=False)


def train_replica(j: int, setup: Setup, heartbeat: Heartbeat) -> None:
    cfg, args = setup.cfg, setup.args
    data = load_data(args)
    model = build_model(cfg["model"], 10, 1, 28)
    model.train()
    params = list(model.parameters())
    sampler = GlobalBatchSampler(setup.num_train, setup.round_batch, setup.b, setup.W, j, args.seed)
    start = _poll(heartbeat, COORDINATOR, coordinator.coord_start, j)  # until the shards hold the (resumed) parameters
    if start < 0:  # the coordinator failed before training began; it says why
        return
    if cfg["warmstart_steps"] and j > 0 and start < cfg["warmstart_steps"]:
        _poll(heartbeat, COORDINATOR, coordinator.coord_wait_warmstart)
    step, report = start, None
    pushes: list[tuple[str, Any]] = []  # (shard name, its push future)
    streak, skipped = BadStepStreak(args.max_skipped_steps), 0  # pushes of a non-finite gradient in a row / in all
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples since the last report
    delay = setup.delays.get(j, 0.0)
    for epoch in range(start // setup.steps_per_epoch, int(cfg["epochs"])):
        sampler.set_epoch(epoch, step % setup.steps_per_epoch if epoch == start // setup.steps_per_epoch else 0)
        for x, y in data.train_batches(sampler):
            if step >= setup.total_steps:
                break
            heartbeat.check()
            if step == start or step % cfg["n_fetch"] == 0:
                _wait_all(pushes)
                pushes = []
                fetch(model, setup, j)
                if args.barrier:
                    barrier(heartbeat, 2 * step)
            if delay:  # a slow machine: its gradient is computed on parameters that age meanwhile
                time.sleep(delay)
            if j == 0 and step + 1 in args.inject_nan:  # testing aid: replica 0's inputs are NaN in this step
                x = torch.full_like(x, float("nan"))
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()  # gradients add up over the steps between pushes
            step += 1
            if loss.isfinite():
                sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
            inject_fault(setup, j, step)
            if step % cfg["n_push"] == 0 or step == setup.total_steps:
                _wait_all(pushes)
                grads = [p.grad for p in params if p.grad is not None]
                bad = not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())
                if streak.update(step, bad):
                    raise RuntimeError(f"stopping at step {step}: {streak.length} pushes in a row (steps "
                                       f"{streak.first}-{step}, --max-skipped-steps {streak.limit}) had a gradient "
                                       f"that was not finite (inf/NaN) and were dropped")
                skipped += bad
                if bad:  # the shards would drop it too; not sent, and the replica refetches
                    model.zero_grad(set_to_none=True)
                    pushes = []
                    fetch(model, setup, j)
                else:
                    pushes = push(model, params, setup, j)
                if args.barrier:
                    _wait_all(pushes)
                    barrier(heartbeat, 2 * step + 1)
                if report is not None:
                    calls.wait(report, COORDINATOR, "coord_report")
                report = calls.call_async(COORDINATOR, coordinator.coord_report, j, step, *sums.tolist(), skipped)
                sums.zero_()
    _wait_all(pushes)
    if report is not None:
        calls.wait(report, COORDINATOR, "coord_report")
    calls.call(COORDINATOR, coordinator.coord_done, j, step, *sums.tolist(), skipped)


def _wait_all(futures: list[tuple[str, Any]]) -> None:
    for to, f in futures:
        calls.wait(f, to, "a push")


def barrier(heartbeat: Heartbeat, key: int) -> None:
    arrive = True
    while not calls.call(COORDINATOR, coordinator.coord_barrier, key, arrive):
        arrive = False
        heartbeat.check()


def fetch(model: torch.nn.Module, setup: Setup, j: int) -> None:
    """Every shard's slice, fetched in parallel, into the replica's model."""
    futures = [calls.call_async(ps.shard_name(i), ps.rpc_fetch, j) for i in range(setup.S)]
    ps.load_slices(model, [calls.wait(f, ps.shard_name(i), "a fetch") for i, f in enumerate(futures)])


def push(model: torch.nn.Module, params: list[torch.nn.Parameter], setup: Setup, j: int) -> list[tuple[str, Any]]:
    """Send each shard its slice of the accumulated gradient and its buffers; zero the gradients."""
    buffers = dict(model.named_buffers())
    flat = ps.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    futures = []
    for i, ((a, b), names) in enumerate(zip(setup.bounds, setup.buffer_shards, strict=True)):
        grads = {ps.FLAT: flat[a:b].clone()}  # a clone: RPC would send a view's whole storage
        bufs = {n: buffers[n].detach().clone() for n in names}
        futures.append((ps.shard_name(i), calls.call_async(ps.shard_name(i), ps.rpc_push, j, grads, bufs)))
    model.zero_grad(set_to_none=True)
    return futures
