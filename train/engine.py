"""From a resolved config and a model to a DeepSpeed engine that every entry point trains the same way.

:func:`build_optimizer_and_schedule` builds our optimizers (optimizers/) and schedules (train/schedules.py) from the
config's blocks and completes the DeepSpeed config: the one place, after :func:`train.config.resolve`, where what
DeepSpeed is given is decided. :func:`build_engine` calls ``deepspeed.initialize`` and then applies what every run
needs from us: layer-wise optimizers bound to the real layers behind DeepSpeed's flat partitions, the run's
collective timeout on every process group, checkpoint loads that cannot run code, and DeepSpeed's skip rule for
non-finite steps in the one mode that lacks it. Importing this module imports DeepSpeed's Muon module with its
compilation put off to the first call (:func:`import_muon_without_compiling`), before any engine is built.
"""

from __future__ import annotations

import functools
import sys
from datetime import timedelta
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

import optimizers
from train.checkpoints import load_weights_only
from train.config import ConfigError, Resolved
from train.distributed import set_collective_timeout
from train.faults import skip_nonfinite_steps
from train.schedules import SCHEDULES

MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


class LazyCompiled:
    """``fn`` compiled with ``torch.compile(fn, **options)`` on its first call, not where it is decorated
    (``torch.compile`` with its default backend imports ``torch._inductor`` at decoration); ``compiled`` is None
    until then."""

    def __init__(self, fn: Any, options: dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)
        self.fn, self.options = fn, options
        self.compiled: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, **self.options)
        return self.compiled(*args, **kwargs)


def lazy_compile(**options: Any) -> Any:
    """A decorator like ``torch.compile(**options)`` compiling on the first call (:class:`LazyCompiled`)."""
    return lambda fn: LazyCompiled(fn, options)


def import_muon_without_compiling() -> None:
    """Import DeepSpeed's Muon module with its ``@compiler.compile()`` functions compiled on first call.

    DeepSpeed 0.19's ZeRO (stages 1-3) and bf16 optimizers import this module in every run, whatever the optimizer
    (for isinstance checks, and ``from ... import muon_update`` in each gradient reduction), and the module's
    Newton-Schulz functions are decorated with ``torch.compile`` at import, which imports ``torch._inductor``:
    about 1.2 CPU-seconds and 48 MB per rank (measured on torch 2.14, DeepSpeed 0.19.8), for code a run without
    Muon never calls. Here the module is the real one, all its names intact; only the compilation moves to the first
    call, so a Muon run compiles the same functions when it first uses them."""
    if MUON_MODULE in sys.modules:
        return
    from deepspeed.runtime import compiler
    original = compiler.compile
    compiler.compile = lambda: lazy_compile()  # DeepSpeed's compile() returns torch.compile, used as a decorator
    try:
        __import__(MUON_MODULE)
    finally:
        compiler.compile = original


import_muon_without_compiling()


def build_optimizer_and_schedule(resolved: Resolved, model: torch.nn.Module) -> tuple[Any, Any, dict[str, Any]]:
    """Our optimizer and schedule (None where DeepSpeed builds its own), and the config DeepSpeed is given."""
    ds_config = dict(resolved.ds_config)
    ds_config.setdefault("steps_per_print", 10 ** 9)  # we print our own progress
    # DeepSpeed's throughput timer (on by default) calls get_accelerator().synchronize() when forward starts it and
    # when step stops it, twice per micro-step from the third step on; StepMeter times our records without it.
    ds_config.setdefault("timers", {"throughput": {"enabled": False}})
    opt_name = str(resolved.optimizer["type"])
    optimizer = None
    if opt_name.lower() in optimizers.KNOWN_OPTIMIZERS:
        try:
            optimizer = optimizers.build_optimizer(
                opt_name, model, resolved.optimizer["params"],
                exclude_norm_and_bias=resolved.training["exclude_norm_and_bias"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"optimizer {opt_name}: {e}") from None
        ds_config.pop("optimizer")
        if resolved.zero_stage > 0:
            ds_config["zero_allow_untested_optimizer"] = True
    elif opt_name.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, opt_name):
        known = sorted(set(optimizers.KNOWN_OPTIMIZERS) | set(DEEPSPEED_OPTIMIZERS))
        raise ConfigError(f"unknown optimizer type {opt_name!r}; known: {', '.join(known)} "
                          f"(or a torch.optim class name)")

    schedule: Any = None
    if resolved.scheduler is not None:
        sched_name = resolved.scheduler["type"]
        if sched_name in SCHEDULES:
            sched_cls, sched_params = SCHEDULES[sched_name], resolved.scheduler["params"]
            try:  # checked now on a stand-in when DeepSpeed builds the optimizer: a bad value fails before the engine
                schedule = sched_cls(optimizer or torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                     **sched_params)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"scheduler {sched_name}: {e}") from None
            if optimizer is None:  # DeepSpeed builds the optimizer (AdamW ...); initialize calls this with it
                schedule = functools.partial(sched_cls, **sched_params)
            ds_config.pop("scheduler")
        elif sched_name not in VALID_LR_SCHEDULES and not hasattr(torch.optim.lr_scheduler, sched_name):
            raise ConfigError(f"unknown scheduler type {sched_name!r}; known: "
                              f"{', '.join(sorted(set(SCHEDULES) | set(VALID_LR_SCHEDULES)))} "
                              f"(or a torch.optim.lr_scheduler class name)")
    return optimizer, schedule, ds_config


def foreign_param_groups(resolved: Resolved, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Our parameter groups for an optimizer DeepSpeed builds (AdamW, torch.optim classes): the decayed weights
    take the config's weight_decay, normalisation parameters and biases none under ``exclude_norm_and_bias``
    (Devlin et al.'s AdamW excludes LayerNorm and biases), as for our optimizers. DeepSpeed passes the groups to
    the optimizer's constructor, where a group's own ``weight_decay`` wins over the constructor's."""
    weight_decay = float(resolved.optimizer["params"].get("weight_decay", 0.0))
    groups = optimizers.build_param_groups(model, weight_decay,
                                           exclude_norm_and_bias=resolved.training["exclude_norm_and_bias"])
    return [{k: v for k, v in g.items() if k != "adapt"} for g in groups]  # "adapt" is a key of our optimizers


def build_engine(resolved: Resolved, model: torch.nn.Module, *, timeout: timedelta, trusted_checkpoint: bool,
                 say: Any = print) -> tuple[Any, dict[str, Any]]:
    """``deepspeed.initialize`` with our optimizer and schedule; return the engine and the config it was given."""
    optimizer, schedule, ds_config = build_optimizer_and_schedule(resolved, model)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        model_parameters=None if optimizer is not None else foreign_param_groups(resolved, model))
    if optimizer is not None:
        say(optimizers.bind_deepspeed(engine))  # layer-wise optimizers learn the real layers behind flat partitions
    set_collective_timeout(timeout)  # also for the groups DeepSpeed made (ZeRO's gradient all-reduce)
    if not trusted_checkpoint:
        load_weights_only(engine)  # checkpoint files load with torch.load(weights_only=True)
    skip_nonfinite_steps(engine)  # fp32 without ZeRO: a non-finite gradient skips the step as in the other modes
    if engine.train_micro_batch_size_per_gpu() != resolved.micro_batch or \
            engine.gradient_accumulation_steps() != resolved.grad_accum:
        raise RuntimeError(f"DeepSpeed derived micro batch {engine.train_micro_batch_size_per_gpu()} x "
                           f"accumulation {engine.gradient_accumulation_steps()}, not {resolved.micro_batch} x "
                           f"{resolved.grad_accum}")
    return engine, ds_config


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype the engine's module computes in."""
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.half if engine.fp16_enabled() else torch.float32
