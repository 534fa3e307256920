"""The fair Downpour study (analysis/study_downpour.py): the runs it plans, the held-out split it tunes on, the
best-of-grid choice, and equal updates. No training runs: the run folders are hand-made metrics.jsonl files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis import study_downpour as sd
from train.data import DataError, TensorData, hold_out


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_tuning_runs_use_the_held_out_split_one_optimizer_and_differ_only_in_the_barrier():
    runs = sd.tuning_plan()
    assert len(runs) == len(sd.LRS) * (1 + 2 * (len(sd.REPLICAS) - 1))  # W = 1 is one run: the barrier is a no-op
    for r in runs:
        cmd = r["cmd"]
        assert flag(cmd, "--holdout") == str(sd.HOLDOUT)  # tuned on training images, never the test set
        assert flag(cmd, "--shard-optimizer") == "sgd" and float(flag(cmd, "--lr")) == r["lr"]
        assert flag(cmd, "--seed") == str(sd.TUNE_SEED) and flag(cmd, "--epochs") == str(sd.EPOCHS)
        assert ("--barrier" in cmd) == (r["side"] == "sync")
        assert "--replica-delay" not in cmd
        assert flag(cmd, "--deepspeed_config").endswith(f"fmnist-w{r['W']}-s2.json")
    # the two sides of one (W, lr) have the same command but for --barrier
    by = {(r["side"], r["W"], r["lr"]): r["cmd"] for r in runs}
    for (side, w, lr), cmd in by.items():
        if side == "sync":
            assert [a for a in cmd if a != "--barrier"] == by["async", w, lr]


def summary(path, **fields):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"kind": "summary", "dead_replicas": [], **fields}) + "\n")


def test_the_best_lr_of_a_finished_grid_is_tuned_and_the_compared_runs_use_it_on_the_test_set(tmp_path):
    errors = {0.03: 20.0, 0.1: 15.0, 0.3: 15.0}  # a tie goes to the smaller lr
    for lr, e in errors.items():
        summary(tmp_path / f"tune-async-w4-lr{lr}", final_val_top1_error=e)
        if lr != 0.3:
            summary(tmp_path / f"tune-sync-w4-lr{lr}", final_val_top1_error=e - 5 * (lr == 0.03))
    (tmp_path / "tune-sync-w4-lr0.3").mkdir()
    assert sd.tuned_lrs(tmp_path) == {("async", 4): 0.1}  # the sync grid lacks lr 0.3: not tuned yet
    assert [r["side"] for r in sd.compared_plan(sd.tuned_lrs(tmp_path)) if r["phase"] == "straggler"] == [
        "async"] * len(sd.SEEDS)
    (tmp_path / "tune-sync-w4-lr0.3" / "failed.txt").write_text("exit code 6\n")  # a diverged lr loses
    # the sync grid's best (0.03, 15%) lies at its edge: one more step, 0.01, is planned before it counts as tuned
    assert "tune-sync-w4-lr0.01" in [r["name"] for r in sd.tuning_plan(tmp_path)]
    assert "tune-async-w4-lr0.01" not in [r["name"] for r in sd.tuning_plan(tmp_path)]
    assert ("sync", 4) not in sd.tuned_lrs(tmp_path)
    summary(tmp_path / "tune-sync-w4-lr0.01", final_val_top1_error=16.0)
    lrs = sd.tuned_lrs(tmp_path)
    assert lrs == {("async", 4): 0.1, ("sync", 4): 0.03}
    assert list(sd.grid_scores(tmp_path, "sync", 4)) == [0.01, 0.03, 0.1, 0.3]
    runs = sd.compared_plan(lrs)
    finals = [r for r in runs if r["phase"] == "final"]
    assert sorted((r["side"], r["seed"]) for r in finals) == sorted((s, k) for s in sd.SIDES for k in sd.SEEDS)
    for r in runs:
        assert "--holdout" not in r["cmd"] and float(flag(r["cmd"], "--lr")) == lrs[r["side"], 4]
    stragglers = [r for r in runs if r["phase"] == "straggler"]
    assert len(stragglers) == 2 * len(sd.SEEDS)
    assert all(flag(r["cmd"], "--replica-delay") == f"0={sd.STRAGGLER_DELAY}" for r in stragglers)


def test_staleness_runs_delay_every_replica():
    for r in sd.staleness_plan():
        cmd = r["cmd"]
        i = cmd.index("--replica-delay")
        assert cmd[i + 1:i + 1 + r["W"]] == [f"{j}={sd.STALENESS_DELAY}" for j in range(r["W"])]
        assert "--barrier" not in cmd and flag(cmd, "--holdout") == str(sd.HOLDOUT)


def test_equal_updates_reads_the_async_run_at_one_wth_of_the_sync_runs_samples():
    w = 4
    sync = {"samples": [30000.0, 60000.0], "error": [20.0, 15.0], "wall": [1.0, 2.0]}
    asyn = {"samples": [7000.0, 8000.0, 60000.0], "error": [30.0, 20.0, 14.0], "wall": [1.0, 2.0, 3.0]}
    # the sync run made 60,000 / 128 = 468.75 updates; as many async updates are 15,000 samples
    assert sd.updates(60000, "sync", w) == pytest.approx(468.75)
    assert sd.at_equal_updates(asyn, sync, w) == pytest.approx(20.0 + (14.0 - 20.0) * 7000 / 52000)
    assert sd.interpolate([1.0, 2.0], [5.0, 7.0], 3.0) is None  # no extrapolation
    assert math.isclose(sd.interpolate([1.0, 2.0], [5.0, 7.0], 1.5), 6.0)


def test_hold_out_carves_the_last_training_samples_as_the_validation_set():
    x, y = torch.arange(10, dtype=torch.uint8)[:, None, None].expand(10, 2, 2), torch.arange(10)
    data = TensorData("synthetic", (x, y), (x[:2], y[:2]), 0.5, 0.25, 1, False, 0)
    held = hold_out(data, 3)
    assert held.train[1].tolist() == list(range(7)) and held.val[1].tolist() == [7, 8, 9]
    assert (held.info.num_train, held.info.num_val) == (7, 3)
    for n in (0, 10):
        with pytest.raises(DataError, match="held-out split"):
            hold_out(data, n)


def test_downpour_holdout_trains_on_the_rest_and_validates_on_the_held_out_images(fashion_mnist_dir, monkeypatch):
    from conftest import REPO

    from train import downpour
    from train.data import load_fashion_mnist
    from train.ps import setup as ps_setup

    monkeypatch.setattr(ps_setup, "_DATA", None)  # read once per process: not the data another test read
    args = downpour.get_args_parser().parse_args([
        "--deepspeed_config", str(REPO / "ds_configs" / "downpour" / "fmnist-w2-s2.json"), "--data-dir",
        str(fashion_mnist_dir), "--holdout", str(sd.HOLDOUT)])
    setup = downpour.load_setup(args)
    assert (setup.num_train, setup.num_val) == (50_000, 10_000)
    assert ps_setup.derived(setup)["val_split"] == "the last 10000 training samples (held out)"
    images, _ = load_fashion_mnist(fashion_mnist_dir, "train")
    assert torch.equal(ps_setup._DATA.val[0], images[50_000:]) and torch.equal(ps_setup._DATA.train[0],
                                                                                images[:50_000])
