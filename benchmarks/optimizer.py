"""Time one optimizer step on ResNet-50's parameters: LARS against torch SGD, LAMB against torch AdamW.

    python -m benchmarks.optimizer [--repeats 15] [--threads 1 2] [--device cpu] [--arch resnet50]

Builds ``torchvision.models.<arch>()`` (ResNet-50: 25.6M parameters in 161 tensors; no weights are downloaded),
gives every parameter a random gradient, and times ``step()`` in two cases:

* ``groups``: our parameter groups (``build_param_groups``: batch-norm parameters and biases get neither weight
  decay nor a trust ratio), as ``train/imagenet.py`` builds them;
* ``all``: every parameter decayed and adapted, as a user calls ``LARS(model.parameters())`` (and as timm's Lars
  is usually timed).

Each case times two families: ``torch.optim.SGD(momentum=0.9, foreach=True)`` with LARS on both paths and our
``SGD`` (the same in-place momentum code as LARS without the trust ratio: LARS's ratio against it is what the
layer-wise norms cost), then ``torch.optim.AdamW(foreach=True)`` with LAMB on both paths. A round steps every
optimizer of the family once, in turn, from the same weights, so machine load hits all of them alike; two rounds
of warm-up allocate the state. A ratio is the median over rounds of (time / the baseline's time in the same
round), for the wall clock and for the CPU time of the process (which time taken by other jobs on the machine
does not inflate). Beside each median time: the minor page faults per step (torch's SGD and AdamW allocate
parameter-sized temporaries every step; whether those land on fresh pages depends on the allocator's history, and
the faults say when they did). The CPU model (from /proc/cpuinfo), thread count and load average are printed with
the figures.
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

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

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
#: Optimizers timed in one round-robin: each baseline with its candidates. Apart, so that AdamW's and LAMB's
#: buffers do not change which of SGD's allocations land on fresh pages.
FAMILIES = [[n for n, (b, _) in OPTIMIZERS.items() if n == base or b == base]
            for base in (n for n, (b, _) in OPTIMIZERS.items() if b is None)]


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


def _minor_faults() -> int:
    """Page faults served without I/O so far: what a fresh parameter-sized buffer costs the kernel to map."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_case(model: torch.nn.Module, case: str, names: list[str], repeats: int,
              device: torch.device) -> dict[str, list[tuple[float, float, int]]]:
    """(wall seconds, CPU seconds of the process, minor page faults) of each step of each optimizer in ``names``:
    ``repeats`` interleaved rounds after 2 warm-up rounds."""
    params = [p for p in model.parameters() if p.requires_grad]

    def groups() -> list[dict[str, Any]]:
        if case == "groups":
            return build_param_groups(model, WEIGHT_DECAY)
        return [{"params": params}]  # what LARS(model.parameters(), weight_decay=...) gets

    originals = [p.detach().clone() for p in params]
    optimizers = {name: OPTIMIZERS[name][1](groups()) for name in names}
    times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in optimizers}
    with torch.no_grad():
        for rnd in range(repeats + 2):
            for name, opt in optimizers.items():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)  # every optimizer steps from the same weights
                _sync(device)
                faults = _minor_faults()
                cpu = time.process_time()
                start = time.perf_counter()
                opt.step()
                _sync(device)
                if rnd >= 2:
                    times[name].append((time.perf_counter() - start, time.process_time() - cpu,
                                        _minor_faults() - faults))
        for p, w in zip(params, originals, strict=True):
            p.copy_(w)
    return times


def ratio(times: dict[str, list[tuple[float, float, int]]], name: str, base: str,
          clock: int = 0) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``times[name][r] / times[base][r]`` (``clock`` 0: wall, 1: CPU)."""
    per_round = [a[clock] / b[clock] for a, b in zip(times[name], times[base], strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def report(times: dict[str, list[tuple[float, float, int]]]) -> list[str]:
    """One line per optimizer: median wall ms, CPU ms and page faults per step; wall and CPU ratios."""
    lines = []
    for name in times:
        base = OPTIMIZERS[name][0]
        wall, cpu, faults = (statistics.median(t[k] for t in times[name]) for k in range(3))
        text = f"  {name:22s} {wall * 1e3:7.1f} ms wall {cpu * 1e3:7.1f} ms CPU {faults:6.0f} faults  "
        if base is None:
            lines.append(text + "baseline")
            continue
        for ref in [base] + ([EXTRA[name]] if name in EXTRA else []):
            (w, lo, hi), (c, _, _) = ratio(times, name, ref, 0), ratio(times, name, ref, 1)
            text += f"{'' if ref == base else '; '}{w:.2f}x wall (rounds {lo:.2f}-{hi:.2f}), {c:.2f}x CPU {ref}"
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
    print("ratio: median over rounds of (step time / the baseline's step time in the same round); wall clock and "
          "CPU time of the process (less disturbed by other jobs on the machine)")
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for case in args.cases:
            what = (f"our groups ({adapted} of {len(params)} tensors decayed and adapted)" if case == "groups"
                    else f"all {len(params)} tensors decayed and adapted, LARS(model.parameters())")
            print(f"\n{where}, {threads} thread{'s' if threads > 1 else ''}, {what}")
            for family in FAMILIES:
                times = time_case(model, case, family, args.repeats, device)
                load = " ".join(f"{x:.1f}" for x in os.getloadavg())
                print("\n".join(report(times)) + f"   [load average {load}]")


if __name__ == "__main__":
    main()
