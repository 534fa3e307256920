"""Compare large-batch runs side by side: Goyal et al.'s figures, a table of final errors, the noise scale.

    python -m analysis.compare runs/256-seed0 runs/8k-seed0 runs/lars-8k-seed0 --out compare/
    python -m analysis.compare runs/ --wandb my-team/largebatch/study1 --out compare/

Reads run folders written by train/imagenet.py (a folder of run folders works too) and, when wandb is online,
the runs of ENTITY/PROJECT[/GROUP] through the wandb public API. Writes to --out:

1. fig1_error_vs_batch.png: validation top-1 error (median of the last 5 epochs, as Goyal et al. report it, or
   the final epoch's with --metric final) against global batch on a log-2 axis, one line per method (SGD with
   linear scaling and gradual warmup, without warmup, without scaling, LARS, LAMB, ...), mean and standard
   deviation over runs that share method and batch (seeds): Goyal et al. 2017 (arXiv:1706.02677) Fig. 1. When runs
   logged the gradient noise scale B_simple (McCandlish et al. 2018, arXiv:1812.06162), a dashed line marks the
   predicted critical batch size.
2. fig2_train_error_vs_epochs.png: training error against epochs, one panel per batch size with the runs of that
   batch overlaid on those of the smallest batch: Goyal et al. Figs. 2 and 4.
3. fig3_lr_schedule.png: each run's learning rate against epochs (one panel per optimizer), warmup included.
4. table.md: one row per run (batch, optimizer, lr, epochs, final and median-of-last-5 top-1 error, training time,
   noise scale) and one per (method, batch) with mean +- std over seeds; on ImageNet the published numbers for the
   same batch (Goyal et al. Table 1, the torchlars LARS reproduction; analysis/papers.py) in a column beside.
5. summary.json: the same numbers, machine-readable.

When runs logged per-layer trust ratios (``--trust-ratio-interval``, "layers" records; train/diagnostics.py):

6. trust_ratio_heatmap.png: per run, the trust ratio of every layer (rows, model order) at every logged step
   (columns) on a log colour scale; grey where a layer has no ratio (batch-norm parameters and biases, which
   LARS and LAMB do not adapt).
7. trust_ratio_layers.png: the ratio of a few layers over training (default the first, a middle and the last
   adapted layer: first conv, a middle conv, the fc; ``--layers`` chooses), one panel per layer, the runs (batch
   sizes) overlaid.
8. w_over_g_table.md: You et al. 2017's table (arXiv:1708.03888, AlexNet-BN there): ||w|| / ||g|| per layer at
   the first "layers" record (the start of training), one column per run.

With --wandb and wandb online it also saves a wandb Report with the same panels (needs the wandb-workspaces
package); offline it says so and skips the wandb parts.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.papers import SOURCES  # noqa: E402
from analysis.runs import (  # noqa: E402
    RunError,
    RunRecord,
    default_layers,
    find_run_dirs,
    load_run,
    load_wandb_runs,
    parse_wandb_path,
    trust_ratio_matrix,
    w_over_g,
    wandb_online,
)

METRICS = {"median5": "median of the last 5 epochs", "final": "final epoch"}
FIGURES = ("fig1_error_vs_batch.png", "fig2_train_error_vs_epochs.png", "fig3_lr_schedule.png")
LAYER_FILES = ("trust_ratio_heatmap.png", "trust_ratio_layers.png", "w_over_g_table.md")


def fmt_batch(b: float) -> str:
    """256, 1k, 8k, 32k (powers of two of 1024 as k), else the number."""
    b = int(b)
    return f"{b // 1024}k" if b >= 1024 and b % 1024 == 0 else f"{b:,}"


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def error_of(run: RunRecord, metric: str) -> float | None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return run.median5_top1 if metric == "median5" else run.final_top1


def unique_names(runs: list[RunRecord]) -> None:
    """Two runs with the same name (from two folders or from a folder and wandb) get "#2", "#3" appended."""
    seen: dict[str, int] = defaultdict(int)
    for r in runs:
        seen[r.name] += 1
        if seen[r.name] > 1:
            r.name = f"{r.name}#{seen[r.name]}"


def method_colors(runs: list[RunRecord]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted({r.method for r in runs}))}


def groups(runs: list[RunRecord], metric: str) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, batch) -> {"runs", "values", "mean", "std" (sample std, 0 for a single run), "n"}."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in runs:
        g = out.setdefault((r.method, r.batch), {"runs": [], "values": []})
        g["runs"].append(r.name)
        v = error_of(r, metric)
        if v is not None:
            g["values"].append(v)
    for g in out.values():
        vals = g["values"]
        g["n"] = len(vals)
        g["mean"] = statistics.fmean(vals) if vals else None
        g["std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0 if vals else None
    return dict(sorted(out.items()))


HEALTHY_MARGIN = 5.0  # percentage points of final error from the best run: a run that trained normally


def critical_batch(runs: list[RunRecord]) -> dict[str, Any] | None:
    """The predicted critical batch: the median over runs of each run's median logged B_simple.

    Only runs that trained normally count (final error within HEALTHY_MARGIN points of the best run that measured
    the noise scale): a diverged run's gradients say nothing about the noise scale of the training it failed to do.
    """
    measured = [r for r in runs if r.noise_scale_median is not None and r.final_top1 is not None]
    if not measured:
        return None
    best = min(r.final_top1 for r in measured)
    per_run = {r.name: r.noise_scale_median for r in measured if r.final_top1 <= best + HEALTHY_MARGIN}
    values = list(per_run.values())
    return {"b_noise": statistics.median(values), "min": min(values), "max": max(values), "per_run": per_run}


# ---------------------------------------------------------------------------------------------------------------
# Figures. Every data line carries a gid ("method:<label>" or "run:<name>") so tests and users can find it.


def plot_error_vs_batch(runs: list[RunRecord], metric: str = "median5") -> Figure:
    """Goyal et al. Fig. 1: validation error against global batch, one line per method, log-2 x axis."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    colors = method_colors(runs)
    by_method: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for (method, batch), g in groups(runs, metric).items():
        if g["n"]:
            by_method[method].append((batch, g))
    batches: set[int] = set()
    for method, points in by_method.items():
        xs = [b for b, _ in points]
        batches.update(xs)
        container = ax.errorbar(xs, [g["mean"] for _, g in points], yerr=[g["std"] for _, g in points],
                                marker="o", capsize=3, color=colors[method], label=method)
        container.lines[0].set_gid(f"method:{method}")
        seeds = [(b, v) for b, g in points if g["n"] > 1 for v in g["values"]]
        if seeds:
            ax.scatter(*zip(*seeds, strict=True), s=10, color=colors[method], alpha=0.4, zorder=1)
    crit = critical_batch(runs)
    if crit is not None:
        ax.axvline(crit["b_noise"], color="k", ls="--", lw=1, gid="critical-batch",
                   label=f"predicted critical batch B_noise ≈ {crit['b_noise']:,.0f} (McCandlish et al.)")
        if crit["max"] > crit["min"]:
            ax.axvspan(crit["min"], crit["max"], color="k", alpha=0.08, lw=0)
    ax.set_xscale("log", base=2)
    if batches:
        ax.set_xticks(sorted(batches), [fmt_batch(b) for b in sorted(batches)])
        ax.minorticks_off()
    mlm = bool(runs) and all(r.is_mlm for r in runs)  # BERT runs (train/bert.py): held-out MLM loss
    ax.set_xlabel("global batch (sequences)" if mlm else "global batch (images)")
    ax.set_ylabel(f"{error_label(runs)}, {METRICS[metric]}")
    ax.set_title("Validation error vs batch size (Goyal et al. 2017, Fig. 1)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return fig


def _grid(n: int, width: float = 4.6, height: float = 3.4) -> tuple[Figure, list[Any]]:
    cols = min(3, max(1, n))
    rows = math.ceil(max(1, n) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, width * cols), height * rows + 0.4), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:max(1, n)]


def _panel(ax: Any, title: str, ylabel: str) -> None:
    """The common dressing of a per-epoch panel."""
    ax.set_title(title)
    ax.set_xlabel("epochs")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_train_error_vs_epochs(runs: list[RunRecord]) -> Figure:
    """Goyal et al. Figs. 2 and 4: training error against epochs; one panel per batch size, each run of that batch
    overlaid on the runs of the smallest batch (dashed). With a single batch size, one panel of all runs."""
    colors = method_colors(runs)
    with_epochs = [r for r in runs if r.epochs]
    batches = sorted({r.batch for r in with_epochs})
    ref_batch = batches[0] if batches else None
    panels = batches[1:] if len(batches) > 1 else batches
    fig, axes = _grid(len(panels))
    for ax, batch in zip(axes, panels, strict=False):
        refs = [r for r in with_epochs if r.batch == ref_batch] if batch != ref_batch else []
        for r in refs + [r for r in with_epochs if r.batch == batch]:
            is_ref = r.batch != batch
            ax.plot([e["epoch"] for e in r.epochs], [e["train_error"] for e in r.epochs],
                    ls="--" if is_ref else "-", marker="." if len(r.epochs) < 30 else None,
                    color=colors[r.method], alpha=0.7 if is_ref else 1.0, gid=f"run:{r.name}",
                    label=f"{fmt_batch(r.batch)} {r.method} ({r.name})")
        title = f"batch {fmt_batch(batch)}" + (f" vs {fmt_batch(ref_batch)}" if batch != ref_batch else "")
        _panel(ax, title, "training error (%)")
    fig.suptitle("Training error vs epochs (Goyal et al. 2017, Figs. 2 and 4)")
    return fig


def plot_lr_schedule(runs: list[RunRecord]) -> Figure:
    """Each run's learning rate (step records) against epochs, one panel per optimizer (their lr scales differ)."""
    with_steps = [r for r in runs if r.steps]
    optimizers = sorted({r.optimizer for r in with_steps})
    fig, axes = _grid(len(optimizers))
    for ax, opt in zip(axes, optimizers, strict=False):
        for r in (r for r in with_steps if r.optimizer == opt):
            ax.plot([s["epoch"] for s in r.steps], [s["lr"] for s in r.steps], gid=f"run:{r.name}",
                    label=f"{r.name} ({fmt_batch(r.batch)})")
        _panel(ax, opt, "learning rate")
    fig.suptitle("Learning-rate schedules")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Per-layer trust ratios ("layers" records)


def _run_label(r: RunRecord) -> str:
    return f"{r.optimizer} {fmt_batch(r.batch)} ({r.name})"


def plot_trust_ratio_heatmaps(runs: list[RunRecord]) -> Figure:
    """One layer x step heat map of the trust ratio per run. Rows: the layers with a ratio (those LARS/LAMB adapt;
    batch-norm parameters and biases have none and are left out). One log colour scale, with its own colour bar, per
    kind of ratio (:func:`ratio_kind`: LARS's ratio, LARC's clipped factor, LAMB's ||w|| / ||u||, the ratio LARS
    would apply under SGD), shared by the runs of that kind: the kinds are different quantities."""
    from matplotlib.colors import LogNorm

    data = []
    for r in (r for r in runs if r.layers):
        names, steps, matrix = trust_ratio_matrix(r)
        keep = [i for i in range(len(names)) if not all(math.isnan(v) for v in matrix[i])]
        data.append((r, [names[i] for i in keep], steps, matrix[keep]))
    norms: dict[str, LogNorm | None] = {}
    for kind in dict.fromkeys(ratio_kind(r) for r, *_ in data):
        values = [v for r, _, _, m in data if ratio_kind(r) == kind for v in m[m > 0].ravel()]
        norms[kind] = LogNorm(vmin=min(values), vmax=max(values)) if values else None
    rows = max((len(names) for _, names, _, _ in data), default=1)
    cols = min(4, max(1, len(data)))
    fig, grid = plt.subplots(math.ceil(max(1, len(data)) / cols), cols, squeeze=False, layout="constrained",
                             figsize=(4.4 * cols + 1.0, min(12.0, max(3.2, 0.2 * rows + 1.6))
                                      * math.ceil(max(1, len(data)) / cols)))
    axes = list(grid.flat)
    for ax in axes[len(data):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    images: dict[str, tuple[Any, list[Any]]] = {}
    for ax, (r, names, steps, matrix) in zip(axes, data, strict=False):
        kind = ratio_kind(r)
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap, norm=norms[kind],
                          gid=f"run:{r.name}", extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5))
        images.setdefault(kind, (image, []))[1].append(ax)
        every = max(1, math.ceil(len(names) / 40))  # at most 40 labels (ResNet-50 has 161 tensors)
        ax.set_yticks(range(0, len(names), every), names[::every] if ax is axes[0] or len(data) == 1 else [],
                      fontsize=max(4, 7 - len(names) // 40))
        ticks = list(range(0, len(steps), max(1, math.ceil(len(steps) / 8))))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("optimizer step")
        ax.set_title(_run_label(r), fontsize=9)
    for kind, (image, kind_axes) in images.items():
        fig.colorbar(image, ax=kind_axes, label=RATIO_LABELS.get(kind, kind), shrink=0.9)
    fig.suptitle("Per-layer trust ratio over training (adapted layers; grey: no record)")
    return fig


#: Colour-bar label of each kind of ratio (:func:`ratio_kind`).
RATIO_LABELS = {"LARS applied": "LARS trust ratio", "LARS larc_clipped": "LARC factor min(ratio / lr, 1)",
                "LAMB applied": "LAMB ||w|| / ||u||", "SGD lars_would_apply": "ratio LARS would apply (SGD)"}


def ratio_kind(r: RunRecord) -> str:
    """What a run's ratios are: the recording optimizer and its "ratio" field (train/diagnostics.py), e.g.
    "LARS larc_clipped"; runs of one kind share a colour scale."""
    first = r.layers[0]
    if "optimizer" in first and "ratio" in first:
        return f"{first['optimizer']} {first['ratio']}"
    by_config = {"lars": "LARS applied", "larc": "LARS larc_clipped", "lamb": "LAMB applied",
                 "sgd": "SGD lars_would_apply"}  # records from wandb's history carry neither field
    return by_config.get(str(r.optimizer).lower(), str(r.optimizer))


def _epochs_of(r: RunRecord, rec: dict[str, Any]) -> float:
    num_train = r.derived.get("num_train")
    return rec["samples"] / num_train if num_train and rec.get("samples") is not None else float(rec["step"])


def plot_trust_ratio_layers(runs: list[RunRecord], layers: list[str] | None = None) -> Figure:
    """The trust ratio of chosen layers against epochs, one panel per layer, the runs overlaid (log y axis)."""
    with_layers = [r for r in runs if r.layers]
    chosen = layers or (default_layers(with_layers[0]) if with_layers else [])
    cmap = plt.get_cmap("viridis")
    batches = sorted({r.batch for r in with_layers})
    color = {b: cmap(i / max(1, len(batches) - 1) * 0.9) for i, b in enumerate(batches)}
    styles = {o: ls for o, ls in zip(sorted({r.optimizer for r in with_layers}), ("-", "--", ":", "-."),
                                     strict=False)}
    fig, axes = plt.subplots(1, max(1, len(chosen)), figsize=(4.2 * max(1, len(chosen)) + 2.2, 3.6), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.flat, chosen, strict=False):
        for r in with_layers:
            points = [(_epochs_of(r, rec), e["trust_ratio"]) for rec in r.layers for e in rec["layers"]
                      if e["name"] == name and e.get("trust_ratio")]
            if points:
                ax.plot(*zip(*points, strict=True), color=color[r.batch], ls=styles.get(r.optimizer, "-"),
                        gid=f"run:{r.name}:{name}", label=_run_label(r))
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epochs" if all(r.derived.get("num_train") for r in with_layers) else "optimizer step")
        ax.set_ylabel("trust ratio")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle("Trust ratio of chosen layers across batch sizes")
    return fig


def _ratio_cell(v: float | None) -> str:
    if v is None:
        return "—"
    return "∞" if math.isinf(v) else f"{v:,.0f}" if v >= 1000 else f"{v:.4g}"


def w_over_g_markdown(runs: list[RunRecord]) -> str:
    """You et al. 2017's table for our runs: ||w|| / ||g|| of every layer at the first "layers" record."""
    tables = [(r, *w_over_g(r)) for r in runs if r.layers]
    tables = [t for t in tables if t[1] is not None]
    names: list[str] = []
    for _, _, ratios in tables:
        names += [n for n in ratios if n not in names]
    adapted = {e["name"]: e.get("adapted", e.get("trust_ratio") is not None) for r, _, _ in tables
               for e in r.layers[0]["layers"]}
    head = ["layer", "adapted"] + [f"{_run_label(r)}, step {step}" for r, step, _ in tables]
    lines = ["## ||w|| / ||g|| per layer at the start of training", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        cells = [f"`{n}`", "yes" if adapted.get(n) else "no"] + [_ratio_cell(ratios.get(n)) for _, _, ratios in tables]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Norms of the weights and of the gradient the optimizer stepped with (after DeepSpeed's averaging "
              "over ranks), at the first logged step; ∞: no gradient reached the layer yet (behind a batch norm "
              "whose gamma starts at 0), 0: a weight that starts at 0. \"adapted\": the layer gets a trust ratio "
              "(LARS, LAMB; batch-norm parameters and biases do not). You et al. 2017 (arXiv:1708.03888) measured "
              "this ratio on AlexNet-BN from about 5 to over 1,000 across layers: the case for a per-layer "
              "learning rate."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Table and summary


def _paper_cell(run: RunRecord, marks: dict[str, str]) -> str:
    p = run.paper()
    if p is None:
        return "—"
    mark = marks.setdefault(p.source, "abcdefgh"[len(marks)])
    return f"{p.top1_error:.2f}" + (f" ± {p.std:.2f}" if p.std is not None else "") + f" [{mark}]"


def error_label(runs: list[RunRecord]) -> str:
    """What the error columns and axes hold: top-1 error, or BERT's held-out MLM loss when every run is BERT's."""
    return "held-out MLM loss (nats)" if runs and all(r.is_mlm for r in runs) else "validation top-1 error (%)"


def table_markdown(runs: list[RunRecord], metric: str = "median5") -> str:
    """Two markdown tables (runs; method x batch) and the footnotes naming the sources of the paper column."""
    imagenet = any(r.dataset == "imagenet" for r in runs)
    marks: dict[str, str] = {}
    ordered = sorted(runs, key=lambda r: (r.dataset, r.method, r.batch, r.seed if r.seed is not None else -1, r.name))
    what = "MLM loss (nats)" if error_label(runs).startswith("held-out") else "top-1 err. (%)"
    head = ["run", "method", "batch", "optimizer", "peak lr", "epochs", f"final {what}",
            f"median-5 {what}", "train time", "B_noise (median / last)"]
    if imagenet:
        head.append("paper top-1 err. (%)")
    lines = ["## Runs", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered:
        planned = r.planned_epochs
        epochs = f"{r.epochs_done:g}" + (f" / {planned}" if planned is not None and planned != r.epochs_done else "")
        noise = "—" if r.noise_scale_median is None else f"{r.noise_scale_median:,.0f} / {r.noise_scale_last:,.0f}"
        row = [r.name, r.method, f"{r.batch:,}", r.optimizer, "—" if r.lr is None else f"{r.lr:g}", epochs,
               _fmt(r.final_top1), _fmt(r.median5_top1), fmt_duration(r.train_time), noise]
        if imagenet:
            row.append(_paper_cell(r, marks) if r.dataset == "imagenet" else "—")
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", f"## By method and batch ({METRICS[metric]}; mean ± sample std over runs)", ""]
    head2 = ["method", "batch", "runs", what] + (["paper top-1 err. (%)"] if imagenet else [])
    lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    by_name = {r.name: r for r in runs}
    for (method, batch), g in groups(runs, metric).items():
        cell = "—" if g["mean"] is None else f"{g['mean']:.2f}" + (f" ± {g['std']:.2f}" if g["n"] > 1 else "")
        row = [method, f"{batch:,}", str(len(g["runs"])), cell]
        if imagenet:
            first = by_name[g["runs"][0]]
            row.append(_paper_cell(first, marks) if first.dataset == "imagenet" else "—")
        lines.append("| " + " | ".join(row) + " |")

    crit = critical_batch(runs)
    lines.append("")
    if crit is not None:
        lines.append(f"Predicted critical batch (gradient noise scale B_simple, McCandlish et al. 2018, "
                     f"arXiv:1812.06162; median over runs of each run's median): {crit['b_noise']:,.0f}.")
    lines.append("Top-1 error: validation error (%); median-5 is the median of the last 5 epochs, as Goyal et al. "
                 "report it. Train time is the sum of the epochs' training time (no evaluation, no start-up).")
    if imagenet:
        lines.append("")
        for source, mark in marks.items():
            lines.append(f"[{mark}] {SOURCES[source]}.")
        if not marks:
            lines.append("No published number matches these runs' method and batch.")
    elif runs:
        lines.append(f"Data set: {', '.join(sorted({r.dataset for r in runs}))}; the papers' numbers are for "
                     f"ImageNet and are not shown.")
    return "\n".join(lines) + "\n"


def summary_dict(runs: list[RunRecord], metric: str = "median5") -> dict[str, Any]:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    out_runs = []
    for r in runs:
        p = r.paper()
        out_runs.append({
            "name": r.name, "source": r.source, "method": r.method, "dataset": r.dataset, "batch": r.batch,
            "optimizer": r.optimizer, "lr": r.lr, "lr_scaling": r.scaling, "warmup": r.warmup, "seed": r.seed,
            "epochs": r.epochs_done, "planned_epochs": r.planned_epochs, "final_top1_error": r.final_top1,
            "median5_top1_error": r.median5_top1, "train_time_s": r.train_time,
            "noise_scale_median": clean(r.noise_scale_median), "noise_scale_last": clean(r.noise_scale_last),
            "noise_scale_points": len(r.noise_scale_values),
            "paper": None if p is None else {"top1_error": p.top1_error, "std": p.std, "source": SOURCES[p.source]},
        })
    return {
        "metric": metric, "metric_meaning": METRICS[metric], "runs": out_runs,
        "groups": [{"method": m, "batch": b, "runs": g["runs"], "n": g["n"], "mean": g["mean"], "std": g["std"]}
                   for (m, b), g in groups(runs, metric).items()],
        "critical_batch": critical_batch(runs),
        "files": list(FIGURES) + ["table.md"],
    }


# ---------------------------------------------------------------------------------------------------------------
# wandb Report


def build_report(entity: str, project: str, group: str | None, table_md: str, title: str | None = None) -> Any:
    """A wandb Report (wandb-workspaces) with the same panels, drawn by wandb from the project's runs; not saved."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise RunError("the wandb Report needs the wandb-workspaces package (pip install wandb-workspaces)") from e
    runset = wr.Runset(entity=entity, project=project, name=group or project,
                       filters=f"Group = '{group}'" if group else "")
    panels = [
        wr.ScatterPlot(title="Validation top-1 error (median of last 5 epochs) vs global batch (Goyal Fig. 1)",
                       x=wr.Config("derived.global_batch"), y=wr.SummaryMetric("summary/median5_val_top1_error"),
                       log_x=True),
        wr.LinePlot(title="Training error vs epochs (Goyal Figs. 2, 4)", x="epoch/epoch", y=["epoch/train_error"]),
        wr.LinePlot(title="Learning rate vs epochs", x="step/epoch", y=["step/lr"]),
        wr.LinePlot(title="Gradient noise scale B_simple (McCandlish et al. 2018)", x="step/epoch",
                    y=["step/noise_scale"]),
        wr.LinePlot(title="Validation top-1 error vs epochs", x="epoch/epoch", y=["epoch/val_top1_error"]),
    ]
    return wr.Report(
        entity=entity, project=project, title=title or f"Large-batch comparison: {group or project}",
        description="Goyal et al. 2017 (arXiv:1706.02677) Figs. 1-4 and Table 1 for our runs; made by "
                    "python -m analysis.compare",
        blocks=[wr.H1(text="Large-batch comparison"),
                wr.P(text="Validation error against batch size, training error and lr against epochs, the "
                          "gradient noise scale; the table below is table.md from analysis.compare."),
                wr.PanelGrid(runsets=[runset], panels=panels),
                wr.H2(text="Table"), wr.MarkdownBlock(text=table_md)])


# ---------------------------------------------------------------------------------------------------------------
# Command line


def collect_runs(paths: list[str], wandb_spec: str | None, *, progress: bool = True) -> tuple[list[RunRecord], bool]:
    """Runs from the folders and, when online, from wandb; returns (runs, whether wandb was read)."""
    runs = [load_run(p) for p in find_run_dirs(paths)] if paths else []
    used_wandb = False
    if wandb_spec:
        parse_wandb_path(wandb_spec)  # a malformed spec fails even offline
        online, why = wandb_online()
        if online:
            try:
                # A run kept in a folder here and also logged to wandb is counted once (the folder's copy).
                local_ids = {d.name.rsplit("-", 1)[-1] for r in runs for d in Path(r.source).glob("wandb/*run-*")}
                runs += [w for w in load_wandb_runs(wandb_spec, progress=progress)
                         if w.source.rsplit("/", 1)[-1] not in local_ids]
            except RunError:
                raise
            except Exception as e:  # noqa: BLE001 (network, permissions, a project that does not exist)
                raise RunError(f"could not read runs from wandb {wandb_spec}: {type(e).__name__}: {e}") from None
            used_wandb = True
        else:
            print(f"wandb: offline ({why}); not reading runs from {wandb_spec} and not making a Report; "
                  f"using the run folders only", file=sys.stderr)
    for r in runs:
        if not r.epochs:
            print(f"warning: {r.source}: no epoch records yet; left out of the error figures", file=sys.stderr)
    unique_names(runs)
    return runs, used_wandb


def compare(runs: list[RunRecord], out: Path, metric: str = "median5",
            layers: list[str] | None = None) -> dict[str, Any]:
    """Write the figures, table.md and summary.json to ``out`` (and the trust-ratio panels when runs logged
    "layers" records; ``layers`` chooses the overlaid layers); return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in zip(FIGURES, (plot_error_vs_batch(runs, metric), plot_train_error_vs_epochs(runs),
                                   plot_lr_schedule(runs)), strict=True):
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    table = table_markdown(runs, metric)
    (out / "table.md").write_text(table)
    summary = summary_dict(runs, metric)
    if any(r.layers for r in runs):
        known = {e["name"] for r in runs for rec in r.layers for e in rec["layers"]}
        unknown = [n for n in layers or [] if n not in known]
        if unknown:
            raise RunError(f"--layers {' '.join(unknown)}: no such layer in the runs' records; known: "
                           f"{', '.join(sorted(known))}")
        for name, fig in zip(LAYER_FILES[:2], (plot_trust_ratio_heatmaps(runs), plot_trust_ratio_layers(runs, layers)),
                             strict=True):
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
        (out / LAYER_FILES[2]).write_text(w_over_g_markdown(runs))
        summary["files"] += list(LAYER_FILES)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders, or folders of run folders (e.g. runs/)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT[/GROUP]", default=None,
                   help="also read the runs of this wandb project (and group), and save a Report there")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the figures, table and summary")
    p.add_argument("--metric", choices=tuple(METRICS), default="median5",
                   help="error per run in the figure and the grouped table: median of the last 5 epochs or final")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="layers (state_dict names) of the trust-ratio overlay; default: first, middle and last "
                        "adapted layer")
    p.add_argument("--no-report", action="store_true", help="do not save a wandb Report even when online")
    p.add_argument("--report-title", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.runs and not args.wandb:
        print("error: give run folders and/or --wandb ENTITY/PROJECT[/GROUP]", file=sys.stderr)
        return 2
    try:
        runs, used_wandb = collect_runs(args.runs, args.wandb)
        if not runs:
            raise RunError("no runs to compare" + (f" (none found in wandb {args.wandb})" if args.wandb else ""))
        out = Path(args.out)
        summary = compare(runs, out, args.metric, args.layers)
        print(f"{len(runs)} runs -> {out}: {', '.join(summary['files'])}, summary.json")
        if used_wandb and not args.no_report:
            entity, project, group = parse_wandb_path(args.wandb)
            try:
                report = build_report(entity, project, group, (out / "table.md").read_text(), args.report_title)
                report.save()
                print(f"wandb Report: {report.url}")
            except Exception as e:  # noqa: BLE001 (the files are written; a Report failure only loses the Report)
                print(f"warning: wandb Report not saved ({type(e).__name__}: {e}); the files in {out} are complete",
                      file=sys.stderr)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
