"""The tuned large-batch study at laptop scale: `python -m analysis.study` runs it and writes docs/study/.

Every run is train/imagenet.py with a config from ds_configs/study/ (written by ds_configs/generate.py from its
tuned-study table): the narrow small ResNet on Fashion-MNIST; SGD with Goyal et al.'s linear scaling and warmup,
LARS, LAMB, Smith et al.'s batch increase (and their momentum scaling) at batch 256 ... 8192, the same 3-epoch
budget for all, each method's lr tuned at each batch on a grid of 3 values around its scaling rule. One process
per run, ``--jobs`` at a time, in phases: the grids (1); where a grid's best lr is its smallest or largest, the next
lr out, x1/9 or x9 (1.5); two more seeds at the best lr of each method at the smallest and the largest batch (2);
Smith et al.'s momentum scaling (3, and its extensions 3.5). Each phase's runs follow from the earlier ones.
Finished runs (a summary record in metrics.jsonl) are skipped, so the study can be stopped and resumed. Then
analysis.study_resnet_figures draws the figures and writes table.md and summary.json into ``--out``.

    python -m analysis.study --jobs 2                    # everything (about 30 minutes on 2 idle CPU cores)
    python -m analysis.study --methods goyal lars --batches 256 8192 --no-seeds   # a part
    python -m analysis.study --analyse-only              # figures and tables from the finished runs
    python -m analysis.study --workload bert ...         # the BERT study: analysis.study_bert with the other args
    python -m analysis.study --workload mlp              # the first study: the MLP, untuned (ds_configs/study-mlp/)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from analysis.grid import ALL_TAGS, EDGE_STEP, GRID_TAGS, best_tag, finished, parse_config_name
from train import REPO

STUDY_CONFIGS = REPO / "ds_configs" / "study"
MLP_CONFIGS = REPO / "ds_configs" / "study-mlp"
ARCH = "resnet_small_narrow"
METHOD_ORDER = ("goyal", "smith", "lars", "lamb", "momentum")
BATCH_ORDER = (256, 8192, 1024, 4096, 2048)
SEED_BATCHES = (256, 8192)  # extra seeds at the best lr where the comparison is decided
EXTRA_SEEDS = (1, 2)
SEED_METHODS = ("goyal", "lars", "lamb", "smith")
NOISE_SCALE_METHODS = ("goyal",)  # runs that measure the gradient noise scale (McCandlish et al. 2018)
TRUST_RATIO_METHODS = ("goyal", "lars", "lamb")  # with --trust-ratio-interval: the per-layer diagnostics
# The first (MLP) study's extra seeds: the knee of linear scaling and the largest batches.
MLP_EXTRA_SEED_POINTS = {"goyal": (1024, 4096, 8192), "linear": (8192,), "lars": (4096, 8192), "lamb": (4096, 8192)}


def final_error(run_dir: Path) -> float | None:
    """The last epoch's validation top-1 error of a finished run (None if unfinished or not finite)."""
    rec = finished(run_dir)
    err = None if rec is None else rec.get("final_val_top1_error")
    return err if isinstance(err, (int, float)) and err == err else None


def grid_runs(methods: list[str] | None = None, batches: list[int] | None = None,
              tags: tuple[str, ...] = GRID_TAGS) -> list[dict[str, Any]]:
    """Phase 1 (3 for momentum scaling): every grid point of the study with a tag in ``tags``, seed 0."""
    out = []
    for cfg in STUDY_CONFIGS.glob("*.json"):
        method, batch, tag = parse_config_name(cfg.stem)
        if (methods and method not in methods) or (batches and batch not in batches) or tag not in tags:
            continue
        out.append({"config": cfg, "method": method, "batch": batch, "tag": tag, "seed": 0,
                    "phase": 3 if method == "momentum" else 1, "name": f"{cfg.stem}-seed0"})
    # The ends of the batch range first, every method at each batch before the next: a study cut short still has
    # every method at 256 and 8192.
    return sorted(out, key=lambda r: (
        r["phase"], BATCH_ORDER.index(r["batch"]) if r["batch"] in BATCH_ORDER else len(BATCH_ORDER),
        METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else len(METHOD_ORDER), r["batch"],
        ALL_TAGS.index(r["tag"])))


def _groups(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    out: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in runs:
        out.setdefault((r["method"], r["batch"]), {})[r["tag"]] = r
    return out


def edge_runs(grid: list[dict[str, Any]], runs_dir: Path) -> list[dict[str, Any]]:
    """Phase 1.5 (3.5): where a finished grid's best lr is its smallest or largest, the next lr out (x1/9 or x9)."""
    out = []
    extension = {(r["method"], r["batch"], r["tag"]): r for r in grid_runs(tags=tuple(EDGE_STEP.values()))}
    for (method, batch), points in sorted(_groups(grid).items()):
        if not all(finished(runs_dir / r["name"]) for r in points.values()):
            continue
        best = best_tag({tag: final_error(runs_dir / r["name"]) for tag, r in points.items()})
        nxt = extension.get((method, batch, EDGE_STEP.get(best or "", "")))
        if nxt is not None:
            out.append({**nxt, "phase": nxt["phase"] + 0.5})
    return out


def seed_runs(grid: list[dict[str, Any]], runs_dir: Path) -> list[dict[str, Any]]:
    """Phase 2: seeds 1 and 2 at the best lr of each method at SEED_BATCHES, once that grid (and its extension
    past an edge, if any, in ``grid``) has finished."""
    out = []
    for (method, batch), points in sorted(_groups(grid).items()):
        if method not in SEED_METHODS or batch not in SEED_BATCHES:
            continue
        if not all(finished(runs_dir / r["name"]) for r in points.values()):
            continue
        best = best_tag({tag: final_error(runs_dir / r["name"]) for tag, r in points.items()})
        if best is None or (best in EDGE_STEP and EDGE_STEP[best] not in points):
            continue  # the extension past this edge has not been planned yet
        for seed in EXTRA_SEEDS:
            r = points[best]
            out.append({**r, "seed": seed, "phase": 2, "name": f"{r['config'].stem}-seed{seed}"})
    return out


def plan(runs_dir: Path, methods: list[str] | None = None, batches: list[int] | None = None,
         seeds: bool = True, extend: bool = True) -> list[dict[str, Any]]:
    """All runs of the study known now, in the order they run (phase 1, 1.5, 2, 3, 3.5)."""
    grid = grid_runs(methods, batches)
    grid += edge_runs(grid, runs_dir) if extend else []
    extra = seed_runs(grid, runs_dir) if seeds else []
    return sorted(grid + extra, key=lambda r: r["phase"])  # stable: the order within a phase is kept


def mlp_plan(methods: list[str] | None, batches: list[int] | None) -> list[dict[str, Any]]:
    """The first study's runs (the MLP, one untuned lr per method; ds_configs/study-mlp/)."""
    out = []
    for cfg in sorted(MLP_CONFIGS.glob("*.json"), key=lambda p: (p.stem.split("-")[0], int(p.stem.split("-")[1]))):
        method, batch = cfg.stem.split("-")[0], int(cfg.stem.split("-")[1])
        if (methods and method not in methods) or (batches and batch not in batches):
            continue
        for seed in [0] + ([1, 2] if batch in MLP_EXTRA_SEED_POINTS.get(method, ()) else []):
            out.append({"config": cfg, "method": method, "batch": batch, "seed": seed, "phase": 1,
                        "name": f"{cfg.stem}-seed{seed}"})
    return out


def log_interval(batch: int, num_train: int = 60000) -> int:
    """About 50 step records an epoch (every step at batch >= 1024): steps-to-target needs the loss curve."""
    return max(1, num_train // batch // 50)


def run_command(run: dict[str, Any], runs_dir: Path, data_dir: str, arch: str, noise_interval: int,
                trust_interval: int) -> list[str]:
    out_dir = runs_dir / run["name"]
    cmd = [sys.executable, "train/imagenet.py", "--deepspeed_config", str(run["config"].relative_to(REPO)),
           "--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", arch, "--seed", str(run["seed"]),
           "--output-dir", str(out_dir), "--run-name", run["name"], "--wandb-group", "study", "--no-wandb",
           "--log-interval", str(log_interval(run["batch"]))]
    if run["method"] in NOISE_SCALE_METHODS and noise_interval:
        cmd += ["--noise-scale-interval", str(noise_interval)]
    if run["method"] in TRUST_RATIO_METHODS and trust_interval:
        cmd += ["--trust-ratio-interval", str(trust_interval)]
    cmd += ["--overwrite"] if (out_dir / "config.json").exists() else []
    return cmd


def run_one(cmd: list[str], name: str, runs_dir: Path) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        (runs_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
        raise RuntimeError(f"{name} failed ({proc.returncode}); log in {runs_dir / (name + '.log')}")
    return {"seconds": time.perf_counter() - t0, **(finished(runs_dir / name) or {})}


def run_all(todo: list[dict[str, Any]], args: argparse.Namespace, runs_dir: Path, t0: float) -> int:
    """Run ``todo`` ``args.jobs`` at a time; return the number of failures."""
    failures = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, run_command(r, runs_dir, args.data_dir, args.arch, args.noise_scale_interval,
                                                    args.trust_ratio_interval), r["name"], runs_dir): r for r in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            run = futures[fut]
            try:
                res = fut.result()
                err = res.get("final_val_top1_error")
                print(f"[{i}/{len(todo)}] {run['name']}: {res['seconds']:.0f} s, final val error "
                      f"{err:.2f}%  (elapsed {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
            except RuntimeError as e:
                failures += 1
                print(f"[{i}/{len(todo)}] {e}", flush=True)
    return failures


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", default="resnet", choices=("resnet", "bert", "mlp"),
                   help="resnet: the tuned study (docs/study/); bert: analysis.study_bert with the remaining "
                        "arguments; mlp: the first, untuned MLP study (ds_configs/study-mlp/)")
    p.add_argument("--runs-dir", default=None, help="where the run folders go (default runs/study, runs/study-mlp)")
    p.add_argument("--out", default=None, help="figures, table and summary (default docs/study, docs/study/mlp)")
    p.add_argument("--data-dir", default=os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--arch", default=None, help=f"model of every run (default {ARCH}; the MLP study: mlp)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at a time")
    p.add_argument("--methods", nargs="*", default=None, help="only these methods")
    p.add_argument("--batches", nargs="*", type=int, default=None, help="only these global batches")
    p.add_argument("--no-seeds", action="store_true", help="skip phase 2 (extra seeds at the best lr)")
    p.add_argument("--no-extend", action="store_true", help="do not try the next lr past a grid's edge")
    p.add_argument("--noise-scale-interval", type=int, default=10, help="0: do not measure the noise scale")
    p.add_argument("--trust-ratio-interval", type=int, default=0,
                   help="log per-layer trust ratios every N steps in the goyal/lars/lamb runs (0: off)")
    p.add_argument("--analyse-only", action="store_true", help="run nothing; analyse the finished runs")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workload", default="resnet", choices=("resnet", "bert", "mlp"))
    workload, rest = pre.parse_known_args(argv)
    if workload.workload == "bert":  # every other argument is the BERT study's
        from analysis import study_bert  # another study's module, imported only when asked for

        return study_bert.main(rest)
    args = get_args_parser().parse_args(argv)
    os.chdir(REPO)  # paths in the outputs stay relative to the repository (no machine's absolute paths)
    mlp = args.workload == "mlp"
    runs_dir = Path(args.runs_dir or ("runs/study-mlp" if mlp else "runs/study"))
    out = Path(args.out or ("docs/study/mlp" if mlp else "docs/study"))
    args.arch = args.arch or ("mlp" if mlp else ARCH)
    runs_dir.mkdir(parents=True, exist_ok=True)

    def current() -> list[dict[str, Any]]:
        return mlp_plan(args.methods, args.batches) if mlp else \
            plan(runs_dir, args.methods, args.batches, seeds=not args.no_seeds, extend=not args.no_extend)

    t0 = time.perf_counter()
    failures, tried = 0, set()
    while not args.analyse_only:
        known = current()
        todo = [r for r in known if r["name"] not in tried and not finished(runs_dir / r["name"])]
        print(f"study: {len(known)} runs known, {len(known) - len(todo)} finished or tried, {len(todo)} to run "
              f"({args.jobs} at a time)", flush=True)
        if args.dry_run:
            for r in todo:
                print(f"  phase {r['phase']}: {r['name']}")
            return 0
        if not todo:
            break
        phase = min(r["phase"] for r in todo)  # a phase's runs depend on the earlier phases' results
        batch = [r for r in todo if r["phase"] == phase]
        tried |= {r["name"] for r in batch}
        failures += run_all(batch, args, runs_dir, t0)
    if not args.analyse_only:
        print(f"study: ran for {(time.perf_counter() - t0) / 60:.1f} min; {failures} failed", flush=True)

    from analysis.runs import load_run

    finished_runs = [r for r in current() if finished(runs_dir / r["name"])]
    runs = [load_run(runs_dir / r["name"]) for r in finished_runs]
    if mlp:
        from analysis.compare import compare

        compare(runs, out, metric="final")
    else:
        from analysis.study_resnet_figures import write_study

        write_study(runs, out, planned=[r["name"] for r in current()])
    print(f"study: {len(runs)} runs analysed into {out}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
