"""ResNet-50 training throughput and memory on one GPU through a DeepSpeed engine: synthetic inputs and the JPEG
pipeline (train/jpeg.py), in fp16, against NVIDIA's published 2,470 images/s (A100 80GB, mixed precision,
batch 256; DeepLearningExamples ResNet-50 v1.5) as the anchor; the issue's target is >= 3,000 images/s on one H100.

    python -m benchmarks.gpu                                # synthetic, micro batches 32 and 256, then the largest
    python -m benchmarks.gpu --jpeg --workers 12            # + the JPEG pipeline on generated 500x375 photos
    python -m benchmarks.gpu --sources loader,jpeg --micro-batches 256 --no-largest --workers 16 --json r.json
    python -m benchmarks.gpu --smoke                        # CPU, tiny model: checks the script runs
    python -m benchmarks.gpu --report DIR --out report.md   # benchmarks/gpu_check.sh's report from DIR's results

Sources: ``synthetic`` (the same uint8 batch already on the device: the model step alone), ``jpeg`` (the JPEG
pipeline feeding the engine, end to end) and ``loader`` (the JPEG pipeline alone, no model: what the loader
processes can supply). Each figure is the median images/s of ``--intervals`` intervals of ``--steps`` optimizer
steps after a warm-up interval, with torch.cuda.max_memory_allocated for that micro batch and, for the model runs,
the fraction of the wall clock the training loop spent waiting for its next batch. The largest micro batch is
found by doubling from 256 until CUDA runs out of memory, then bisecting. Not yet measured: the sessions so far had
no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
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

from train.distributed import exit_process, single_process_env  # noqa: E402

ANCHOR = 2470.0  # images/s, ResNet-50 v1.5, A100 80GB, AMP, batch 256 (NVIDIA DeepLearningExamples)
TARGET_SYNTHETIC = 3000.0  # images/s, ResNet-50 fp16 synthetic on one H100/H200 (issue 11)
TARGET_END_TO_END = 2500.0  # images/s, ResNet-50 fp16 fed by the JPEG pipeline on the same GPU (issue 11)
WAIT_TOLERANCE = 0.05  # end to end may fall this far below the synthetic rate before we say the GPU waited


def engine_for(arch: str, micro: int, precision: str, image_size: int, classes: int) -> Any:
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


def measure(engine: Any, batches: Iterator, steps: int, intervals: int, normalize: Any) -> tuple[float, float]:
    """(median images/s, median fraction of the wall clock spent in ``next(batches)``) over ``intervals``
    intervals of ``steps`` steps, after ``steps`` warm-up steps.

    DeepSpeed's fp16 step reads its overflow flag on the host, so the host is at most one step ahead of the GPU:
    time blocked in ``next`` is, to within that step, time the GPU sat idle waiting for data."""
    dtype = torch.half if engine.fp16_enabled() else torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
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

    engine = engine_for(args.arch, micro, args.precision, args.image_size, 1000)
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


# ---------------------------------------------------------------------------------------------------------------
# The report of benchmarks/gpu_check.sh


def gpu_waited(synthetic: float | None, end_to_end: float | None, tolerance: float = WAIT_TOLERANCE) -> bool | None:
    """Whether the GPU waited on data: the end-to-end rate (JPEG pipeline feeding the model) fell more than
    ``tolerance`` below the rate of the same model on a batch already on the device. None when either is missing."""
    if synthetic is None or end_to_end is None or not synthetic > 0:
        return None
    return end_to_end < (1.0 - tolerance) * synthetic


def workers_needed(synthetic: float | None, loader: float | None, workers: int) -> int | None:
    """Loader processes that would supply the synthetic rate, at the measured images/s per process."""
    if not synthetic or not loader or workers < 1:
        return None
    return math.ceil(synthetic / (loader / workers))


def _fmt(rate: float | None) -> str:
    return "not measured" if rate is None else f"{rate:,.0f} images/s"


def _met(value: float | None, target: float) -> str:
    return "unknown (not measured)" if value is None else ("**met**" if value >= target else "**not met**")


def render_report(info: dict[str, Any], stages: list[dict[str, Any]], results: dict[str, Any],
                  tests: dict[str, Any] | None) -> str:
    """The markdown report: the machine, each stage's outcome and time, the figures against their targets, and
    whether the GPU waited on data. ``results`` holds the benchmark JSON rows (``source``, ``images_per_s``, ...)."""
    rows = {r["source"]: r for r in results.get("rows", [])}
    syn, e2e, ldr = (rows.get(s, {}).get("images_per_s") for s in ("synthetic", "jpeg", "loader"))
    workers = results.get("workers") or 0
    waited = gpu_waited(syn, e2e)
    need = workers_needed(syn, ldr, workers)
    lines = ["# GPU check report", "",
             f"Written by `bash benchmarks/gpu_check.sh` on {info.get('date', '?')}"
             + (" (**dry run on CPU**: tiny model and sizes, not a measurement)" if info.get("dry_run") else "")
             + ".", "",
             "| | |", "|---|---|"]
    for key in ("device", "driver", "torch", "cuda", "cudnn", "deepspeed", "python", "cores", "commit"):
        lines.append(f"| {key} | {info.get(key, '?')} |")
    lines += ["", "## Stages", "", "| stage | result | seconds (limit) |", "|---|---|---|"]
    for s in stages:
        if s.get("rc") is None:
            result = "skipped" + (f": {s['note']}" if s.get("note") else "")
        elif s["rc"] == 0:
            result = "ok"
        elif s["rc"] in (124, 137):
            result = f"**timed out** (rc {s['rc']})"
        else:
            result = f"**failed** (rc {s['rc']})"
        lines.append(f"| {s['stage']} | {result} | {s.get('seconds', 0):.0f} ({s.get('limit', '-')}) |")
    lines += ["", "## GPU test tier (`pytest -m gpu`)", ""]
    if tests:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped, in {tests['seconds']:.0f} s.")
        lines += [f"- failed: `{name}`" for name in tests.get("failures", [])]
    else:
        lines.append("No result (the stage did not run or wrote no JUnit file); see gpu_check.log.")
    arch = results.get("arch", "resnet50")
    micro = results.get("micro", "?")
    lines += ["", "## Throughput", "",
              f"{arch}, {results.get('precision', 'fp16')}, channels_last, micro batch {micro}, "
              f"{results.get('image_size', 224)} px; JPEG pipeline: {workers} loader processes on "
              f"{results.get('jpeg_images', '?')} generated 500x375 photos (quality 90). Each figure is the median of "
              f"{results.get('intervals', '?')} intervals of {results.get('steps', '?')} steps after a warm-up.", "",
              "| figure | measured | target | |", "|---|---|---|---|",
              f"| synthetic (batch already on the GPU) | {_fmt(syn)} | >= {TARGET_SYNTHETIC:,.0f} "
              f"(NVIDIA A100 AMP: {ANCHOR:,.0f}) | {_met(syn, TARGET_SYNTHETIC)} |",
              f"| JPEG pipeline alone{f', {workers} processes' if workers else ''} | {_fmt(ldr)} | "
              f">= the synthetic rate | "
              f"{_met(ldr, syn) if syn is not None else 'unknown'} |",
              f"| end to end from JPEGs | {_fmt(e2e)} | >= {TARGET_END_TO_END:,.0f} | "
              f"{_met(e2e, TARGET_END_TO_END)} |"]
    for source in ("synthetic", "jpeg"):
        r = rows.get(source)
        if r:
            mem = f"{r['peak_gib']:.2f} GiB" if math.isfinite(r["peak_gib"]) else "n/a (no GPU)"
            lines.append(f"| {source}: peak memory, time waiting for the next batch | {mem}, "
                         f"{100 * r['data_wait']:.1f}% of the wall clock | | |")
    lines.append("")
    if waited is None:
        lines.append("**GPU waited on data: unknown** (the synthetic or the end-to-end rate was not measured).")
    else:
        lines.append(f"**GPU waited on data: {'yes' if waited else 'no'}** (rule: end to end < "
                     f"{1 - WAIT_TOLERANCE:.2f} x synthetic; here {e2e:,.0f} vs {1 - WAIT_TOLERANCE:.2f} x {syn:,.0f}"
                     f" = {(1 - WAIT_TOLERANCE) * syn:,.0f}; end to end / synthetic = {e2e / syn:.3f}).")
    if need is not None:
        lines.append(f"Loader processes needed to supply the synthetic rate at the measured {ldr / workers:,.0f} "
                     f"images/s per process: {need} (ceil({syn:,.0f} / {ldr / workers:,.0f})).")
    if waited:
        lines.append("Next step (issue 11): decode on the GPU (torchvision.io.decode_jpeg on the device, batched).")
    lines += ["", "Full output: gpu_check.log beside this file.", ""]
    return "\n".join(lines)


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts and failing test ids from pytest's JUnit XML file, or None if there is none."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"],
            "seconds": sum(float(s.get("time", 0)) for s in suites), "failures": failures}


def write_report(work: Path, out: Path) -> str:
    """Reads gpu_check.sh's files in ``work`` (info.json, stages.jsonl, results*.json, pytest.xml) and writes
    the report to ``out``; missing or broken files are reported as such, never raised."""
    def load(name: str, default: Any) -> Any:
        try:
            return json.loads((work / name).read_text())
        except (OSError, ValueError):
            return default

    stages = []
    for line in (work / "stages.jsonl").read_text().splitlines() if (work / "stages.jsonl").exists() else []:
        try:
            stages.append(json.loads(line))
        except ValueError:
            pass
    results: dict[str, Any] = {}
    for f in sorted(work.glob("results*.json")):  # one file per benchmark stage; rows add up, settings agree
        part = load(f.name, {})
        results = {**part, **results, "rows": results.get("rows", []) + part.get("rows", [])}
    text = render_report(load("info.json", {}), stages, results, junit_summary(work / "pytest.xml"))
    out.write_text(text)
    return text


def machine_info(dry_run: bool) -> dict[str, Any]:
    """Device, driver and library versions for the report header."""
    import subprocess

    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "dry_run": dry_run,
                            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
                            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
                            "cores": os.cpu_count()}
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
    p.add_argument("--report", default=None, help="write gpu_check.sh's report from the files in this folder")
    p.add_argument("--out", default=None, help="with --report: the markdown file (default: DIR/gpu_report.md)")
    args = p.parse_args()
    if args.report:
        print(write_report(Path(args.report), Path(args.out or Path(args.report) / "gpu_report.md")))
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
    summary.update(micro=micros[-1], workers=workers, rows=[])
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
                if args.json:  # after each figure, so that a time-out keeps what was measured
                    rows = [r for r in summary["rows"] if r["micro"] == micros[-1]] or summary["rows"]
                    Path(args.json).write_text(json.dumps({**summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
    exit_process(0)  # DeepSpeed keeps its gloo threads alive on a CPU: no finalisation with them
