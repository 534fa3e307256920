"""Which precision a run gets: the config's, unless this device would run it slowly or not at all.

On a GPU every precision the accelerator supports runs natively. A CPU is different, and CPUs differ:

* fp16. DeepSpeed's CPU accelerator reports fp16 as supported where oneDNN has fp16 kernels (Xeons with
  avx512_fp16, Sapphire Rapids and later), but training there is emulated: the small ResNet's step took 17.6-18.6 s
  in fp16 against about 0.14 s in bf16 on such a
  machine (2 ranks, batch 256). ``--precision auto`` therefore never picks fp16 on a CPU,
  whatever the accelerator says; an explicit ``--precision fp16`` is obeyed with one warning line.
* bf16 is fast only with native instructions (avx512_bf16, AMX); oneDNN emulates it on older AVX-512 CPUs and
  torch falls back to slow reference kernels elsewhere. Whether it pays is measured, not guessed from flags:
  :func:`bf16_speedup` times the real model's forward and backward at the run's micro batch in fp32 and in bf16
  (about a second), and auto takes bf16 only when it is at least :data:`MIN_BF16_SPEEDUP` times faster, else fp32.

The decision itself (:func:`fast_precisions`) is a pure function of the device type, what the accelerator claims
and the measured speed-up, so it is tested on any host; the choice and its reason are printed and recorded in the
run's config.json (``derived.precision``, ``derived.precision_reason``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from train.config import config_precision

# bf16 must beat fp32 by this factor to be chosen on a CPU: below it, fp32's extra precision is worth more.
MIN_BF16_SPEEDUP = 1.1


def fast_precisions(device_type: str, supported: tuple[str, ...],
                    bf16_speedup: Callable[[], float] | None = None) -> tuple[tuple[str, ...], str]:
    """The precisions this device runs at full speed, and a sentence saying why.

    ``supported`` is what the accelerator claims it can run at all; ``bf16_speedup`` (called only on a CPU that
    claims bf16) returns how many times faster bf16 ran than fp32 for this run's model and micro batch.
    """
    if device_type != "cpu":
        return supported, f"{device_type}: {', '.join(supported)} run natively"
    fast = ["fp32"]
    parts = ["CPU: fp16 is never chosen automatically (emulated, about 100x slower than bf16 where it is "
             "accepted at all)"]
    if "bf16" in supported:
        if bf16_speedup is None:
            parts.append("bf16 not measured (the config asks for fp32, or --precision was given)")
        else:
            speedup = bf16_speedup()
            if speedup >= MIN_BF16_SPEEDUP:
                fast.append("bf16")
            parts.append(f"bf16 measured {speedup:.2f}x fp32's speed on this model and micro batch "
                         f"({'>=' if speedup >= MIN_BF16_SPEEDUP else '<'} {MIN_BF16_SPEEDUP}x: "
                         f"{'fast' if 'bf16' in fast else 'not worth it'})")
    else:
        parts.append("bf16 not supported")
    return tuple(fast), "; ".join(parts)


def bf16_speedup(model: torch.nn.Module, example: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                 target: torch.Tensor, *, seconds: float = 1.0, max_pairs: int = 8) -> float:
    """fp32 time over bf16 time of one forward and backward of ``model`` on ``example`` (fastest of paired runs).

    The model is copied (its weights and BatchNorm statistics are not touched). fp32 and bf16 alternate, after one
    warm-up each, so a change of machine load hits both; at least 3 pairs are timed, then more until ``seconds``
    have passed or ``max_pairs`` are done, and each precision's fastest run counts (other programs on the machine
    only ever add time). bf16 runs as DeepSpeed's bf16 mode does: weights and inputs in bf16.
    """
    models = {torch.float32: copy.deepcopy(model).float(), torch.bfloat16: copy.deepcopy(model).to(torch.bfloat16)}
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}

    def once(dtype: torch.dtype) -> float:
        m = models[dtype]
        t0 = time.perf_counter()
        loss_fn(m(example.to(dtype)).float(), target).backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for dtype in models:  # warm-up: oneDNN picks and caches its kernels on the first call
        once(dtype)
    start = time.perf_counter()
    while len(times[torch.float32]) < max_pairs:
        for dtype in models:
            times[dtype].append(once(dtype))
        if len(times[torch.float32]) >= 3 and time.perf_counter() - start >= seconds:
            break
    return min(times[torch.float32]) / min(times[torch.bfloat16])


def device_precisions(world: Any, cfg: dict[str, Any], requested: str,
                      probe: Callable[[], float]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """What the accelerator supports, what it runs fast, and why, for this run; the same answer on every rank.

    ``probe()`` measures bf16's speed-up (:func:`bf16_speedup`); it runs only where the answer depends on it (a CPU,
    ``--precision auto``, a config asking for fp16 or bf16), on every rank at once (each rank then measures with its
    neighbours busy, as in training), and the ranks average their results.
    """
    from deepspeed.accelerator import get_accelerator  # heavy: imported when a run starts

    accel = get_accelerator()
    supported = ("fp32",) + (("fp16",) if accel.is_fp16_supported() else ()) + (
        ("bf16",) if accel.is_bf16_supported() else ())

    def agreed() -> float:
        mean = torch.tensor([probe()], dtype=torch.float64)
        torch.distributed.all_reduce(mean)
        return mean.item() / world.size

    needed = world.on_cpu and requested == "auto" and config_precision(cfg) != "fp32"
    fast, why = fast_precisions(world.device_type, supported, agreed if needed else None)
    return supported, fast, why
