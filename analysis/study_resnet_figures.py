"""The tuned study's figures, table and summary (docs/study/), from its run folders: `python -m analysis.study`.

Each run is named METHOD-BATCH-TAG-seedS (analysis/study.py), TAG the point of the lr grid (the method's scaling
rule x 1/3, 1, 3, and x1/9 or x9 where the best was at an edge). For each method and batch the best grid point is
the one with the lowest final validation error of seed 0 (seeds 1 and 2 exist only at the best point; they give
the mean +- std). Written to ``out``:

1. fig1_error_vs_batch.png: Goyal et al. 2017 (arXiv:1706.02677) Fig. 1: validation error against batch, the
   best of the grid per method, the grid's other points faint; the gradient noise scale B_noise measured in the
   Goyal runs (McCandlish et al. 2018, arXiv:1812.06162) as a dashed line.
2. fig2_train_loss_vs_epochs.png: Goyal et al. Fig. 2 style: one method per panel, the training loss of each
   batch's best run against the smallest batch's (black), seeds as a band (min to max) where there are seeds.
3. fig3_steps_to_target.png: Shallue et al. 2018 (arXiv:1811.03600) Fig. 1 style: optimizer steps to reach a
   target training loss against batch, log-log, the best lr per batch; the perfect-scaling line from the smallest
   batch, the diminishing-returns region (more than twice the perfect-scaling steps), each method's maximal
   useful batch (a star), and B_noise (McCandlish et al.'s predicted critical batch) marked.
4. table.md and summary.json: the whole grid (best marked, a best at the grid's edge flagged), best-of-grid
   errors with seeds, steps to target, the fitted critical batch of S(B) = S_min (1 + B_crit / B).

Steps to target use the training loss of the step records (the mean over the steps since the previous record),
not the validation error Shallue et al. used: validation error is measured once an epoch, which in a 3-epoch
budget gives three possible step counts per run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.compare import critical_batch, fmt_batch  # noqa: E402
from analysis.grid import ALL_TAGS, at_edge, best_tag, parse_run_name  # noqa: E402
from analysis.runs import RunRecord  # noqa: E402

METHODS = {
    "goyal": "SGD + linear scaling + warmup (Goyal)",
    "lars": "LARS (You et al. 2017)",
    "lamb": "LAMB (You et al. 2019)",
    "smith": "SGD, batch increase (Smith et al.)",
    "momentum": "SGD, momentum scaling (Smith et al.)",
}
COLORS = {"goyal": "tab:blue", "lars": "tab:orange", "lamb": "tab:green", "smith": "tab:red", "momentum": "tab:purple"}
DIMINISHING = 2.0  # steps more than this x the perfect-scaling steps: the diminishing-returns region
# Targets: the hard one (every method reaches it at the smallest batch) and easier ones, these multiples of it: a fixed
# epoch budget leaves the large batches short of the hard one, and Shallue et al.'s curves depend on the target.
TARGETS = {"hard": 1.0, "medium": 2.0, "easy": 4.0}
USEFUL = 0.8  # the maximal useful batch: the smallest whose steps are within 1/USEFUL of the method's fewest


def grid_of(runs: list[RunRecord]) -> dict[tuple[str, int], dict[str, dict[int, RunRecord]]]:
    """(method, batch) -> tag -> seed -> run."""
    out: dict[tuple[str, int], dict[str, dict[int, RunRecord]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        method, batch, tag, seed = parse_run_name(r.name)
        out[(method, batch)][tag][seed] = r
    return {k: dict(v) for k, v in sorted(out.items())}


def smoothed_losses(run: RunRecord) -> list[tuple[int, float, float]]:
    """(step, epoch, loss) of the step records with a finite loss, in step order."""
    return [(int(s["step"]), float(s["epoch"]), float(s["loss"])) for s in sorted(run.steps, key=lambda s: s["step"])
            if isinstance(s.get("loss"), (int, float)) and math.isfinite(s["loss"])]


def steps_to_target(points: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose (recorded) loss is at or below ``target``; None if the run never gets there."""
    for step, loss in points:
        if loss <= target:
            return step
    return None


def choose_target(min_loss_at_smallest: dict[str, float]) -> float:
    """A loss every method reaches at the smallest batch: the largest of their lowest losses, rounded up to 0.01."""
    return math.ceil(max(min_loss_at_smallest.values()) * 100) / 100


def fit_critical_batch(steps: dict[int, int]) -> tuple[float, float] | None:
    """Least squares in log space of S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018, eq. 2.11).

    Returns (S_min, B_crit), B_crit searched on a log grid from B/100 to 100 B; None with fewer than 3 points.
    """
    if len(steps) < 3:
        return None
    bs = sorted(steps)
    logs = {b: math.log(steps[b]) for b in bs}
    best = None
    for i in range(401):
        bc = bs[0] / 100 * (100 * 100 * bs[-1] / bs[0]) ** (i / 400)
        # For a given B_crit the best log S_min is the mean of log S - log(1 + B_crit / B).
        log_smin = statistics.fmean(logs[b] - math.log1p(bc / b) for b in bs)
        sse = sum((logs[b] - log_smin - math.log1p(bc / b)) ** 2 for b in bs)
        if best is None or sse < best[0]:
            best = (sse, math.exp(log_smin), bc)
    assert best is not None
    return best[1], best[2]


def maximal_useful_batch(steps: dict[int, int]) -> int | None:
    """The smallest batch whose steps are within 1/USEFUL of the fewest steps any batch took (Shallue et al.'s
    maximal useful batch: beyond it a larger batch buys less than a 1 - USEFUL cut in steps)."""
    if not steps:
        return None
    fewest = min(steps.values())
    return min(b for b, s in steps.items() if USEFUL * s <= fewest)


# ---------------------------------------------------------------------------------------------------------------


def analyse(runs: list[RunRecord]) -> dict[str, Any]:
    """Everything the figures and the table show, as plain data."""
    grid = grid_of(runs)
    groups: list[dict[str, Any]] = []
    for (method, batch), points in grid.items():
        seed0 = {tag: seeds[0].final_top1 if 0 in seeds else None for tag, seeds in points.items()}
        best = best_tag(seed0)
        seeds = points.get(best, {}) if best else {}
        vals = [r.final_top1 for r in seeds.values() if r.final_top1 is not None]
        groups.append({
            "method": method, "batch": batch, "best": best, "edge": at_edge(best, list(points), ALL_TAGS),
            "grid": {tag: {"lr": seeds_[min(seeds_)].lr, "error_seed0": seed0[tag],
                           "runs": [r.name for r in seeds_.values()]} for tag, seeds_ in sorted(
                               points.items(), key=lambda kv: ALL_TAGS.index(kv[0]))},
            "best_lr": seeds[min(seeds)].lr if seeds else None,
            "best_mean": statistics.fmean(vals) if vals else None,
            "best_std": statistics.stdev(vals) if len(vals) > 1 else None, "best_seeds": len(vals),
        })
    smallest = min((g["batch"] for g in groups), default=None)
    min_loss = {}
    for (method, batch), points in grid.items():
        if batch == smallest and method in METHODS:
            losses = [min(p[2] for p in smoothed_losses(s[0])) for s in points.values() if 0 in s and s[0].steps]
            if losses:
                min_loss[method] = min(losses)
    hard = choose_target(min_loss) if min_loss else None
    targets = [] if hard is None else [{"name": n, "loss": f * hard} for n, f in TARGETS.items()]
    per_target: dict[str, dict[str, dict[str, Any]]] = {}
    for t in targets:
        per_method: dict[str, dict[str, Any]] = {}
        for g in groups:
            best_steps = None
            for tag, seeds in grid[(g["method"], g["batch"])].items():
                if 0 not in seeds:
                    continue
                st = steps_to_target([(p[0], p[2]) for p in smoothed_losses(seeds[0])], t["loss"])
                g["grid"][tag].setdefault("steps_to_target", {})[t["name"]] = st
                if st is not None and (best_steps is None or st < best_steps):
                    best_steps = st
            g.setdefault("steps_to_target", {})[t["name"]] = best_steps
            steps = per_method.setdefault(g["method"], {"steps": {}})["steps"]
            if best_steps is not None:
                steps[g["batch"]] = best_steps
        for pm in per_method.values():
            steps = pm["steps"]
            fit = fit_critical_batch(steps)
            pm["fit"] = None if fit is None else {"s_min": fit[0], "b_crit": fit[1]}
            pm["maximal_useful_batch"] = maximal_useful_batch(steps)
            pm["diminishing_from"] = None
            if smallest in steps:
                perfect = {b: steps[smallest] * smallest / b for b in steps}
                pm["diminishing_from"] = min((b for b in steps if steps[b] > DIMINISHING * perfect[b]), default=None)
            pm["steps"] = {str(b): st for b, st in sorted(steps.items())}
        per_target[t["name"]] = per_method
    crit = critical_batch([r for r in runs if parse_run_name(r.name)[0] == "goyal"])
    return {"groups": groups, "targets": targets, "min_loss_at_smallest": min_loss, "smallest_batch": smallest,
            "per_target": per_target, "noise_scale": crit}


def _best_runs(runs: list[RunRecord], summary: dict[str, Any]) -> dict[tuple[str, int], list[RunRecord]]:
    by_name = {r.name: r for r in runs}
    return {(g["method"], g["batch"]): [by_name[n] for n in g["grid"][g["best"]]["runs"]]
            for g in summary["groups"] if g["best"]}


def plot_error_vs_batch(summary: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8.5, 4.6), layout="constrained")
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in summary["groups"]:
        by_method[g["method"]].append(g)
    for method, gs in by_method.items():
        color = COLORS.get(method, "grey")
        for g in gs:
            others = [p["error_seed0"] for t, p in g["grid"].items() if t != g["best"] and p["error_seed0"] is not None]
            ax.scatter([g["batch"]] * len(others), [min(e, 95) for e in others], color=color, alpha=0.25, s=14,
                       lw=0)
        pts = [g for g in gs if g["best_mean"] is not None]
        ax.errorbar([g["batch"] for g in pts], [g["best_mean"] for g in pts],
                    yerr=[g["best_std"] or 0 for g in pts], color=color, marker="o", capsize=3,
                    label=METHODS.get(method, method), gid=f"method:{method}")
    crit = summary.get("noise_scale")
    if crit:
        ax.axvline(crit["b_noise"], color="k", ls="--", lw=1,
                   label=f"B_noise = {crit['b_noise']:,.0f} (McCandlish, measured)")
    ax.set_xscale("log", base=2)
    batches = sorted({g["batch"] for g in summary["groups"]})
    ax.set_xticks(batches, [fmt_batch(b) for b in batches])
    ax.set_xlabel("global batch")
    ax.set_ylabel("final validation top-1 error (%)")
    ax.set_ylim(bottom=max(0, min((g["best_mean"] for g in summary["groups"] if g["best_mean"]), default=0) - 2))
    ax.set_title("Error vs batch, best lr of each grid (faint: the grid's other lrs, capped at 95%)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_vs_epochs(runs: list[RunRecord], summary: dict[str, Any]) -> Any:
    best = _best_runs(runs, summary)
    methods = [m for m in METHODS if any(k[0] == m for k in best)]
    batches = sorted({b for _, b in best})
    cmap = plt.get_cmap("viridis")
    colors = {b: "black" if i == 0 else cmap((i - 1) / max(1, len(batches) - 2) * 0.85) for i, b in enumerate(batches)}
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.6, 3.2 * rows + 0.5), squeeze=False, sharey=True,
                             layout="constrained")
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for b in batches:
            seeds = best.get((method, b), [])
            if not seeds and method == "momentum" and b == batches[0]:
                seeds = best.get(("goyal", b), [])  # at 256 momentum scaling gives 0.9: Goyal's own runs
            curves = [smoothed_losses(r) for r in seeds if r.steps]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            window = max(1, n // 30)
            epochs = [p[1] for p in curves[0][:n]]
            ys = [_smooth([p[2] for p in c[:n]], window) for c in curves]
            mean = [statistics.fmean(col) for col in zip(*ys, strict=True)]
            ax.plot(epochs, mean, color=colors[b], lw=1.6 if b == batches[0] else 1.2, gid=f"run:{method}-{b}",
                    label=f"{fmt_batch(b)}" + (" (reference)" if b == batches[0] else "") +
                    (f", {len(curves)} seeds" if len(curves) > 1 else ""))
            if len(curves) > 1:
                cols = list(zip(*ys, strict=True))
                ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], color=colors[b], alpha=0.25,
                                lw=0)
        ax.set_title(METHODS[method], fontsize=9)
        ax.set_xlabel("epochs")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (best lr)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            key = label.split(" ")[0].rstrip(",")
            if key not in [lab.split(" ")[0].rstrip(",") for lab in labels]:
                handles.append(h)
                labels.append(label.split(",")[0])
    fig.legend(handles, labels, title="global batch", loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle("Training loss vs epochs, each batch's best lr against the smallest batch (Goyal et al. Fig. 2 "
                 "style; band: seeds min-max)", fontsize=10)
    return fig


def plot_steps_to_target(summary: dict[str, Any]) -> Any:
    """One panel per target: steps to it against batch, log-log (Shallue et al. 2018 Fig. 1 style)."""
    targets = summary["targets"]
    fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(4.4 * max(1, len(targets)) + 2.8, 4.4), sharey=True,
                             squeeze=False, layout="constrained")
    smallest = summary["smallest_batch"]
    all_b = sorted({g["batch"] for g in summary["groups"]})
    ys = [st for pt in summary["per_target"].values() for pm in pt.values() for st in pm["steps"].values()]
    crit = summary.get("noise_scale")
    for ax, t in zip(axes[0], targets, strict=False):
        per_method = summary["per_target"][t["name"]]
        ref = per_method.get("goyal", {}).get("steps", {}).get(str(smallest))
        if ref is not None:
            ax.plot(all_b, [ref * smallest / b for b in all_b], color="grey", ls=":", lw=1.2,
                    label="perfect scaling (from Goyal at the smallest batch)")
            ax.fill_between(all_b, [DIMINISHING * ref * smallest / b for b in all_b], [1e6] * len(all_b),
                            color="grey", alpha=0.1, lw=0, label=f"diminishing returns (> {DIMINISHING:g}x perfect)")
        top = max(ys) * 1.8 if ys else 10
        for i, (method, pm) in enumerate(per_method.items()):
            steps = {int(b): st for b, st in pm["steps"].items()}
            color = COLORS.get(method, "grey")
            bs = sorted(steps)
            ax.plot(bs, [steps[b] for b in bs], marker="o", color=color, label=METHODS.get(method, method),
                    gid=f"method:{method}")
            mub = pm.get("maximal_useful_batch")
            if mub is not None:
                ax.scatter([mub], [steps[mub]], marker="*", s=220, color=color, edgecolor="k", zorder=5)
            missing = [g["batch"] for g in summary["groups"]
                       if g["method"] == method and g["steps_to_target"].get(t["name"]) is None]
            ax.scatter([b * 1.07 ** (i - 1.5) for b in missing], [top] * len(missing), marker="x", color=color,
                       zorder=4)  # side by side, not on top of each other
        if crit:
            ax.axvline(crit["b_noise"], color="k", ls="--", lw=1,
                       label=f"predicted critical batch: B_noise = {crit['b_noise']:,.0f}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(all_b, [fmt_batch(b) for b in all_b])
        if ys:
            ax.set_ylim(min(ys) / 2, max(ys) * 2.5)
        ax.set_xlabel("global batch")
        ax.set_title(f"{t['name']} target: training loss {t['loss']:.3g}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("optimizer steps to target (best lr)")
    axes[0][0].scatter([], [], marker="*", s=120, color="white", edgecolor="k", label="maximal useful batch")
    axes[0][0].scatter([], [], marker="x", color="k", label="target not reached (top)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle("Steps to a target training loss against batch (Shallue et al. 2018 style)", fontsize=10)
    return fig


def _cell(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _steps(d: dict[str, int | None] | None) -> str:
    d = d or {}
    return " / ".join("—" if d.get(n) is None else str(d[n]) for n in TARGETS)


def table_markdown(summary: dict[str, Any], planned: list[str] | None = None) -> str:
    lines = ["# Tuned study: the whole grid", "",
             "Final validation top-1 error (%) of seed 0 at each lr of the grid (the method's rule x 1/3, 1, 3; "
             "x1/9 or x9 only where the best of the three was at that edge), with the steps that lr took to the "
             "hard / medium / easy target training loss; **bold**: the best error, by which the method is judged at "
             "that batch; *edge*: the best lr is the grid's smallest or largest, so the optimum may lie outside. "
             "Best: mean ± sample std over the seeds run at the best lr (n). Steps: the fewest over the grid "
             "(Shallue et al. take the best lr for each batch).", "",
             "| method | batch | lr × 1/9 | lr × 1/3 | lr × 1 | lr × 3 | lr × 9 | best (n) | steps to hard / medium "
             "/ easy target |", "|---|---|---|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        cells = []
        for tag in ALL_TAGS:
            p = g["grid"].get(tag)
            if p is None:
                cells.append("not run" if tag in ("x1_3", "x1", "x3") else "")
                continue
            txt = f"{_cell(p['error_seed0'])} (lr {p['lr']:.3g}; {_steps(p.get('steps_to_target'))} st)"
            cells.append(f"**{txt}**" if tag == g["best"] else txt)
        best = "—" if g["best_mean"] is None else f"{g['best_mean']:.2f}" + (
            f" ± {g['best_std']:.2f}" if g["best_std"] is not None else "") + f" ({g['best_seeds']})"
        if g["edge"]:
            best += " *edge*"
        lines.append(f"| {g['method']} | {g['batch']:,} | " + " | ".join(cells) +
                     f" | {best} | {_steps(g.get('steps_to_target'))} |")
    for t in summary["targets"]:
        lines += ["", f"**{t['name'].capitalize()} target: training loss {t['loss']:.3g}** " + (
            f"(the largest of each method's lowest loss at batch {summary['smallest_batch']}: every method reaches it "
            f"there)" if t["name"] == "hard" else f"({TARGETS[t['name']]:g} x the hard target)") + ".", "",
            "| method | steps by batch | maximal useful batch | diminishing returns from | fitted B_crit "
            "(S = S_min (1 + B_crit/B)) |", "|---|---|---|---|---|"]
        for method, pm in summary["per_target"][t["name"]].items():
            fit = pm.get("fit")
            fitted = "—" if fit is None else f"{fit['b_crit']:,.0f} (S_min {fit['s_min']:.0f})"
            steps = ", ".join(f"{fmt_batch(int(b))}: {st}" for b, st in pm["steps"].items()) or "—"
            lines.append(f"| {method} | {steps} | {pm.get('maximal_useful_batch') or '—'} | "
                         f"{pm.get('diminishing_from') or '—'} | {fitted} |")
    crit = summary.get("noise_scale")
    if crit:
        lines += ["", f"Gradient noise scale B_simple (Goyal runs that trained normally; median of per-run medians): "
                      f"{crit['b_noise']:,.0f} (range {crit['min']:,.0f}-{crit['max']:,.0f} over "
                      f"{len(crit['per_run'])} runs)."]
    if planned:
        done = {n for g in summary["groups"] for p in g["grid"].values() for n in p["runs"]}
        missing = [n for n in planned if n not in done]
        if missing:
            lines += ["", f"Planned but not finished ({len(missing)}): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_study(runs: list[RunRecord], out: Path, planned: list[str] | None = None) -> dict[str, Any]:
    """Write the three figures, table.md and summary.json into ``out``; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = analyse(runs)
    for name, fig in (("fig1_error_vs_batch.png", plot_error_vs_batch(summary)),
                      ("fig2_train_loss_vs_epochs.png", plot_loss_vs_epochs(runs, summary)),
                      ("fig3_steps_to_target.png", plot_steps_to_target(summary))):
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    (out / "table.md").write_text(table_markdown(summary, planned))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
