"""The large-batch study at laptop scale: `python -m analysis.study` runs it and writes docs/study/.

Every run is train/imagenet.py with a config from ds_configs/study/ (written by ds_configs/generate.py from its
study table: six methods x batch 64 ... 8192 on Fashion-MNIST, the same epoch budget for all), one process each,
``--jobs`` at a time. Finished runs (a summary record in metrics.jsonl) are skipped, so the study can be stopped
and resumed in parts. Then analysis.compare draws the figures and the table into ``--out``.

    python -m analysis.study                      # everything: about 30 minutes on 2 CPU cores
    python -m analysis.study --methods goyal lars --batches 256 8192 --seeds 0   # a part
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STUDY_CONFIGS = REPO / "ds_configs" / "study"
# Extra seeds where the comparison is decided: the knee of linear scaling and the largest batches.
EXTRA_SEED_POINTS = {"goyal": (1024, 4096, 8192), "linear": (8192,), "lars": (4096, 8192), "lamb": (4096, 8192)}
NOISE_SCALE_METHODS = ("goyal",)  # runs that measure the gradient noise scale (McCandlish et al. 2018)


def plan(methods: list[str] | None, batches: list[int] | None, seeds: list[int] | None) -> list[dict[str, Any]]:
    """The runs of the study (config, seed, run folder name), smallest batches first within each method."""
    out = []
    for cfg in sorted(STUDY_CONFIGS.glob("*.json"), key=lambda p: (p.stem.split("-")[0], int(p.stem.split("-")[1]))):
        method, batch = cfg.stem.split("-")[0], int(cfg.stem.split("-")[1])
        if (methods and method not in methods) or (batches and batch not in batches):
            continue
        run_seeds = [0] + ([1, 2] if batch in EXTRA_SEED_POINTS.get(method, ()) else [])
        for seed in run_seeds:
            if seeds is None or seed in seeds:
                out.append({"config": cfg, "method": method, "batch": batch, "seed": seed,
                            "name": f"{cfg.stem}-seed{seed}"})
    return out


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The summary record of a finished run, else None."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    for line in reversed(metrics.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a killed run: that run is not finished
            continue
        if rec.get("kind") == "summary":
            return rec
    return None


def run_one(run: dict[str, Any], runs_dir: Path, data_dir: str, arch: str, noise_interval: int) -> dict[str, Any]:
    out_dir = runs_dir / run["name"]
    cmd = [sys.executable, "train/imagenet.py", "--deepspeed_config", str(run["config"].relative_to(REPO)),
           "--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", arch, "--seed", str(run["seed"]),
           "--output-dir", str(out_dir), "--run-name", run["name"], "--wandb-group", "study", "--no-wandb",
           "--log-interval", "5"]
    if run["method"] in NOISE_SCALE_METHODS and noise_interval:
        cmd += ["--noise-scale-interval", str(noise_interval)]
    cmd += ["--overwrite"] if (out_dir / "config.json").exists() else []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        (runs_dir / f"{run['name']}.log").write_text(proc.stdout + proc.stderr)
        raise RuntimeError(f"{run['name']} failed ({proc.returncode}); log in {runs_dir / (run['name'] + '.log')}")
    return {"seconds": time.perf_counter() - t0, **(finished(out_dir) or {})}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs/study", help="where the run folders go")
    p.add_argument("--out", default="docs/study", help="figures, table and summary")
    p.add_argument("--data-dir", default=os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--arch", default="mlp", help="model of every run (an MLP keeps the study within the hour)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs at a time")
    p.add_argument("--methods", nargs="*", default=None, help="only these methods")
    p.add_argument("--batches", nargs="*", type=int, default=None, help="only these global batches")
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="only these seeds")
    p.add_argument("--noise-scale-interval", type=int, default=10, help="0: do not measure the noise scale")
    p.add_argument("--metric", default="final", choices=("final", "median5"),
                   help="final: last epoch's error (the study's 6 epochs end in the decayed lr); median5: Goyal's "
                        "median of the last 5 epochs, which here would mostly count epochs before the decay")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    os.chdir(REPO)  # paths in the outputs stay relative to the repository (no machine's absolute paths)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo, done = [], []
    for run in plan(args.methods, args.batches, args.seeds):
        (done if finished(runs_dir / run["name"]) else todo).append(run)
    print(f"study: {len(done) + len(todo)} runs, {len(done)} already finished, {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    if args.dry_run:
        for run in todo:
            print(f"  {run['name']}")
        return 0
    t0 = time.perf_counter()
    failures = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, run, runs_dir, args.data_dir, args.arch, args.noise_scale_interval): run
                   for run in todo}
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
    from analysis.compare import compare
    from analysis.runs import load_run

    runs = [load_run(runs_dir / r["name"]) for r in plan(args.methods, args.batches, args.seeds)
            if finished(runs_dir / r["name"])]
    out = Path(args.out)
    compare(runs, out, metric=args.metric)
    print(f"study: {len(runs)} runs compared into {out}; {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
