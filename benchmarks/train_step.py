"""Training-step overhead: train/imagenet.py on 2 CPU ranks (the real deepspeed launcher, gloo) against a plain
PyTorch DistributedDataParallel loop (gloo, 2 processes) doing the same work.

    python -m benchmarks.train_step                   # 3 interleaved rounds, micro batch 32 x 2 accumulation x 2
    python -m benchmarks.train_step --micro-batch 16 --rounds 5

Same work on both sides: SmallResNet (train/models.py, 3 x 28 x 28 inputs, 10 classes), the synthetic data set
and the sampler of train/data.py (the same batches), channels-last inputs, fp32, cross-entropy, SGD with
Nesterov momentum 0.9, lr 0.1, weight decay 1e-4 on conv/linear weights only, one thread per rank. The baseline
is torch.optim.SGD (foreach) under DDP with ``no_sync`` on all but the last micro-step of an accumulation.

Timing: images/s per logging interval, the clock read at the same points (every ``--log-interval`` optimizer
steps, after the step); the first interval (warm-up) is dropped and the median of the others is the run's figure.
imagenet.py's own figure is its metrics.jsonl ``images_per_sec``; start-up, evaluation and checkpoints are outside
the intervals. On a shared machine wall-clock rates swing by 2-3x between runs, so the command also prints CPU
seconds per optimizer step (all ranks): each side runs twice, ``--steps`` and ``--short-steps`` long, and the
difference of their CPU times over the difference of steps cancels start-up, evaluation and checkpointing; it is
what other jobs disturb least (gloo waits block rather than spin). Baseline and imagenet.py alternate round by
round; the ratios printed are medians of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(global_batch: int, micro: int) -> dict:
    return {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro,
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True,
                                                    "weight_decay": 1e-4}},
            "training": {"epochs": 1, "exclude_norm_and_bias": True}}


def child_cpu() -> float:
    """CPU seconds of this process's finished children and their waited-for descendants (the ranks)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_imagenet(tmp: Path, args: argparse.Namespace, round_: int, steps: int) -> tuple[list[float], float]:
    """One train/imagenet.py run through the deepspeed launcher: images/s of its logging intervals, and the CPU
    seconds of the launcher and both ranks."""
    cfg = tmp / "bench.json"
    cfg.write_text(json.dumps(config(args.micro_batch * args.accum * 2, args.micro_batch)))
    out = tmp / f"run{round_}-{steps}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "train/imagenet.py", "--deepspeed_config", str(cfg), "--dataset", "synthetic", "--arch", "resnet_small",
           "--image-size", "28", "--precision", "fp32", "--max-steps", str(steps), "--log-interval",
           str(args.log_interval), "--val-subset", "64", "--no-wandb", "--output-dir", str(out), "--seed", "0"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    c0 = child_cpu()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    cpu = child_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"train/imagenet.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_sec"] for r in recs if r["kind"] == "step"][1:], cpu


def ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace, steps: int, queue: object) -> None:
    """The baseline: one DDP rank; puts the images/s of each logging interval (rank 0) on ``queue``."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from train.data import GlobalBatchSampler, synthetic
    from train.models import SmallResNet

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as train/imagenet.py does on CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = synthetic(4096, 512, image_size=28, channels=3, num_classes=10, seed=0)
    torch.manual_seed(0)
    net = SmallResNet(3, 10)
    if args.ddp_channels_last:
        net = net.to(memory_format=torch.channels_last)  # PyTorch's channels-last recipe: weights NHWC too
    model = torch.nn.parallel.DistributedDataParallel(net)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    accum = args.accum
    sampler = GlobalBatchSampler(4096, args.micro_batch * accum * world, args.micro_batch, world, rank, seed=0)
    batches = data.train_batches(sampler)
    rates, t_log, step = [], time.perf_counter(), 0
    while step < steps:
        for a in range(accum):
            x, y = next(batches)
            x = x.to(torch.float32, memory_format=torch.channels_last)
            with model.no_sync() if a < accum - 1 else nullcontext():
                loss = F.cross_entropy(model(x), y) / accum
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0:
            now = time.perf_counter()
            rates.append(args.log_interval * args.micro_batch * accum * world / (now - t_log))
            t_log = now
    if rank == 0:
        queue.put(rates[1:])
    dist.destroy_process_group()


def run_ddp(args: argparse.Namespace, steps: int) -> tuple[list[float], float]:
    """The baseline's 2 ranks: images/s of their logging intervals and their CPU seconds."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    c0 = child_cpu()
    mp.start_processes(ddp_worker, args=(2, free_port(), args, steps, queue), nprocs=2, join=True,
                       start_method="spawn")
    return queue.get(), child_cpu() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (an epoch is 4096 images)")
    p.add_argument("--short-steps", type=int, default=10,
                   help="steps of the second, shorter run on each side: CPU time per step is the difference / "
                        "(steps - short-steps), start-up and shut-down cancel")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ddp-channels-last", default=True, action=argparse.BooleanOptionalAction,
                   help="baseline weights in channels-last too (otherwise DDP warns that gradient strides do not "
                        "match its buckets and copies them)")
    args = p.parse_args()
    if 4096 // (args.micro_batch * args.accum * 2) < args.steps:
        raise SystemExit(f"--steps {args.steps} is more than one synthetic epoch (4096 images) at "
                         f"{args.micro_batch} x {args.accum} x 2 ranks")
    print(f"2 ranks x micro batch {args.micro_batch} x {args.accum} accumulation = "
          f"{args.micro_batch * args.accum * 2} per step; {args.steps} steps, intervals of {args.log_interval} "
          f"(first dropped); {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            base_rates, base_long = run_ddp(args, args.steps)
            _, base_short = run_ddp(args, args.short_steps)
            ours_rates, ours_long = run_imagenet(Path(tmp), args, r, args.steps)
            _, ours_short = run_imagenet(Path(tmp), args, r, args.short_steps)
            n = args.steps - args.short_steps
            row = {"base_wall": statistics.median(base_rates), "ours_wall": statistics.median(ours_rates),
                   "base_cpu": (base_long - base_short) / n, "ours_cpu": (ours_long - ours_short) / n}
            rows.append(row)
            print(f"  round {r + 1}: images/s plain DDP {row['base_wall']:7.1f}, train/imagenet.py "
                  f"{row['ours_wall']:7.1f} (step time {row['base_wall'] / row['ours_wall']:.3f}x) | CPU s/step "
                  f"plain DDP {row['base_cpu']:.4f}, train/imagenet.py {row['ours_cpu']:.4f} "
                  f"({row['ours_cpu'] / row['base_cpu']:.3f}x)", flush=True)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    wall = [row["base_wall"] / row["ours_wall"] for row in rows]
    cpu = [row["ours_cpu"] / row["base_cpu"] for row in rows]
    print(f"median images/s: baseline plain DDP (gloo) {med('base_wall'):.1f}, "
          f"train/imagenet.py {med('ours_wall'):.1f}")
    print(f"step time train/imagenet.py / plain DDP, wall clock: {statistics.median(wall):.3f}x (median of "
          f"{len(rows)} interleaved rounds; min {min(wall):.3f}x, max {max(wall):.3f}x)")
    print(f"CPU seconds per step (both ranks; runs of {args.steps} minus runs of {args.short_steps} steps): plain DDP "
          f"{med('base_cpu'):.4f}, train/imagenet.py {med('ours_cpu'):.4f}; ratio {statistics.median(cpu):.3f}x "
          f"(median; min {min(cpu):.3f}x, max {max(cpu):.3f}x)")

if __name__ == "__main__":
    main()
