"""Downpour SGD (Dean et al. 2012, "Large Scale Distributed Deep Networks", sec. 4.1) on torch.distributed.rpc.

    python train/downpour.py --deepspeed_config ds_configs/downpour/fmnist-w2-s2.json          # one machine
    torchrun --nnodes 2 --nproc-per-node 3 --node-rank R --master-addr HOST --master-port 29500 \\
        train/downpour.py --deepspeed_config ds_configs/downpour/fmnist-w4-s1.json               # a cluster

One process per role, all in one RPC world of 1 + S + W workers: rank 0 the coordinator (starts the shards, logs,
evaluates, checkpoints), ranks 1..S the parameter-server shards (train/parameter_server.py: a slice of the model
and its Adagrad state each, updates applied as they arrive under a lock per shard), ranks S+1..S+W the model
replicas. Replica j trains on its own slice of each step's samples (train.data.GlobalBatchSampler with W "ranks":
replica j takes slice j of every global batch of W x b samples, so the replicas' data are disjoint) and, with no
barrier between replicas:

    every n_fetch steps: fetch the parameters from every shard (rpc_async to all, then wait)
    forward, backward on its b samples; the gradient accumulates
    every n_push steps:  push the accumulated (summed) gradient to every shard (rpc_async, not waited for until
                         the next fetch), zero it

Plain ``python train/downpour.py`` starts the 1 + S + W processes itself (torch.multiprocessing, spawn) on this
machine; under torchrun (or any launcher that sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) each process takes
the role of its rank and WORLD_SIZE must be 1 + S + W.

The experiment is one JSON file with a ``downpour`` block (ds_configs/downpour/, written by
ds_configs/generate.py): model, dataset, replicas W, shards S, batch_per_replica b, n_fetch, n_push, the shards'
optimizer ("adagrad" or "sgd"), lr, initial_accumulator_value, warmstart_steps (Dean et al.: "warmstarting",
one replica alone for its first steps before the others start), epochs (passes over the training set by all
replicas together). The run writes what train/imagenet.py writes (config.json, metrics.jsonl with step, epoch and
summary records, model.pt, wandb) plus the staleness tau of every push (its distribution per record) and the
parameter server's checkpoint (checkpoints/ps.pt; ``--resume`` continues from it). A replica that fails (an exception, a
signal, silence) is noted in the records and the others go on while at most ``--max-dead-replicas`` (default W - 1)
have failed; one more, or a failed shard, fails the run: exit code 1 and one line per failed role with its error
(``--resume`` continues from the last checkpoint).

The run flags are train/cli.py's ``add_run_arguments``, shared with train/imagenet.py (not the DeepSpeed-only
``add_engine_arguments``: the model runs in fp32, ``--rpc-timeout`` bounds a call); here ``--max-steps`` counts each
replica's steps, ``--log-interval`` and ``--save-interval`` the replicas' steps summed, ``--micro-batch`` overrides
batch_per_replica, ``--inject-nan`` makes replica 0's inputs NaN, and ``--max-skipped-steps`` N fails a replica
whose gradient was not finite at N pushes in a row (such a push is not sent; a shard drops any non-finite gradient
it receives, and counts it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun does this): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # agents report pipes closed by a shutdown as warnings
warnings.filterwarnings("ignore", message="You are using a Backend")  # torch's own RPC start-up, not ours

import torch  # noqa: E402
from torch.distributed import rpc  # noqa: E402

from train import cli  # noqa: E402
from train import parameter_server as ps  # noqa: E402
from train.checkpoints import CheckpointError  # noqa: E402
from train.config import ConfigError, load_json  # noqa: E402
from train.data import FASHION_MNIST_DEFAULT_DIR, GlobalBatchSampler, fashion_mnist  # noqa: E402
from train.distributed import free_port  # noqa: E402
from train.faults import BadStepStreak  # noqa: E402
from train.models import ARCHS, build_model  # noqa: E402
from train.run_folder import claim_output_dir, rewind_metrics  # noqa: E402
from train.tracking import RunLog, git_commit  # noqa: E402

COORDINATOR = "coordinator"
DEFAULTS: dict[str, Any] = {"dataset": "fashion-mnist", "batch_per_replica": 32, "n_fetch": 1, "n_push": 1,
                            "optimizer": "adagrad", "initial_accumulator_value": 0.1, "warmstart_steps": 0}
REQUIRED = ("model", "replicas", "shards", "lr", "epochs")
KNOWN = set(DEFAULTS) | set(REQUIRED)


def replica_name(j: int) -> str:
    return f"replica{j}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_run_arguments(p)  # --max-steps: per replica; --log-interval/--save-interval: replica steps, all summed
    p.add_argument("--data-dir", default=None, metavar="DIR", help="Fashion-MNIST: folder of the four IDX files")
    p.add_argument("--replicas", type=cli.int_at_least(0), default=None, help="override downpour.replicas (W)")
    p.add_argument("--shards", type=cli.int_at_least(0), default=None, help="override downpour.shards (S)")
    p.add_argument("--n-fetch", type=cli.int_at_least(0), default=None, help="override downpour.n_fetch")
    p.add_argument("--n-push", type=cli.int_at_least(0), default=None, help="override downpour.n_push")
    p.add_argument("--shard-optimizer", choices=ps.SHARD_OPTIMIZERS, default=None,
                   help="override downpour.optimizer")
    p.add_argument("--lr", type=cli.positive_float, default=None, help="override downpour.lr")
    p.add_argument("--train-subset", type=cli.int_at_least(1), default=None,
                   help="use only the first N training samples")
    p.add_argument("--val-subset", type=cli.int_at_least(1), default=None,
                   help="use only the first N validation samples")
    p.add_argument("--replica-delay", nargs="+", default=(), metavar="J=SECONDS",
                   help="a straggler: replica J sleeps SECONDS before each step")
    p.add_argument("--barrier", action="store_true",
                   help="plumbing check: all replicas fetch, then all push, round by round (with n_fetch = n_push "
                        "= 1 and the sgd shard optimizer this is synchronous SGD at lr x W)")
    p.add_argument("--kill-replica", default=None, metavar="J@STEP",
                   help="testing aid: replica J sends itself SIGKILL after its step STEP (--fault replicaJ:kill@STEP)")
    p.add_argument("--fault", nargs="+", default=(), metavar="replicaJ:KIND@STEP",
                   help="testing aid: replica J fails after its step STEP; KIND raise (an exception), kill "
                        "(SIGKILL) or hang (SIGSTOP)")
    p.add_argument("--max-dead-replicas", type=cli.int_at_least(0), default=None, metavar="N",
                   help="the run goes on while at most N replicas have failed (default W - 1: all but one); one more, "
                        "or a failed shard, fails the run")
    p.add_argument("--replica-timeout", type=cli.positive_float, default=120.0,
                   help="seconds without a heartbeat from a replica before it counts as lost")
    p.add_argument("--heartbeat", type=cli.positive_float, default=1.0, metavar="SECONDS",
                   help="every replica tells the coordinator it lives, and the coordinator pings every shard, this "
                        "often (in every state: warmstart wait, barrier, training)")
    p.add_argument("--rpc-timeout", type=cli.positive_float, default=60.0, metavar="SECONDS",
                   help="the longest any RPC (fetch, push, report, ping) waits for its answer; a shard that does not "
                        "answer within it fails the run")
    p.add_argument("--eval-batch", type=cli.int_at_least(1), default=1000, help="validation batch")
    p.add_argument("--evals-per-epoch", type=cli.int_at_least(1), default=1,
                   help="evaluate (an epoch record, fractional epoch) K times per pass over the training set")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The experiment: config + overrides, checked before any process starts


@dataclass
class Setup:
    """Everything every process needs, derived once from the config and the flags (picklable)."""

    cfg: dict[str, Any]  # the downpour block after overrides
    args: argparse.Namespace
    num_train: int
    num_val: int
    param_shards: list[list[str]]  # what each shard's slice holds (name[a:b] pieces), for config.json
    delays: dict[int, float] = field(default_factory=dict)
    faults: dict[int, tuple[str, int]] = field(default_factory=dict)  # replica -> (kind, after its step)
    max_dead: int = 0  # replicas that may fail before the run does
    bounds: list[tuple[int, int]] = field(default_factory=list)  # each shard's slice of the flattened parameters
    buffer_shards: list[list[str]] = field(default_factory=list)

    @property
    def W(self) -> int:  # noqa: N802 (the paper's letter)
        return int(self.cfg["replicas"])

    @property
    def S(self) -> int:  # noqa: N802
        return int(self.cfg["shards"])

    @property
    def b(self) -> int:
        return int(self.cfg["batch_per_replica"])

    @property
    def round_batch(self) -> int:
        """Samples per update round (one step of every replica): the synchronous baseline's global batch."""
        return self.W * self.b

    @property
    def steps_per_epoch(self) -> int:
        """Steps of each replica per pass over the training set (the replicas share each pass)."""
        return self.num_train // self.round_batch

    @property
    def total_steps(self) -> int:
        steps = self.steps_per_epoch * int(self.cfg["epochs"])
        return min(steps, self.args.max_steps) if self.args.max_steps else steps


def _int_at_least(cfg: dict[str, Any], key: str, low: int) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"downpour.{key} must be an integer >= {low}, got {v!r}")
    return v


def load_setup(args: argparse.Namespace) -> Setup:
    """The config's downpour block with the flags' overrides, checked; raises ConfigError with what and why."""

    raw = load_json(args.deepspeed_config)
    if not isinstance(raw.get("downpour"), dict):
        raise ConfigError(f"{args.deepspeed_config}: no \"downpour\" block; expected a Downpour experiment "
                          f"(ds_configs/downpour/*.json) with keys {', '.join(REQUIRED)}")
    cfg = DEFAULTS | raw["downpour"]
    unknown = sorted(set(cfg) - KNOWN)
    missing = [k for k in REQUIRED if k not in cfg]
    if unknown or missing:
        raise ConfigError(f"{args.deepspeed_config}: downpour block " + (f"has unknown keys {unknown}" if unknown
                          else f"lacks {missing}") + f"; expected keys {sorted(KNOWN)}")
    for flag, key in (("replicas", "replicas"), ("shards", "shards"), ("n_fetch", "n_fetch"), ("n_push", "n_push"),
                      ("shard_optimizer", "optimizer"), ("lr", "lr"), ("epochs", "epochs"),
                      ("micro_batch", "batch_per_replica")):
        if getattr(args, flag) is not None:
            cfg[key] = getattr(args, flag)
    for key in ("replicas", "shards", "n_fetch", "n_push", "batch_per_replica", "epochs"):
        _int_at_least(cfg, key, 1)
    _int_at_least(cfg, "warmstart_steps", 0)
    if cfg["model"] not in ARCHS:
        raise ConfigError(f"downpour.model {cfg['model']!r} is unknown; known: {', '.join(ARCHS)}")
    if cfg["dataset"] != "fashion-mnist":
        raise ConfigError(f"downpour.dataset {cfg['dataset']!r}: only 'fashion-mnist' is supported")
    if cfg["optimizer"] not in ps.SHARD_OPTIMIZERS:
        raise ConfigError(f"downpour.optimizer {cfg['optimizer']!r}: expected one of {', '.join(ps.SHARD_OPTIMIZERS)}")
    for key in ("lr", "initial_accumulator_value"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                key == "lr" and v == 0):
            raise ConfigError(f"downpour.{key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, got {v!r}")
    model = build_model(cfg["model"], 10, 1, 28)
    sizes = {k: v.numel() for k, v in model.named_parameters()}
    if cfg["shards"] > sum(sizes.values()):
        raise ConfigError(f"downpour.shards = {cfg['shards']} but model {cfg['model']} has {sum(sizes.values()):,} "
                          f"parameters; every shard needs at least one")
    buffers = [k for k, _ in model.named_buffers()]
    delays = {}
    for item in args.replica_delay:
        j, _, sec = item.partition("=")
        try:
            delays[int(j)] = float(sec)
        except ValueError:
            raise ConfigError(f"--replica-delay {item!r}: expected J=SECONDS, e.g. 0=0.05") from None
        if not 0 <= int(j) < cfg["replicas"] or not float(sec) >= 0:
            raise ConfigError(f"--replica-delay {item!r}: J must be a replica (0..{cfg['replicas'] - 1}) and "
                              f"SECONDS >= 0")
    faults = parse_faults(args, cfg["replicas"])
    max_dead = cfg["replicas"] - 1 if args.max_dead_replicas is None else args.max_dead_replicas
    if max_dead >= cfg["replicas"]:
        raise ConfigError(f"--max-dead-replicas {max_dead} with {cfg['replicas']} replicas: a run needs one replica "
                          f"alive; use at most {cfg['replicas'] - 1}")
    info = _data(args).info  # a missing or corrupt data set fails here, before any process starts
    num_train = min(info.num_train, args.train_subset or info.num_train)
    num_val = min(info.num_val, args.val_subset or info.num_val)
    bounds = ps.partition(sum(sizes.values()), cfg["shards"])
    setup = Setup(cfg, args, num_train, num_val, ps.describe_slices(sizes, bounds), delays, faults, max_dead,
                  bounds, ps.assign_buffers(buffers, cfg["shards"]))
    if setup.steps_per_epoch < 1:
        raise ConfigError(f"{num_train} training samples make no step of {setup.W} replicas x "
                          f"{setup.b} samples; use more samples or fewer replicas")
    return setup


FAULT_KINDS = ("raise", "kill", "hang")


def parse_faults(args: argparse.Namespace, replicas: int) -> dict[int, tuple[str, int]]:
    """--fault replicaJ:KIND@STEP (and --kill-replica J@STEP): which replica fails how, after which of its steps."""
    items = list(args.fault) + ([f"replica{args.kill_replica.partition('@')[0]}:kill@"
                                 f"{args.kill_replica.partition('@')[2]}"] if args.kill_replica else [])
    faults = {}
    for item in items:
        role, _, rest = item.partition(":")
        kind, _, step = rest.partition("@")
        try:
            j, n = int(role.removeprefix("replica")), int(step)
        except ValueError:
            j = n = -1
        if not role.startswith("replica") or kind not in FAULT_KINDS or not 0 <= j < replicas or n < 1:
            raise ConfigError(f"--fault {item!r}: expected replicaJ:KIND@STEP with J in 0..{replicas - 1}, KIND one "
                              f"of {', '.join(FAULT_KINDS)} and STEP >= 1, e.g. replica1:kill@20")
        faults[j] = (kind, n)
    return faults


def inject_fault(setup: Setup, j: int, step: int) -> None:
    kind, at = setup.faults.get(j, ("", 0))
    if at != step:
        return
    if kind == "raise":
        raise RuntimeError(f"injected fault (--fault replica{j}:raise@{step})")
    os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)


class RunFailed(Exception):
    """The run cannot go on: a shard failed, or more replicas than --max-dead-replicas allows."""


def failure_report(errors: dict[str, str], dead: int, replicas: int, max_dead: int) -> str | None:
    """One line saying why the run failed, then one per failed role with its error; None while it may go on."""
    shards = [k for k in errors if k.startswith("shard")]
    if not shards and dead <= max_dead and dead < replicas:
        return None
    why = (f"{', '.join(shards)} failed" if shards else
           f"{dead} of {replicas} replicas failed, --max-dead-replicas allows {max_dead}")
    return "\n".join([f"error: the Downpour run failed: {why}", *(f"error: {k}: {v}" for k, v in errors.items())])


# ---------------------------------------------------------------------------------------------------------------
# Starting the processes


def rpc_options(setup: Setup) -> Any:
    return rpc.TensorPipeRpcBackendOptions(num_worker_threads=max(16, 2 * setup.W + 8),
                                           rpc_timeout=setup.args.rpc_timeout,
                                           init_method="env://")


def role_of(rank: int, setup: Setup) -> tuple[str, int]:
    if rank == 0:
        return COORDINATOR, 0
    if rank <= setup.S:
        return "shard", rank - 1
    return "replica", rank - 1 - setup.S


def child(rank: int, world_size: int, setup: Setup, parent: int | None = None) -> None:
    """A shard or a replica process (the coordinator is rank 0, the caller)."""
    role, index = role_of(rank, setup)
    if role == "shard":
        ps.serve(rank, world_size, index, rpc_options(setup), coordinator_timeout=2 * setup.args.rpc_timeout +
                 setup.args.heartbeat, parent=parent)
    else:
        run_replica(rank, world_size, index, setup)


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    setup = load_setup(args)
    world_size = 1 + setup.S + setup.W
    run_name = args.run_name or f"{Path(args.deepspeed_config).stem}-seed{args.seed}"
    out_dir = Path(args.output_dir or Path("runs") / run_name)
    if "RANK" in os.environ:  # a launcher started every process: take the role of this rank
        rank, size = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "0"))
        if size != world_size:
            raise ConfigError(f"WORLD_SIZE={size} but the experiment needs 1 coordinator + {setup.S} shards + "
                              f"{setup.W} replicas = {world_size} processes")
        if rank:
            child(rank, world_size, setup)
            return None
        return coordinate(setup, world_size, {}, run_name, out_dir)
    refusal = claim_output_dir(out_dir, resume=args.resume, overwrite=args.overwrite)
    if refusal:
        raise SystemExit(f"error: {refusal}")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    ctx = torch.multiprocessing.get_context("spawn")
    procs = {}
    for rank in range(1, world_size):
        procs[rank] = ctx.Process(target=child, args=(rank, world_size, setup, os.getpid()), daemon=False)
        procs[rank].start()
    try:
        return coordinate(setup, world_size, procs, run_name, out_dir)
    finally:
        lost = {1 + setup.S + j for j in range(setup.W) if _COORD is not None and _COORD.dead[j]}
        deadline = time.monotonic() + 10
        for rank, p in procs.items():  # only the processes this command started; a lost replica may be hung
            p.join(timeout=0 if rank in lost else max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------
# A replica: fetch, compute, push


class RpcFailed(Exception):
    """An RPC got no answer within --rpc-timeout, or its callee failed; the message names the callee."""


_RPC_TIMEOUT = 60.0  # this process's --rpc-timeout (set when it joins the RPC world)


def _wait(future: Any, to: str, what: str) -> Any:
    try:
        return future.wait()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RpcFailed(f"{to} did not answer {what} within --rpc-timeout {_RPC_TIMEOUT:g} s, or failed "
                        f"({lines[0][:200] if lines else type(e).__name__})") from None


def _call(to: str, func: Any, *args: Any) -> Any:
    return _wait(rpc.rpc_async(to, func, args=args, timeout=_RPC_TIMEOUT), to, func.__name__)


def _poll(heartbeat: Heartbeat, to: str, func: Any, *args: Any) -> Any:
    """Call ``func`` until it answers something other than None (each answer comes within a second or so)."""
    while (answer := _call(to, func, *args)) is None:
        heartbeat.check()
    return answer


POLL_SECONDS = 1.0  # the longest a coordinator endpoint holds a caller before answering "not yet" (None)


class Heartbeat(threading.Thread):
    """A replica's heartbeat: every --heartbeat s, in every state, it tells the coordinator it lives; it learns when
    the coordinator counts the replica as lost or does not answer (:meth:`check` then raises in the caller)."""

    def __init__(self, j: int, setup: Setup) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{j}")
        self.j, self.every, self.why, self.halt = j, setup.args.heartbeat, "", threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                alive = _call(COORDINATOR, coord_heartbeat, self.j)
            except RpcFailed as e:
                self.why = str(e)
                return
            if not alive:
                self.why = "the coordinator counts this replica as lost (it heard nothing within --replica-timeout)"
                return

    def check(self) -> None:
        if self.why:
            raise RuntimeError(self.why)


def run_replica(rank: int, world_size: int, j: int, setup: Setup) -> None:
    """A replica's whole life; an exception is reported to the coordinator (one line) before the process fails."""
    global _RPC_TIMEOUT
    torch.set_num_threads(1)
    _RPC_TIMEOUT = setup.args.rpc_timeout
    rpc.init_rpc(replica_name(j), rank=rank, world_size=world_size, rpc_backend_options=rpc_options(setup))
    heartbeat = Heartbeat(j, setup)
    heartbeat.start()
    try:
        train_replica(j, setup, heartbeat)
    except Exception as e:
        lines = str(e).strip().splitlines()
        try:
            rpc.rpc_sync(COORDINATOR, coord_failed, args=(j, f"{type(e).__name__}: {lines[0] if lines else ''}"),
                         timeout=min(10.0, _RPC_TIMEOUT))
        except Exception:  # noqa: BLE001, S110 (the coordinator is gone: it learns from the exit code, if at all)
            pass
        rpc.shutdown(graceful=False)
        raise
    heartbeat.halt.set()
    rpc.shutdown(graceful=False)


def train_replica(j: int, setup: Setup, heartbeat: Heartbeat) -> None:
    cfg, args = setup.cfg, setup.args
    data = _data(args)
    model = build_model(cfg["model"], 10, 1, 28)
    model.train()
    params = list(model.parameters())
    sampler = GlobalBatchSampler(setup.num_train, setup.round_batch, setup.b, setup.W, j, args.seed)
    start = _poll(heartbeat, COORDINATOR, coord_start, j)  # until the shards hold the (resumed) parameters
    if start < 0:  # the coordinator failed before training began; it says why
        return
    if cfg["warmstart_steps"] and j > 0 and start < cfg["warmstart_steps"]:
        _poll(heartbeat, COORDINATOR, coord_wait_warmstart)
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
                    _wait(report, COORDINATOR, "coord_report")
                report = rpc.rpc_async(COORDINATOR, coord_report, args=(j, step, *sums.tolist(), skipped),
                                       timeout=_RPC_TIMEOUT)
                sums.zero_()
    _wait_all(pushes)
    if report is not None:
        _wait(report, COORDINATOR, "coord_report")
    _call(COORDINATOR, coord_done, j, step, *sums.tolist(), skipped)


_DATA: Any = None


def _data(args: argparse.Namespace) -> Any:
    """Fashion-MNIST, read once per process (no flips: Dean et al. trained on the data as they were)."""
    global _DATA
    if _DATA is None:

        _DATA = fashion_mnist(args.data_dir or FASHION_MNIST_DEFAULT_DIR, 1, args.seed, flip=False)
    return _DATA


def _wait_all(futures: list[tuple[str, Any]]) -> None:
    for to, f in futures:
        _wait(f, to, "a push")


def barrier(heartbeat: Heartbeat, key: int) -> None:
    arrive = True
    while not _call(COORDINATOR, coord_barrier, key, arrive):
        arrive = False
        heartbeat.check()


def fetch(model: torch.nn.Module, setup: Setup, j: int) -> None:
    """Every shard's slice, fetched in parallel, into the replica's model."""
    futures = [rpc.rpc_async(ps.shard_name(i), ps.rpc_fetch, args=(j,), timeout=_RPC_TIMEOUT)
               for i in range(setup.S)]
    load_slices(model, [_wait(f, ps.shard_name(i), "a fetch") for i, f in enumerate(futures)])


def load_slices(model: torch.nn.Module, shards: list[dict[str, torch.Tensor]]) -> None:
    """Every shard's slice (and buffers) into the model."""
    ps.unflatten_into(torch.cat([s.pop(ps.FLAT) for s in shards]), list(model.parameters()))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for s in shards:
            for name, b in s.items():
                buffers[name].copy_(b)


def push(model: torch.nn.Module, params: list[torch.nn.Parameter], setup: Setup, j: int) -> list[tuple[str, Any]]:
    """Send each shard its slice of the accumulated gradient and its buffers; zero the gradients."""
    buffers = dict(model.named_buffers())
    flat = ps.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    futures = []
    for i, ((a, b), names) in enumerate(zip(setup.bounds, setup.buffer_shards, strict=True)):
        grads = {ps.FLAT: flat[a:b].clone()}  # a clone: RPC would send a view's whole storage
        bufs = {n: buffers[n].detach().clone() for n in names}
        futures.append((ps.shard_name(i), rpc.rpc_async(ps.shard_name(i), ps.rpc_push, args=(j, grads, bufs),
                                                        timeout=_RPC_TIMEOUT)))
    model.zero_grad(set_to_none=True)
    return futures


# ---------------------------------------------------------------------------------------------------------------
# The coordinator: shards' initial state, replicas' progress, records, evaluation, checkpoints


class Coordinator:
    """The coordinator's shared state, read and written by its RPC threads and its main loop under one lock."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.cond = threading.Condition()
        self.ready = False
        self.failed = False
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
            futures = [rpc.rpc_async(ps.shard_name(i), ps.rpc_ping, timeout=_RPC_TIMEOUT) for i in range(setup.S)]
            for i, f in enumerate(futures):
                try:
                    _wait(f, ps.shard_name(i), "a ping")
                except RpcFailed as e:
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


def coord_heartbeat(j: int) -> bool:
    """Replica -> coordinator: alive. The answer: whether the coordinator still counts it (False once lost)."""
    c = _coordinator()
    with c.cond:
        c.last_seen[j] = time.monotonic()
        return not c.dead[j]


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


@dataclass
class State:
    """Where the coordinator's records stand (saved in the checkpoint)."""

    epochs_logged: int = 0
    next_log: int = 0
    next_save: int = 0
    t0: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    t_epoch: float = field(default_factory=time.perf_counter)
    samples_log: int = 0
    samples_epoch: int = 0
    wall_before: float = 0.0  # wall time of the runs this one resumes
    dropped: int = 0  # pushes the shards dropped (not finite)
    taus_interval: list[int] = field(default_factory=list)
    taus_epoch: list[int] = field(default_factory=list)
    taus_all: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


def coordinate(setup: Setup, world_size: int, procs: dict[int, Any], run_name: str, out_dir: Path) -> dict[str, Any]:
    """Rank 0: start the shards, release the replicas, record until every replica is done or dead, finish."""
    global _COORD

    args = setup.args
    if procs:
        torch.set_num_threads(1)
    refusal = None if procs else claim_output_dir(out_dir, resume=args.resume, overwrite=args.overwrite)
    global _RPC_TIMEOUT
    _RPC_TIMEOUT = args.rpc_timeout
    _COORD = c = Coordinator(setup)
    rpc.init_rpc(COORDINATOR, rank=0, world_size=world_size, rpc_backend_options=rpc_options(setup))
    pinger = ShardPinger(c)
    pinger.start()
    try:
        if refusal:
            raise SystemExit(f"error: {refusal}")
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
        log = start_log(setup, out_dir, run_name, wandb_id)
        with c.cond:
            c.ready = True
            c.last_seen = [time.monotonic()] * setup.W  # every replica's heartbeat started before init_rpc returned
            c.cond.notify_all()
        try:
            watch(c, setup, state, log, model, procs, out_dir)
            return finish(c, setup, state, log, model, out_dir)
        except (RunFailed, RpcFailed) as e:
            log.close()
            with c.cond:
                why = str(e) if isinstance(e, RunFailed) else "\n".join(
                    [f"error: the Downpour run failed: {e}", *(f"error: {k}: {v}" for k, v in c.errors.items())])
            raise SystemExit(why) from None
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
        _call(ps.shard_name(i), ps.rpc_create, i, {ps.FLAT: flat[a:b].clone()},
              {n: buffers[n].detach() for n in names}, options)
        if saved:
            _call(ps.shard_name(i), ps.rpc_load, saved["shards"][i])


def load_checkpoint(path: Path, setup: Setup) -> dict[str, Any]:
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
    shards = [_call(ps.shard_name(i), ps.rpc_state) for i in range(setup.S)]
    path = out_dir / "checkpoints" / "ps.pt"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name("ps.pt.tmp")
    torch.save({"shards": shards, "replica_steps": steps, "epochs_logged": state.epochs_logged,
                "wall_time": state.wall(), "taus": state.taus_all, "wandb_id": log.wandb_id}, tmp)
    os.replace(tmp, path)


def describe(setup: Setup) -> str:
    cfg = setup.cfg
    return "\n".join([
        f"Downpour SGD: {setup.W} replicas x {setup.b} samples = {setup.round_batch} samples per update round; "
        f"{setup.S} parameter-server shards (contiguous slices of {', '.join(f'{b - a:,}' for a, b in setup.bounds)} "
        f"parameters)",
        f"data: fashion-mnist, {setup.num_train:,} training samples -> {setup.steps_per_epoch:,} steps/epoch per "
        f"replica x {cfg['epochs']} epochs" + (f", stopping at step {setup.total_steps}" if setup.args.max_steps
                                                else ""),
        f"shards: {cfg['optimizer']} lr {cfg['lr']}" + (f", initial accumulator {cfg['initial_accumulator_value']}"
                                                       if cfg["optimizer"] == "adagrad" else "") +
        f"; fetch every {cfg['n_fetch']}, push every {cfg['n_push']} steps; warmstart {cfg['warmstart_steps']} steps"
        + (f"; delays {setup.delays}" if setup.delays else "") + ("; barrier (synchronous)" if setup.args.barrier
                                                                  else "")])


def derived(setup: Setup) -> dict[str, Any]:
    cfg = setup.cfg
    return {"global_batch": setup.round_batch, "dataset": cfg["dataset"], "num_train": setup.num_train,
            "num_val": setup.num_val, "arch": cfg["model"], "optimizer": "Adagrad" if cfg["optimizer"] == "adagrad"
            else "SGD", "lr": cfg["lr"], "epochs": cfg["epochs"], "steps_per_epoch": setup.steps_per_epoch,
            "total_steps": setup.total_steps, "replicas": setup.W, "shards": setup.S, "n_fetch": cfg["n_fetch"],
            "n_push": cfg["n_push"], "batch_per_replica": setup.b, "warmstart_steps": cfg["warmstart_steps"],
            "world_size": 1 + setup.S + setup.W, "replica_delays": setup.delays, "barrier": setup.args.barrier,
            "warmup_steps": 0}


def start_log(setup: Setup, out_dir: Path, run_name: str, wandb_id: str | None) -> Any:

    args = setup.args
    summary_cfg = {"run_name": run_name, "group": args.wandb_group, "config_file": str(args.deepspeed_config),
                   "args": vars(args), "derived": derived(setup), "downpour": setup.cfg,
                   "optimizer": {"type": derived(setup)["optimizer"], "params": {"lr": setup.cfg["lr"]}},
                   "scheduler": None, "training": {"recipe": f"downpour-{setup.cfg['optimizer']}",
                                                   "epochs": setup.cfg["epochs"]},
                   "param_shards": setup.param_shards, "git_commit": git_commit()}
    (out_dir / "config.json").write_text(json.dumps(summary_cfg, indent=2, default=str) + "\n")
    return RunLog(out_dir, use_wandb=not args.no_wandb, project=args.wandb_project, group=args.wandb_group,
                  name=run_name, tags=["downpour", setup.cfg["optimizer"], f"W{setup.W}", f"S{setup.S}"],
                  config=summary_cfg, resume_id=wandb_id, timeout=args.wandb_timeout)


def drain_taus(setup: Setup, state: State) -> None:
    for i in range(setup.S):
        _, taus, dropped = _call(ps.shard_name(i), ps.rpc_drain_taus)
        state.dropped += dropped
        for group in (state.taus_interval, state.taus_epoch, state.taus_all):
            group.extend(taus)


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
            epoch_record(c, setup, state, log, model)
            save_checkpoint(c, setup, state, log, out_dir)
        elif total >= state.next_log:
            step_record(c, setup, state, log)
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


def _rates(c: Coordinator, sums: list[float]) -> tuple[float | None, float | None]:
    loss_sum, correct, n = sums
    return (loss_sum / n, 100 * (1 - correct / n)) if n else (None, None)


def step_record(c: Coordinator, setup: Setup, state: State, log: Any) -> None:
    drain_taus(setup, state)
    with c.cond:
        total, samples, (loss, _) = sum(c.steps), c.samples, _rates(c, c.interval)
        c.interval = [0.0, 0.0, 0.0]
        alive, dead = sum(not d for d in c.dead), sum(c.dead)
    now = time.perf_counter()
    rec = {"kind": "step", "step": total, "epoch": samples / (setup.steps_per_epoch * setup.round_batch),
           "samples": samples, "loss": loss, "lr": setup.cfg["lr"],
           "images_per_sec": (samples - state.samples_log) / max(now - state.t_log, 1e-9),
           "global_batch": setup.round_batch, "wall_time": state.wall(), "replicas_alive": alive,
           "replicas_dead": dead,
           **ps.tau_summary(state.taus_interval)}
    state.t_log, state.samples_log, state.taus_interval = now, samples, []
    log.log(rec)


def epoch_record(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Training totals since the last epoch record, the parameters fetched from the shards, evaluated."""
    step_record(c, setup, state, log)
    with c.cond:
        total, samples, (loss, err) = sum(c.steps), c.samples, _rates(c, c.epoch_sums)
        c.epoch_sums = [0.0, 0.0, 0.0]
    now = time.perf_counter()
    epoch_time, seen = now - state.t_epoch, samples - state.samples_epoch
    load_from_shards(model, setup)
    val = evaluate(model, setup)
    # evaluation points passed (whole epochs with the default --evals-per-epoch 1)
    state.epochs_logged = samples * setup.args.evals_per_epoch // (setup.steps_per_epoch * setup.round_batch)
    rec = {"kind": "epoch", "epoch": samples / (setup.steps_per_epoch * setup.round_batch), "step": total,
           "samples": samples, "train_loss": loss, "train_error": err, **val, "epoch_time": epoch_time,
           "images_per_sec": seen / max(epoch_time, 1e-9), "lr": setup.cfg["lr"], "wall_time": state.wall(),
           **{k: v for k, v in ps.tau_summary(state.taus_epoch).items() if k != "tau_hist"},
           "tau_hist": ps.tau_summary(state.taus_epoch).get("tau_hist")}
    state.taus_epoch, state.t_epoch, state.samples_epoch = [], time.perf_counter(), samples
    state.history.append(rec)
    log.log(rec)
    print(f"epoch {rec['epoch']:.3g}/{setup.cfg['epochs']} | train loss {_fmt(loss)} | val top-1 error "
          f"{val['val_top1_error']:.2f}% | staleness mean {rec.get('tau_mean', float('nan')):.2f} max "
          f"{rec.get('tau_max', '-')} | {epoch_time:.1f} s, {rec['images_per_sec']:.0f} samples/s", flush=True)
    return rec


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def load_from_shards(model: torch.nn.Module, setup: Setup) -> None:
    shards = [_call(ps.shard_name(i), ps.rpc_state) for i in range(setup.S)]
    load_slices(model, [s["params"] | s["buffers"] for s in shards])


@torch.no_grad()
def evaluate(model: torch.nn.Module, setup: Setup) -> dict[str, float]:
    """Top-1/top-5 error (%) and loss over the validation samples (the first --val-subset of the test set)."""
    data = _data(setup.args)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in data.val_batches(list(range(setup.num_val)), setup.args.eval_batch):
        logits = model(x).float()
        hit = logits.topk(5, dim=1).indices == y[:, None]
        sums += torch.tensor([hit[:, 0].sum(), hit.any(1).sum(), y.numel(),
                              torch.nn.functional.cross_entropy(logits, y, reduction="sum")], dtype=torch.float64)
    model.train()
    c1, c5, n, loss = sums.tolist()
    return {"val_top1_error": 100 * (1 - c1 / n), "val_top5_error": 100 * (1 - c5 / n), "val_loss": loss / n,
            "val_samples": int(n)}


def finish(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module,
           out_dir: Path) -> dict[str, Any]:
    """The last epoch record (if samples came after the last one), the checkpoint, model.pt, the summary."""
    drain_taus(setup, state)
    if c.samples > state.samples_epoch or not state.history:
        epoch_record(c, setup, state, log, model)
    else:
        load_from_shards(model, setup)
    save_checkpoint(c, setup, state, log, out_dir)
    torch.save({k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               out_dir / "model.pt")
    last = [h["val_top1_error"] for h in state.history[-5:]]
    result = {"steps": sum(c.steps), "samples": c.samples, "final_val_top1_error": state.history[-1]["val_top1_error"],
              "final_val_top5_error": state.history[-1]["val_top5_error"],
              "median5_val_top1_error": statistics.median(last), "wall_time": state.wall(),
              "replica_steps": list(c.steps), "dead_replicas": [j for j in range(setup.W) if c.dead[j]],
              "replica_errors": dict(c.errors), "max_dead_replicas": setup.max_dead,
              "skipped_pushes": list(c.skipped), "dropped_pushes": state.dropped,
              **{k: v for k, v in ps.tau_summary(state.taus_all).items() if k != "tau_hist"},
              "tau_hist": ps.tau_summary(state.taus_all).get("tau_hist")}
    log.log({"kind": "summary", **result})
    log.summary({k: v for k, v in result.items() if not isinstance(v, list)})
    log.close()
    print(f"done: {json.dumps(result)}; run folder {out_dir}", flush=True)
    return result


if __name__ == "__main__":
    from train import downpour  # the module, not this script: RPC names its functions train.downpour.*

    cli.entry(downpour.main, downpour.get_args_parser())
