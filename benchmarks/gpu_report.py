"""The report of benchmarks/gpu_check.sh, from the files its stages leave in one folder; no torch import, so that
the check can rewrite it after every stage in a fraction of a second.

    python -m benchmarks.gpu_report DIR [--out FILE]   # DIR/gpu_report.md from DIR's files (what gpu_check.sh runs)

Files read (each may be missing or broken; the report says so and is written anyway): info.json (machine),
probes.json (/dev/shm, NCCL, nvJPEG, Python against the wheels), stages.jsonl (one line per stage),
results_*.json (benchmark rows), pytest.xml (the GPU test tier's JUnit file).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ANCHOR = 2470.0  # images/s, ResNet-50 v1.5, A100 80GB, AMP, batch 256 (NVIDIA DeepLearningExamples)
TARGET_SYNTHETIC = 3000.0  # images/s, ResNet-50 fp16 synthetic on one H100/H200 (issue 11)
TARGET_END_TO_END = 2500.0  # images/s, ResNet-50 fp16 fed by the JPEG pipeline on the same GPU (issue 11)
WAIT_TOLERANCE = 0.05  # end to end may fall this far below the synthetic rate before we say the GPU waited
RECIPE_MICRO = 32  # the shipped recipes' micro batch (Goyal et al.'s n = 32 images per batch-norm group)
SPLIT_LAYER_NOTE = ("The NCCL reduction of a layer's norms split across two ranks' ZeRO partitions is not covered "
                    "on one GPU: NCCL refuses two ranks on one device, so the GPU tier runs a world of one there. "
                    "Its proof is the CPU test on 2 gloo ranks (tests/test_optimizers_deepspeed.py).")


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


def _stage_result(s: dict[str, Any]) -> str:
    rc = s.get("rc")
    if rc is None:
        return "skipped" + (f": {s['note']}" if s.get("note") else "")
    if rc == 0:
        return "ok"
    if rc in (124, 137):
        return f"**timed out** (rc {rc})"
    if rc in (129, 130, 143):
        return f"**interrupted** (rc {rc}: the check was stopped" + (f"; {s['note']}" if s.get("note") else "") + ")"
    return f"**failed** (rc {rc})"


def render_report(info: dict[str, Any], stages: list[dict[str, Any]], results: dict[str, Any],
                  tests: dict[str, Any] | None, probes: dict[str, Any] | None = None) -> str:
    """The markdown report: the machine, the probes, each stage's outcome and time, the figures against their
    targets, and whether the GPU waited on data. ``results`` holds the benchmark JSON rows (``source``, ``micro``,
    ``images_per_s``, ...); the figures compared with the targets are those at ``results["micro"]``."""
    micro = results.get("micro", "?")
    main_rows = [r for r in results.get("rows", []) if r.get("micro", micro) == micro]
    rows = {r["source"]: r for r in main_rows}
    syn, e2e, ldr = (rows.get(s, {}).get("images_per_s") for s in ("synthetic", "jpeg", "loader"))
    workers = results.get("workers") or 0
    waited = gpu_waited(syn, e2e)
    need = workers_needed(syn, ldr, workers)
    lines = ["# GPU check report", "",
             f"Written by `bash benchmarks/gpu_check.sh` on {info.get('date', '?')}"
             + (" (**dry run on CPU**: tiny model and sizes, not a measurement)" if info.get("dry_run") else "")
             + (f", after the stage '{stages[-1]['stage']}'" if stages else "") + ".", "",
             "| | |", "|---|---|"]
    for key in ("device", "gpus", "driver", "torch", "cuda", "cudnn", "deepspeed", "python", "cores", "commit"):
        lines.append(f"| {key} | {info.get(key, '?')} |")
    lines += ["", "## Probes", ""]
    if probes:
        lines += ["| probe | result | detail |", "|---|---|---|"]
        for name in ("shm", "nccl", "nvjpeg", "python"):
            p = probes.get(name)
            if p is None:
                continue
            ok = p.get("ok")
            result = "skipped" if ok is None else "ok" if ok else "**failed**"
            lines.append(f"| {name} | {result} | {p.get('detail', '')} |")
    else:
        lines.append("No result (the probe stage did not run or wrote no probes.json).")
    lines += ["", "## Stages", "", "| stage | result | seconds (limit) |", "|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {_stage_result(s)} | {s.get('seconds', 0):.0f} ({s.get('limit', '-')}) |")
    lines += ["", "## GPU test tier (`pytest -m gpu`)", ""]
    if tests:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped, in {tests['seconds']:.0f} s.")
        lines += [f"- failed: `{name}`" for name in tests.get("failures", [])]
    else:
        lines.append("No result (the stage did not run or wrote no JUnit file); see gpu_check.log.")
    if not isinstance(info.get("gpus"), int) or info["gpus"] < 2:
        lines += ["", SPLIT_LAYER_NOTE]
    arch = results.get("arch", "resnet50")
    lines += ["", "## Throughput", "",
              f"{arch}, {results.get('precision', 'fp16')}, channels_last, micro batch {micro}, "
              f"{results.get('image_size', 224)} px, one optimizer step per micro-batch; the engine is built from "
              f"{results.get('recipe', 'ds_configs/256.json')} by train.config.resolve and train.engine.build_engine "
              f"(the wrapper training gets: {results.get('wrapper', '?')}). JPEG pipeline: {workers} loader processes "
              f"on {results.get('jpeg_images', '?')} generated 500x375 photos (quality 90). Each figure is the median "
              f"of {results.get('intervals', '?')} intervals of {results.get('steps', '?')} steps after a warm-up.",
              "",
              "| figure | measured | target | |", "|---|---|---|---|",
              f"| synthetic (batch already on the GPU) | {_fmt(syn)} | >= {TARGET_SYNTHETIC:,.0f} "
              f"(NVIDIA A100 AMP: {ANCHOR:,.0f}) | {_met(syn, TARGET_SYNTHETIC)} |",
              f"| JPEG pipeline alone{f', {workers} processes' if workers else ''} | {_fmt(ldr)} | "
              f">= the synthetic rate | "
              f"{_met(ldr, syn) if syn is not None else 'unknown'} |",
              f"| end to end from JPEGs | {_fmt(e2e)} | >= {TARGET_END_TO_END:,.0f} | "
              f"{_met(e2e, TARGET_END_TO_END)} |"]
    for r in results.get("rows", []):
        if r.get("micro", micro) != micro:
            role = (" (the shipped recipes' micro batch, Goyal et al.'s n)" if r.get("micro") == RECIPE_MICRO
                    else "")
            lines.append(f"| {r['source']} at micro batch {r.get('micro')}{role} | {_fmt(r['images_per_s'])} | | |")
    for source in ("synthetic", "jpeg"):
        r = rows.get(source)
        if r:
            mem = f"{r['peak_gib']:.2f} GiB" if math.isfinite(r["peak_gib"]) else "n/a (no GPU)"
            lines.append(f"| {source}: peak memory, time waiting for the next batch | {mem}, "
                         f"{100 * r['data_wait']:.1f}% of the wall clock | | |")
    lines.append("")
    if micro != "?":
        lines.append(f"Micro batch {micro} is what `train/imagenet.py --micro-batch {micro}` runs at (the same global "
                     f"batch through less accumulation); the shipped recipes' micro batch {RECIPE_MICRO} (Goyal et "
                     f"al.'s batch-norm group) keeps their statistics but uses less of a GPU.")
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
    """Reads gpu_check.sh's files in ``work`` and writes the report to ``out`` (through a temporary file and a
    rename, so that a kill mid-write leaves the previous report); missing or broken files are reported as such,
    never raised."""
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
        if isinstance(part, dict):
            results = {**part, **results, "rows": results.get("rows", []) + part.get("rows", [])}
    text = render_report(load("info.json", {}), stages, results, junit_summary(work / "pytest.xml"),
                         load("probes.json", None))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="gpu_check.sh's output folder")
    p.add_argument("--out", default=None, help="the markdown file (default: DIR/gpu_report.md)")
    args = p.parse_args()
    write_report(Path(args.dir), Path(args.out or Path(args.dir) / "gpu_report.md"))


if __name__ == "__main__":
    main()
