"""The Downpour study (docs/study-downpour/): `python -m analysis.study_downpour` runs it and writes the figures.

On Fashion-MNIST with the MLP of train/models.py, 2 epochs each, one run at a time (2 CPU cores):

* Downpour SGD (train/downpour.py, ds_configs/downpour/fmnist-w*-s2.json) with Adagrad at 2 shards, W = 1, 2, 4, 8
  replicas of 32 samples, n_fetch = n_push = 1; the same with plain SGD at the shards (Dean et al. chose Adagrad);
* synchronous DeepSpeed training (train/imagenet.py, 2 ranks through the deepspeed launcher,
  ds_configs/downpour/sync-*.json) with the same samples per update round, B = 32 W;
* one straggler: W = 4 with replica 0 sleeping ``STRAGGLER_DELAY`` s before each step, asynchronous and in lock
  step (``--barrier``: every replica waits for the slowest, as synchronous training does), 1 epoch each.

Finished runs (a summary record) are skipped, so the command resumes where it stopped. Then the figures and
``table.md`` are written from the run folders alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from analysis.grid import finished
from analysis.runs import load_run
from train import REPO
from train.distributed import free_port

CONFIGS = REPO / "ds_configs" / "downpour"
REPLICAS = (1, 2, 4, 8)
STRAGGLER_DELAY = 0.02


def plan() -> list[dict[str, Any]]:
    """Every run: name, command line (without the output folder), and what it is."""
    py, common = sys.executable, ["--no-wandb", "--seed", "0"]
    runs = []
    for w in REPLICAS:
        cfg = str(CONFIGS / f"fmnist-w{w}-s2.json")
        for opt in ("adagrad", "sgd"):
            runs.append({"name": f"downpour-{opt}-w{w}", "kind": f"downpour-{opt}", "W": w,
                         "cmd": [py, "train/downpour.py", "--deepspeed_config", cfg, "--shard-optimizer", opt,
                                 "--evals-per-epoch", "4", "--max-dead-replicas", "0", *common]})
        runs.append({"name": f"sync-{32 * w}", "kind": "sync", "W": w, "cmd": [
            str(Path(py).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "PORT", "train/imagenet.py",
            "--deepspeed_config", str(CONFIGS / f"sync-{32 * w}.json"), "--dataset", "fashion-mnist", "--arch", "mlp",
            *common]})
    for mode, extra in (("async", []), ("barrier", ["--barrier"])):
        runs.append({"name": f"straggler-{mode}-w4", "kind": f"straggler-{mode}", "W": 4, "cmd": [
            py, "train/downpour.py", "--deepspeed_config", str(CONFIGS / "fmnist-w4-s2.json"), "--epochs", "1",
            "--replica-delay", f"0={STRAGGLER_DELAY}", "--evals-per-epoch", "4", "--max-dead-replicas", "0", *extra,
            *common]})
    return runs


def finished_as_planned(run_dir: Path, lost: tuple[int, ...] = ()) -> bool:
    """Whether the run finished (analysis.grid.finished); a finished run that lost replicas other than ``lost``
    (those the plan kills) is refused: its numbers are not those of the W replicas the study names."""
    summary = finished(run_dir)
    if summary is None:
        return False
    dead = tuple(summary.get("dead_replicas") or ())
    if dead != tuple(lost):
        raise SystemExit(f"{run_dir}: the run lost replicas {list(dead)} (planned: {list(lost)}; errors "
                         f"{summary.get('replica_errors')}); its numbers are not the study's. Rerun it: delete "
                         f"the folder and run the study again")
    return True


def run_all(runs_dir: Path) -> None:
    for r in plan():
        out = runs_dir / r["name"]
        if finished_as_planned(out):
            print(f"{r['name']}: done before, skipped", flush=True)
            continue
        cmd = [str(free_port()) if a == "PORT" else a for a in r["cmd"]] + ["--output-dir", str(out), "--overwrite"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1"))
        if proc.returncode or not finished_as_planned(out):
            raise SystemExit(f"{r['name']} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        (out / "command.txt").write_text(" ".join(Path(a).name if a.startswith(str(REPO)) else a for a in cmd) + "\n")
        print(f"{r['name']}: {time.perf_counter() - t:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Figures and table, from the run folders


def curves(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    """(samples, wall seconds since training began, val top-1 error) at each evaluation."""
    run = load_run(run_dir)
    samples = [float(e["samples"]) for e in run.epochs]
    errors = [float(e["val_top1_error"]) for e in run.epochs]
    if "wall_time" in (run.epochs[0] if run.epochs else {}):
        wall = [float(e["wall_time"]) for e in run.epochs]
    else:  # train/imagenet.py: training time of the epochs so far (evaluation not counted)
        wall, total = [], 0.0
        for e in run.epochs:
            total += float(e["epoch_time"])
            wall.append(total)
    return samples, wall, errors


def figures(runs_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    styles = {"downpour-adagrad": ("Downpour, Adagrad", "C0"), "downpour-sgd": ("Downpour, SGD at the shards", "C1"),
              "sync": ("synchronous SGD (DeepSpeed)", "C2")}
    for axis, fname, xlabel in ((0, "fig1_error_vs_samples.png", "training samples processed"),
                                (1, "fig2_error_vs_wall_time.png", "wall time (s; 2 shared CPU cores)")):
        fig, axes = plt.subplots(1, len(REPLICAS), figsize=(4.2 * len(REPLICAS), 3.4), sharey=True)
        for ax, w in zip(axes, REPLICAS, strict=True):
            for kind, (label, color) in styles.items():
                name = f"sync-{32 * w}" if kind == "sync" else f"{kind}-w{w}"
                if not finished_as_planned(runs_dir / name):
                    continue
                c = curves(runs_dir / name)
                ax.plot(c[axis], c[2], "o-", color=color, label=label, ms=3)
            ax.set_title(f"W = {w} replicas / batch {32 * w} per round")
            ax.set_xlabel(xlabel)
            ax.set_ylim(10, 30)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test top-1 error (%)")
        axes[-1].legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, w in enumerate(REPLICAS):
        s = load_run(runs_dir / f"downpour-adagrad-w{w}").summary
        hist = s.get("tau_hist") or [0]
        total = sum(hist)
        seen = [(t, h / total) for t, h in enumerate(hist) if h]  # a log axis has no place for empty bins
        ax.plot([t for t, _ in seen], [f for _, f in seen], "o-", color=f"C{k}", ms=3,
                label=f"W = {w} (mean {s['tau_mean']:.2f}, p90 {s['tau_p90']})")
    ax.set_yscale("log")
    ax.set_xlabel("staleness tau (updates applied since the replica fetched)")
    ax.set_ylabel("fraction of pushes")
    ax.set_title("Downpour, Adagrad: staleness of every push")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig3_staleness.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode, label, color in (("async", "Downpour (asynchronous)", "C0"), ("barrier", "lock step (synchronous)",
                                                                              "C3")):
        c = curves(runs_dir / f"straggler-{mode}-w4")
        ax.plot(c[1], c[2], "o-", color=color, label=label, ms=3)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test top-1 error (%)")
    ax.set_title(f"W = 4, replica 0 sleeps {STRAGGLER_DELAY * 1000:.0f} ms per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig4_straggler.png", dpi=110)
    plt.close(fig)


def table(runs_dir: Path) -> str:
    rows = ["| run | samples per round | final test top-1 err. (%) | wall time (s) | samples/s | staleness mean / "
            "p90 / max |", "|---|---|---|---|---|---|"]
    for r in plan():
        d = runs_dir / r["name"]
        if not finished_as_planned(d):
            continue
        run = load_run(d)
        s, (samples, wall, errors) = run.summary, curves(d)
        tau = f"{s['tau_mean']:.2f} / {s['tau_p90']} / {s['tau_max']}" if "tau_mean" in s else "-"
        rows.append(f"| {r['name']} | {run.batch} | {errors[-1]:.2f} | {wall[-1]:.1f} | "
                    f"{samples[-1] / max(wall[-1], 1e-9):.0f} | {tau} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/study-downpour", help="folder of the run folders")
    p.add_argument("--out", default="docs/study-downpour", help="figures and table")
    p.add_argument("--no-run", action="store_true", help="only draw from the runs already there")
    args = p.parse_args(argv)
    runs_dir, out = Path(args.runs), Path(args.out)
    if not args.no_run:
        run_all(runs_dir)
    figures(runs_dir, out)
    (out / "table.md").write_text(table(runs_dir))
    print(f"-> {out}: fig1_error_vs_samples.png, fig2_error_vs_wall_time.png, fig3_staleness.png, "
          f"fig4_straggler.png, table.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
