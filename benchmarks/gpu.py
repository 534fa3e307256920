"""ResNet-50 training throughput and memory on one GPU through a DeepSpeed engine: synthetic inputs and the JPEG
pipeline (train/jpeg.py), in fp16, against NVIDIA's published 2,470 images/s (A100 80GB, mixed precision,
batch 256; DeepLearningExamples ResNet-50 v1.5) as the anchor; the issue's target is >= 3,000 images/s on one H100.

    python -m benchmarks.gpu                                # synthetic, micro batches 32 and 256, then the largest
    python -m benchmarks.gpu --jpeg --workers 12            # + the JPEG pipeline on generated 500x375 photos
    python -m benchmarks.gpu --smoke                        # CPU, tiny model: checks the script runs

Each figure is the median images/s of ``--intervals`` intervals of ``--steps`` optimizer steps after a warm-up,
with torch.cuda.max_memory_allocated for that micro batch. The largest micro batch is found by doubling from 256
until CUDA runs out of memory, then bisecting. Not yet measured: the sessions so far had no GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ANCHOR = 2470.0  # images/s, ResNet-50 v1.5, A100 80GB, AMP, batch 256 (NVIDIA DeepLearningExamples)


def engine_for(arch: str, micro: int, precision: str, image_size: int, classes: int) -> object:
    import deepspeed

    from train.models import build_model

    cfg = {"train_batch_size": micro, "train_micro_batch_size_per_gpu": micro,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}},
           "steps_per_print": 10**9}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    torch.manual_seed(0)
    model = build_model(arch, classes, 3, image_size)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def measure(engine: object, batches: object, steps: int, intervals: int, normalize: object) -> float:
    """Median images/s over ``intervals`` intervals of ``steps`` steps, after ``steps`` warm-up steps."""
    dtype = torch.half if engine.fp16_enabled() else torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rates = []
    for i in range(intervals + 1):
        sync()
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            x, y = next(batches)
            x = normalize(x, engine.device, dtype, torch.channels_last)
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y.to(engine.device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            n += len(y)
        sync()
        if i:  # interval 0 is the warm-up (cudnn autotuning, allocator growth)
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def synthetic_batches(micro: int, image_size: int, classes: int, device: torch.device) -> object:
    """The same uint8 batch over and over, already on the device: measures the model step alone."""
    x = torch.randint(0, 256, (micro, 3, image_size, image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (micro,), device=device)
    while True:
        yield x, y


def jpeg_batches(root: Path, micro: int, image_size: int, workers: int | None, count: int) -> object:
    """``count`` batches from one loader (no worker restarts at epoch ends), cycling over the folder."""
    from train.data import ImageFolderData

    data = ImageFolderData(root, image_size, workers, seed=0, uint8=True)
    n = data.info.num_train
    chunks = [[i % n for i in range(k * micro, (k + 1) * micro)] for k in range(count)]
    for x, y, _ in data._loader(data.train, chunks, epoch=0):
        yield x, y


def run(args: argparse.Namespace, micro: int, jpeg_root: Path | None) -> tuple[float, float]:
    from train.data import to_model_input

    engine = engine_for(args.arch, micro, args.precision, args.image_size, 1000)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    count = args.steps * (args.intervals + 1)
    batches = (jpeg_batches(jpeg_root, micro, args.image_size, args.workers, count) if jpeg_root else
               synthetic_batches(micro, args.image_size, 1000, engine.device))
    rate = measure(engine, batches, args.steps, args.intervals, to_model_input)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rate, mem


def fits(args: argparse.Namespace, micro: int) -> bool:
    try:
        run(argparse.Namespace(**{**vars(args), "steps": 2, "intervals": 1}), micro, None)
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--micro-batches", default="32,256", help="comma-separated micro batches to time")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per interval")
    p.add_argument("--intervals", type=int, default=5)
    p.add_argument("--no-largest", action="store_true", help="skip the search for the largest micro batch")
    p.add_argument("--jpeg", action="store_true", help="also time the JPEG pipeline (generated 500x375 photos)")
    p.add_argument("--jpeg-images", type=int, default=2048)
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: train.data's default)")
    p.add_argument("--smoke", action="store_true", help="CPU, resnet18 at 32x32, 2 steps: checks the script runs")
    args = p.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if args.smoke:
        args.arch, args.precision, args.image_size, args.micro_batches = "resnet18", "fp32", 32, "4"
        args.steps, args.intervals, args.no_largest, args.jpeg_images = 1, 1, True, 16
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU (or --smoke)")
    else:
        torch.backends.cudnn.benchmark = True
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
    print(f"{device}; {args.arch} {args.precision} {args.image_size}px; torch {torch.__version__}; anchor: NVIDIA "
          f"A100 {ANCHOR:.0f} images/s", flush=True)
    micros = [int(m) for m in args.micro_batches.split(",")]
    if not args.no_largest:
        lo, hi = 256, 512
        while fits(args, hi):
            lo, hi = hi, hi * 2
        while hi - lo > 8:
            mid = (lo + hi) // 2 // 8 * 8
            lo, hi = (mid, hi) if fits(args, mid) else (lo, mid)
        print(f"largest micro batch that fits: {lo}", flush=True)
        micros.append(lo)
    with tempfile.TemporaryDirectory() as tmp:
        root = None
        if args.jpeg:
            from benchmarks.pipeline import make_photos

            root = Path(tmp)
            make_photos(root, args.jpeg_images, 500, 375)
        for micro in micros:
            for source in ("synthetic", "jpeg") if args.jpeg else ("synthetic",):
                rate, mem = run(args, micro, root if source == "jpeg" else None)
                print(f"micro batch {micro:4d} {source:9s}: {rate:8.1f} images/s ({rate / ANCHOR:.2f}x the A100 "
                      f"anchor), peak memory {mem:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
