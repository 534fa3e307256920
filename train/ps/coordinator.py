"""The coordinator's shared state (:class:`Coordinator`, this module's ``_COORD``: one per coordinator process, read
and written by its RPC threads and its main loop under one lock), its watch on the shards (:class:`ShardPinger`)
and its RPC endpoints, which the replicas call by name (``coord_*``: start, heartbeat, report, done, failed,
warmstart, barrier).
"""

from __future__ import annotations

import threading
import time

from train.ps import calls
from train.ps import shard as ps
from train.ps.setup import Setup

POLL_SECONDS = 1.0  # the longest a coordinator endpoint holds a caller before answering "not yet" (None)


class Coordinator:
    """The coordinator's shared state, read and written by its RPC threads and its main loop under one lock."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cond = threading.Condition()
        self.ready = False
        self.failed = False
        self.stopping = False  # the coordinator is going: replicas stop (a signal, or the run failed)
        self.told_to_stop: set[int] = set()  # replicas whose heartbeat was answered STOP
        self.start_steps = [0] * setup.W
        self.steps = [0] * setup.W  # steps each replica has reported
        self.done = [False] * setup.W
        self.dead = [False] * setup.W
        self.skipped = [0] * setup.W  # pushes each replica left out: a gradient that was not finite
        self.dropped = 0  # pushes the shards dropped: a gradient that was not finite
        self.errors: dict[str, str] = {}  # failed role ("replica 3", "shard 0") -> its error, in order of failure
        self.last_seen = [time.monotonic()] * setup.W
        self.interval = [0.0, 0.0, 0.0]  # loss sum, correct, samples since the last record
        self.epoch_sums = [0.0, 0.0, 0.0]
        self.barriers: dict[int, int] = {}

    @property
    def samples(self) -> int:
        return sum(self.steps) * self.setup.b

    def finished(self, j: int) -> bool:
        return self.done[j] or self.dead[j]


_COORD: Coordinator | None = None


def start(setup: Setup) -> Coordinator:
    """This process is the coordinator: its state, before it joins the RPC world."""
    global _COORD
    _COORD = Coordinator(setup)
    return _COORD


def current() -> Coordinator | None:
    """This process's coordinator state; None before :func:`start` and in every other process."""
    return _COORD


def _coordinator() -> Coordinator:
    """The coordinator process's state (its RPC handlers run only there, after it is set)."""
    if _COORD is None:
        raise RuntimeError("a coordinator RPC reached a process that is not the coordinator")
    return _COORD


class ShardPinger(threading.Thread):
    """The coordinator's watch on the shards: a ping to each every --heartbeat s; a shard that does not answer
    within --rpc-timeout (hung, dead, its machine gone) is a failed role, also where no exit code is visible."""

    def __init__(self, c: Coordinator) -> None:
        super().__init__(daemon=True, name="shard-pinger")
        self.c, self.halt = c, threading.Event()

    def run(self) -> None:
        setup = self.c.setup
        while not self.halt.wait(setup.args.heartbeat):
            futures = [calls.call_async(ps.shard_name(i), ps.rpc_ping) for i in range(setup.S)]
            for i, f in enumerate(futures):
                try:
                    calls.wait(f, ps.shard_name(i), "a ping")
                except calls.RpcFailed as e:
                    if not self.halt.is_set():
                        with self.c.cond:
                            self.c.errors.setdefault(f"shard {i}", str(e))
                            self.c.cond.notify_all()


def coord_start(j: int) -> int | None:
    """Replica -> coordinator: the step to start from once the shards hold the parameters (-1: the run failed);
    None: not yet, ask again."""
    c = _coordinator()
    with c.cond:
        if not c.cond.wait_for(lambda: c.ready or c.failed, timeout=POLL_SECONDS):
            return None
        return -1 if c.failed else c.start_steps[j]


ALIVE, LOST, STOP = 1, 0, -1  # coord_heartbeat's answers


def coord_heartbeat(j: int) -> int:
    """Replica -> coordinator: alive. The answer: ALIVE; LOST once the coordinator counts it lost; STOP when the run
    is stopping (a signal: the checkpoint is saved; or the run failed)."""
    c = _coordinator()
    with c.cond:
        c.last_seen[j] = time.monotonic()
        if c.stopping and not c.dead[j]:
            c.told_to_stop.add(j)
            c.cond.notify_all()
        return LOST if c.dead[j] else STOP if c.stopping else ALIVE


def coord_report(j: int, step: int, loss_sum: float, correct: float, samples: float, skipped: int = 0) -> None:
    c = _coordinator()
    with c.cond:
        c.steps[j] = step
        c.skipped[j] = skipped
        c.last_seen[j] = time.monotonic()
        for k, v in enumerate((loss_sum, correct, samples)):
            c.interval[k] += v
            c.epoch_sums[k] += v
        if j == 0 and c.setup.cfg["warmstart_steps"]:
            c.cond.notify_all()  # replicas waiting for the warmstart (the main loop polls, no need to wake it)


def coord_done(j: int, step: int, loss_sum: float, correct: float, samples: float, skipped: int = 0) -> None:
    coord_report(j, step, loss_sum, correct, samples, skipped)
    c = _coordinator()
    with c.cond:
        c.done[j] = True
        c.cond.notify_all()


def coord_failed(j: int, error: str) -> None:
    """Replica -> coordinator: it failed with this error (its process is about to end)."""
    c = _coordinator()
    with c.cond:
        if not c.finished(j):
            c.dead[j] = True
            c.errors[f"replica {j}"] = f"{error} (after step {c.steps[j]})"
            print(f"replica {j} failed after step {c.steps[j]}: {error}", flush=True)
        c.cond.notify_all()


def coord_wait_warmstart() -> bool | None:
    """Dean et al.'s warmstart: the other replicas start once replica 0 has done ``warmstart_steps`` steps (True);
    None: not yet."""
    c = _coordinator()
    with c.cond:
        return c.cond.wait_for(lambda: c.steps[0] >= c.setup.cfg["warmstart_steps"] or c.finished(0),
                               timeout=POLL_SECONDS) or None


def coord_barrier(key: int, arrive: bool) -> bool:
    """Replica -> coordinator: arrived at barrier ``key`` (first call) / still waiting; True once all live replicas
    have arrived."""
    c = _coordinator()
    with c.cond:
        c.barriers[key] = c.barriers.get(key, 0) + arrive
        c.cond.notify_all()
        return c.cond.wait_for(lambda: c.barriers[key] >= sum(not c.finished(j) for j in range(c.setup.W)),
                               timeout=POLL_SECONDS)
