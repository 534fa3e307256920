"""The gradient-noise-scale monitor's cost inside a DeepSpeed training loop, against the same loop without it.

    python -m benchmarks.noise_scale                          # resnet_small, micro 32, intervals 0, 10 and 1
    deepspeed --num_gpus 2 benchmarks/noise_scale.py --zero 1 --accum 4

On a CPU the clock is this process's CPU time with one thread (not wall time), so that other programs on a shared
machine barely move the ratio; the settings are interleaved and rotated round by round. Prints each interval's
time per optimizer step as a ratio to interval 0 (the monitor off) and the share spent inside the monitor.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from train import distributed  # noqa: E402
from train.models import build_model  # noqa: E402
from train.noise_scale import NoiseScaleMonitor  # noqa: E402


def bench(args: argparse.Namespace) -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    distributed.init(timeout_minutes=5)
    torch.manual_seed(0)
    model = build_model(args.arch, 10, 1, 28)
    cfg = {"train_batch_size": args.micro * args.accum * torch.distributed.get_world_size(),
           "train_micro_batch_size_per_gpu": args.micro, "zero_optimization": {"stage": args.zero},
           "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}, "steps_per_print": 10 ** 9,
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(args.micro, 1, 28, 28, device=engine.device)
    y = torch.randint(0, 10, (args.micro,), device=engine.device)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out.float(), target)

    clock = time.perf_counter if engine.device.type == "cuda" else time.process_time
    if engine.device.type != "cuda":
        torch.set_num_threads(1)  # CPU time of spinning worker threads would blur the ratio on a busy machine

    def run(interval: int, steps: int) -> tuple[float, float]:
        """Seconds per optimizer step, and those of it spent inside the monitor. On CPU: CPU time of this process
        with one thread, not wall time, so that other programs on a shared machine barely move the ratio."""
        mon = NoiseScaleMonitor(engine, interval=interval)
        inside = 0.0
        start = clock()
        for step in range(steps):
            for _ in range(args.accum):
                t = clock()
                mon.maybe_measure(step, x, y, loss_fn)
                inside += clock() - t
                engine.backward(loss_fn(engine(x), y))
                engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return (clock() - start) / steps, inside / steps

    run(1, 3)  # warm-up, both paths
    times: dict[int, list[tuple[float, float]]] = {0: [], args.interval: [], 1: []}
    order = list(times)
    for r in range(args.repeats):  # interleaved and rotated, so drifts in machine speed hit all settings alike
        for interval in order[r % len(order):] + order[:r % len(order)]:
            times[interval].append(run(interval, args.steps))

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    base = median([t for t, _ in times[0]])
    unit = "ms" if clock is time.perf_counter else "CPU ms"
    print(f"{args.arch}, micro {args.micro} x accumulation {args.accum}, ZeRO {args.zero}, "
          f"{torch.distributed.get_world_size()} rank(s), {engine.device}; median of {args.repeats} x {args.steps} "
          f"steps")
    for interval, ts in times.items():
        t, inside = median([t for t, _ in ts]), median([i for _, i in ts])
        label = "off (interval 0)" if interval == 0 else f"interval {interval}"
        print(f"  {label:18s} {1000 * t:8.1f} {unit}/step  x{t / base:.3f} of off; "
              f"{100 * inside / max(t - inside, 1e-12):5.1f}% of the training time spent in the monitor")
    distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Measure the noise-scale monitor's cost (see the module docstring).")
    p.add_argument("--arch", default="resnet_small")
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
    distributed.exit_process(0)  # DeepSpeed keeps the gloo threads alive: no finalisation with them
