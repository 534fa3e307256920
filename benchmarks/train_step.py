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
the intervals. Baseline and imagenet.py alternate round by round; the ratio printed is the median of the rounds'
ratios (the machine may be shared: single runs move, interleaved ratios much less).
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_imagenet(tmp: Path, args: argparse.Namespace, round_: int) -> list[float]:
    """One train/imagenet.py run through the deepspeed launcher; images/s of its logging intervals."""
    cfg = tmp / "bench.json"
    cfg.write_text(json.dumps(config(args.micro_batch * args.accum * 2, args.micro_batch)))
    out = tmp / f"run{round_}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "train/imagenet.py", "--deepspeed_config", str(cfg), "--dataset", "synthetic", "--arch", "resnet_small",
           "--image-size", "28", "--precision", "fp32", "--max-steps", str(args.steps), "--log-interval",
           str(args.log_interval), "--val-subset", "64", "--no-wandb", "--output-dir", str(out), "--seed", "0"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"train/imagenet.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_sec"] for r in recs if r["kind"] == "step"][1:]


def ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace, queue: object) -> None:
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
    while step < args.steps:
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


def run_ddp(args: argparse.Namespace) -> list[float]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(ddp_worker, args=(2, free_port(), args, queue), nprocs=2, join=True, start_method="spawn")
    return queue.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (an epoch is 4096 images)")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ddp-channels-last", default=True, action=argparse.BooleanOptionalAction,
                   help="baseline weights in channels-last too (otherwise DDP warns that gradient strides do not "
                        "match its buckets and copies them)")
    p.add_argument("--baseline-only", action="store_true", help="time the DDP loop only")
    args = p.parse_args()
    if 4096 // (args.micro_batch * args.accum * 2) < args.steps:
        raise SystemExit(f"--steps {args.steps} is more than one synthetic epoch (4096 images) at "
                         f"{args.micro_batch} x {args.accum} x 2 ranks")
    print(f"2 ranks x micro batch {args.micro_batch} x {args.accum} accumulation = "
          f"{args.micro_batch * args.accum * 2} per step; {args.steps} steps, intervals of {args.log_interval} "
          f"(first dropped); {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    ratios, ours_all, base_all = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            base = statistics.median(run_ddp(args))
            if args.baseline_only:
                print(f"  round {r + 1}: plain DDP {base:7.1f} images/s", flush=True)
                continue
            ours = statistics.median(run_imagenet(Path(tmp), args, r))
            ratios.append(base / ours)
            base_all.append(base)
            ours_all.append(ours)
            print(f"  round {r + 1}: plain DDP {base:7.1f} images/s   train/imagenet.py {ours:7.1f} images/s   "
                  f"step time ratio {base / ours:.3f}x", flush=True)
    if args.baseline_only:
        return
    print(f"median images/s: baseline plain DDP (gloo) {statistics.median(base_all):.1f}, train/imagenet.py "
          f"{statistics.median(ours_all):.1f}")
    print(f"step time train/imagenet.py / plain DDP: {statistics.median(ratios):.3f}x (median of {args.rounds} "
          f"interleaved rounds; min {min(ratios):.3f}x, max {max(ratios):.3f}x)")


if __name__ == "__main__":
    main()
