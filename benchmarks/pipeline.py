"""Input pipeline throughput per CPU core: ours (train/jpeg.py via ImageFolderData) against torchvision's default
ImageFolder + PIL transforms (RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize).

    python -m benchmarks.pipeline                       # 512 generated 500x375 JPEGs (quality 90), 5 rounds
    python -m benchmarks.pipeline --size 1024x768       # larger photos, where reduced-size decoding pays
    python -m benchmarks.pipeline --split val           # Resize(256) + CenterCrop(224) instead

Both sides run one DataLoader worker process (batch 32), so images/s is per core; the clock starts at the first
batch (worker start-up excluded) and the pass covers every image. Baseline and ours alternate, round by round,
and the medians are printed with the median of the per-round ratios: other work on the machine shifts single
numbers, interleaving keeps the ratio fair. ``--inline`` also times the per-image transforms in this process
(1 thread, no DataLoader).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.data import IMAGENET_MEAN, IMAGENET_STD, GlobalBatchSampler, ImageFolderData  # noqa: E402


def make_photos(root: Path, n: int, width: int, height: int, classes: int = 4, seed: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth colour fields, edges and sensor-like noise; quality 90) in an ImageFolder
    layout root/{train,val}/cNN/*.JPEG. File sizes land near ImageNet's (about 110 KB for 500x375)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC)).astype(np.int16)
        arr = (arr + rng.normal(0, 10, arr.shape)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        for split in ("train", "val"):
            img.save(root / split / f"c{i % classes:02d}" / f"{i:05d}.JPEG", quality=90)


def torchvision_loader(root: Path, split: str, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """The baseline: torchvision's ImageFolder (PIL loader) and the reference transforms, float32 batches."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if split == "train":
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])
    ds = tvd.ImageFolder(str(root / split), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=split == "train", num_workers=workers,
                                       prefetch_factor=4 if workers else None)


def ours_batches(root: Path, split: str, batch: int, workers: int,
                 epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    data = ImageFolderData(root, 224, workers, seed=0, uint8=True)
    if split == "train":
        sampler = GlobalBatchSampler(data.info.num_train, batch, batch, 1, 0, seed=0)
        sampler.set_epoch(epoch)
        return data.train_batches(sampler)
    return data.val_batches(list(range(data.info.num_val)), batch)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(make: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[float, float]:
    """(images per wall-clock second from the first batch on, images per CPU second over the whole pass).

    Wall clock excludes worker start-up; CPU time covers the main process and the workers (counted when they
    exit at the end of the pass) and is what other jobs on the machine disturb least."""
    c0 = cpu_seconds()
    it = iter(make())
    first = len(next(it)[0])
    t0, n = time.perf_counter(), 0
    for x, _ in it:
        n += len(x)
    wall = time.perf_counter() - t0
    del it
    gc.collect()  # joins the workers, so that their CPU time is counted
    return n / wall, (n + first) / (cpu_seconds() - c0)


def inline_rates(root: Path, split: str, n: int) -> tuple[float, float]:
    """Per-image transform throughput in this process (1 thread): torchvision's vs ours (images per CPU-second)."""
    from PIL import Image

    from train.jpeg import TrainTransform, ValTransform

    paths = sorted(str(p) for p in (root / split).rglob("*.JPEG"))[:n]
    base_tf = torchvision_loader(root, split, 1, 0).dataset.transform
    ours = TrainTransform(224) if split == "train" else ValTransform(224)
    t0 = time.process_time()
    for p in paths:
        with open(p, "rb") as f:
            base_tf(Image.open(f).convert("RGB"))
    t1 = time.process_time()
    for i, p in enumerate(paths):
        ours(p, torch.Generator().manual_seed(i))
    t2 = time.process_time()
    return len(paths) / (t1 - t0), len(paths) / (t2 - t1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="JPEGs to generate")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated JPEGs")
    p.add_argument("--split", default="train", choices=("train", "val"))
    p.add_argument("--rounds", type=int, default=5, help="baseline/ours pairs, interleaved")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="loader processes on each side (1: per-core figures)")
    p.add_argument("--inline", action="store_true", help="also time the transforms in-process, no DataLoader")
    p.add_argument("--dir", default=None, help="reuse/keep the generated images here (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        if not (root / "train").is_dir():
            make_photos(root, args.images, width, height)
        files = list((root / "train").rglob("*.JPEG"))
        kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        print(f"{len(files)} JPEGs {width}x{height} q90 (mean {kb:.0f} KB), split {args.split}, batch {args.batch}, "
              f"{args.workers} worker process(es), {args.rounds} interleaved rounds, {os.cpu_count()} cores, "
              f"torch {torch.__version__}")
        rows = []
        for r in range(args.rounds):
            b = timed(lambda: torchvision_loader(root, args.split, args.batch, args.workers))
            o = timed(lambda r=r: ours_batches(root, args.split, args.batch, args.workers, epoch=r))
            rows.append((b, o))
            print(f"  round {r + 1}: wall images/s torchvision {b[0]:6.1f} ours {o[0]:6.1f} ({o[0] / b[0]:.2f}x) | "
                  f"images per CPU-second torchvision {b[1]:6.1f} ours {o[1]:6.1f} ({o[1] / b[1]:.2f}x)")
        per = max(1, args.workers)
        for k, what in ((0, f"wall-clock images/s per worker ({per} worker)"), (1, "images per CPU-second")):
            base, ours = statistics.median(b[k] for b, _ in rows), statistics.median(o[k] for _, o in rows)
            ratio = statistics.median(o[k] / b[k] for b, o in rows)
            scale = per if k == 0 else 1
            print(f"median {what}: baseline torchvision ImageFolder+PIL {base / scale:.1f}, ours {ours / scale:.1f}; "
                  f"ratio ours/baseline {ratio:.2f}x (median of {len(rows)} interleaved rounds)")
        if args.inline:
            rates = [inline_rates(root, args.split, min(256, len(files))) for _ in range(args.rounds)]
            b, o = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
            print(f"inline (this process, 1 thread, no DataLoader), images per CPU-second: torchvision transforms "
                  f"{b:.1f}, ours {o:.1f}; ratio {statistics.median(r[1] / r[0] for r in rates):.2f}x")


if __name__ == "__main__":
    main()
