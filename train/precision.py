"""Which precision a run gets: the config's, unless this device would run it slowly or not at all.

On a GPU every precision the accelerator supports runs natively. A CPU is different, and CPUs differ:

* fp16. DeepSpeed's CPU accelerator reports fp16 as supported where oneDNN has fp16 kernels (Xeons with
  avx512_fp16, Sapphire Rapids and later), but training there is emulated: the small ResNet's step took 17.6-18.6 s
  in fp16 against about 0.14 s in bf16 on such a
  machine (2 ranks, batch 256). ``--precision auto`` therefore never picks fp16 on a CPU,
  whatever the accelerator says; an explicit ``--precision fp16`` is obeyed with one warning line.
* bf16 is fast only with native instructions (avx512_bf16, AMX); oneDNN emulates it on older AVX-512 CPUs and
  torch falls back to slow reference kernels elsewhere. An x86 CPU whose flags (``/proc/cpuinfo``) name neither
  ``avx512_bf16`` nor ``amx_bf16`` gets fp32 without a probe: it can only emulate bf16 (an AVX2-only AMD EPYC
  measured it at 0.07x fp32's speed), and the probe would spend seconds of emulated work to learn what the flags
  say. Where the flags do name native bf16, or cannot be read, whether it pays is measured: :func:`bf16_speedup`
  times the real model's forward and backward at the run's micro batch in fp32 and in bf16 (about a second), and
  auto takes bf16 only when it is at least :data:`MIN_BF16_SPEEDUP` times faster, else fp32.

The decision itself (:func:`fast_precisions`) is a pure function of the device type, what the accelerator claims,
the CPU's flags (:func:`native_bf16`) and the measured speed-up, so it is tested on any host; the choice and its
reason are printed and recorded in the run's config.json (``derived.precision``, ``derived.precision_reason``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train.config import config_precision

# bf16 must beat fp32 by this factor to be chosen on a CPU: below it, fp32's extra precision is worth more.
MIN_BF16_SPEEDUP = 1.1

# The x86 CPU flags (as Linux names them in /proc/cpuinfo) of native bf16 arithmetic: AVX512-BF16 (Cooper Lake,
# Zen 4 and later) and AMX-BF16 (Sapphire Rapids and later). Without either, bf16 matrix products are emulated.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16(cpuinfo: str) -> bool | None:
    """Whether the CPU described by ``cpuinfo`` (the text of /proc/cpuinfo) has native bf16 instructions: True or
    False from an x86 ``flags`` line, None (unknown: the probe decides) where there is none (another architecture,
    another OS)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(flag in value.split() for flag in NATIVE_BF16_FLAGS)
    return None


def host_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """:func:`native_bf16` of this host; None where ``cpuinfo`` cannot be read."""
    try:
        return native_bf16(cpuinfo.read_text())
    except OSError:
        return None


def fast_precisions(device_type: str, supported: tuple[str, ...],
                    bf16_speedup: Callable[[], float] | None = None,
                    native: bool | None = None) -> tuple[tuple[str, ...], str]:
    """The precisions this device runs at full speed, and a sentence saying why.

    ``supported`` is what the accelerator claims it can run at all; ``bf16_speedup`` (called only on a CPU that
    claims bf16 and whose flags do not rule it out) returns how many times faster bf16 ran than fp32 for this run's
    model and micro batch; ``native`` is :func:`native_bf16` of the CPU (False: no probe, fp32).
    """
    if device_type != "cpu":
        return supported, f"{device_type}: {', '.join(supported)} run natively"
    fast = ["fp32"]
    parts = ["CPU: fp16 is never chosen automatically (emulated, about 100x slower than bf16 where it is "
             "accepted at all)"]
    if "bf16" in supported:
        if bf16_speedup is not None and native is False:
            parts.append(f"bf16 not measured: this CPU has no native bf16 instructions (none of "
                         f"{', '.join(NATIVE_BF16_FLAGS)} in its flags), so bf16 is emulated and slower than fp32")
        elif bf16_speedup is None:
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


def device_precisions(world: Any, cfg: dict[str, Any], requested: str, probe: Callable[[], float],
                      native: bool | None = None) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """What the accelerator supports, what it runs fast, and why, for this run; the same answer on every rank.

    ``probe()`` measures bf16's speed-up (:func:`bf16_speedup`); it runs only where the answer depends on it (a CPU,
    ``--precision auto``, a config asking for fp16 or bf16), on every rank at once (each rank then measures with its
    neighbours busy, as in training), and the ranks average their results. ``native`` (default: this host's
    :func:`host_native_bf16`) False skips it: every rank reads the same flags on one machine; across machines a
    rank that cannot read them would probe alone, so the flags are agreed first (any rank without native bf16
    makes every rank skip).
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
    if needed and "bf16" in supported:
        mine = host_native_bf16() if native is None else native
        # 0: no native bf16, 1: unknown, 2: native; the minimum over the ranks, so that all probe or none does
        code = torch.tensor([{False: 0, None: 1, True: 2}[mine]], dtype=torch.int64)
        torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MIN)
        native = {0: False, 1: None, 2: True}[int(code.item())]
    fast, why = fast_precisions(world.device_type, supported, agreed if needed else None, native)
    return supported, fast, why
