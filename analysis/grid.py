"""What every laptop study shares: which run finished, the lr grid's tags, the best point of a grid, run names, the
mean and std over seeds.

The ResNet study (analysis/study.py, analysis/study_resnet_figures.py), the BERT study (analysis/study_bert.py) and
the Downpour study (analysis/study_downpour.py) read their run folders through these, so "finished", "the best of
a grid" and "at the grid's edge" mean one thing in all three.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar

# The tuned ResNet study's lr grid (ds_configs/generate.py TUNED_GRID: the scaling rule's lr x 1/3, 1, 3) and the
# one step past either edge (TUNED_EXTENSION: x 1/9, x 9) that runs only where a grid's best lies at that edge.
GRID_TAGS = ("x1_3", "x1", "x3")
EDGE_STEP = {"x1_3": "x1_9", "x3": "x9"}
ALL_TAGS = ("x1_9", *GRID_TAGS, "x9")  # in lr order
TAG_FACTORS = {"x1_9": "1/9", "x1_3": "1/3", "x1": "1", "x3": "3", "x9": "9"}

K = TypeVar("K", bound=Hashable)


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The summary record of a finished run (the last ``"kind": "summary"`` line of its metrics.jsonl), else None.

    A line torn by a killed run is skipped, as is a line that is not a JSON object."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    for line in reversed(metrics.read_text().splitlines()):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("kind") == "summary":
            return rec
    return None


def best_of_grid(scores: dict[K, float | None], order: Iterable[K]) -> K | None:
    """The key of the lowest finite score; ties go to the key that comes first in ``order`` (the smaller lr).

    None and non-finite scores (an unfinished or a diverged run) never win; None if nothing finished."""
    rank = {k: i for i, k in enumerate(order)}
    done = [(s, rank[k], k) for k, s in scores.items() if s is not None and math.isfinite(s)]
    return min(done, key=lambda t: (t[0], t[1]))[2] if done else None


def best_tag(errors: dict[str, float | None]) -> str | None:
    """The ResNet study's tag of the lowest error (ties: the smaller lr); None when no grid point has an error."""
    return best_of_grid(errors, ALL_TAGS)


def at_edge(best: K | None, ran: Iterable[K], order: Iterable[K]) -> bool:
    """Whether ``best`` is the smallest or the largest lr of the points that ran (the optimum may lie outside)."""
    rank = {k: i for i, k in enumerate(order)}
    points = sorted(ran, key=rank.__getitem__)
    return best is not None and len(points) > 1 and best in (points[0], points[-1])


def parse_config_name(stem: str) -> tuple[str, int, str]:
    """A ResNet study config's name: "goyal-1024-x1_3" -> ("goyal", 1024, "x1_3")."""
    parts = stem.split("-")
    if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in ALL_TAGS:
        raise ValueError(f"ds_configs/study/{stem}.json: expected METHOD-BATCH-TAG with TAG one of "
                         f"{', '.join(ALL_TAGS)}; run python ds_configs/generate.py")
    return parts[0], int(parts[1]), parts[2]


def parse_run_name(name: str) -> tuple[str, int, str, int]:
    """A ResNet study run's name: "lars-8192-x1_3-seed2" -> ("lars", 8192, "x1_3", 2)."""
    parts = name.split("-")
    if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in ALL_TAGS or not parts[3].startswith("seed") \
            or not parts[3][len("seed"):].isdigit():
        raise ValueError(f"run {name!r}: expected METHOD-BATCH-TAG-seedS as analysis/study.py names its runs, "
                         f"with TAG one of {', '.join(ALL_TAGS)}")
    return parts[0], int(parts[1]), parts[2], int(parts[3][len("seed"):])


def mean_std(values: list[float], single_std: float = math.nan) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of ``values``; the std of one value is ``single_std``; (nan, nan)
    for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else single_std
