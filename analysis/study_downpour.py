"""The Downpour study (docs/study-downpour/): `python -m analysis.study_downpour` runs it and writes the figures.

Downpour SGD against synchronous SGD on Fashion-MNIST with the MLP of train/models.py, both on the same machinery
(train/downpour.py: 2 parameter-server shards, W replicas of 32 samples, n_fetch = n_push = 1), so that the only
difference is the barrier:

* asynchronous: Downpour, Dean et al.'s client, plain SGD at the shards;
* synchronous: the same with ``--barrier`` (every replica fetches, then every replica pushes, round by round); with
  plain SGD at the shards this is synchronous SGD at batch 32 W and lr W x the shards' lr (tests/test_downpour.py
  checks it weight for weight).

Same optimizer (plain SGD, no momentum), same augmentation (none), same model, same data order, same evaluation
and one clock (the coordinator's) on both sides. W = 1, 2, 4, 8 (at W = 1 the two are the same run). Phases:

1. tuning: every (side, W) at each lr of ``LRS`` (the shards' lr), one seed, trained on 50,000 of the training
   images and validated on the other 10,000 (``--holdout``); the test set is not looked at;
2. the compared runs: the tuned lr of each (side, W), 3 seeds, trained on all 60,000, evaluated on the test set;
3. the straggler: W = 4, replica 0 sleeping ``STRAGGLER_DELAY`` s per step, asynchronous and with the barrier, each
   at its tuned lr, 3 seeds;
4. staleness: every replica sleeping ``STALENESS_DELAY`` s per step (the cores are then idle most of the time, so
   the order of the pushes follows W, not the OS scheduler), W = 2, 4, 8, ``STALENESS_STEPS`` steps each.

Finished runs (a summary record, or a tuning run that failed, noted in ``failed.txt``) are skipped, so the command
resumes where it stopped. Each run folder gets ``load.json``: the 1-minute load average sampled while it ran, and
the command's own seconds. Then the figures and ``table.md`` are written from the run folders alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from analysis.grid import at_edge, best_of_grid, finished
from analysis.grid import mean_std as grid_mean_std
from analysis.runs import load_run
from train import REPO

REPLICAS = (1, 2, 4, 8)
SIDES = ("async", "sync")
LRS = (0.03, 0.1, 0.3)  # the shards' lr: per push (async) or per replica's share of a round (sync: lr W x this)
EDGE_STEP = {0.03: 0.01, 0.3: 1.0}  # one step past the edge, run only where a grid's best lies at that edge
ALL_LRS = (0.01, *LRS, 1.0)  # in lr order
SEEDS = (0, 1, 2)
TUNE_SEED = 0
HOLDOUT = 10_000
EPOCHS = 1
EVALS_PER_EPOCH = 16
BATCH = 32  # per replica, from the configs
TAIL = 0.9  # equal samples also read at 90% of the epoch, before the asynchronous runs' tail
STRAGGLER_W, STRAGGLER_DELAY = 4, 0.03
STALENESS_REPLICAS, STALENESS_DELAY, STALENESS_STEPS, STALENESS_LR = (2, 4, 8), 0.1, 100, 0.1


def sides(w: int) -> tuple[str, ...]:
    """At W = 1 the barrier changes nothing: one run, the reference (plain SGD at batch 32)."""
    return ("async",) if w == 1 else SIDES


def command(w: int, side: str, lr: float, seed: int, *extra: str) -> list[str]:
    return [sys.executable, "train/downpour.py", "--deepspeed_config", f"ds_configs/downpour/fmnist-w{w}-s2.json",
            "--shard-optimizer", "sgd", "--lr", str(lr), "--epochs", str(EPOCHS), "--evals-per-epoch",
            str(EVALS_PER_EPOCH), "--max-dead-replicas", "0", "--no-wandb", "--seed", str(seed),
            *(["--barrier"] if side == "sync" else []), *extra]


def tune_run(side: str, w: int, lr: float) -> dict[str, Any]:
    return {"name": f"tune-{side}-w{w}-lr{lr}", "phase": "tune", "side": side, "W": w, "lr": lr, "seed": TUNE_SEED,
            "cmd": command(w, side, lr, TUNE_SEED, "--holdout", str(HOLDOUT))}


def tuning_plan(runs_dir: Path | None = None) -> list[dict[str, Any]]:
    """The grid ``LRS`` of every (side, W); with ``runs_dir``, also the step past the edge (``EDGE_STEP``) of each
    grid that finished with its best at that edge."""
    runs = []
    for w in REPLICAS:
        for side in sides(w):
            runs += [tune_run(side, w, lr) for lr in LRS]
            if runs_dir is not None:
                scores = {lr: tuning_score(runs_dir / f"tune-{side}-w{w}-lr{lr}") for lr in LRS}
                best = best_of_grid(scores, ALL_LRS) if all(v is not None for v in scores.values()) else None
                if best in EDGE_STEP:
                    runs.append(tune_run(side, w, EDGE_STEP[best]))
    return runs


def tuning_score(run_dir: Path) -> float | None:
    """The held-out error (%) at the end of a tuning run; inf for one that failed (diverged); None if not run."""
    if (run_dir / "failed.txt").is_file():
        return math.inf
    summary = finished(run_dir)
    return None if summary is None else float(summary["final_val_top1_error"])


def grid_scores(runs_dir: Path, side: str, w: int) -> dict[float, float | None]:
    """The held-out error of every tuning run planned for (side, W), by lr in lr order."""
    lrs = {r["lr"] for r in tuning_plan(runs_dir) if (r["side"], r["W"]) == (side, w)}
    return {lr: tuning_score(runs_dir / f"tune-{side}-w{w}-lr{lr}") for lr in ALL_LRS if lr in lrs}


def tuned_lrs(runs_dir: Path) -> dict[tuple[str, int], float]:
    """The best lr of each (side, W) whose tuning runs all finished, the step past an edge included
    (analysis.grid.best_of_grid: ties to the smaller lr)."""
    best = {}
    for w in REPLICAS:
        for side in sides(w):
            scores = grid_scores(runs_dir, side, w)
            if all(s is not None for s in scores.values()):
                lr = best_of_grid(scores, ALL_LRS)
                if lr is not None:
                    best[side, w] = lr
    return best


def compared_plan(lrs: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    """The final runs (all 60,000 training images, the test set) and the straggler runs, at the tuned lrs."""
    runs = [{"name": f"final-{side}-w{w}-seed{s}", "phase": "final", "side": side, "W": w, "lr": lrs[side, w],
             "seed": s, "cmd": command(w, side, lrs[side, w], s)}
            for w in REPLICAS for side in sides(w) if (side, w) in lrs for s in SEEDS]
    runs += [{"name": f"straggler-{side}-w{STRAGGLER_W}-seed{s}", "phase": "straggler", "side": side,
              "W": STRAGGLER_W, "lr": lrs[side, STRAGGLER_W], "seed": s,
              "cmd": command(STRAGGLER_W, side, lrs[side, STRAGGLER_W], s, "--replica-delay", f"0={STRAGGLER_DELAY}")}
             for side in SIDES if (side, STRAGGLER_W) in lrs for s in SEEDS]
    return runs


def staleness_plan() -> list[dict[str, Any]]:
    return [{"name": f"staleness-w{w}", "phase": "staleness", "side": "async", "W": w, "lr": STALENESS_LR,
             "seed": 0, "cmd": command(w, "async", STALENESS_LR, 0, "--holdout", str(HOLDOUT), "--max-steps",
                                       str(STALENESS_STEPS), "--replica-delay",
                                       *(f"{j}={STALENESS_DELAY}" for j in range(w)))}
            for w in STALENESS_REPLICAS]


def plan(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run that can be planned now: the compared runs need their tuning grid finished."""
    return tuning_plan(runs_dir) + compared_plan(tuned_lrs(runs_dir)) + staleness_plan()


def finished_as_planned(run_dir: Path) -> bool:
    """Whether the run finished (analysis.grid.finished); one that lost a replica is refused: its numbers are not
    those of the W replicas the study names."""
    summary = finished(run_dir)
    if summary is None:
        return False
    if summary.get("dead_replicas"):
        raise SystemExit(f"{run_dir}: the run lost replicas {summary['dead_replicas']} (errors "
                         f"{summary.get('replica_errors')}); its numbers are not the study's. Rerun it: delete the "
                         f"folder and run the study again")
    return True


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").is_file() else math.nan


def launch(r: dict[str, Any], out: Path) -> int:
    """Run one command; sample the 1-minute load average every 2 s meanwhile; write load.json and command.txt."""
    cmd = r["cmd"] + ["--output-dir", str(out), "--overwrite"]
    out.mkdir(parents=True, exist_ok=True)
    t, loads = time.perf_counter(), [loadavg()]
    with open(out / "stdout.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1"))
        while proc.poll() is None:
            time.sleep(2)
            loads.append(loadavg())
    (out / "load.json").write_text(json.dumps({"command_seconds": time.perf_counter() - t, "loadavg_1min": loads,
                                               "returncode": proc.returncode}) + "\n")
    (out / "command.txt").write_text(" ".join(Path(a).name if a.startswith(str(REPO)) or a == sys.executable
                                              else a for a in cmd) + "\n")
    return proc.returncode


def run_all(runs_dir: Path) -> None:
    t0, done = time.perf_counter(), set()
    while True:
        todo = [r for r in plan(runs_dir) if r["name"] not in done]
        if not todo:
            break
        for r in todo:
            done.add(r["name"])
            out = runs_dir / r["name"]
            if finished_as_planned(out) or (r["phase"] == "tune" and (out / "failed.txt").is_file()):
                print(f"{r['name']}: done before, skipped", flush=True)
                continue
            t = time.perf_counter()
            rc = launch(r, out)
            if rc or not finished_as_planned(out):
                tail = (out / "stdout.txt").read_text()[-2000:]
                if r["phase"] != "tune":
                    raise SystemExit(f"{r['name']} failed ({rc}):\n{tail}")
                (out / "failed.txt").write_text(f"exit code {rc}\n{tail}")  # a diverged lr: it loses the grid
            print(f"{r['name']}: {time.perf_counter() - t:.0f} s (study so far {time.perf_counter() - t0:.0f} s, "
                  f"load {loadavg():.1f})", flush=True)
            if r["phase"] == "tune":
                break  # replan: a finished grid makes its compared runs plannable (tuning runs come first)


# ---------------------------------------------------------------------------------------------------------------
# Reading the runs back


def curve(run_dir: Path) -> dict[str, list[float]]:
    """At each evaluation: samples, wall seconds (the coordinator's clock), top-1 error (%) on its validation set."""
    epochs = load_run(run_dir).epochs
    return {"samples": [float(e["samples"]) for e in epochs], "wall": [float(e["wall_time"]) for e in epochs],
            "error": [float(e["val_top1_error"]) for e in epochs]}


def updates(samples: float, side: str, w: int) -> float:
    """Updates of the shards' parameters: one per push (async), one per round of W pushes (sync)."""
    return samples / BATCH / (w if side == "sync" else 1)


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """ys linearly interpolated at x; None outside [xs[0], xs[-1]] (no extrapolation)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if xs and x == xs[0] else None


def at_equal_updates(async_curve: dict[str, list[float]], sync_curve: dict[str, list[float]], w: int) -> float | None:
    """The asynchronous run's error at the updates the synchronous run made in all (1/W of its samples)."""
    target = updates(sync_curve["samples"][-1], "sync", w) * BATCH  # async samples for as many updates
    return interpolate(async_curve["samples"], async_curve["error"], target)


def at_fraction(c: dict[str, list[float]], fraction: float) -> float | None:
    """The error at ``fraction`` of the run's samples (interpolated): before the end of an epoch, where Downpour's
    replicas finish one by one and the last pushes are nearly fresh."""
    return interpolate(c["samples"], c["error"], fraction * c["samples"][-1])


def mean_std(values: list[float]) -> tuple[float, float]:
    """analysis.grid.mean_std with a std of 0 for one value (one seed: no spread to show)."""
    return grid_mean_std(values, single_std=0.0)


def pm(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return "-" if not values else f"{m:.{digits}f} ± {s:.{digits}f}"


def load_of(run_dir: Path) -> list[float]:
    f = run_dir / "load.json"
    return [x for x in json.loads(f.read_text())["loadavg_1min"] if math.isfinite(x)] if f.is_file() else []


def finals(runs_dir: Path, prefix: str) -> list[Path]:
    return [runs_dir / f"{prefix}-seed{s}" for s in SEEDS if finished_as_planned(runs_dir / f"{prefix}-seed{s}")]


def results(runs_dir: Path) -> dict[str, Any]:
    """Everything the table and the README quote, from the run folders."""
    lrs = tuned_lrs(runs_dir)
    rows = []
    for w in REPLICAS:
        row: dict[str, Any] = {"W": w}
        for side in sides(w):
            grid = grid_scores(runs_dir, side, w)
            dirs = finals(runs_dir, f"final-{side}-w{w}")
            row[side] = {"lr": lrs.get((side, w)), "grid": grid,
                         "edge": at_edge(lrs.get((side, w)), [lr for lr, s in grid.items() if s is not None],
                                         ALL_LRS),
                         "samples": [load_run(d).summary["final_val_top1_error"] for d in dirs],
                         "samples90": [e for d in dirs if (e := at_fraction(curve(d), TAIL)) is not None],
                         "wall": [load_run(d).summary["wall_time"] for d in dirs],
                         "tau": [load_run(d).summary.get("tau_mean", 0.0) for d in dirs],
                         "load": [x for d in dirs for x in load_of(d)], "seeds": len(dirs)}
        if w > 1:
            pairs = [(runs_dir / f"final-async-w{w}-seed{s}", runs_dir / f"final-sync-w{w}-seed{s}") for s in SEEDS]
            row["async"]["updates"] = [e for a, s in pairs if finished_as_planned(a) and finished_as_planned(s)
                                       if (e := at_equal_updates(curve(a), curve(s), w)) is not None]
            row["sync"]["updates"] = row["sync"]["samples"]
        else:
            row["async"]["updates"] = row["async"]["samples"]
        d = runs_dir / f"staleness-w{w}"
        if w > 1 and finished_as_planned(d):
            s = load_run(d).summary
            row["tau_delay"] = {"mean": s["tau_mean"], "p90": s["tau_p90"], "max": s["tau_max"]}
        rows.append(row)
    straggler = {}
    for side in SIDES:
        dirs = finals(runs_dir, f"straggler-{side}-w{STRAGGLER_W}")
        straggler[side] = {"error": [load_run(d).summary["final_val_top1_error"] for d in dirs],
                           "wall": [load_run(d).summary["wall_time"] for d in dirs],
                           "tau": [load_run(d).summary.get("tau_mean", 0.0) for d in dirs],
                           "load": [x for d in dirs for x in load_of(d)], "curves": [curve(d) for d in dirs]}
    sync_final = statistics.fmean(straggler["sync"]["error"]) if straggler["sync"]["error"] else None
    for side in SIDES:  # wall time until the run first reached the barrier runs' mean final error
        straggler[side]["to_target"] = [next((t for t, e in zip(c["wall"], c["error"], strict=True)
                                              if e <= sync_final), math.nan) for c in straggler[side]["curves"]
                                        ] if sync_final is not None else []
    return {"rows": rows, "straggler": straggler, "straggler_target": sync_final}


def table(res: dict[str, Any]) -> str:
    def lr(side: dict[str, Any]) -> str:
        return "-" if side["lr"] is None else f"**{side['lr']:g}**" + (" (at the edge)" if side["edge"] else "")

    def load(values: list[float]) -> str:
        return f"{min(values):.1f}-{max(values):.1f}" if values else "-"

    lines = [f"Test top-1 error (%), mean ± std over {len(SEEDS)} seeds, after {EPOCHS} epoch of 60,000 samples; "
             "the shards' lr tuned on the grid " + ", ".join(f"{x:g}" for x in LRS) + " (and one step past an "
             f"edge where the best lay there) on {HOLDOUT:,} held-out training images (seed 0). Equal updates: "
             "the asynchronous run read at the updates the synchronous run made in all (1/W of the samples). "
             "Wall time: the coordinator's clock, both sides; load: the 1-minute load average while the runs ran "
             "(2 cores).", "",
             "| W | side | tuned lr | held-out error (%) by lr | test error, equal samples | at equal samples, "
             f"{TAIL:.0%} of the epoch | test error, equal updates | staleness mean (no delay) | wall time (s) | "
             "load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        for side in sides(row["W"]):
            s = row[side]
            grid = ", ".join(f"{k:g}: " + ("-" if v is None else "failed" if math.isinf(v) else f"{v:.2f}")
                             for k, v in s["grid"].items())
            name = "one replica" if row["W"] == 1 else "Downpour" if side == "async" else "barrier (sync SGD)"
            tau = pm(s["tau"]) if side == "async" else "-"
            lines.append(f"| {row['W']} | {name} | {lr(s)} | {grid} | {pm(s['samples'])} | {pm(s['samples90'])} | "
                         f"{pm(s['updates'])} | "
                         f"{tau} | {pm(s['wall'], 1)} | {load(s['load'])} |")
    lines += ["", f"Staleness with every replica sleeping {STALENESS_DELAY * 1000:.0f} ms per step "
              f"({STALENESS_STEPS} steps each, lr {STALENESS_LR}): tau = updates the shard applied between a "
              "replica's fetch and its push.", "", "| W | mean | p90 | max | W - 1 |", "|---|---|---|---|---|"]
    for row in res["rows"]:
        if "tau_delay" in row:
            t = row["tau_delay"]
            lines.append(f"| {row['W']} | {t['mean']:.2f} | {t['p90']} | {t['max']} | {row['W'] - 1} |")
    target = res["straggler_target"]
    lines += ["", f"Straggler: W = {STRAGGLER_W}, replica 0 sleeps {STRAGGLER_DELAY * 1000:.0f} ms per step, each "
              f"side at its tuned lr, {len(SEEDS)} seeds.", "",
              "| side | test error at the end | wall time to the end (s) | wall time to "
              + ("-" if target is None else f"{target:.2f}") + "% (s) | staleness mean | load |",
              "|---|---|---|---|---|---|"]
    for side in SIDES:
        s = res["straggler"][side]
        lines.append(f"| {'Downpour' if side == 'async' else 'barrier (sync SGD)'} | {pm(s['error'])} | "
                     f"{pm(s['wall'], 1)} | {pm(s['to_target'], 1)} | "
                     f"{pm(s['tau']) if side == 'async' else '-'} | {load(s['load'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Figures


def _band(ax: Any, curves: list[dict[str, list[float]]], x_of: Any, color: str, label: str) -> None:
    """Mean curve over seeds (at the evaluations of the first seed, the others interpolated) with a min-max band."""
    if not curves:
        return
    xs = [x_of(s) for s in curves[0]["samples"]]
    ys = [[v for c in curves if (v := interpolate([x_of(s) for s in c["samples"]], c["error"], x)) is not None]
          for x in xs]
    keep = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
    ax.plot([x for x, _ in keep], [statistics.fmean(y) for _, y in keep], "o-", color=color, ms=2.5, label=label)
    ax.fill_between([x for x, _ in keep], [min(y) for _, y in keep], [max(y) for _, y in keep], color=color,
                    alpha=0.2, lw=0)


def figures(runs_dir: Path, out: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ws = [w for w in REPLICAS if w > 1]
    one = [curve(d) for d in finals(runs_dir, "final-async-w1")]
    for fname, axis, xlabel, title in (
            ("fig1_equal_samples.png", "samples", "training samples processed",
             "At equal samples: does asynchrony cost accuracy?"),
            ("fig2_equal_updates.png", "updates", "updates of the parameters (log scale)",
             "At equal updates: asynchronous updates of 32 samples against synchronous ones of 32 W")):
        fig, grid = plt.subplots(1, len(ws), figsize=(4.3 * len(ws), 3.6), sharey=True, squeeze=False)
        axes = grid[0]
        for ax, w in zip(axes, ws, strict=True):
            for side, color, label in (("async", "C0", f"Downpour, {w} replicas"),
                                       ("sync", "C3", f"synchronous (barrier), batch {BATCH * w}")):
                cs = [curve(d) for d in finals(runs_dir, f"final-{side}-w{w}")]
                _band(ax, cs, (lambda s, side=side, w=w: updates(s, side, w)) if axis == "updates" else float,
                      color, label)
            _band(ax, one, (lambda s: updates(s, "async", 1)) if axis == "updates" else float, "0.5",
                  "one replica, batch 32")
            ax.set_title(f"W = {w}")
            ax.set_xlabel(xlabel)
            if axis == "updates":
                ax.set_xscale("log")
            ax.set_ylim(10, 30)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        axes[0].set_ylabel("test top-1 error (%)")
        fig.suptitle(title + f" (mean of {len(SEEDS)} seeds, band: min-max)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    rows = [r for r in res["rows"] if r["W"] > 1]
    ax.plot([r["W"] for r in rows], [r["W"] - 1 for r in rows], "k--", lw=1, label="W - 1")
    ax.plot([r["W"] for r in rows], [(r["W"] - 1) / 2 for r in rows], "k:", lw=1, label="(W - 1) / 2")
    with_delay = [r for r in rows if "tau_delay" in r]
    ax.plot([r["W"] for r in with_delay], [r["tau_delay"]["mean"] for r in with_delay], "o-", color="C0",
            label=f"every replica sleeping {STALENESS_DELAY * 1000:.0f} ms per step")
    free = [r for r in rows if r["async"]["tau"]]
    ax.errorbar([r["W"] for r in free], [mean_std(r["async"]["tau"])[0] for r in free],
                yerr=[mean_std(r["async"]["tau"])[1] for r in free], fmt="s-", color="C1", capsize=3,
                label=f"no delay (the compared runs, {len(SEEDS)} seeds)")
    ax.set_xlabel("replicas W")
    ax.set_xticks([r["W"] for r in rows])
    ax.set_ylabel("mean staleness tau (updates)")
    ax.set_title("Does the staleness follow W?", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig3_staleness.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    for side, color, label in (("async", "C0", "Downpour"), ("sync", "C3", "barrier (sync SGD)")):
        for k, c in enumerate(res["straggler"][side]["curves"]):
            ax.plot(c["wall"], c["error"], "o-", color=color, ms=2, lw=1, label=label if k == 0 else None)
    if res["straggler_target"] is not None:
        ax.axhline(res["straggler_target"], color="0.5", lw=0.8, ls="--", label="barrier runs' mean final error")
    ax.set_xlabel("wall time (s, the coordinator's clock; 2 shared cores)")
    ax.set_ylabel("test top-1 error (%)")
    ax.set_ylim(10, 30)
    ax.set_title(f"W = {STRAGGLER_W}, replica 0 {STRAGGLER_DELAY * 1000:.0f} ms slower per step: does the barrier "
                 "wait for it?", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig4_straggler.png", dpi=110)
    plt.close(fig)

    fig, grid = plt.subplots(1, len(REPLICAS), figsize=(3.4 * len(REPLICAS), 3.4), sharey=True, squeeze=False)
    axes = grid[0]
    for ax, row in zip(axes, res["rows"], strict=True):
        for side, color in (("async", "C0"), ("sync", "C3")):
            if side not in row:
                continue
            pts = [(lr, s) for lr, s in row[side]["grid"].items() if s is not None and math.isfinite(s)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color,
                    label="one replica" if row["W"] == 1 else "Downpour" if side == "async" else "barrier (sync)")
        ax.set_xscale("log")
        ax.set_yscale("log")  # the best points differ by tenths of a point, the diverged ones by tens
        ax.set_yticks([14, 16, 18, 20, 30, 50, 90], ["14", "16", "18", "20", "30", "50", "90"])
        ax.minorticks_off()
        ax.set_title(f"W = {row['W']}")
        ax.set_xlabel("the shards' lr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"held-out top-1 error (%, log), {HOLDOUT:,} images")
    fig.suptitle("Tuning: is each side's best lr inside the grid? (seed 0, 50,000 training images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "fig5_tuning.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/study-downpour", help="folder of the run folders")
    p.add_argument("--out", default="docs/study-downpour", help="figures and table")
    p.add_argument("--no-run", action="store_true", help="only draw from the runs already there")
    args = p.parse_args(argv)
    runs_dir, out = Path(args.runs), Path(args.out)
    if not args.no_run:
        t, load0 = time.perf_counter(), loadavg()
        run_all(runs_dir)
        print(f"study: {time.perf_counter() - t:.0f} s, load average {load0:.1f} at the start, {loadavg():.1f} at "
              f"the end", flush=True)
    res = results(runs_dir)
    figures(runs_dir, out, res)
    (out / "table.md").write_text(table(res))
    print(f"-> {out}: fig1_equal_samples.png, fig2_equal_updates.png, fig3_staleness.png, fig4_straggler.png, "
          f"fig5_tuning.png, table.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
