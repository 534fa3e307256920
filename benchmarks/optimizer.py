"""Time one optimizer step on ResNet-50's parameters: LARS against torch SGD, LAMB against torch AdamW.

    python -m benchmarks.optimizer [--repeats 15] [--threads 1 2] [--device cpu] [--arch resnet50]

Builds ``torchvision.models.<arch>()`` (ResNet-50: 25.6M parameters in 161 tensors; no weights are downloaded),
gives every parameter a random gradient, and times ``step()`` in two cases:

* ``groups``: our parameter groups (``build_param_groups``: batch-norm parameters and biases get neither weight
  decay nor a trust ratio), as ``train/imagenet.py`` builds them;
* ``all``: every parameter decayed and adapted, as a user calls ``LARS(model.parameters())`` (and as timm's Lars
  is usually timed).

Each case builds the baselines (``torch.optim.SGD(momentum=0.9, foreach=True)``, ``torch.optim.AdamW(
foreach=True)``), our optimizers on both paths, and our ``SGD`` (the same in-place momentum code as LARS without
the trust ratio: LARS's ratio against it is what the layer-wise norms cost). Rounds step every optimizer once, in
turn, from the same weights, so machine load hits all of them alike; two rounds of warm-up allocate the state.
A ratio is the median over rounds of (time / the baseline's time in the same round). The CPU model (from
/proc/cpuinfo), thread count and load average are printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from optimizers import LAMB, LARS, SGD, build_param_groups

WEIGHT_DECAY = 5e-5  # MLPerf's LARS value for ResNet-50 at large batch

Factory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


def _plain(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """torch's optimizers do not know our ``adapt`` key: leave it out for them."""
    return [{k: v for k, v in g.items() if k != "adapt"} for g in groups]


#: name -> (the baseline its ratio is against, or None for a baseline; factory of param groups -> optimizer)
OPTIMIZERS: dict[str, tuple[str | None, Factory]] = {
    "torch SGD (foreach)": (None, lambda g: torch.optim.SGD(_plain(g), lr=0.1, momentum=0.9,
                                                             weight_decay=WEIGHT_DECAY, foreach=True)),
    "LARS (foreach)": ("torch SGD (foreach)", lambda g: LARS(g, lr=10.0, momentum=0.9, weight_decay=WEIGHT_DECAY,
                                                            foreach=True)),
    "LARS (single-tensor)": ("torch SGD (foreach)", lambda g: LARS(g, lr=10.0, momentum=0.9,
                                                                  weight_decay=WEIGHT_DECAY, foreach=False)),
    "our SGD (foreach)": ("torch SGD (foreach)", lambda g: SGD(g, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY,
                                                              foreach=True)),
    "torch AdamW (foreach)": (None, lambda g: torch.optim.AdamW(_plain(g), lr=1e-3, weight_decay=WEIGHT_DECAY,
                                                                 foreach=True)),
    "LAMB (foreach)": ("torch AdamW (foreach)", lambda g: LAMB(g, lr=1e-3, weight_decay=WEIGHT_DECAY, foreach=True)),
    "LAMB (single-tensor)": ("torch AdamW (foreach)", lambda g: LAMB(g, lr=1e-3, weight_decay=WEIGHT_DECAY,
                                                                    foreach=False)),
}
#: Extra ratios printed beside the baseline's: (optimizer, reference).
EXTRA = {"LARS (foreach)": "our SGD (foreach)"}


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(model: torch.nn.Module, case: str, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each optimizer in ``OPTIMIZERS``, ``repeats`` interleaved rounds after 2 warm-up ones."""
    params = [p for p in model.parameters() if p.requires_grad]

    def groups() -> list[dict[str, Any]]:
        if case == "groups":
            return build_param_groups(model, WEIGHT_DECAY)
        return [{"params": params}]  # what LARS(model.parameters(), weight_decay=...) gets

    originals = [p.detach().clone() for p in params]
    optimizers = {name: make(groups()) for name, (_, make) in OPTIMIZERS.items()}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    with torch.no_grad():
        for rnd in range(repeats + 2):
            for name, opt in optimizers.items():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)  # every optimizer steps from the same weights
                _sync(device)
                start = time.perf_counter()
                opt.step()
                _sync(device)
                if rnd >= 2:
                    times[name].append(time.perf_counter() - start)
        for p, w in zip(params, originals, strict=True):
            p.copy_(w)
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``times[name][r] / times[base][r]``."""
    per_round = [a / b for a, b in zip(times[name], times[base], strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def report(times: dict[str, list[float]]) -> list[str]:
    lines = []
    for name, (base, _) in OPTIMIZERS.items():
        ms = statistics.median(times[name]) * 1e3
        if base is None:
            lines.append(f"  {name:22s} {ms:8.1f} ms  baseline")
            continue
        med, lo, hi = ratio(times, name, base)
        text = f"  {name:22s} {ms:8.1f} ms  {med:5.2f}x {base} (rounds {lo:.2f}-{hi:.2f})"
        if name in EXTRA:
            m2, lo2, hi2 = ratio(times, name, EXTRA[name])
            text += f"; {m2:.2f}x {EXTRA[name]} ({lo2:.2f}-{hi2:.2f})"
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time one optimizer step on ResNet-50's parameters.")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case (default 15)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch.set_num_threads values to run, in turn (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="device for parameters and state (default cpu)")
    parser.add_argument("--arch", default="resnet50", help="torchvision model whose parameters are stepped "
                        "(default resnet50)")
    parser.add_argument("--cases", nargs="+", choices=("groups", "all"), default=["groups", "all"],
                        help="groups: BN/bias excluded (ours); all: LARS(model.parameters()) (default: both)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.threads is not None and min(args.threads) < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    import torchvision

    device = torch.device(args.device)
    model = getattr(torchvision.models, args.arch)().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-2
    adapted = len(build_param_groups(model, WEIGHT_DECAY)[0]["params"])
    where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.arch}: {sum(p.numel() for p in params) / 1e6:.1f}M parameters in {len(params)} tensors; "
          f"device {device} ({where}); torch {torch.__version__}; weight decay {WEIGHT_DECAY}; {args.repeats} rounds")
    print("ratio: median over rounds of (step time / the baseline's step time in the same round)")
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for case in args.cases:
            times = time_case(model, case, args.repeats, device)
            what = (f"our groups ({adapted} of {len(params)} tensors decayed and adapted)" if case == "groups"
                    else f"all {len(params)} tensors decayed and adapted, LARS(model.parameters())")
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"\n{where}, {threads} thread{'s' if threads > 1 else ''}, {what}; load average {load}")
            print("\n".join(report(times)))


if __name__ == "__main__":
    main()
