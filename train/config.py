"""One JSON file defines an experiment: read it, check it, and resolve it against the machine and data set.

The file is a DeepSpeed config plus one block of our own:

* DeepSpeed's keys (``train_batch_size``, ``train_micro_batch_size_per_gpu``, ``fp16``/``bf16``,
  ``zero_optimization``, ...) mean what DeepSpeed says they mean.
* ``"optimizer": {"type": NAME, "params": {...}}`` has DeepSpeed's shape. Our own optimizers
  (``optimizers.KNOWN_OPTIMIZERS``: SGD, LARS, LARC, LAMB) are built here and handed to
  ``deepspeed.initialize``; any other name is left for DeepSpeed (its built-ins, then ``torch.optim``).
* ``"scheduler": {"type": NAME, "params": {...}}`` has DeepSpeed's shape. Our schedules
  (``train.schedules.SCHEDULES``) are built here; DeepSpeed's own (WarmupLR, ...) are passed through.
  In either, a parameter whose name ends in ``_epochs`` is given in epochs and is converted to the
  matching ``_steps`` parameter for the data set actually used (``warmup_num_epochs`` becomes
  ``warmup_num_steps``), and ``"auto"`` for ``total_num_steps``/``total_num_epochs`` means the run's length.
* ``"training"`` is ours: ``epochs``, ``label_smoothing``, ``zero_init_residual``, ``recipe`` (where the
  numbers come from). DeepSpeed never sees it.

Everything here runs before the model or the data are built, so a bad file fails in a second.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 90,
    "label_smoothing": 0.0,
    "zero_init_residual": True,  # Goyal et al. 5.1: gamma = 0 for the last BN of each residual block
    "exclude_norm_and_bias": True,  # no weight decay / no layer-wise adaptation for BN params and biases
    # Smith et al. 2018: {"milestones_epochs": [30, 60, 80], "factor": 10} multiplies the global batch by factor at
    # each milestone (DeepSpeed's engine.set_train_batch_size: more accumulation steps) instead of decaying the lr.
    "batch_increase": None,
    # Smith et al. 2018 (arXiv:1711.00489) sec. 5: the noise scale g ~ lr N / (B (1 - m)), so raising the momentum
    # lets the batch grow at a fixed lr, B ~ 1 / (1 - m). {"base_batch": 256, "base_momentum": 0.9} sets the
    # optimizer's momentum (LAMB: beta1) for the run's global batch B to 1 - (1 - base_momentum) x base_batch / B.
    "momentum_scaling": None,
    "recipe": "",
}

PRECISIONS = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A config or command line that cannot run; the message says what, which value, and what was expected."""


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON config, naming the file, line and column of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (expected a DeepSpeed JSON file, e.g. "
                          f"ds_configs/8k.json)")
    text = path.read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, found {type(cfg).__name__}")
    return cfg


def config_precision(cfg: dict[str, Any]) -> str:
    """The precision a config asks for: 'fp16', 'bf16' or 'fp32'."""
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise ConfigError("config enables both fp16 and bf16; enable at most one")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def set_precision(cfg: dict[str, Any], precision: str) -> None:
    """Rewrite the fp16/bf16 blocks of a DeepSpeed config in place to select ``precision``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    fp16 = cfg.get("fp16", {})
    cfg.pop("fp16", None)
    cfg.pop("bf16", None)
    if precision == "fp16":
        cfg["fp16"] = {**fp16, "enabled": True}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}


def batch_arithmetic(
    train_batch: int | None, micro_batch: int | None, grad_accum: int | None, world_size: int
) -> tuple[int, int, int]:
    """Solve DeepSpeed's rule train_batch = micro_batch x grad_accum x world_size; return all three.

    Two of the three settings must be given; a given third must agree. Errors name the numbers.
    """
    for name, value in (("train_batch_size", train_batch), ("train_micro_batch_size_per_gpu", micro_batch),
                        ("gradient_accumulation_steps", grad_accum)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if micro_batch is None:
        if train_batch is None or grad_accum is None:
            raise ConfigError("config needs train_micro_batch_size_per_gpu, or both train_batch_size and "
                              "gradient_accumulation_steps")
        micro_batch, rem = divmod(train_batch, grad_accum * world_size)
        if rem or micro_batch == 0:
            raise ConfigError(f"train_batch_size {train_batch} does not divide by gradient_accumulation_steps "
                              f"{grad_accum} x world size {world_size}")
    if train_batch is None:
        train_batch = micro_batch * (grad_accum or 1) * world_size
    per_step = micro_batch * world_size
    accum, rem = divmod(train_batch, per_step)
    if rem or accum == 0:
        ok = reachable_world_sizes(train_batch, micro_batch)
        worlds = (f"world sizes that can reach it with this micro batch: {nearest(ok, world_size)} (all: "
                  f"{', '.join(map(str, ok[:12]))}{', ...' if len(ok) > 12 else ''}); " if ok else "")
        raise ConfigError(
            f"train_batch_size {train_batch} does not divide by train_micro_batch_size_per_gpu {micro_batch} x "
            f"world size {world_size} = {per_step}; {worlds}or choose a global batch that is a multiple of "
            f"{per_step}, or a micro batch that divides "
            f"{train_batch // world_size if train_batch % world_size == 0 else '?'}")
    if grad_accum is not None and grad_accum != accum:
        raise ConfigError(f"gradient_accumulation_steps {grad_accum} disagrees with train_batch_size {train_batch} / "
                          f"(micro batch {micro_batch} x world size {world_size}) = {accum}; remove one of them")
    return train_batch, micro_batch, accum


def reachable_world_sizes(global_batch: int, micro_batch: int) -> list[int]:
    """The world sizes that reach ``global_batch`` with ``micro_batch`` per rank and whole accumulation steps (an
    elastic resume keeps the global batch: train/reshard.py)."""
    most = global_batch // micro_batch if global_batch % micro_batch == 0 else 0
    return [w for w in range(1, most + 1) if most % w == 0]


def nearest(sizes: list[int], world_size: int) -> str:
    """The nearest of ``sizes`` below and above ``world_size``: '2 or 4'."""
    below, above = [w for w in sizes if w < world_size], [w for w in sizes if w > world_size]
    return " or ".join(str(w) for w in below[-1:] + above[:1])


def check_world_size(cfg: dict[str, Any], micro_batch: int | None, world_size: int) -> None:
    """Refuse, before anything heavy, a world size whose ranks cannot reach the config's global batch (the batch
    arithmetic of :func:`resolve`; ``micro_batch``: the --micro-batch flag, which replaces the config's accumulation
    steps)."""
    batch_arithmetic(cfg.get("train_batch_size"), micro_batch or cfg.get("train_micro_batch_size_per_gpu"),
                     None if micro_batch else cfg.get("gradient_accumulation_steps"), world_size)


def epochs_to_steps(params: dict[str, Any], steps_per_epoch: int | list[int], total_steps: int) -> dict[str, Any]:
    """Convert every ``*_epochs`` scheduler parameter to its ``*_steps`` counterpart (lists elementwise).

    ``steps_per_epoch`` is one number, or the steps of each epoch when the batch changes during the run (Smith et
    al.'s schedule): then epoch e starts at the sum of the steps of the epochs before it. ``"auto"`` as a total
    (``total_num_steps``/``total_num_epochs``) means the run's total number of steps.
    """
    def at(epoch: float) -> int:
        if isinstance(steps_per_epoch, int):
            return int(round(epoch * steps_per_epoch))
        whole = min(int(epoch), len(steps_per_epoch))
        rest = (epoch - whole) * steps_per_epoch[min(whole, len(steps_per_epoch) - 1)]
        return sum(steps_per_epoch[:whole]) + int(round(rest))

    out: dict[str, Any] = {}
    for key, value in params.items():
        if value == "auto" and key in ("total_num_steps", "total_num_epochs"):
            out["total_num_steps"] = total_steps
        elif key.endswith("_epochs"):
            new_key = key[: -len("_epochs")] + "_steps"
            if new_key in params:
                raise ConfigError(f"scheduler gives both {key} and {new_key}; give one")

            def conv(v: Any, key: str = key) -> int:
                if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                    raise ConfigError(f"scheduler parameter {key} must be a number of epochs >= 0, got {v!r}")
                return at(v)

            out[new_key] = [conv(v) for v in value] if isinstance(value, list) else conv(value)
        else:
            out[key] = value
    return out


def batch_schedule(increase: dict[str, Any] | None, batch: int, epochs: int, unit: int, num_train: int) -> list[int]:
    """The global batch of every epoch under Smith et al.'s schedule (constant ``batch`` without one)."""
    if not increase:
        return [batch] * epochs
    if not isinstance(increase, dict) or set(increase) != {"milestones_epochs", "factor"}:
        raise ConfigError(f'training.batch_increase must be {{"milestones_epochs": [...], "factor": N}}, got '
                          f"{increase!r}")
    factor, milestones = increase["factor"], increase["milestones_epochs"]
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
        raise ConfigError(f"training.batch_increase.factor must be an integer >= 2, got {factor!r}")
    if not isinstance(milestones, list) or not all(isinstance(m, int) and m > 0 for m in milestones):
        raise ConfigError(f"training.batch_increase.milestones_epochs must be a list of positive whole epochs, "
                          f"got {milestones!r}")
    out = [batch * factor ** sum(e >= m for m in milestones) for e in range(epochs)]
    for e, b in enumerate(out):
        if b > num_train:
            raise ConfigError(f"training.batch_increase makes the global batch {b} at epoch {e}, larger than the "
                              f"training set ({num_train} samples)")
        if b % unit:
            raise ConfigError(f"training.batch_increase makes the global batch {b} at epoch {e}, not a multiple "
                              f"of micro batch x world size = {unit}")
    return out


def scaled_momentum(batch: int, base_batch: int, base_momentum: float) -> float:
    """Smith et al.'s momentum for ``batch``: B / (1 - m) held at base_batch / (1 - base_momentum)."""
    m = 1.0 - (1.0 - base_momentum) * base_batch / batch
    if not 0.0 <= m < 1.0:
        raise ConfigError(f"training.momentum_scaling gives momentum {m:.4g} at global batch {batch} (base batch "
                          f"{base_batch}, base momentum {base_momentum}); expected a momentum in [0, 1): use a "
                          f"base batch of at most {batch / (1.0 - base_momentum):.0f}")
    return m


def apply_momentum_scaling(scaling: Any, optimizer: dict[str, Any], batch: int, notes: list[str]) -> None:
    """Set the momentum (or LAMB's beta1) in ``optimizer["params"]`` by :func:`scaled_momentum`."""
    if not isinstance(scaling, dict) or set(scaling) != {"base_batch", "base_momentum"}:
        raise ConfigError(f'training.momentum_scaling must be {{"base_batch": N, "base_momentum": m}}, got '
                          f"{scaling!r}")
    base_batch, base_m = scaling["base_batch"], scaling["base_momentum"]
    if not isinstance(base_batch, int) or isinstance(base_batch, bool) or base_batch < 1:
        raise ConfigError(f"training.momentum_scaling.base_batch must be a positive integer, got {base_batch!r}")
    if not isinstance(base_m, (int, float)) or isinstance(base_m, bool) or not 0.0 <= base_m < 1.0:
        raise ConfigError(f"training.momentum_scaling.base_momentum must be in [0, 1), got {base_m!r}")
    m = scaled_momentum(batch, base_batch, float(base_m))
    params = optimizer["params"]
    if "betas" in params:
        params["betas"] = [m, *list(params["betas"])[1:]]
    elif "momentum" in params or str(optimizer["type"]).lower() in ("sgd", "lars", "larc"):
        params["momentum"] = m
    else:
        raise ConfigError(f"training.momentum_scaling needs an optimizer with a momentum or betas parameter; "
                          f"{optimizer['type']} has neither in its params")
    notes.append(f"momentum scaling (Smith et al. 2018): momentum {m:.6g} at global batch {batch} "
                 f"(= 1 - (1 - {base_m}) x {base_batch}/{batch})")


@dataclass
class Resolved:
    """The experiment after resolving the file against world size, data set size and precision."""

    ds_config: dict[str, Any]  # what DeepSpeed is given
    training: dict[str, Any]
    optimizer: dict[str, Any]  # {"type", "params"}
    scheduler: dict[str, Any] | None  # {"type", "params"} with steps, or None
    world_size: int
    global_batch: int
    micro_batch: int
    grad_accum: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    precision: str
    config_precision: str
    zero_stage: int
    notes: list[str] = field(default_factory=list)
    precision_reason: str = ""  # why this precision (train/precision.py): recorded in config.json
    epoch_batches: list[int] = field(default_factory=list)  # the global batch of each epoch

    def batch_at(self, epoch: int) -> int:
        return self.epoch_batches[epoch] if epoch < len(self.epoch_batches) else self.global_batch

    def derived(self) -> dict[str, Any]:
        sp = (self.scheduler or {}).get("params", {})
        return {
            "world_size": self.world_size, "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
            "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
            "total_steps": self.total_steps, "precision": self.precision, "config_precision": self.config_precision,
            "precision_reason": self.precision_reason,
            "zero_stage": self.zero_stage, "optimizer": self.optimizer.get("type"),
            "lr": peak_lr(self.optimizer, self.scheduler),
            "warmup_steps": sp.get("warmup_num_steps", 0),
            "decay_steps": sp.get("milestones_steps", sp.get("total_num_steps")),
            "epoch_batches": self.epoch_batches if len(set(self.epoch_batches)) > 1 else None,
        }


def peak_lr(optimizer: dict[str, Any], scheduler: dict[str, Any] | None) -> float | None:
    """The largest lr of the run: the scheduler's warmup target when it has one, else the optimizer's lr."""
    sp = (scheduler or {}).get("params", {})
    for key in ("warmup_max_lr", "max_lr", "cycle_max_lr"):
        if key in sp:
            return float(sp[key])
    lr = optimizer.get("params", {}).get("lr")
    return None if lr is None else float(lr)


def choose_precision(wanted: str, requested: str, supported: tuple[str, ...], fast: tuple[str, ...],
                     notes: list[str]) -> str:
    """The precision a run gets: ``requested`` if given (and supported), else the config's ``wanted`` if it is fast
    here, else bf16 if fast, else fp32; warnings go to ``notes`` (one line each)."""
    if requested == "auto":
        if wanted in fast:
            return wanted
        chosen = "bf16" if "bf16" in fast else "fp32"
        why = "not supported" if wanted not in supported else "not natively supported (emulated, slow)"
        notes.append(f"WARNING: {wanted} is {why} on this device; running in {chosen} instead "
                     f"(same optimizer math, different rounding; --precision forces one)")
        return chosen
    if requested not in PRECISIONS:
        raise ConfigError(f"unknown precision {requested!r}; expected auto, {', '.join(PRECISIONS)}")
    if requested not in supported:
        raise ConfigError(f"--precision {requested} is not supported on this device; supported: "
                          f"{', '.join(p for p in PRECISIONS if p in supported)}")
    if requested == "fp16" and "fp16" not in fast:
        notes.append("WARNING: --precision fp16 on this device is emulated and slow (often 100x bf16's step "
                     "time on a CPU); --precision auto picks bf16 or fp32 by measured speed")
    return requested


def resolve(
    cfg: dict[str, Any],
    *,
    world_size: int,
    num_train: int,
    epochs: int | None = None,
    micro_batch: int | None = None,
    precision: str = "auto",
    supported_precisions: tuple[str, ...] = PRECISIONS,
    fast_precisions: tuple[str, ...] = PRECISIONS,
    precision_reason: str = "",
) -> Resolved:
    """Resolve a loaded config for a run: batch arithmetic, precision fallback, epochs -> steps.

    ``supported_precisions`` are those the device can run at all, ``fast_precisions`` those it runs natively. With
    ``precision="auto"`` a config asking for a precision that is not fast here runs in bf16 if that is fast, else
    fp32, and ``notes`` carries the one-line warning (fp16 on a CPU). An explicit precision is obeyed if supported.
    """
    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    training = {**TRAINING_DEFAULTS, **cfg.pop("training", {})}
    unknown = set(training) - set(TRAINING_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown key(s) in the 'training' block: {sorted(unknown)}; "
                          f"known: {sorted(TRAINING_DEFAULTS)}")
    if epochs is not None:
        training["epochs"] = epochs
    if not isinstance(training["epochs"], int) or training["epochs"] < 1:
        raise ConfigError(f"epochs must be a positive integer, got {training['epochs']!r}")

    if micro_batch is not None:  # a command-line override changes accumulation, not the global batch
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
        cfg.pop("gradient_accumulation_steps", None)
    global_batch, micro, accum = batch_arithmetic(
        cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu"),
        cfg.get("gradient_accumulation_steps"), world_size)
    cfg["train_batch_size"] = global_batch
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum

    steps_per_epoch = num_train // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"global batch {global_batch} is larger than the training set ({num_train} samples): "
                          f"an epoch would have no optimizer step")
    epoch_batches = batch_schedule(training["batch_increase"], global_batch, training["epochs"], micro * world_size,
                                   num_train)
    total_steps = sum(num_train // b for b in epoch_batches)

    wanted = config_precision(cfg)
    chosen = choose_precision(wanted, precision, supported_precisions, fast_precisions, notes)
    set_precision(cfg, chosen)
    if chosen != "fp32":
        # DeepSpeed casts parameters but not buffers; batch norm's running statistics must match the input dtype.
        cfg.setdefault("data_types", {}).setdefault("buffer_dtype", chosen)
    if "gradient_clipping" not in cfg:
        # DeepSpeed 0.19 clips at global norm 1.0 when the key is absent; none of the papers' recipes clip.
        cfg["gradient_clipping"] = 0.0

    zero = cfg.get("zero_optimization", {})
    zero_stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage {zero_stage} is not supported here; expected 0, 1 or 2 "
                          f"(stage 3 shards parameters, which layer-wise optimizers do not handle yet)")

    optimizer = cfg.get("optimizer")
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        raise ConfigError('config needs an "optimizer": {"type": NAME, "params": {...}} block')
    optimizer = {"type": optimizer["type"], "params": dict(optimizer.get("params", {}))}
    lr = optimizer["params"].get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise ConfigError(f"optimizer lr must be a positive number, got {lr!r}")
    if training["momentum_scaling"] is not None:
        apply_momentum_scaling(training["momentum_scaling"], optimizer, global_batch, notes)
        cfg["optimizer"] = optimizer  # DeepSpeed's copy (when DeepSpeed builds the optimizer) says the same

    scheduler = cfg.get("scheduler")
    if scheduler is not None:
        if not isinstance(scheduler, dict) or "type" not in scheduler:
            raise ConfigError('"scheduler" must look like {"type": NAME, "params": {...}}')
        scheduler = {"type": scheduler["type"],
                     "params": epochs_to_steps(dict(scheduler.get("params", {})), steps_per_epoch if len(set(
                         epoch_batches)) == 1 else [num_train // b for b in epoch_batches], total_steps)}
        cfg["scheduler"] = scheduler
        for key in ("warmup_min_lr", "warmup_max_lr"):
            v = scheduler["params"].get(key)
            if v is not None and (not isinstance(v, (int, float)) or v < 0):
                raise ConfigError(f"scheduler {key} must be a number >= 0, got {v!r}")

    return Resolved(
        ds_config=cfg, training=training, optimizer=optimizer, scheduler=scheduler, world_size=world_size,
        global_batch=global_batch, micro_batch=micro, grad_accum=accum, steps_per_epoch=steps_per_epoch,
        epochs=training["epochs"], total_steps=total_steps, precision=chosen, config_precision=wanted,
        zero_stage=zero_stage, notes=notes, precision_reason=precision_reason, epoch_batches=epoch_batches)
