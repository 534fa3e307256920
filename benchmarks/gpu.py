"""ResNet-50 training throughput and memory on one GPU through a DeepSpeed engine: synthetic inputs and the JPEG
pipeline (train/jpeg.py), in fp16, against NVIDIA's published 2,470 images/s (A100 80GB, mixed precision,
batch 256; DeepLearningExamples ResNet-50 v1.5) as the anchor; the issue's target is >= 3,000 images/s on one H100.

    python -m benchmarks.gpu                                # synthetic, micro batches 32 and 256, then the largest
    python -m benchmarks.gpu --jpeg --workers 12            # + the JPEG pipeline on generated 500x375 photos
    python -m benchmarks.gpu --sources loader,jpeg --micro-batches 256 --no-largest --workers 16 --json r.json
    python -m benchmarks.gpu --smoke                        # CPU, tiny model: checks the script runs
    python -m benchmarks.gpu --probe probes.json --wheels .whl   # /dev/shm, NCCL, nvJPEG, Python vs the wheels
    python -m benchmarks.gpu --report DIR --out report.md   # benchmarks/gpu_check.sh's report from DIR's results

Sources: ``synthetic`` (the same uint8 batch already on the device: the model step alone), ``jpeg`` (the JPEG
pipeline feeding the engine, end to end) and ``loader`` (the JPEG pipeline alone, no model: what the loader
processes can supply). Each figure is the median images/s of ``--intervals`` intervals of ``--steps`` optimizer
steps after a warm-up interval, with torch.cuda.max_memory_allocated for that micro batch and, for the model runs,
the fraction of the wall clock the training loop spent waiting for its next batch. The engine is the one
train/imagenet.py trains with: ds_configs/256.json (fp16, ZeRO-1, our SGD, no clipping) through
train.config.resolve and train.engine.build_engine at the measured micro batch (:func:`engine_for`); cuDNN's
autotuner is left off, as in training. The largest micro batch is
found by doubling from 256 until CUDA runs out of memory, then bisecting. Not yet measured: the sessions so far had
no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_report import (  # noqa: E402, F401 (the report's functions, also importable from here)
    ANCHOR,
    TARGET_END_TO_END,
    TARGET_SYNTHETIC,
    WAIT_TOLERANCE,
    gpu_waited,
    junit_summary,
    render_report,
    workers_needed,
    write_report,
)
from train import REPO  # noqa: E402
from train.distributed import exit_process, single_process_env  # noqa: E402

RECIPE = REPO / "ds_configs" / "256.json"  # Goyal et al.'s recipe: fp16, ZeRO-1, our SGD, no clipping


def engine_for(arch: str, micro: int, precision: str, image_size: int, classes: int,
               recipe: Path = RECIPE) -> tuple[Any, dict[str, Any]]:
    """The engine train/imagenet.py builds from ``recipe`` at micro batch ``micro`` in ``precision`` on a world of
    one, and the config DeepSpeed was given: the same :func:`train.config.resolve` and
    :func:`train.engine.build_engine` (our optimizer, the ZeRO stage and its wrapper, no clipping, batch-norm buffers
    in the model's dtype, DeepSpeed's throughput timer off), with the global batch set to ``micro`` (one optimizer
    step per micro-batch, as in NVIDIA's figure)."""
    from datetime import timedelta

    from train.config import load_json, resolve
    from train.engine import build_engine
    from train.models import build_model

    cfg = load_json(recipe)
    cfg["train_batch_size"] = micro
    resolved = resolve(cfg, world_size=1, num_train=1_281_167, micro_batch=micro, precision=precision)  # ImageNet
    torch.manual_seed(0)
    model = build_model(arch, classes, 3, image_size, zero_init_residual=resolved.training["zero_init_residual"])
    return build_engine(resolved, model, timeout=timedelta(minutes=10), trusted_checkpoint=True,
                        say=lambda *_: None)


def wrapper_name(engine: Any) -> str:
    """The optimizer wrapper DeepSpeed put around ours, and ours: e.g. "DeepSpeedZeroOptimizer over SGD"."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return type(engine.optimizer).__name__ + (f" over {type(inner).__name__}" if inner is not None else "")


def measure(engine: Any, batches: Iterator, steps: int, intervals: int, normalize: Any) -> tuple[float, float]:
    """(median images/s, median fraction of the wall clock spent in ``next(batches)``) over ``intervals``
    intervals of ``steps`` steps, after ``steps`` warm-up steps.

    DeepSpeed's fp16 step reads its overflow flag on the host, so the host is at most one step ahead of the GPU:
    time blocked in ``next`` is, to within that step, time the GPU sat idle waiting for data."""
    from train.engine import engine_dtype

    dtype = engine_dtype(engine)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    rates, waits = [], []
    for i in range(intervals + 1):
        sync()
        t0, n, waited = time.perf_counter(), 0, 0.0
        for _ in range(steps):
            w0 = time.perf_counter()
            x, y = next(batches)
            waited += time.perf_counter() - w0
            x = normalize(x, engine.device, dtype, torch.channels_last)
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y.to(engine.device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            n += len(y)
        sync()
        if i:  # interval 0 is the warm-up (cudnn autotuning, allocator growth, loader workers starting)
            wall = time.perf_counter() - t0
            rates.append(n / wall)
            waits.append(waited / wall)
    return statistics.median(rates), statistics.median(waits)


def synthetic_batches(micro: int, image_size: int, classes: int, device: torch.device) -> Iterator:
    """The same uint8 batch over and over, already on the device: measures the model step alone."""
    x = torch.randint(0, 256, (micro, 3, image_size, image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (micro,), device=device)
    while True:
        yield x, y


def jpeg_batches(root: Path, micro: int, image_size: int, workers: int | None, count: int,
                 prefetch_factor: int = 2) -> Iterator:
    """``count`` batches from one loader (no worker restarts at epoch ends), cycling over the folder.

    Prefetch 2 (training uses 4): the steady-state rate is the same, and the backlog that builds up while the
    first interval autotunes (workers x prefetch batches) is half as large, so it drains within the warm-up and
    the first timed intervals instead of inflating the median."""
    from train.data import ImageFolderData

    data = ImageFolderData(root, image_size, workers, seed=0, uint8=True, prefetch_factor=prefetch_factor)
    n = data.info.num_train
    chunks = [[i % n for i in range(k * micro, (k + 1) * micro)] for k in range(count)]
    for x, y, _ in data._loader(data.train, chunks, epoch=0):
        yield x, y


def loader_rate(root: Path, micro: int, image_size: int, workers: int | None, steps: int,
                intervals: int) -> float:
    """Median images/s of the JPEG pipeline alone (decode, crop, flip, collate, pinned; no model), timed as the
    model runs are: ``intervals`` intervals of ``steps`` batches after a warm-up interval (workers starting)."""
    batches = jpeg_batches(root, micro, image_size, workers, steps * (intervals + 1))
    rates = []
    for i in range(intervals + 1):
        t0, n = time.perf_counter(), 0
        for _ in range(steps):
            n += len(next(batches)[1])
        if i:
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _photo_shard(args: tuple[str, int, int, int, int]) -> None:
    from benchmarks.pipeline import make_photos

    root, n, width, height, seed = args
    make_photos(Path(root), n, width, height, seed=seed)


def make_photos_parallel(root: Path, n: int, width: int = 500, height: int = 375, processes: int | None = None,
                         ) -> None:
    """benchmarks.pipeline.make_photos in ``processes`` shards (one seed each), merged into one ImageFolder."""
    processes = max(1, min(processes or os.cpu_count() or 1, n))
    sizes = [n // processes + (k < n % processes) for k in range(processes)]
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        jobs = [(str(Path(tmp) / f"s{k}"), sizes[k], width, height, k) for k in range(processes) if sizes[k]]
        with ProcessPoolExecutor(len(jobs)) as pool:
            list(pool.map(_photo_shard, jobs))
        for shard, *_ in jobs:
            for f in Path(shard).rglob("*.JPEG"):
                dest = root / f.parent.relative_to(shard) / f"{Path(shard).name}_{f.name}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(f), dest)


def run(args: argparse.Namespace, micro: int, jpeg_root: Path | None) -> tuple[float, float, float]:
    """(images/s, peak GiB allocated, fraction of time waiting for data) of one engine on one source."""
    from train.data import to_model_input

    engine, _ = engine_for(args.arch, micro, args.precision, args.image_size, 1000)
    args.wrapper = wrapper_name(engine)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    count = args.steps * (args.intervals + 1)
    batches = (jpeg_batches(jpeg_root, micro, args.image_size, args.workers, count) if jpeg_root else
               synthetic_batches(micro, args.image_size, 1000, engine.device))
    rate, wait = measure(engine, batches, args.steps, args.intervals, to_model_input)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    del engine, batches
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rate, mem, wait


def fits(args: argparse.Namespace, micro: int) -> bool:
    try:
        run(argparse.Namespace(**{**vars(args), "steps": 2, "intervals": 1}), micro, None)
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def machine_info(dry_run: bool) -> dict[str, Any]:
    """Device, driver and library versions for the report header."""
    import subprocess

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "dry_run": dry_run,
                            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
                            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
                            "cores": os.cpu_count(), "gpus": torch.cuda.device_count()}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 (the report says what failed, the check goes on)
        info["deepspeed"] = f"not importable ({type(e).__name__}: {e})"
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        name, driver, memory = (v.strip() for v in q.stdout.splitlines()[0].split(","))
        info["device"], info["driver"] = f"{name} ({memory})", driver
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (nvidia-smi absent)"
        info["driver"] = "?"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "?"
    return info


def wheel_python(wheels: Path) -> str | None:
    """The CPython version the version-specific wheels in ``wheels`` were built for ("3.12" from a cp312 ABI tag;
    abi3 and pure-Python wheels fit any), several joined by ", ", or None when there is none."""
    tags = set()
    for w in wheels.glob("*.whl"):
        parts = w.stem.split("-")
        if len(parts) >= 5 and parts[-2].startswith("cp3") and parts[-2][2:].isdigit():
            tags.add(int(parts[-2][3:]))
    return ", ".join(f"3.{t}" for t in sorted(tags)) or None


def probes(wheels: Path | None) -> dict[str, dict[str, Any]]:
    """What the GPU check needs from the machine, each probe on its own: /dev/shm's size (loader workers pass
    batches through it), an NCCL all_reduce on a world of one, nvJPEG (torchvision.io.decode_jpeg on the device)
    against the CPU decode, and this Python against the carried wheels' tag. ``ok`` is None for a skipped probe."""
    out: dict[str, dict[str, Any]] = {}
    try:
        st = os.statvfs("/dev/shm")
        total, free = st.f_blocks * st.f_frsize / 2**30, st.f_bavail * st.f_frsize / 2**30
        # a batch of 256 uint8 224x224 images is 37 MiB; each loader process keeps prefetch (2-4) of them in flight
        out["shm"] = {"ok": free >= 2.0, "detail": f"/dev/shm {total:.1f} GiB, {free:.1f} GiB free (>= 2 GiB "
                      f"wanted: loader processes x prefetch x 37 MiB batches)"}
    except OSError as e:
        out["shm"] = {"ok": False, "detail": f"/dev/shm not usable: {e}"}
    if torch.cuda.is_available():
        try:
            import torch.distributed as dist

            single_process_env()
            dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
            t = torch.full((1024,), 2.0, device="cuda")
            dist.all_reduce(t)
            ok = bool((t == 2.0).all())
            dist.destroy_process_group()
            out["nccl"] = {"ok": ok, "detail": f"all_reduce on a world of one, NCCL {torch.cuda.nccl.version()}"}
        except Exception as e:  # noqa: BLE001 (a probe reports, never stops the check)
            out["nccl"] = {"ok": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        try:
            from torchvision.io import decode_jpeg, encode_jpeg

            yy, xx = torch.meshgrid(torch.arange(375), torch.arange(500), indexing="ij")  # smooth, photo-like
            img = torch.stack([xx * 255 // 499, yy * 255 // 374, (xx + yy) * 255 // 873]).to(torch.uint8)
            data = encode_jpeg(img, quality=90)
            cpu = decode_jpeg(data)
            gpu = decode_jpeg(data, device="cuda").cpu()
            diff = (cpu.int() - gpu.int()).abs().max().item()
            # libjpeg-turbo and nvJPEG use different IDCT/upsampling: a few grey levels apart, not bit-equal
            out["nvjpeg"] = {"ok": gpu.shape == cpu.shape and diff <= 16,
                             "detail": f"decode_jpeg(device='cuda') of a 500x375 JPEG: largest difference from the "
                                       f"CPU decode {diff} grey levels (<= 16 wanted)"}
        except Exception as e:  # noqa: BLE001
            out["nvjpeg"] = {"ok": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    else:
        out["nccl"] = {"ok": None, "detail": "no CUDA device"}
        out["nvjpeg"] = {"ok": None, "detail": "no CUDA device"}
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = wheel_python(wheels) if wheels is not None and wheels.is_dir() else None
    if built is None:
        out["python"] = {"ok": None, "detail": f"Python {here}; no compiled wheel to check against"
                         + (f" in {wheels}" if wheels else "")}
    else:
        out["python"] = {"ok": built == here, "detail": f"Python {here}; wheels built for {built}"
                         + ("" if built == here else f" (rebuild: bash benchmarks/wheelhouse.sh --python-version "
                                                     f"{here})")}
    return out


# ---------------------------------------------------------------------------------------------------------------


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
    p.add_argument("--jpeg", action="store_true", help="same as --sources synthetic,jpeg")
    p.add_argument("--sources", default="synthetic", help="comma-separated: synthetic, jpeg, loader")
    p.add_argument("--jpeg-images", type=int, default=2048, help="generated 500x375 photos (cycled over)")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: train.data's default)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--smoke", action="store_true", help="CPU, resnet18 at 32x32, 2 steps: checks the script runs")
    p.add_argument("--info", default=None, help="write the machine's description (JSON) here and stop")
    p.add_argument("--probe", default=None, help="run the probes (shm, NCCL, nvJPEG, Python), write JSON here, stop")
    p.add_argument("--wheels", default=None, help="with --probe: the wheel folder whose Python tag is checked")
    p.add_argument("--report", default=None, help="write gpu_check.sh's report from the files in this folder")
    p.add_argument("--out", default=None, help="with --report: the markdown file (default: DIR/gpu_report.md)")
    args = p.parse_args()
    if args.report:
        print(write_report(Path(args.report), Path(args.out or Path(args.report) / "gpu_report.md")))
        return
    if args.probe:
        found = probes(Path(args.wheels) if args.wheels else None)
        Path(args.probe).write_text(json.dumps(found, indent=1))
        print(json.dumps(found, indent=1))
        return
    if args.info:
        Path(args.info).write_text(json.dumps(machine_info(args.smoke), indent=1))
        return
    sources = ["synthetic", "jpeg"] if args.jpeg else args.sources.split(",")
    bad = sorted(set(sources) - {"synthetic", "jpeg", "loader"})
    if bad:
        p.error(f"--sources: unknown {bad}; expected synthetic, jpeg, loader")
    single_process_env()
    if args.smoke:
        args.arch, args.precision, args.image_size, args.micro_batches = "resnet18", "fp32", 32, "2,4"
        args.steps, args.intervals, args.no_largest, args.jpeg_images = 1, 1, True, 16
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU (or --smoke)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
    print(f"{device}; {args.arch} {args.precision} {args.image_size}px; torch {torch.__version__}; anchor: NVIDIA "
          f"A100 {ANCHOR:.0f} images/s", flush=True)
    micros = [int(m) for m in args.micro_batches.split(",")]
    if not args.no_largest and "synthetic" in sources:
        lo, hi = 256, 512
        while fits(args, hi):
            lo, hi = hi, hi * 2
        while hi - lo > 8:
            mid = (lo + hi) // 2 // 8 * 8
            lo, hi = (mid, hi) if fits(args, mid) else (lo, mid)
        print(f"largest micro batch that fits: {lo}", flush=True)
        micros.append(lo)
    workers = args.workers
    if workers is None:
        from train.data import default_workers

        workers = default_workers()
    summary = {k: getattr(args, k) for k in ("arch", "precision", "image_size", "steps", "intervals",
                                              "jpeg_images")}
    summary.update(micro=micros[-1], workers=workers, rows=[], recipe=str(RECIPE.relative_to(REPO)))
    with tempfile.TemporaryDirectory() as tmp:
        root = None
        if {"jpeg", "loader"} & set(sources):
            root = Path(tmp) / "photos"
            t0 = time.perf_counter()
            make_photos_parallel(root, args.jpeg_images)
            print(f"{args.jpeg_images} photos generated in {time.perf_counter() - t0:.1f} s", flush=True)
        for micro in micros:
            for source in sources:
                if source == "loader":
                    rate = loader_rate(root, micro, args.image_size, workers, args.steps, args.intervals)
                    mem, wait = float("nan"), float("nan")
                    print(f"micro batch {micro:4d} loader   : {rate:8.1f} images/s from {workers} loader processes "
                          f"({rate / workers:.1f} per process), no model", flush=True)
                else:
                    rate, mem, wait = run(args, micro, root if source == "jpeg" else None)
                    print(f"micro batch {micro:4d} {source:9s}: {rate:8.1f} images/s ({rate / ANCHOR:.2f}x the A100 "
                          f"anchor), peak memory {mem:.2f} GiB, waiting for data {100 * wait:.1f}% of the time",
                          flush=True)
                summary["rows"].append({"source": source, "micro": micro, "images_per_s": rate,
                                        "peak_gib": mem, "data_wait": wait})
                summary["wrapper"] = getattr(args, "wrapper", summary.get("wrapper"))
                if args.json:  # after each figure, so that a time-out keeps what was measured
                    Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
    exit_process(0)  # DeepSpeed keeps its gloo threads alive on a CPU: no finalisation with them
