"""Time one optimizer step on ResNet-50's parameter set: LARS vs torch SGD, LAMB vs torch AdamW.

    python -m optimizers.benchmark [--repeats 20] [--device cpu] [--threads N]

Builds ``torchvision.models.resnet50()`` (25.6M parameters in 161 tensors; no weights are downloaded), gives every
parameter a random gradient, and times ``step()`` of each optimizer over the same parameter groups (batch-norm
parameters and biases excluded from decay and adaptation, as in training). Steps are interleaved round-robin so
that machine load hits every optimizer alike; the median and the minimum of ``--repeats`` steps are reported,
after two warm-up steps that allocate state (on a shared machine the minimum is the steadier figure). Ratios are
against the named torch baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from . import LAMB, LARS, build_param_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time one optimizer step on ResNet-50's parameters.")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per optimizer (default 20)")
    parser.add_argument("--device", default="cpu", help="device for parameters and state (default cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = torchvision.models.resnet50().to(device)
    params = list(model.parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-2
    wd = 5e-5

    def groups() -> list[dict]:
        return build_param_groups(model, wd)

    def plain(group_list: list[dict]) -> list[dict]:  # torch optimizers ignore "adapt", but keep them unaware
        return [{k: v for k, v in g.items() if k != "adapt"} for g in group_list]

    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "torch SGD (foreach)": lambda: torch.optim.SGD(plain(groups()), lr=0.1, momentum=0.9, weight_decay=wd,
                                                       foreach=True),
        "LARS (foreach)": lambda: LARS(groups(), lr=10.0, momentum=0.9, weight_decay=wd, foreach=True),
        "LARS (single-tensor)": lambda: LARS(groups(), lr=10.0, momentum=0.9, weight_decay=wd, foreach=False),
        "torch AdamW (foreach)": lambda: torch.optim.AdamW(plain(groups()), lr=1e-3, weight_decay=wd, foreach=True),
        "LAMB (foreach)": lambda: LAMB(groups(), lr=1e-3, weight_decay=wd, foreach=True),
        "LAMB (single-tensor)": lambda: LAMB(groups(), lr=1e-3, weight_decay=wd, foreach=False),
    }
    # Each optimizer steps its own copy of the weights so that no run changes another's inputs.
    originals = [p.detach().clone() for p in params]
    optimizers = {}
    for name, make in factories.items():
        optimizers[name] = make()
    times: dict[str, list[float]] = {name: [] for name in factories}
    with torch.no_grad():
        for rep in range(args.repeats + 2):
            for name, opt in optimizers.items():
                for p, w in zip(params, originals, strict=True):
                    p.copy_(w)
                _sync(device)
                start = time.perf_counter()
                opt.step()
                _sync(device)
                if rep >= 2:
                    times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    best = {name: min(t) * 1e3 for name, t in times.items()}
    n_params = sum(p.numel() for p in params)
    print(f"ResNet-50: {n_params / 1e6:.1f}M parameters in {len(params)} tensors; device {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"median (min) of {args.repeats} steps in ms; ratios of medians (of minima) against the named baseline")
    baselines = {"LARS": "torch SGD (foreach)", "LAMB": "torch AdamW (foreach)"}
    for name, ms in med.items():
        base = baselines.get(name.split()[0])
        ratio = f"{ms / med[base]:5.2f}x ({best[name] / best[base]:4.2f}x) {base}" if base else "baseline"
        extra = ""
        if name.endswith("(single-tensor)"):
            fast = name.replace("single-tensor", "foreach")
            extra = f"; foreach is {ms / med[fast]:.2f}x ({best[name] / best[fast]:.2f}x) faster"
        print(f"  {name:24s} {ms:8.1f} ({best[name]:7.1f}) ms  {ratio}{extra}")


if __name__ == "__main__":
    main()
