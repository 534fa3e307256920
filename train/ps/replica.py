"""A Downpour model replica: its whole life (:func:`run_replica`), its training loop (:func:`train_replica`: start a
fetch every n_fetch steps, forward and backward, a local step, push the accrued gradient every n_push steps), Dean
et al.'s client that holds the local copy (:class:`Client`) and its heartbeat.
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
        self.stopping = False  # the coordinator said the run stops: leave quietly

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                answer = calls.call(COORDINATOR, coordinator.coord_heartbeat, self.j)
            except calls.RpcFailed as e:
                self.why = str(e)
                return
            if answer == coordinator.STOP:
                self.stopping, self.why = True, "the coordinator stops the run"
                return
            if answer == coordinator.LOST:
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
        if heartbeat.stopping:  # a signal stopped the run (its checkpoint is saved), or the run failed
            rpc.shutdown(graceful=False)
            return
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


class Client:
    """Dean et al.'s client (the paper's Algorithm 1.1): a local copy of the model that the replica updates with its
    own gradient every step, fetches started every n_fetch steps and pushes every n_push steps, neither awaited
    where it is started.

    The local rule is plain SGD at the shards' lr (``parameters -= lr x gradient``), as the paper's pseudo-code
    writes it, whatever the shards apply: Adagrad's accumulator is the shards' state, shared by every replica and
    changing under each one; a replica's copy of it would drift from it, and a fetch replaces the local parameters
    anyway. A fetch asked for at step t (after this replica's last push) has the next step's compute to arrive; it
    is installed before the next push at the latest (so that it cannot hold that push) as the fetched parameters
    minus lr x the gradient accrued since the last push, exactly the local steps the shards do not hold yet. (In
    the paper the fetch lands whenever it arrives and overwrites them; here the point is fixed, so a run with one
    replica is reproducible, tests/test_downpour.py.) A push has n_push steps to complete before the next one
    waits for it."""

    def __init__(self, model: torch.nn.Module, setup: Setup, j: int, start: int) -> None:
        self.model, self.setup, self.j = model, setup, j
        self.params = list(model.parameters())
        self.lr = float(setup.cfg["lr"])
        self.accrued = torch.zeros(sum(p.numel() for p in self.params))  # the gradient since the last push
        self.pushed = start  # the step of the last push sent (a fetch asks for the parameters after it)
        self.fetching: list[Any] | None = None  # the futures of the fetch under way
        self.pushes: list[tuple[str, Any]] = []  # (shard name, the future of its push under way)
        self.bad = False  # a gradient since the last push was not finite (inf/NaN)

    def start_fetch(self) -> None:
        self.fetching = [calls.call_async(ps.shard_name(i), ps.rpc_fetch, self.j, self.pushed)
                         for i in range(self.setup.S)]

    def install(self) -> None:
        """The fetch under way, if any: waited for, and its parameters, less the local steps not pushed yet, are
        the local copy."""
        if self.fetching is None:
            return
        slices = [calls.wait(f, ps.shard_name(i), "a fetch") for i, f in enumerate(self.fetching)]
        self.fetching = None
        ps.load_slices(self.model, slices)
        if self.accrued.any():
            ps.unflatten_into(ps.flatten(self.params) - self.lr * self.accrued, self.params)

    def local_step(self) -> None:
        """The step's gradient accrued and applied to the local copy (plain SGD at the shards' lr); one that is not
        finite is neither (:attr:`bad`: the push of this interval is dropped)."""
        g = ps.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        self.model.zero_grad(set_to_none=True)
        if not bool(g.isfinite().all()):
            self.bad = True
            return
        self.accrued += g
        ps.unflatten_into(ps.flatten(self.params) - self.lr * g, self.params)

    def push(self, step: int) -> None:
        """Send each shard its slice of the accrued gradient (the steps up to ``step``) and its buffers."""
        self.wait_pushes()
        buffers = dict(self.model.named_buffers())
        for i, ((a, b), names) in enumerate(zip(self.setup.bounds, self.setup.buffer_shards, strict=True)):
            grads = {ps.FLAT: self.accrued[a:b].clone()}  # a clone: RPC would send a view's whole storage
            bufs = {n: buffers[n].detach().clone() for n in names}
            self.pushes.append((ps.shard_name(i), calls.call_async(ps.shard_name(i), ps.rpc_push, self.j, step,
                                                                   grads, bufs)))
        self.accrued.zero_()
        self.pushed = step

    def drop(self) -> None:
        """A push interval with a gradient that was not finite: nothing sent (the shards would drop it); the local
        copy, which holds the interval's finite steps, is refetched."""
        self.accrued.zero_()
        self.bad = False
        self.install()
        self.start_fetch()
        self.install()

    def wait_pushes(self) -> None:
        for to, f in self.pushes:
            calls.wait(f, to, "a push")
        self.pushes = []


def train_replica(j: int, setup: Setup, heartbeat: Heartbeat) -> None:
    cfg, args = setup.cfg, setup.args
    data = load_data(args)
    model = build_model(cfg["model"], 10, 1, 28)
    model.train()
    sampler = GlobalBatchSampler(setup.num_train, setup.round_batch, setup.b, setup.W, j, args.seed)
    start = _poll(heartbeat, COORDINATOR, coordinator.coord_start, j)  # until the shards hold the (resumed) parameters
    if start < 0:  # the coordinator failed before training began; it says why
        return
    if cfg["warmstart_steps"] and j > 0 and start < cfg["warmstart_steps"]:
        _poll(heartbeat, COORDINATOR, coordinator.coord_wait_warmstart)
    client = Client(model, setup, j, start)
    step, report = start, None
    streak, skipped = BadStepStreak(args.max_skipped_steps), 0  # pushes of a non-finite gradient in a row / in all
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples since the last report
    delay = setup.delays.get(j, 0.0)
    for epoch in range(start // setup.steps_per_epoch, int(cfg["epochs"])):
        sampler.set_epoch(epoch, step % setup.steps_per_epoch if epoch == start // setup.steps_per_epoch else 0)
        for x, y in data.train_batches(sampler):
            if step >= setup.total_steps:
                break
            heartbeat.check()
            client.install()  # the fetch started before the last step, if it was not installed at its push
            if step == start or step % cfg["n_fetch"] == 0:
                client.start_fetch()
                if step == start or args.barrier:  # nothing to compute on before the first; lock step
                    client.install()
                if args.barrier:
                    barrier(heartbeat, 2 * step)
            if delay:  # a slow machine: its gradient is computed on parameters that age meanwhile
                time.sleep(delay)
            if j == 0 and step + 1 in args.inject_nan:  # testing aid: replica 0's inputs are NaN in this step
                x = torch.full_like(x, float("nan"))
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            loss.backward()
            step += 1
            if loss.isfinite():
                sums += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
            client.local_step()
            inject_fault(setup, j, step)
            if step % cfg["n_push"] == 0 or step == setup.total_steps:
                bad = client.bad
                if streak.update(step, bad):
                    raise RuntimeError(f"stopping at step {step}: {streak.length} pushes in a row (steps "
                                       f"{streak.first}-{step}, --max-skipped-steps {streak.limit}) had a gradient "
                                       f"that was not finite (inf/NaN) and were dropped")
                skipped += bad
                client.install()  # before the push: the fetch holds exactly the pushes before it
                if bad:
                    client.drop()
                else:
                    client.push(step)
                if args.barrier:
                    client.wait_pushes()
                    barrier(heartbeat, 2 * step + 1)
                if report is not None:
                    calls.wait(report, COORDINATOR, "coord_report")
                report = calls.call_async(COORDINATOR, coordinator.coord_report, j, step, *sums.tolist(), skipped)
                sums.zero_()
    client.install()
    client.wait_pushes()
    if report is not None:
        calls.wait(report, COORDINATOR, "coord_report")
    calls.call(COORDINATOR, coordinator.coord_done, j, step, *sums.tolist(), skipped)


def barrier(heartbeat: Heartbeat, key: int) -> None:
    arrive = True
    while not calls.call(COORDINATOR, coordinator.coord_barrier, key, arrive):
        arrive = False
        heartbeat.check()
