"""The tuned study (analysis/study.py, analysis/study_resnet_figures.py, ds_configs/study/): the grid, the best-of-grid
choice, steps to target, the fitted critical batch, and Smith et al.'s momentum scaling. No training runs: the
run folders here are hand-made metrics.jsonl files, and every expected number is worked out in the test.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
from conftest import REPO

import analysis
from analysis import grid, study, study_resnet_figures
from train.config import TRAINING_DEFAULTS, ConfigError, resolve, scaled_momentum

FACTORS = {"x1_3": 1 / 3, "x1": 1.0, "x3": 3.0}
EXTENSION = {"x1_9": 1 / 9, "x9": 9.0}


def rule(method: str, batch: int) -> float:
    """The scaling rules, written out again: Goyal 0.1 B/256; LARS MLCommons' 10 at 8k, square root; LAMB 0.1 at
    8k (LARS's / 100), square root; momentum scaling keeps lr 0.1."""
    return {"goyal": 0.1 * batch / 256, "smith": 0.1 * batch / 256, "lars": 10 * (batch / 8192) ** 0.5,
            "lamb": 0.1 * (batch / 8192) ** 0.5, "momentum": 0.1}[method]


def test_grid_lrs_are_the_rule_times_the_grid_factors_and_every_run_has_the_same_budget():
    runs = study.grid_runs()
    groups: dict[tuple[str, int], dict[str, float]] = {}
    for r in runs:
        cfg = json.loads(r["config"].read_text())
        assert cfg["train_batch_size"] == r["batch"]
        assert cfg["training"]["epochs"] == 3
        lr = cfg["optimizer"]["params"]["lr"]
        assert lr == pytest.approx(rule(r["method"], r["batch"]) * FACTORS[r["tag"]], rel=1e-12), r["name"]
        assert cfg["scheduler"]["params"]["warmup_max_lr"] == pytest.approx(lr, rel=1e-12)
        groups.setdefault((r["method"], r["batch"]), {})[r["tag"]] = lr
    assert all(set(tags) == set(FACTORS) for tags in groups.values())
    for r in study.grid_runs(tags=tuple(EXTENSION)):  # the steps past an edge exist for every grid
        lr = json.loads(r["config"].read_text())["optimizer"]["params"]["lr"]
        assert lr == pytest.approx(rule(r["method"], r["batch"]) * EXTENSION[r["tag"]], rel=1e-12), r["name"]
    for method in ("goyal", "lars", "lamb"):
        assert {b for m, b in groups if m == method} == {256, 1024, 2048, 4096, 8192}
    # Smith's batch x5 at epoch 2 must leave >= 4 steps an epoch of 60,000: 5 B <= 15,000.
    assert {b for m, b in groups if m == "smith"} == {256, 1024, 2048}
    assert [r["phase"] for r in runs] == sorted(r["phase"] for r in runs)
    assert {r["phase"] for r in runs if r["method"] == "momentum"} == {3}


def write_run(folder, error: float | None, losses: list[tuple[int, float, float]] = ()) -> None:
    folder.mkdir(parents=True)
    lines = [{"kind": "step", "step": s, "epoch": e, "loss": v} for s, e, v in losses]
    if error is not None:
        lines.append({"kind": "summary", "final_val_top1_error": error})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_best_of_grid_and_the_seed_phase(tmp_path):
    assert grid.best_tag({"x1_3": 12.0, "x1": 10.5, "x3": None}) == "x1"
    assert grid.best_tag({"x1_3": 10.0, "x1": 10.0, "x3": 11.0}) == "x1_3"  # a tie goes to the smaller lr
    assert grid.best_tag({"x1": None}) is None
    ran = ["x1_3", "x1", "x3"]
    assert grid.at_edge("x3", ran, grid.ALL_TAGS) and not grid.at_edge("x1", ran, grid.ALL_TAGS)
    assert grid.best_tag({"x1_3": float("nan"), "x1": 12.0}) == "x1"  # a diverged point never wins
    runs = study.grid_runs(["lars"], [8192])
    for r, err in zip(runs, (30.0, 20.0, 25.0), strict=True):  # x1_3, x1, x3
        write_run(tmp_path / r["name"], err)
    seeds = study.seed_runs(runs, tmp_path)
    assert [s["name"] for s in seeds] == ["lars-8192-x1-seed1", "lars-8192-x1-seed2"]
    assert study.edge_runs(runs, tmp_path) == []  # the best is inside the grid
    # Best at the largest lr: the next lr out (x9) runs first, then the seeds go to the best of all four.
    runs = study.grid_runs(["goyal"], [256])
    for r, err in zip(runs, (30.0, 20.0, 15.0), strict=True):
        write_run(tmp_path / r["name"], err)
    ext = study.edge_runs(runs, tmp_path)
    assert [(e["name"], e["phase"]) for e in ext] == [("goyal-256-x9-seed0", 1.5)]
    assert study.seed_runs(runs, tmp_path) == []  # waits for the extension
    assert study.seed_runs(runs + ext, tmp_path) == []  # planned, not finished
    write_run(tmp_path / "goyal-256-x9-seed0", 12.0)
    assert [s["name"] for s in study.seed_runs(runs + ext, tmp_path)] == ["goyal-256-x9-seed1", "goyal-256-x9-seed2"]
    assert [r["name"] for r in study.plan(tmp_path, ["goyal"], [256]) if r["phase"] != 1] == \
        ["goyal-256-x9-seed0", "goyal-256-x9-seed1", "goyal-256-x9-seed2"]
    assert study.seed_runs(study.grid_runs(["lars"], [1024]), tmp_path) == []  # not a seed batch
    # An unfinished grid plans no seeds yet.
    runs = study.grid_runs(["lamb"], [256])
    write_run(tmp_path / runs[0]["name"], 20.0)
    assert study.seed_runs(runs, tmp_path) == []


def test_steps_to_target_target_and_maximal_useful_batch():
    points = [(10, 2.0), (20, 1.0), (30, 0.6), (40, 0.7), (50, 0.4)]
    assert study_resnet_figures.steps_to_target(points, 0.65) == 30  # the first record at or below the target
    assert study_resnet_figures.steps_to_target(points, 0.3) is None
    assert study_resnet_figures.choose_target({"goyal": 0.301, "lars": 0.2543}) == 0.31
    steps = {256: 800, 1024: 220, 2048: 130, 4096: 110, 8192: 105}
    # Within 1/0.8 of the fewest (105 -> 131.25): 2048's 130 is the first.
    assert study_resnet_figures.maximal_useful_batch(steps) == 2048


def test_fitted_critical_batch_recovers_mccandlish_curve():
    s_min, b_crit = 100.0, 1500.0
    steps = {b: s_min * (1 + b_crit / b) for b in (256, 1024, 2048, 4096, 8192)}
    fit = study_resnet_figures.fit_critical_batch(steps)
    assert fit is not None
    assert fit[1] == pytest.approx(b_crit, rel=0.03) and fit[0] == pytest.approx(s_min, rel=0.03)
    assert study_resnet_figures.fit_critical_batch({256: 10, 512: 5}) is None


def test_momentum_scaling_formula_and_config():
    # Smith et al. 2018: B / (1 - m) constant. From m = 0.9 at 256: 1 - 0.1 / 4 at 1024, 1 - 0.1 / 32 at 8192.
    assert scaled_momentum(1024, 256, 0.9) == pytest.approx(0.975)
    assert scaled_momentum(8192, 256, 0.9) == pytest.approx(0.996875)
    assert scaled_momentum(256, 256, 0.9) == pytest.approx(0.9)
    assert "momentum_scaling" in TRAINING_DEFAULTS
    cfg = {"train_batch_size": 8192, "train_micro_batch_size_per_gpu": 64,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
           "training": {"epochs": 1, "momentum_scaling": {"base_batch": 256, "base_momentum": 0.9}}}
    r = resolve(cfg, world_size=1, num_train=60000)
    assert r.optimizer["params"]["momentum"] == pytest.approx(1 - 0.1 * 256 / 8192)
    assert any("momentum scaling" in n for n in r.notes)
    lamb = dict(cfg, optimizer={"type": "LAMB", "params": {"lr": 0.01, "betas": [0.9, 0.999]}})
    assert resolve(lamb, world_size=1, num_train=60000).optimizer["params"]["betas"] == \
        pytest.approx([0.996875, 0.999])
    small = dict(cfg, train_batch_size=16, train_micro_batch_size_per_gpu=16)
    with pytest.raises(ConfigError, match="momentum .* at global batch 16"):
        resolve(small, world_size=1, num_train=60000)
    cfg_m = json.loads((REPO / "ds_configs" / "study" / "momentum-1024-x1.json").read_text())
    assert math.isclose(resolve(cfg_m, world_size=1, num_train=60000).optimizer["params"]["momentum"], 0.975)


def test_workload_bert_hands_the_other_arguments_to_study_bert(monkeypatch):
    seen = []
    fake = types.ModuleType("analysis.study_bert")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "analysis.study_bert", fake)
    monkeypatch.setattr(analysis, "study_bert", fake, raising=False)
    assert study.main(["--workload", "bert", "--jobs", "1", "--some-bert-flag", "3"]) == 0
    assert seen == [["--jobs", "1", "--some-bert-flag", "3"]]
