"""Runs read back for comparison: from run folders (config.json + metrics.jsonl) or from the wandb public API.

A run folder is what train/imagenet.py writes on rank 0: ``config.json`` (run name, command-line args, the
derived batch arithmetic, optimizer, scheduler, DeepSpeed config) and ``metrics.jsonl`` with one JSON record a
line, ``"kind"`` one of "step", "epoch", "summary", "layers" (per-layer norms and trust ratios, written with
``--trust-ratio-interval``; train/diagnostics.py) and "checkpoint" (kept in the folder only, not read here).
The step, epoch and summary records reach wandb through train/tracking.py with
keys prefixed "step/", "epoch/", "summary/" and step = samples seen; ``records_from_history`` turns wandb history
rows back into the records, so both sources give the same ``RunRecord``.

The method of a run (a line in Goyal et al.'s Figure 1, arXiv:1706.02677) is derived from its config: the
optimizer; for SGD whether the peak lr follows the linear scaling rule 0.1 x B / 256, the square-root rule
0.1 x sqrt(B / 256), or no scaling (0.1); and whether the schedule warms up (``warmup_num_steps`` > 0 with
``warmup_min_lr`` < ``warmup_max_lr``). Goyal's warmup starts at 0.1, so at batch 256 it has nothing to do; a run
whose schedule declares warmup steps from an lr equal to its target counts as warming up, the recipe it follows.

The gradient noise scale (McCandlish et al. 2018, arXiv:1812.06162), when the run logged it (``noise_scale`` in
step records, an exponential moving average, see train/noise_scale.py), gives the run's predicted critical batch:
the median of its logged values (``noise_scale_median``; the last value is kept too, the noise scale grows as the
loss falls).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.papers import PaperError, paper_error


class RunError(ValueError):
    """A path or wandb run that cannot be read as a run; the message names it and says what was expected."""


@dataclass
class RunRecord:
    name: str
    source: str  # the run folder, or wandb's entity/project/run_id
    config: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # "layers" records (--trust-ratio-interval)

    # --- what the config says ---------------------------------------------------------------------------------
    @property
    def derived(self) -> dict[str, Any]:
        return self.config.get("derived", {})

    @property
    def batch(self) -> int:
        return int(self.derived["global_batch"])

    @property
    def optimizer(self) -> str:
        return str(self.derived.get("optimizer") or self.config.get("optimizer", {}).get("type", "?"))

    @property
    def lr(self) -> float | None:
        lr = self.derived.get("lr")
        return None if lr is None else float(lr)

    @property
    def dataset(self) -> str:
        return str(self.derived.get("dataset", "?"))

    @property
    def seed(self) -> int | None:
        return self.config.get("args", {}).get("seed")

    @property
    def planned_epochs(self) -> int | None:
        return self.derived.get("epochs")

    @property
    def warmup(self) -> bool:
        sp = (self.config.get("scheduler") or {}).get("params", {})
        steps = sp.get("warmup_num_steps", self.derived.get("warmup_steps", 0)) or 0
        lo, hi = sp.get("warmup_min_lr"), sp.get("warmup_max_lr")
        if not steps:
            return False
        if lo is None or hi is None:
            return True
        # Flat at or below 0.1: Goyal's warmup starts at 0.1, so for k <= 1 it has nothing to climb (his 256 run).
        return float(lo) < float(hi) or (math.isclose(float(lo), float(hi)) and float(hi) <= 0.1 + 1e-12)

    @property
    def scaling(self) -> str:
        return lr_scaling(self.lr, self.batch)

    @property
    def method(self) -> str:
        recipe = str((self.config.get("training") or {}).get("recipe") or "")
        if recipe.startswith("study-") and recipe[len("study-"):] in STUDY_METHODS:
            return STUDY_METHODS[recipe[len("study-"):]]  # the study's configs say which method they are
        if isinstance(self.config.get("downpour"), dict):  # train/downpour.py: asynchronous, W replicas
            return f"Downpour SGD, {self.optimizer} at the shards"
        if (self.config.get("training") or {}).get("batch_increase"):
            return f"{self.optimizer.upper()}, batch increase (Smith et al.)"
        return method_label(self.optimizer, self.scaling, self.warmup)

    # --- what the records say ---------------------------------------------------------------------------------
    @property
    def epochs_done(self) -> float:
        return float(self.epochs[-1]["epoch"]) if self.epochs else 0.0

    @property
    def is_mlm(self) -> bool:
        """A masked-language-model run (train/bert.py): its held-out figure is the MLM loss, not top-1 error."""
        return self.dataset == "text"

    @property
    def error_key(self) -> str:
        """The epoch record's held-out figure, lower is better: val_loss (nats) for BERT, else val_top1_error (%)."""
        return "val_loss" if self.is_mlm else "val_top1_error"

    @property
    def final_top1(self) -> float | None:
        return _finite(self.epochs[-1].get(self.error_key)) if self.epochs else None

    @property
    def median5_top1(self) -> float | None:
        """Goyal et al.'s reported error: the median top-1 error of the last 5 epochs (fewer if the run is shorter)."""
        values = [v for e in self.epochs[-5:] if (v := _finite(e.get(self.error_key))) is not None]
        return statistics.median(values) if values else None

    @property
    def train_time(self) -> float:
        """Seconds spent in training epochs (the sum of epoch_time; evaluation and start-up are not counted)."""
        return float(sum(_finite(e.get("epoch_time")) or 0.0 for e in self.epochs))

    @property
    def noise_scale_values(self) -> list[float]:
        return [v for s in self.steps if (v := _finite(s.get("noise_scale"))) is not None]

    @property
    def noise_scale_median(self) -> float | None:
        values = self.noise_scale_values
        return statistics.median(values) if values else None

    @property
    def noise_scale_last(self) -> float | None:
        values = self.noise_scale_values
        return values[-1] if values else None

    def paper(self) -> PaperError | None:
        """The published number for this kind of run and batch, on ImageNet only."""
        if self.dataset != "imagenet":
            return None
        return paper_error(self.optimizer, self.scaling, self.warmup, self.batch)


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def lr_scaling(lr: float | None, batch: int, base_lr: float = 0.1, base_batch: int = 256) -> str:
    """Which rule gives ``lr`` at ``batch``: "linear" (Goyal), "sqrt", "none" (the base lr), else "other"."""
    if lr is None:
        return "other"
    k = batch / base_batch
    if math.isclose(lr, base_lr * k, rel_tol=1e-6):
        return "linear"
    if math.isclose(lr, base_lr * math.sqrt(k), rel_tol=1e-6):
        return "sqrt"
    if math.isclose(lr, base_lr, rel_tol=1e-6):
        return "none"
    return "other"


# The methods of the laptop study (ds_configs/generate.py, STUDY_METHODS), named as method_label would name them.
STUDY_METHODS = {
    "noscale": "SGD, no scaling, no warmup", "linear": "SGD, linear scaling, no warmup",
    "goyal": "SGD, linear scaling, gradual warmup", "lars": "LARS", "lamb": "LAMB",
    "smith": "SGD, batch increase (Smith et al.)",
}


def method_label(optimizer: str, scaling: str, warmup: bool) -> str:
    """E.g. "SGD, linear scaling, gradual warmup", "SGD, no scaling, no warmup", "LARS", "LAMB, no warmup"."""
    name = optimizer.upper() if optimizer.lower() in ("sgd", "lars", "larc", "lamb") else optimizer
    if optimizer.lower() == "sgd":
        rule = {"linear": "linear scaling", "sqrt": "sqrt scaling", "none": "no scaling"}.get(scaling, "own lr")
        return f"{name}, {rule}, {'gradual warmup' if warmup else 'no warmup'}"
    return name if warmup else f"{name}, no warmup"


# ---------------------------------------------------------------------------------------------------------------
# Run folders


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path is a run folder (has config.json) or a folder of run folders (e.g. runs/)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise RunError(f"{p} does not exist (expected a run folder written by train/imagenet.py, with "
                           f"config.json and metrics.jsonl, or a folder of such run folders)")
        if (p / "config.json").is_file():
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and (c / "config.json").is_file()) if p.is_dir() \
            else []
        if not children:
            raise RunError(f"{p} is not a run folder: no config.json in it, and no run folders below it (expected "
                           f"the --output-dir of train/imagenet.py, with config.json and metrics.jsonl)")
        found.extend(children)
    return found


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn last line (a run killed mid-write) is dropped with a warning."""
    if not path.is_file():
        raise RunError(f"{path.parent}: no metrics.jsonl (the run has not logged anything yet, or this folder is "
                       f"not a run folder)")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"warning: {path}:{i}: torn last line dropped ({e.msg})", file=sys.stderr)
                continue
            raise RunError(f"{path}:{i}: not valid JSON ({e.msg}); expected one JSON record per line") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise RunError(f"{path}:{i}: expected a JSON object with a \"kind\" (step, epoch or summary)")
        records.append(rec)
    if not records:
        raise RunError(f"{path} is empty: the run logged no records")
    return records


def load_run(path: str | Path) -> RunRecord:
    """Read one run folder written by train/imagenet.py."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise RunError(f"{path} is not a run folder: no config.json (expected the --output-dir of train/imagenet.py)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{cfg_path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    check_config(config, str(cfg_path))
    records = read_metrics(path / "metrics.jsonl")
    run = RunRecord(name=str(config.get("run_name") or path.name), source=str(path), config=config)
    _sort_records(run, records)
    return run


def check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("derived"), dict) \
            or "global_batch" not in config["derived"]:
        raise RunError(f"{where}: no derived.global_batch; expected the config.json of train/imagenet.py "
                       f"(run_name, args, derived, optimizer, scheduler, ...)")


def _sort_records(run: RunRecord, records: Iterable[dict[str, Any]]) -> None:
    for rec in records:
        kind = rec.get("kind")
        if kind == "step":
            run.steps.append(rec)
        elif kind == "epoch":
            run.epochs.append(rec)
        elif kind == "summary":
            run.summary = rec
        elif kind == "layers":
            run.layers.append(rec)


# ---------------------------------------------------------------------------------------------------------------
# wandb


def records_from_history(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """wandb history rows (as train/tracking.py logs them) back to metrics.jsonl records, in step order.

    One row may hold a step record and an epoch record logged at the same sample count; each prefix becomes its
    own record. Values wandb could not store (None, NaN) are simply absent.
    """
    kinds = ("step", "epoch", "summary")
    for row in sorted(rows, key=lambda r: (r.get("samples", r.get("_step", 0)) or 0)):
        for kind in kinds:
            rec = {k[len(kind) + 1:]: v for k, v in row.items() if k.startswith(kind + "/")}
            if rec:
                yield {"kind": kind, **rec, "samples": row.get("samples", row.get("_step"))}
        ratios = [{"name": k[len("trust_ratio/"):], "trust_ratio": v, "adapted": True} for k, v in row.items()
                  if k.startswith("trust_ratio/")]  # wandb holds the adapted layers' ratios only, not the norms
        if ratios and row.get("layers/step") is not None:
            yield {"kind": "layers", "step": row["layers/step"], "samples": row.get("samples"), "layers": ratios}


def parse_wandb_path(spec: str) -> tuple[str, str, str | None]:
    """"ENTITY/PROJECT" or "ENTITY/PROJECT/GROUP" -> (entity, project, group or None)."""
    parts = spec.strip("/").split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise RunError(f"--wandb {spec!r}: expected ENTITY/PROJECT or ENTITY/PROJECT/GROUP")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def wandb_online() -> tuple[bool, str]:
    """(True, "") when the wandb API can be used here, else (False, why)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return False, f"WANDB_MODE={mode}"
    from train.tracking import wandb_logged_in

    if not wandb_logged_in():
        return False, "not logged in to wandb (no WANDB_API_KEY and no netrc entry; run `wandb login`)"
    return True, ""


def load_wandb_runs(spec: str, *, api: Any = None, progress: bool = True) -> list[RunRecord]:
    """All runs of ENTITY/PROJECT (in GROUP if given) through the wandb public API."""
    entity, project, group = parse_wandb_path(spec)
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    from tqdm import tqdm

    found = api.runs(f"{entity}/{project}", filters={"group": group} if group else None)
    runs: list[RunRecord] = []
    total = len(found) if hasattr(found, "__len__") else None
    for r in tqdm(found, total=total, desc=f"wandb {spec}", unit="run", disable=not progress or (total or 0) < 4):
        config = dict(r.config)
        where = f"wandb run {entity}/{project}/{r.id} ({r.name})"
        try:
            check_config(config, where)
        except RunError as e:
            print(f"warning: skipped: {e}", file=sys.stderr)
            continue
        run = RunRecord(name=str(config.get("run_name") or r.name), source=f"{entity}/{project}/{r.id}", config=config)
        _sort_records(run, records_from_history(r.scan_history()))
        if not run.steps and not run.epochs:
            print(f"warning: skipped: {where} has no history (still starting?)", file=sys.stderr)
            continue
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Per-layer trust ratios ("layers" records)


def trust_ratio_matrix(run: RunRecord) -> tuple[list[str], list[int], Any]:
    """(layer names in model order, steps, ratios as a layers x steps float array; NaN where a layer has no ratio:
    not adapted, or absent from a record)."""
    import numpy as np

    names: list[str] = []
    for rec in run.layers:
        names += [e["name"] for e in rec["layers"] if e["name"] not in names]
    row = {n: i for i, n in enumerate(names)}
    matrix = np.full((len(names), len(run.layers)), np.nan)
    for j, rec in enumerate(run.layers):
        for e in rec["layers"]:
            if (v := _finite(e.get("trust_ratio"))) is not None:
                matrix[row[e["name"]], j] = v
    return names, [int(rec["step"]) for rec in run.layers], matrix


def adapted_layers(run: RunRecord) -> list[str]:
    """The layers of the first "layers" record that have a trust ratio (LARS/LAMB adapt them), in model order."""
    return [e["name"] for e in run.layers[0]["layers"] if e.get("adapted", e.get("trust_ratio") is not None)] \
        if run.layers else []


def default_layers(run: RunRecord) -> list[str]:
    """First, middle and last adapted layer: on a ResNet the first conv, a middle conv and the last fc."""
    names = adapted_layers(run)
    picks = [names[0], names[(len(names) - 1) // 2], names[-1]] if names else []
    return list(dict.fromkeys(picks))


def w_over_g(run: RunRecord) -> tuple[int | None, dict[str, float | None]]:
    """You et al. 2017's table (arXiv:1708.03888, for AlexNet-BN): ||w|| / ||g|| per layer at the first "layers" record
    (the start of training); (its step, {layer: ratio}); None where a norm is missing, inf where ||g|| is 0."""
    if not run.layers or not any("w_norm" in e for e in run.layers[0]["layers"]):
        return None, {}
    out: dict[str, float | None] = {}
    for e in run.layers[0]["layers"]:
        w, g = _finite(e.get("w_norm")), _finite(e.get("g_norm"))
        out[e["name"]] = None if w is None or g is None else (w / g if g > 0 else math.inf)
    return int(run.layers[0]["step"]), out
