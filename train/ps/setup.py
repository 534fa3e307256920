"""The experiment of a Downpour run: the config's downpour block with the flags' overrides, checked before any process
starts (:func:`load_setup` -> :class:`Setup`, picklable, handed to every process), the roles' names, the testing
faults (``--fault``), the rule that fails the run (:func:`failure_report`), the data (read once per process) and
how the run is described (the banner, config.json's ``derived``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
from dataclasses import dataclass, field
from typing import Any

from train.config import ConfigError, load_json
from train.data import FASHION_MNIST_DEFAULT_DIR, fashion_mnist, hold_out
from train.models import ARCHS, build_model
from train.ps import shard as ps

COORDINATOR = "coordinator"
DEFAULTS: dict[str, Any] = {"dataset": "fashion-mnist", "batch_per_replica": 32, "n_fetch": 1, "n_push": 1,
                            "optimizer": "adagrad", "initial_accumulator_value": 0.1, "warmstart_steps": 0}
REQUIRED = ("model", "replicas", "shards", "lr", "epochs")
KNOWN = set(DEFAULTS) | set(REQUIRED)


def replica_name(j: int) -> str:
    return f"replica{j}"


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


def load_setup(args: argparse.Namespace, data: bool = True) -> Setup:
    """The config's downpour block with the flags' overrides, checked; raises ConfigError with what and why.
    ``data`` False (a shard): the data set is not read, and the sample counts are 0."""

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
    num_train = num_val = 0
    if data:
        info = load_data(args).info  # a missing or corrupt data set, or --holdout too large, fails here, before
        # any process starts
        num_train = min(info.num_train, args.train_subset or info.num_train)
        num_val = min(info.num_val, args.val_subset or info.num_val)
    bounds = ps.partition(sum(sizes.values()), cfg["shards"])
    setup = Setup(cfg, args, num_train, num_val, describe_slices(sizes, bounds), delays, faults, max_dead,
                  bounds, ps.assign_buffers(buffers, cfg["shards"]))
    if data and setup.steps_per_epoch < 1:
        raise ConfigError(f"{num_train} training samples make no step of {setup.W} replicas x "
                          f"{setup.b} samples; use more samples or fewer replicas")
    return setup


def describe_slices(param_sizes: dict[str, int], bounds: list[tuple[int, int]]) -> list[list[str]]:
    """What each slice holds, as ``name[a:b]`` pieces of the flattened tensors (for config.json)."""
    pieces: list[list[str]] = []
    for a, b in bounds:
        pieces.append([])
        start = 0
        for name, n in param_sizes.items():
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                pieces[-1].append(name if (lo, hi) == (start, start + n) else f"{name}[{lo - start}:{hi - start}]")
            start += n
    return pieces


def role_of(rank: int, setup: Setup) -> tuple[str, int]:
    """Rank 0 the coordinator, ranks 1..S the shards, ranks S+1..S+W the replicas: (role, its index)."""
    if rank == 0:
        return COORDINATOR, 0
    if rank <= setup.S:
        return "shard", rank - 1
    return "replica", rank - 1 - setup.S


def rank_of(role: str, index: int, setup: Setup) -> int:
    """The RPC rank of a role (the inverse of :func:`role_of`)."""
    return 0 if role == COORDINATOR else 1 + index if role == "shard" else 1 + setup.S + index


def parse_role(name: str, setup: Setup) -> tuple[str, int]:
    """``--roles`` entry -> (role, index): coordinator, shard<i> (i < S) or replica<j> (j < W)."""
    m = re.fullmatch(r"(shard|replica)(\d+)", name)
    if name == COORDINATOR:
        return COORDINATOR, 0
    if m and int(m.group(2)) < (setup.S if m.group(1) == "shard" else setup.W):
        return m.group(1), int(m.group(2))
    raise ConfigError(f"--roles {name!r}: expected coordinator, shard<i> with i in 0..{setup.S - 1} or replica<j> "
                      f"with j in 0..{setup.W - 1}, e.g. --roles coordinator shard0 replica1")


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
    unreached = sorted({m for v in errors.values() for m in re.findall(r"\b(ps\d+) did not answer", v)})
    why = (f"{', '.join(shards)} failed" if shards else
           f"{dead} of {replicas} replicas failed, --max-dead-replicas allows {max_dead}" + (
               f" (they could not reach {', '.join(unreached)} within --rpc-timeout: a hung or lost shard)"
               if unreached else ""))
    return "\n".join([f"error: the Downpour run failed: {why}", *(f"error: {k}: {v}" for k, v in errors.items())])


_DATA: Any = None


def load_data(args: argparse.Namespace) -> Any:
    """Fashion-MNIST, read once per process (no flips: Dean et al. trained on the data as they were); with
    ``--holdout N`` the last N training samples are the validation set instead of the test set."""
    global _DATA
    if _DATA is None:
        _DATA = fashion_mnist(args.data_dir or FASHION_MNIST_DEFAULT_DIR, 1, args.seed, flip=False)
        if args.holdout:
            _DATA = hold_out(_DATA, args.holdout)
    return _DATA


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
            "val_split": f"the last {setup.args.holdout} training samples (held out)" if setup.args.holdout else "test",
            "warmup_steps": 0}
