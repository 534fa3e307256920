"""Training-step speed on this CPU, fp32 and bf16: train/imagenet.py on 2 CPU ranks (the real deepspeed launcher,
gloo) against a plain PyTorch DistributedDataParallel loop (gloo, 2 processes) doing the same work in the same
precision.

    python -m benchmarks.train_step                        # fp32 and bf16, 3 interleaved rounds, channels-last
    python -m benchmarks.train_step --rounds 5 --precision bf16
    python -m benchmarks.train_step --layout contiguous     # both sides NCHW (imagenet.py --no-channels-last)
    python -m benchmarks.train_step --precision fp32 --trust-ratio-interval 10 --log-interval 10   # diagnostics cost

Same work on both sides: SmallResNet (train/models.py, 3 x 28 x 28 inputs, 10 classes), the synthetic data set
and the sampler of train/data.py (the same batches), cross-entropy on fp32 logits, SGD with Nesterov momentum 0.9,
lr 0.1, weight decay 1e-4 on conv/linear weights only, one thread per rank, micro batch 32 x 2 accumulation x 2
ranks. The baseline is torch.optim.SGD (foreach) under DDP with ``no_sync`` on all but the last micro-step of an
accumulation.

Precision. imagenet.py runs ``--precision fp32`` or ``--precision bf16`` (passed explicitly). Its bf16 is
DeepSpeed's bf16 mode: bf16 weights, activations, gradients and gradient all-reduce, fp32 master weights in the
optimizer (ZeRO-0: ``FP16_UnfusedOptimizer``: bf16 gradients cast to the fp32 master copy, SGD on it, weights cast
back). The bf16 baseline is one of two plain-torch equivalents (``--bf16-baseline``):

* ``master`` (default): the same scheme written in plain torch: a bf16 model under DDP (bf16 all-reduce), fp32
  master copies of the weights that torch.optim.SGD updates, copied back to the bf16 model after each step;
* ``autocast``: ``torch.autocast("cpu", torch.bfloat16)`` on the fp32 model: convolutions and the linear layer in
  bf16, fp32 weights, gradients and all-reduce, no copies. Measured slower than ``master`` on the 2-core machine
  (docs/benchmarks.md), so ``master`` is the default: the fastest honest baseline.

Layout. ``--layout channels_last`` (default): NHWC inputs on both sides; the baseline's weights are NHWC too
(PyTorch's channels-last recipe; with NCHW weights DDP warns that gradient strides do not match its buckets),
imagenet.py keeps them NCHW (DeepSpeed flattens them) and its inputs NHWC (its default ``--channels-last``).
``--layout contiguous``: NCHW everywhere, imagenet.py with ``--no-channels-last``.

Timing: images/s per logging interval, the clock read at the same points (every ``--log-interval`` optimizer
steps, after the step); the first interval (warm-up) is dropped and the median of the others is the run's figure.
imagenet.py's own figure is its metrics.jsonl ``images_per_sec``; start-up, evaluation and checkpoints are outside
the intervals. Over the same intervals, CPU seconds per optimizer step (user + system, all threads of both ranks):
the baseline reads ``time.process_time()`` in each rank at its logging points; for imagenet.py this script reads the
CPU times of the launcher's process tree (launchers and ranks) each time a step record reaches metrics.jsonl. Other
jobs on the machine move wall-clock rates by 2-3x; they move CPU time per step much less (gloo waits block rather
than spin), so the CPU ratio is the steadier figure. Baseline and imagenet.py alternate within each round (which goes
first alternates between rounds), the ratios printed are medians of the rounds' ratios, and the load average
(``uptime``) is printed with each round. ``--short-steps N`` adds the older whole-run measure: each side runs a
second time N steps long, and the difference of the two runs' CPU times over the difference of their steps cancels
start-up and shut-down.

Diagnostics. ``--trust-ratio-interval N`` adds a third side to every round: train/imagenet.py with
``--trust-ratio-interval N`` (train/diagnostics.py: per-layer norms and the ratio LARS would apply, a "layers"
record every N steps), against the same imagenet.py without it. With ``--log-interval`` equal to N, every measured
interval holds exactly one diagnostics step, so the ratio is the cost per N steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import psutil  # a dependency of DeepSpeed
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import REPO  # noqa: E402
from train.distributed import free_port  # noqa: E402

PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("channels_last", "contiguous")
BF16_BASELINES = ("master", "autocast")


def cpu_description() -> str:
    """The CPU model (/proc/cpuinfo "model name") and its native bf16 instructions (AVX512_BF16, AMX-BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"CPU: unknown (no /proc/cpuinfo); oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 "unknown")
    flags = set(text.split())
    bf16 = sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
    return (f"CPU: {model}, {os.cpu_count()} cores; bf16 instructions: {', '.join(bf16) or 'none (bf16 emulated)'}; "
            f"oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


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


def tree_cpu(root: psutil.Process) -> float:
    """User + system CPU seconds of ``root`` and its live descendants (the launchers and both ranks)."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_imagenet(tmp: Path, args: argparse.Namespace, precision: str, tag: str, steps: int, extra: tuple[str, ...] = ()
                 ) -> tuple[list[float], list[float], float]:
    """One train/imagenet.py run through the deepspeed launcher: images/s of its logging intervals, CPU seconds per
    optimizer step in each interval (all processes, read when the interval's record reaches metrics.jsonl), and the
    CPU seconds of the whole run (launcher and both ranks)."""
    cfg = tmp / "bench.json"
    cfg.write_text(json.dumps(config(args.micro_batch * args.accum * 2, args.micro_batch)))
    out = tmp / f"run-{tag}-{precision}-{steps}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "train/imagenet.py", "--deepspeed_config", str(cfg), "--dataset", "synthetic", "--arch", "resnet_small",
           "--image-size", "28", "--precision", precision, "--max-steps", str(steps), "--log-interval",
           str(args.log_interval), "--val-subset", "64", "--no-wandb", "--output-dir", str(out), "--seed", "0",
           "--channels-last" if args.layout == "channels_last" else "--no-channels-last", *extra]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    metrics = out / "metrics.jsonl"
    c0 = child_cpu()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        root = psutil.Process(proc.pid)
        samples, seen, size, t_end = [], 0, 0, time.monotonic() + 900
        while proc.poll() is None:  # one CPU reading per new step record: the ranks are just past that step
            if time.monotonic() > t_end:
                proc.kill()
                raise SystemExit(f"train/imagenet.py did not finish in 900 s: {' '.join(cmd)}")
            new_size = metrics.stat().st_size if metrics.exists() else 0
            if new_size != size:
                size = new_size
                n = metrics.read_text().count('"kind": "step"')
                if n > seen:
                    samples.append((n, tree_cpu(root)))
                    seen = n
            time.sleep(0.005)
        log.seek(0)
        output = log.read()
    cpu = child_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"train/imagenet.py failed ({proc.returncode}):\n{output[-5000:]}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates = [r["images_per_sec"] for r in recs if r["kind"] == "step"]
    # consecutive records only (a record the poll missed would merge two intervals), the first interval dropped
    cpu_steps = [(c1 - c0_) / args.log_interval for (n0, c0_), (n1, c1) in zip(samples, samples[1:], strict=False)
                 if n1 == n0 + 1]
    return rates[1:], cpu_steps, cpu


def ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace, precision: str, steps: int,
               queue: object) -> None:
    """The baseline: one DDP rank; puts its rank, the images/s of each logging interval and its CPU seconds at each
    logging point (all its threads) on ``queue``."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from train.data import GlobalBatchSampler, synthetic
    from train.distributed import exit_process
    from train.models import SmallResNet

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as train/imagenet.py does on CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = synthetic(4096, 512, image_size=28, channels=3, num_classes=10, seed=0)
    torch.manual_seed(0)
    net = SmallResNet(3, 10)
    layout = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=layout)  # PyTorch's channels-last recipe: weights NHWC too
    master = precision == "bf16" and args.bf16_baseline == "master"
    autocast = precision == "bf16" and args.bf16_baseline == "autocast"
    if master:
        net = net.to(torch.bfloat16)  # weights, BatchNorm buffers, activations and gradients in bf16
    model = torch.nn.parallel.DistributedDataParallel(net)  # all-reduces gradients in their dtype (bf16: bf16)
    params = list(model.parameters())
    # fp32 master weights for the optimizer, as DeepSpeed's bf16 optimizer keeps them
    opt_params = [p.detach().float().requires_grad_() for p in params] if master else params
    decay = [p for p in opt_params if p.ndim > 1]
    no_decay = [p for p in opt_params if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    in_dtype = torch.bfloat16 if master else torch.float32
    accum = args.accum
    sampler = GlobalBatchSampler(4096, args.micro_batch * accum * world, args.micro_batch, world, rank, seed=0)
    batches = data.train_batches(sampler)
    rates, cpu_marks, t_log, step = [], [], time.perf_counter(), 0
    while step < steps:
        for a in range(accum):
            x, y = next(batches)
            x = x.to(in_dtype, memory_format=layout)
            with model.no_sync() if a < accum - 1 else nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y) / accum
                loss.backward()
        if master:
            for m, p in zip(opt_params, params, strict=True):
                m.grad = p.grad.float()
            opt.step()
            with torch.no_grad():
                torch._foreach_copy_(params, opt_params)
            model.zero_grad(set_to_none=True)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0:
            now = time.perf_counter()
            cpu_marks.append(time.process_time())
            rates.append(args.log_interval * args.micro_batch * accum * world / (now - t_log))
            t_log = now
    queue.put((rank, rates[1:], cpu_marks))
    dist.destroy_process_group()
    exit_process(0)  # no finalisation with gloo threads alive (train/distributed.py)


def run_ddp(args: argparse.Namespace, precision: str, steps: int) -> tuple[list[float], list[float], float]:
    """The baseline's 2 ranks: rank 0's images/s per logging interval, CPU seconds per optimizer step in each
    interval (both ranks), and the CPU seconds of the whole run."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    c0 = child_cpu()
    mp.start_processes(ddp_worker, args=(2, free_port(), args, precision, steps, queue), nprocs=2, join=True,
                       start_method="spawn")
    got = dict((rank, (rates, marks)) for rank, rates, marks in (queue.get(), queue.get()))
    both = [sum(m) for m in zip(got[0][1], got[1][1], strict=True)]
    cpu_steps = [(b - a) / args.log_interval for a, b in zip(both, both[1:], strict=False)]
    return got[0][0], cpu_steps, child_cpu() - c0


def measure(tmp: Path, args: argparse.Namespace, precision: str, round_: int) -> dict[str, float]:
    """One round for one precision: both sides, the baseline first in odd rounds and second in even ones."""
    sides = {"base": lambda steps: run_ddp(args, precision, steps),
             "ours": lambda steps: run_imagenet(tmp, args, precision, f"r{round_}", steps)}
    order: tuple[str, ...] = ("base", "ours") if round_ % 2 == 0 else ("ours", "base")
    if args.trust_ratio_interval:
        flag = ("--trust-ratio-interval", str(args.trust_ratio_interval))
        sides["diag"] = lambda steps: run_imagenet(tmp, args, precision, f"r{round_}-diag", steps, flag)
        order = (order[0], "diag", order[1])  # between the two, whose order alternates
    row: dict[str, float] = {}
    for side in order:
        rates, cpu_steps, cpu_long = sides[side](args.steps)
        row[f"{side}_wall"] = statistics.median(rates)
        row[f"{side}_cpu_step"] = statistics.median(cpu_steps)
        if args.short_steps:
            _, _, cpu_short = sides[side](args.short_steps)
            row[f"{side}_cpu"] = (cpu_long - cpu_short) / (args.steps - args.short_steps)
    return row


def baseline_name(args: argparse.Namespace, precision: str) -> str:
    if precision == "fp32":
        return "plain DDP fp32"
    return ("plain DDP bf16 model + fp32 master weights" if args.bf16_baseline == "master"
            else "plain DDP fp32 model under torch.autocast(cpu, bfloat16)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="precisions to measure, each on both sides")
    p.add_argument("--layout", choices=LAYOUTS, default="channels_last",
                   help="memory layout of the convolutions' inputs on both sides")
    p.add_argument("--bf16-baseline", choices=BF16_BASELINES, default="master",
                   help="plain-torch bf16: a bf16 model with fp32 master weights (DeepSpeed's scheme), or autocast")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (an epoch is 4096 images)")
    p.add_argument("--short-steps", type=int, default=0,
                   help="if > 0, each side also runs this many steps and CPU seconds per step are printed: the "
                        "difference of the two runs' CPU times / (steps - short-steps)")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trust-ratio-interval", type=int, default=0, metavar="N",
                   help="also run train/imagenet.py with --trust-ratio-interval N in each round and print its cost")
    args = p.parse_args()
    if args.trust_ratio_interval < 0:
        raise SystemExit(f"--trust-ratio-interval must be 0 (off) or more, got {args.trust_ratio_interval}")
    for name in ("micro_batch", "accum", "steps", "log_interval", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if 4096 // (args.micro_batch * args.accum * 2) < args.steps:
        raise SystemExit(f"--steps {args.steps} is more than one synthetic epoch (4096 images) at "
                         f"{args.micro_batch} x {args.accum} x 2 ranks")
    if args.steps < 2 * args.log_interval:
        raise SystemExit(f"--steps {args.steps} gives fewer than 2 logging intervals of {args.log_interval} steps; "
                         f"the first is dropped as warm-up, so at least {2 * args.log_interval} are needed")
    if args.steps % args.log_interval:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --log-interval {args.log_interval} (equal "
                         f"intervals on both sides)")
    if not 0 <= args.short_steps < args.steps:
        raise SystemExit(f"--short-steps {args.short_steps} must be 0 (off) or less than --steps {args.steps}")
    precisions = list(dict.fromkeys(args.precision))
    print(cpu_description())
    print(f"2 ranks x micro batch {args.micro_batch} x {args.accum} accumulation = "
          f"{args.micro_batch * args.accum * 2} per step; {args.steps} steps, intervals of {args.log_interval} "
          f"(first dropped); layout {args.layout}; torch {torch.__version__}; {load()}", flush=True)
    rows: dict[str, list[dict[str, float]]] = {prec: [] for prec in precisions}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for prec in precisions:
                row = measure(Path(tmp), args, prec, r)
                rows[prec].append(row)
                loads.append(os.getloadavg()[0])
                line = (f"  round {r + 1} {prec}: images/s {baseline_name(args, prec)} {row['base_wall']:7.1f}, "
                        f"train/imagenet.py {row['ours_wall']:7.1f} (step time "
                        f"{row['base_wall'] / row['ours_wall']:.3f}x) | CPU s/step {row['base_cpu_step']:.4f}, "
                        f"{row['ours_cpu_step']:.4f} ({row['ours_cpu_step'] / row['base_cpu_step']:.3f}x)")
                if args.trust_ratio_interval:
                    line += (f" | with --trust-ratio-interval {args.trust_ratio_interval}: {row['diag_wall']:7.1f} "
                             f"images/s (step time {row['ours_wall'] / row['diag_wall']:.3f}x without), CPU s/step "
                             f"{row['diag_cpu_step']:.4f} ({row['diag_cpu_step'] / row['ours_cpu_step']:.3f}x)")
                if args.short_steps:
                    line += (f" | differential CPU s/step plain DDP {row['base_cpu']:.4f}, train/imagenet.py "
                             f"{row['ours_cpu']:.4f} ({row['ours_cpu'] / row['base_cpu']:.3f}x)")
                print(f"{line}; {load()}", flush=True)

    print(f"load average (1 min) after each measurement: min {min(loads):.2f}, median "
          f"{statistics.median(loads):.2f}, max {max(loads):.2f}")
    for prec in precisions:
        rs = rows[prec]
        wall = [row["base_wall"] / row["ours_wall"] for row in rs]
        base = statistics.median(row["base_wall"] for row in rs)
        ours = statistics.median(row["ours_wall"] for row in rs)
        print(f"{prec}: median images/s {baseline_name(args, prec)} {base:.1f}, train/imagenet.py {ours:.1f}; "
              f"step time train/imagenet.py / plain torch {statistics.median(wall):.3f}x (median of {len(rs)} "
              f"interleaved rounds; min {min(wall):.3f}x, max {max(wall):.3f}x; target <= 1.05x)")
        cpu_step = [row["ours_cpu_step"] / row["base_cpu_step"] for row in rs]
        print(f"{prec}: CPU seconds per optimizer step in the same intervals (both ranks, all threads): plain torch "
              f"{statistics.median(r['base_cpu_step'] for r in rs):.4f}, train/imagenet.py "
              f"{statistics.median(r['ours_cpu_step'] for r in rs):.4f}; ratio {statistics.median(cpu_step):.3f}x "
              f"(median; min {min(cpu_step):.3f}x, max {max(cpu_step):.3f}x)")
        if args.trust_ratio_interval:
            diag = [row["ours_wall"] / row["diag_wall"] for row in rs]
            diag_cpu = [row["diag_cpu_step"] / row["ours_cpu_step"] for row in rs]
            print(f"{prec}: --trust-ratio-interval {args.trust_ratio_interval}: step time "
                  f"{statistics.median(diag):.3f}x train/imagenet.py without it (median; min {min(diag):.3f}x, "
                  f"max {max(diag):.3f}x); CPU s/step {statistics.median(diag_cpu):.3f}x (min {min(diag_cpu):.3f}x, "
                  f"max {max(diag_cpu):.3f}x)")
        if args.short_steps:
            cpu = [row["ours_cpu"] / row["base_cpu"] for row in rs]
            print(f"{prec}: CPU seconds per step (both ranks; runs of {args.steps} minus runs of "
                  f"{args.short_steps} steps): plain torch {statistics.median(r['base_cpu'] for r in rs):.4f}, "
                  f"train/imagenet.py {statistics.median(r['ours_cpu'] for r in rs):.4f}; ratio "
                  f"{statistics.median(cpu):.3f}x (median; min {min(cpu):.3f}x, max {max(cpu):.3f}x)")
    if set(PRECISIONS) <= set(precisions):
        speedup = [b["ours_wall"] / f["ours_wall"] for f, b in zip(rows["fp32"], rows["bf16"], strict=True)]
        base_speedup = [b["base_wall"] / f["base_wall"] for f, b in zip(rows["fp32"], rows["bf16"], strict=True)]
        print(f"bf16 / fp32 images/s: train/imagenet.py {statistics.median(speedup):.3f}x, plain torch "
              f"{statistics.median(base_speedup):.3f}x (median of rounds)")


if __name__ == "__main__":
    main()
