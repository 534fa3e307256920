"""Downpour SGD (Dean et al. 2012, "Large Scale Distributed Deep Networks", sec. 4.1) on torch.distributed.rpc.

    python train/downpour.py --deepspeed_config ds_configs/downpour/fmnist-w2-s2.json          # one machine
    torchrun --nnodes 3 --nproc-per-node 3 --node-rank 0 --master-addr HOST --master-port 29500 \\
        train/downpour.py --deepspeed_config ds_configs/downpour/fmnist-w4-s2.json --roles coordinator shard0 shard1
    (and on two more hosts --node-rank 1 / 2, --nproc-per-node 2, --roles replica0 replica1 / replica2 replica3)

One process per role, all in one RPC world of 1 + S + W workers: rank 0 the coordinator (starts the shards, logs,
evaluates, checkpoints), ranks 1..S the parameter-server shards (train/ps/shard.py: a slice of the model and its
Adagrad state each, updates applied as they arrive under a lock per shard), ranks S+1..S+W the model
replicas. Replica j trains on its own slice of each step's samples (train.data.GlobalBatchSampler with W "ranks":
replica j takes slice j of every global batch of W x b samples, so the replicas' data are disjoint) and, with no
barrier between replicas, Dean et al.'s client (the paper's Algorithm 1.1, train/ps/replica.py's ``Client``):

    every n_fetch steps: start fetching the parameters from every shard (rpc_async to all, not waited for: it has
                         the next step to arrive, then replaces the local copy, less the steps not pushed yet)
    forward, backward on its b samples; the gradient accrues and takes a local step (plain SGD at the shards' lr)
    every n_push steps:  start pushing the accrued gradient to every shard (rpc_async), zero it

Plain ``python train/downpour.py`` starts the 1 + S + W processes itself (torch.multiprocessing's forkserver,
preloaded with this module: the server imports torch once and forks each shard and replica from it) on this
machine; under torchrun (or any launcher that sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) each
process takes the role ``--roles`` names at its LOCAL_RANK (any split of the roles over hosts), or without it the
role of its rank; WORLD_SIZE must be 1 + S + W. A shard never reads the data set. The README gives the per-host
commands and the interface variables (TP_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).

The experiment is one JSON file with a ``downpour`` block (ds_configs/downpour/, written by
ds_configs/generate.py): model, dataset, replicas W, shards S, batch_per_replica b, n_fetch, n_push, the shards'
optimizer ("adagrad" or "sgd"), lr, initial_accumulator_value, warmstart_steps (Dean et al.: "warmstarting",
one replica alone for its first steps before the others start), epochs (passes over the training set by all
replicas together). The run writes what train/imagenet.py writes (config.json, kept from the first start with a
line in resumes.jsonl per ``--resume``; metrics.jsonl with step, epoch and summary records; model.pt; wandb) plus
the staleness tau of every push (its distribution per record) and the parameter server's checkpoints, each a
consistent cut of the shards (checkpoints/step<N>/ps.pt and checkpoints/latest, atomic and fsynced, the newest
``--keep-checkpoints`` kept; SIGTERM or SIGINT saves one and exits 128 + N; ``--resume`` continues from 'latest').
A replica that fails (an exception, a signal, silence) is noted in the records and the others go on while at most
``--max-dead-replicas`` (default W - 1) have failed; one more, or a failed shard, fails the run: exit code 6 and
one line per failed role with its error (``--resume`` continues from the last checkpoint).

This file is the command line and the launch (a role per rank, :func:`child`, :func:`main`); the roles are the
package train/ps/: ``setup`` (the experiment, checked before any process starts), ``calls`` (RPC with its
time-out), ``shard``, ``replica``, ``coordinator`` (rank 0's state and RPC endpoints), ``run`` (rank 0's life,
checkpoints) and ``records``. The run folder, config.json, the records and the summary come from the parts
train/imagenet.py uses (train/run_folder.py, train/tracking.py).

The run flags are train/cli.py's ``add_run_arguments``, shared with train/imagenet.py (not the DeepSpeed-only
``add_engine_arguments``: the model runs in fp32, ``--rpc-timeout`` bounds a call); here ``--max-steps`` counts each
replica's steps, ``--log-interval`` and ``--save-interval`` the replicas' steps summed, ``--micro-batch`` overrides
batch_per_replica, ``--inject-nan`` makes replica 0's inputs NaN, and ``--max-skipped-steps`` N fails a replica
whose gradient was not finite at N pushes in a row (such a push is not sent; a shard drops any non-finite gradient
it receives, and counts it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun does this): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # agents report pipes closed by a shutdown as warnings
warnings.filterwarnings("ignore", message="You are using a Backend")  # torch's own RPC start-up, not ours

import torch  # noqa: E402

from train import cli  # noqa: E402
from train.config import ConfigError  # noqa: E402
from train.distributed import free_port  # noqa: E402
from train.exits import refuse  # noqa: E402
from train.ps import calls, coordinator  # noqa: E402
from train.ps import shard as ps  # noqa: E402
from train.ps.replica import run_replica  # noqa: E402
from train.ps.run import coordinate  # noqa: E402
from train.ps.setup import Setup, load_setup, parse_role, rank_of, role_of  # noqa: E402
from train.run_folder import claim_folder  # noqa: E402


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
    p.add_argument("--holdout", type=cli.int_at_least(1), default=None, metavar="N",
                   help="tuning: train on all but the last N training samples and validate on those N (not the "
                        "test set)")
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
    p.add_argument("--roles", nargs="+", default=None, metavar="ROLE",
                   help="under a launcher (torchrun): the roles of the processes it starts on this node, in "
                        "LOCAL_RANK order: coordinator, shard<i>, replica<j>; each of the 1 + S + W on one node "
                        "(default: by RANK, 0 the coordinator, 1..S the shards, then the replicas)")
    p.add_argument("--eval-batch", type=cli.int_at_least(1), default=1000, help="validation batch")
    p.add_argument("--evals-per-epoch", type=cli.int_at_least(1), default=1,
                   help="evaluate (an epoch record, fractional epoch) K times per pass over the training set")
    return p


def child(rank: int, world_size: int, setup: Setup) -> None:
    """A shard or a replica process (the coordinator is rank 0, the caller). It ignores SIGTERM and SIGINT, which a
    scheduler or Ctrl-C sends to every process: the coordinator saves a checkpoint and stops the others. Started
    by this module's :func:`main`, a shard also stops when the coordinator's process ends (multiprocessing's
    sentinel of the parent: a pipe only the coordinator holds open)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    role, index = role_of(rank, setup)
    if role == "shard":
        parent = multiprocessing.parent_process()  # None under a launcher
        ps.serve(rank, world_size, index, calls.rpc_options(setup), coordinator_timeout=2 * setup.args.rpc_timeout +
                 setup.args.heartbeat, coordinator_alive=parent.is_alive if parent is not None else None)
    else:
        run_replica(rank, world_size, index, setup)


def launched_role(args: argparse.Namespace, setup: Setup) -> tuple[str, int]:
    """Under a launcher: this process's role, ``--roles`` at LOCAL_RANK (one role per process of this node), or
    without ``--roles`` the rank's (:func:`role_of`)."""
    size = int(os.environ.get("WORLD_SIZE", "0"))
    if size != 1 + setup.S + setup.W:
        raise ConfigError(f"WORLD_SIZE={size} but the experiment needs 1 coordinator + {setup.S} shards + "
                          f"{setup.W} replicas = {1 + setup.S + setup.W} processes")
    if not args.roles:
        return role_of(int(os.environ["RANK"]), setup)
    local, local_size = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if len(args.roles) != local_size or len(set(args.roles)) != len(args.roles):
        raise ConfigError(f"--roles {' '.join(args.roles)}: expected {local_size} different roles, one per process "
                          f"this launcher starts (LOCAL_WORLD_SIZE={local_size}, --nproc-per-node)")
    return parse_role(args.roles[local], setup)


def start_forkserver() -> multiprocessing.context.ForkServerContext:
    """The context whose processes are forked from a forkserver preloaded with this module: each shard and replica
    starts from a server that imported torch once (spawn, a fresh interpreter each, cost about 2.3 CPU-s of imports
    per process). A child gets the server's state, not this process's: this module imported, ``os.environ`` as it
    was when the server started (after :func:`main` set MASTER_ADDR and MASTER_PORT), and what its arguments
    pickle.

    The server ignores SIGTERM: a scheduler's SIGTERM to every process must leave it running, since a forkserver
    gone reads to the coordinator as every child dead (exit code 255) while the coordinator is saving and stopping
    them. Python's forkserver ignores SIGINT itself; SIGTERM it inherits ignored (through fork and exec) from here.
    A SIGTERM to this process in those milliseconds is lost."""
    ctx = torch.multiprocessing.get_context("forkserver")  # torch's: tensors in the arguments go by shared memory
    ctx.set_forkserver_preload(["train.downpour"])
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return ctx


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    setup = load_setup(args, data=False)
    role, index = launched_role(args, setup) if "RANK" in os.environ else ("coordinator", 0)
    if role != "shard":  # the coordinator and the replicas read the data set; a shard never does
        setup = load_setup(args)
    world_size = 1 + setup.S + setup.W
    run_name = args.run_name or f"{Path(args.deepspeed_config).stem}-seed{args.seed}"
    out_dir = cli.run_dir(args)
    if "RANK" in os.environ:  # a launcher started every process: the role --roles gives it, or its rank's
        if role != "coordinator":
            child(rank_of(role, index, setup), world_size, setup)
            return None
        return coordinate(setup, world_size, {}, run_name, out_dir)
    refusal = claim_folder(out_dir, resume=args.resume, overwrite=args.overwrite)
    if refusal:
        refuse(refusal)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    ctx = start_forkserver()
    procs = {}
    for rank in range(1, world_size):
        procs[rank] = ctx.Process(target=child, args=(rank, world_size, setup), daemon=False)
        procs[rank].start()
    try:
        return coordinate(setup, world_size, procs, run_name, out_dir)
    finally:
        c = coordinator.current()
        lost = {1 + setup.S + j for j in range(setup.W) if c is not None and c.dead[j]}
        deadline = time.monotonic() + 10
        for rank, p in procs.items():  # only the processes this command started; a lost replica may be hung
            p.join(timeout=0 if rank in lost else max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


if __name__ == "__main__":
    from train import downpour  # the module, not this script: the forkserver pickles child as train.downpour.child

    cli.entry(downpour.main, downpour.get_args_parser())
