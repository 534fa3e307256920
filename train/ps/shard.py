"""The parameter server of Downpour SGD: S shards, each an RPC worker holding a slice of the model and its optimizer.

Dean et al. 2012, "Large Scale Distributed Deep Networks" (NeurIPS), sec. 4.1: "the model parameters are sharded
across [...] parameter server shards"; each model replica "asynchronously fetches [...] parameters" and "pushes
[its] gradient to the parameter server", and each shard "applies updates to its subset of the parameters"
independently. Adagrad (Duchi et al. 2011) is applied at the shards, per parameter:

    G <- G + g * g                 (G starts at ``initial_accumulator_value``)
    p <- p - lr * g / (sqrt(G) + eps)

exactly as ``torch.optim.Adagrad`` (lr_decay 0, weight_decay 0, its default eps 1e-10) does it; plain SGD
(``p <- p - lr * g``) is offered to show why Dean et al. chose Adagrad. Each shard applies one push at a time under
its own lock, so a push is never half-applied; shards do not wait for each other.

Staleness is measured, not assumed: a shard counts the updates it has applied (its ``version``) and remembers the
version each replica last fetched; a push reports ``tau = version - version at that replica's last fetch`` before
it is applied. With one replica that fetches after every push, tau is always 0.

Each push carries the replica's step count (the last step whose gradient it holds) and the shard keeps, per
replica, the step of the last push it took (``applied``, also for a push it dropped). Two things rest on it:
a fetch "after step s" is answered once this replica's pushes up to step s are in (the replica sends its push and
asks for the parameters without waiting in between, and still reads its own writes), and the coordinator's
consistent cut (:meth:`ParameterShard.hold`, :meth:`cut`, :meth:`release`): pushes are held, the cut is the
largest step any shard took from each replica, every shard takes the pushes up to it (in flight: a replica sends
one push to every shard at once) and none beyond, its state is copied, then the held pushes go on. Every step
counted in the checkpoint is then in every shard, and no later one.

BatchNorm statistics (buffers) are not gradients: a push carries the replica's current buffers and the shard keeps
the latest ones (the last replica to push wins); the parameters are the only thing the optimizer updates.

This module imports only torch: a shard process never loads the data or torchvision.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

SHARD_OPTIMIZERS = ("adagrad", "sgd")


def shard_name(i: int) -> str:
    return f"ps{i}"


FLAT = "flat"  # a shard's one parameter tensor: its slice of the model's parameters, flattened


def partition(num_params: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous slices [a, b) of the model's parameters flattened in ``named_parameters`` order (tensors
    cut where a boundary falls), of sizes that differ by at most one. The caller checks ``shards <= num_params``."""
    return [(i * num_params // shards, (i + 1) * num_params // shards) for i in range(shards)]


def assign_buffers(buffer_names: list[str], shards: int) -> list[list[str]]:
    """Buffers (BatchNorm statistics: not optimized) go whole to the shards, round robin."""
    return [buffer_names[i::shards] for i in range(shards)]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copy a flat vector back into the tensors it was made from (the inverse of :func:`flatten`)."""
    start = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()


def load_slices(model: torch.nn.Module, shards: list[dict[str, torch.Tensor]]) -> None:
    """Every shard's slice (and buffers), as :meth:`ParameterShard.fetch` gives them, into the model (a replica's
    fetch, the coordinator's model for evaluation)."""
    unflatten_into(torch.cat([s.pop(FLAT) for s in shards]), list(model.parameters()))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for s in shards:
            for name, b in s.items():
                buffers[name].copy_(b)


def adagrad_update(p: torch.Tensor, g: torch.Tensor, state_sum: torch.Tensor, lr: float, eps: float) -> None:
    """One Adagrad step on one tensor, in place (the formula of the module docstring)."""
    state_sum.addcmul_(g, g, value=1.0)
    p.addcdiv_(g, state_sum.sqrt().add_(eps), value=-lr)


class ParameterShard:
    """One shard: its parameters, their optimizer state, the version counter and the staleness record."""

    def __init__(self, index: int, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], *,
                 optimizer: str, lr: float, initial_accumulator_value: float = 0.0, eps: float = 1e-10):
        if optimizer not in SHARD_OPTIMIZERS:
            raise ValueError(f"shard optimizer {optimizer!r} unknown; known: {', '.join(SHARD_OPTIMIZERS)}")
        self.index = index
        self.params = {k: v.detach().clone().float() for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.optimizer, self.lr, self.eps = optimizer, float(lr), float(eps)
        self.state_sum = {k: torch.full_like(v, float(initial_accumulator_value)) for k, v in self.params.items()}
        self.version = 0  # updates applied
        self.fetched: dict[int, int] = {}  # replica -> version at its last fetch
        self.applied: dict[int, int] = {}  # replica -> the step of its last push taken (applied or dropped)
        self.limit: dict[int, int] | None = None  # while a cut is taken: replica -> the last step a push may have
        self.taus: list[int] = []  # staleness of the pushes since the coordinator last drained them
        self.dropped = 0  # pushes not applied because a gradient was not finite (inf/NaN), since the last drain
        self.lock = threading.Condition()

    def fetch(self, replica: int, after: int = 0, timeout: float = 600.0) -> dict[str, torch.Tensor]:
        """The shard's parameters and buffers (copies, taken under the lock) once it holds this replica's pushes up
        to its step ``after``; remembers the version fetched."""
        with self.lock:
            if not self.lock.wait_for(lambda: self.applied.get(replica, 0) >= after, timeout=timeout):
                raise RuntimeError(f"shard {self.index}: replica {replica}'s push of step {after} did not arrive "
                                   f"within {timeout:g} s (it has step {self.applied.get(replica, 0)})")
            self.fetched[replica] = self.version
            return {k: v.clone() for k, v in (self.params | self.buffers).items()}

    def push(self, replica: int, grads: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             step: int = 0, timeout: float = 600.0) -> int | None:
        """Apply one replica's gradient, which holds its steps up to ``step``; return its staleness tau (updates
        applied since that replica fetched). A gradient that is not finite is dropped (None) and counted: one NaN
        would poison Adagrad's sum forever. While a cut is taken, a push beyond it waits."""
        finite = all(bool(g.isfinite().all()) for g in grads.values())
        with self.lock:
            if not self.lock.wait_for(lambda: self.limit is None or step <= self.limit.get(replica, -1),
                                      timeout=timeout):
                raise RuntimeError(f"shard {self.index}: a push waited {timeout:g} s for a checkpoint's cut")
            self.applied[replica] = max(step, self.applied.get(replica, 0))
            self.lock.notify_all()  # a fetch waiting for this push, a cut waiting for it
            if not finite:
                self.dropped += 1
                return None
            tau = self.version - self.fetched.get(replica, 0)
            for name, g in grads.items():
                p = self.params[name]
                if self.optimizer == "adagrad":
                    adagrad_update(p, g, self.state_sum[name], self.lr, self.eps)
                else:
                    p.add_(g, alpha=-self.lr)
            for name, b in buffers.items():
                self.buffers[name].copy_(b)
            self.version += 1
            self.taus.append(tau)
            return tau

    def drain_taus(self) -> tuple[int, list[int], int]:
        """(version, staleness of the pushes applied, pushes dropped) since the last drain."""
        with self.lock:
            taus, self.taus, dropped, self.dropped = self.taus, [], self.dropped, 0
            return self.version, taus, dropped

    def hold(self) -> dict[int, int]:
        """A cut begins: every push from now on waits; the step of each replica's last push taken."""
        with self.lock:
            self.limit = {}
            return dict(self.applied)

    def cut(self, steps: dict[int, int], timeout: float) -> tuple[dict[str, Any], list[int], int]:
        """Take each replica's pushes up to ``steps[replica]`` (no later ones), then: (the state, and the staleness
        and dropped pushes since the last drain, :meth:`drain_taus`), all of them at the cut."""
        with self.lock:
            self.limit = dict(steps)
            self.lock.notify_all()
            if not self.lock.wait_for(lambda: all(self.applied.get(j, 0) >= s for j, s in steps.items()),
                                      timeout=timeout):
                missing = {j: s for j, s in steps.items() if self.applied.get(j, 0) < s}
                raise RuntimeError(f"shard {self.index}: the pushes of replica steps {missing} did not arrive within "
                                   f"{timeout:g} s (a replica died while pushing?); no consistent checkpoint")
            _, taus, dropped = self.drain_taus()
            return self.state_dict(), taus, dropped

    def release(self) -> None:
        """The cut is taken: held pushes go on."""
        with self.lock:
            self.limit = None
            self.lock.notify_all()

    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"index": self.index, "params": {k: v.clone() for k, v in self.params.items()},
                    "buffers": {k: v.clone() for k, v in self.buffers.items()},
                    "state_sum": {k: v.clone() for k, v in self.state_sum.items()}, "version": self.version,
                    "applied": dict(self.applied), "optimizer": self.optimizer, "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self.lock:
            if set(state["params"]) != set(self.params) or set(state["buffers"]) != set(self.buffers):
                raise ValueError(f"shard {self.index}: the checkpoint holds tensors {sorted(state['params'])}, "
                                 f"this shard {sorted(self.params)}; resume with the run's model and shard count")
            for group in ("params", "buffers", "state_sum"):
                for k, v in state[group].items():
                    getattr(self, group)[k].copy_(v)
            self.version = int(state["version"])
            self.applied = {int(j): int(s) for j, s in state["applied"].items()}
            self.fetched = {}


# ---------------------------------------------------------------------------------------------------------------
# The shard process: its RPC endpoints (called by name from the replicas and the coordinator) and its main


_SHARD: ParameterShard | None = None
_STOP = threading.Event()
_READY = threading.Event()
_LAST_PING = [time.monotonic()]  # when the coordinator last pinged this shard


def _shard() -> ParameterShard:
    if not _READY.wait(timeout=600):
        raise RuntimeError("the parameter-server shard was never given its parameters by the coordinator")
    assert _SHARD is not None
    return _SHARD


def rpc_create(index: int, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               options: dict[str, Any]) -> int:
    """Coordinator -> shard: hold these tensors (the initial model's slice)."""
    global _SHARD
    _SHARD = ParameterShard(index, params, buffers, **options)
    _READY.set()
    return sum(v.numel() for v in params.values())


def rpc_fetch(replica: int, after: int) -> dict[str, torch.Tensor]:
    return _shard().fetch(replica, after)


def rpc_push(replica: int, step: int, grads: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> int | None:
    return _shard().push(replica, grads, buffers, step)


def rpc_hold() -> dict[int, int]:
    return _shard().hold()


def rpc_cut(steps: dict[int, int], timeout: float) -> tuple[dict[str, Any], list[int], int]:
    return _shard().cut(steps, timeout)


def rpc_release() -> bool:
    _shard().release()
    return True


def rpc_drain_taus() -> tuple[int, list[int], int]:
    return _shard().drain_taus()


def rpc_state() -> dict[str, Any]:
    return _shard().state_dict()


def rpc_load(state: dict[str, Any]) -> int:
    _shard().load_state_dict(state)
    return _shard().version


def rpc_ping() -> bool:
    """Coordinator -> shard, every few seconds: the coordinator lives; the answer says the shard does."""
    _LAST_PING[0] = time.monotonic()
    return True


def rpc_stop() -> bool:
    _STOP.set()
    return True


def serve(rank: int, world_size: int, index: int, rpc_options: Any, *, coordinator_timeout: float,
          coordinator_alive: Callable[[], bool] | None = None) -> None:
    """A shard's whole life: join the RPC world, answer calls until the coordinator says stop, or until it is
    gone: no ping for ``coordinator_timeout`` seconds (any machine), or (started by the coordinator's process)
    ``coordinator_alive()`` says that process ended. A shard never outlives its run."""
    from torch.distributed import rpc

    torch.set_num_threads(1)
    rpc.init_rpc(shard_name(index), rank=rank, world_size=world_size, rpc_backend_options=rpc_options)
    _LAST_PING[0] = time.monotonic()
    while not _STOP.wait(timeout=0.5):
        silent = time.monotonic() - _LAST_PING[0]
        if silent > coordinator_timeout or (coordinator_alive is not None and not coordinator_alive()):
            why = f"no ping for {silent:.0f} s" if silent > coordinator_timeout else "its process ended"
            print(f"parameter-server shard {index}: the coordinator is gone ({why}); stopping", flush=True)
            os._exit(1)  # a graceful RPC shutdown would wait for the coordinator
    time.sleep(0.2)  # let the answer to rpc_stop leave before the agent goes
    rpc.shutdown(graceful=False)
