"""analysis/study_bert.py: the plan (You et al. 2019's square-root rule, arXiv:1904.00962, times a grid), the
best-of-grid choice (Nado et al. 2021, arXiv:2102.06356) on hand-made run folders, and resuming (a finished run is
never run again). No training is launched here: train/bert.py itself is tested in tests/test_bert.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from analysis import study_bert as sb


def test_plan_scales_lr_by_the_square_root_of_the_batch_times_the_grid():
    runs = sb.plan()
    # Computed here from the rule, not from the module: lr = base x sqrt(B / 64) x factor.
    base = {"adamw": 1.5e-3, "lamb": 1.5e-2}
    expected = {(o, b, f): base[o] * (b / 64) ** 0.5 * f
                for o in ("adamw", "lamb") for b in (64, 256, 1024, 4096, 8192) for f in (0.5, 1.0, 2.0)}
    assert {(r["optimizer"], r["batch"], r["factor"]): r["lr"] for r in runs} == pytest.approx(expected, rel=1e-12)
    assert len(runs) == len(expected) == len({r["name"] for r in runs})
    # by hand: LAMB at 8192 is 128 x the base batch, so sqrt gives 11.31 x 1.5e-2; AdamW at 256 twice 1.5e-3
    lamb = {(r["batch"], r["factor"]): r["lr"] for r in runs if r["optimizer"] == "lamb"}
    assert lamb[(8192, 1.0)] == pytest.approx(0.1697056275, rel=1e-9)
    assert [r["lr"] for r in runs if r["name"] == "adamw-256-x1"] == [pytest.approx(3e-3)]
    # a part of the study: only what was asked; an unknown batch is refused with the known ones
    assert {r["name"] for r in sb.plan(["lamb"], [64], [2.0])} == {"lamb-64-x2"}
    with pytest.raises(sb.StudyError, match=r"unknown batch\(s\) \[100\].*64, 256"):
        sb.plan(batches=[100])


def test_config_same_epochs_for_every_batch_and_warmup_a_tenth_of_the_steps_from_a_nonzero_lr():
    num_train = 8211  # sequences: 1 step per epoch at 8192 (the remainder dropped), 128 at 64
    for batch, steps_per_epoch, micro in ((64, 128, 64), (1024, 8, 256), (8192, 1, 256)):
        run = next(r for r in sb.plan(["adamw"], [batch], [1.0]))
        cfg = sb.ds_config(run, num_train)
        total = 4 * steps_per_epoch
        assert cfg["training"]["epochs"] == 4
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]) == (batch, micro)
        sched = cfg["scheduler"]["params"]
        assert sched["warmup_max_lr"] == cfg["optimizer"]["params"]["lr"] == run["lr"]
        w = {64: 51, 1024: 3, 8192: 2}[batch]  # a tenth of 512, of 32, then DeepSpeed's least, 2
        assert sched["warmup_num_steps"] == w and sched["total_num_steps"] == "auto"
        assert sched["warmup_min_lr"] == pytest.approx(run["lr"] / (w + 1))
        # DeepSpeed's own schedule with these numbers, stepped as the engine does: no step at lr 0; up to the
        # peak, reached at step W + 2, then down (the first two steps share the start, DeepSpeed's way)
        lrs = deepspeed_lrs(sched, total)
        assert min(lrs) > 0 and lrs[0] == lrs[1] == pytest.approx(run["lr"] / (w + 1))
        top = lrs.index(max(lrs))
        assert top == w + 1 and max(lrs) == pytest.approx(run["lr"])
        assert lrs[:top + 1] == sorted(lrs[:top + 1]) and lrs[top:] == sorted(lrs[top:], reverse=True)
        if batch == 8192:  # the 4 steps, by hand: 1/3, 1/3, 2/3, 1 x the peak
            assert lrs == pytest.approx([run["lr"] * f for f in (1 / 3, 1 / 3, 2 / 3, 1)], rel=1e-9)
        assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True
    lamb = sb.ds_config(sb.plan(["lamb"], [64], [1.0])[0], num_train)
    assert lamb["optimizer"]["type"] == "LAMB" and "torch_adam" not in lamb["optimizer"]["params"]


def deepspeed_lrs(params: dict, total: int) -> list[float]:
    """The lr of each optimizer step under DeepSpeed's WarmupDecayLR (the engine reads it before stepping)."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR
    from test_schedules import lrs_seen

    return lrs_seen(WarmupDecayLR, total, **{**params, "total_num_steps": total})


def test_corpus_part_stops_at_the_wanted_sequences_and_skips_a_document_that_overshoots():
    # 31 tokens fill one packed row of 32 ([CLS] + 31): 62 tokens are 2 rows; 3100 would jump past 4 + 1 rows.
    # All five: 3253 tokens, ceil(3253 / 31) = 105 rows
    docs = [("a", 62), ("big", 3100), ("b", 31), ("c", 40), ("d", 20)]
    import zlib
    order = [n for n, _ in sorted(docs, key=lambda d: zlib.crc32(d[0].encode()))]
    chosen = sb.choose(docs, at_least=4, slack=1)
    assert "big" not in chosen and chosen == [n for n in order if n != "big"][:len(chosen)]
    total = sum(n for name, n in docs if name in chosen)
    assert 4 <= math.ceil(total / 31) <= 5
    with pytest.raises(sb.StudyError, match="too little text: 105 packed sequences of 32 tokens, the study needs 1000"):
        sb.choose(docs, at_least=1000, slack=None)


def fake_run(runs_dir: Path, name: str, losses: list[float], *, summary: bool = True, torn: bool = False) -> None:
    """A run folder as train/bert.py leaves it: epoch records (held-out loss), then a summary record."""
    d = runs_dir / name
    d.mkdir(parents=True)
    lines = [json.dumps({"kind": "step", "step": 1, "loss": 8.0})]
    for i, v in enumerate(losses, 1):
        lines.append(json.dumps({"kind": "epoch", "epoch": i, "step": 2 * i, "tokens": 1000 * i, "val_loss": v,
                                 "val_mlm_accuracy": 20.0, "epoch_time": 1.5, "tokens_per_sec": 9000.0}))
    if summary:
        lines.append(json.dumps({"kind": "summary", "final_val_loss": losses[-1]}))
    text = "\n".join(lines) + "\n"
    (d / "metrics.jsonl").write_text(text + ('{"kind": "summ' if torn else ""))


@pytest.fixture
def grid_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    # LAMB at 64: the middle factor wins; at 8192: the largest factor wins (an edge), the smallest diverged (nan)
    fake_run(runs_dir, "lamb-64-x0.5", [6.0, 5.5])
    fake_run(runs_dir, "lamb-64-x1", [5.9, 5.1])
    fake_run(runs_dir, "lamb-64-x2", [5.8, 5.3])
    fake_run(runs_dir, "lamb-8192-x0.5", [7.0, float("nan")])
    fake_run(runs_dir, "lamb-8192-x1", [7.5, 7.2])
    fake_run(runs_dir, "lamb-8192-x2", [7.4, 6.9])
    fake_run(runs_dir, "adamw-64-x1", [5.0, 4.9], summary=False)  # killed before its summary: not a result
    return runs_dir


def test_best_of_grid_lowest_final_loss_flags_the_edge_and_never_a_diverged_run(grid_runs):
    runs = sb.plan(batches=[64, 8192])
    rows = sb.results(runs, grid_runs)
    assert sorted(r["name"] for r in rows) == ["lamb-64-x0.5", "lamb-64-x1", "lamb-64-x2", "lamb-8192-x0.5",
                                               "lamb-8192-x1", "lamb-8192-x2"]
    best = sb.best_points(rows)
    assert set(best) == {("lamb", 64), ("lamb", 8192)}
    assert (best[("lamb", 64)]["name"], best[("lamb", 64)]["final_val_loss"], best[("lamb", 64)]["at_edge"]) == \
        ("lamb-64-x1", 5.1, False)
    assert (best[("lamb", 8192)]["name"], best[("lamb", 8192)]["final_val_loss"], best[("lamb", 8192)]["at_edge"]) \
        == ("lamb-8192-x2", 6.9, True)
    assert best[("lamb", 64)]["tokens"] == [1000, 2000]


def test_outputs_table_marks_the_best_and_the_edge(grid_runs, tmp_path):
    out = tmp_path / "out"
    summary = sb.write_outputs(sb.plan(batches=[64, 8192]), grid_runs, out, {"val_unigram_entropy": 5.5})
    table = (out / "table.md").read_text().splitlines()
    row = {line.split("|")[1].strip() + line.split("|")[2].strip() + line.split("|")[4].strip(): line
           for line in table[2:]}
    assert "**best**" in row["LAMB64x1"] and "edge" not in row["LAMB64x1"]
    assert "**best** (at the grid's edge)" in row["LAMB8192x2"]
    assert "5.900 / 5.100" in row["LAMB64x1"] and "nan" in row["LAMB8192x0.5"] and "best" not in row["LAMB8192x0.5"]
    assert summary["runs_finished"] == 6 and summary["runs_planned"] == 12
    assert summary["best"]["lamb-8192"]["final_val_loss"] == 6.9 and summary["best"]["lamb-8192"]["at_edge"]
    assert (out / "fig1_loss_vs_batch.png").stat().st_size > 10_000
    assert (out / "fig2_loss_vs_tokens.png").stat().st_size > 10_000


def test_finished_runs_are_skipped_and_unfinished_ones_run_again(grid_runs, monkeypatch, capsys):
    fake_run(grid_runs, "lamb-256-x1", [6.0], summary=False, torn=True)  # killed while writing its summary
    started = []
    monkeypatch.setattr(sb, "run_one", lambda run, runs_dir, info: started.append(run["name"]) or {
        "seconds": 0.0, "cpu_seconds": 0.0})
    before = (grid_runs / "lamb-64-x1" / "metrics.jsonl").read_text()
    failures = sb.run_all(sb.plan(["lamb"], [64, 256, 8192]), grid_runs, {}, jobs=2)
    assert failures == 0
    assert sorted(started) == ["lamb-256-x0.5", "lamb-256-x1", "lamb-256-x2"]  # all of 64 and 8192 had finished
    assert "9 runs, 6 finished before, 3 to run" in capsys.readouterr().out
    assert (grid_runs / "lamb-64-x1" / "metrics.jsonl").read_text() == before
    # the unfinished run's folder exists, so its command starts it again from scratch (--overwrite)
    cmd = sb.command(sb.plan(["lamb"], [256], [1.0])[0], grid_runs, {"corpus_dir": "c", "tokenizer": "t"})
    assert cmd[-1] == "--overwrite"
    assert "--overwrite" not in sb.command(sb.plan(["lamb"], [4096], [1.0])[0], grid_runs,
                                           {"corpus_dir": "c", "tokenizer": "t"})


def test_a_finished_run_made_with_another_lr_is_refused(grid_runs):
    (grid_runs / "lamb-64-x1" / "config.json").write_text(json.dumps(
        {"optimizer": {"type": "LAMB", "params": {"lr": 0.02}}, "derived": {"global_batch": 64}}))
    with pytest.raises(sb.StudyError, match=r"made with peak lr 0.02 at batch 64 for 4 epochs, the plan says "
                                            r"lr 0.015 at batch 64 for 4"):
        sb.run_all(sb.plan(["lamb"], [64]), grid_runs, {}, jobs=1)
    (grid_runs / "lamb-64-x1" / "config.json").write_text(json.dumps(
        {"optimizer": {"type": "LAMB", "params": {"lr": 0.015}}, "derived": {"global_batch": 64},
         "training": {"epochs": 4}}))
    assert [r["name"] for r in sb.results(sb.plan(["lamb"], [64]), grid_runs)] == [
        "lamb-64-x0.5", "lamb-64-x1", "lamb-64-x2"]
    with pytest.raises(sb.StudyError, match=r"for 4 epochs, the plan says lr 0.015 at batch 64 for 16"):
        sb.results(sb.plan(["lamb"], [64], epochs=16), grid_runs)  # a 16-epoch side check needs its own folder


def test_a_best_at_the_edge_extends_the_grid_beyond_it_and_no_further_than_two_doublings(grid_runs):
    fake_run(grid_runs, "adamw-1024-x0.5", [5.0, 4.8])  # the smallest factor wins: try x0.25 next
    fake_run(grid_runs, "adamw-1024-x1", [5.0, 4.9])
    fake_run(grid_runs, "adamw-1024-x2", [5.1, 5.0])
    rows = sb.results(sb.plan(batches=[64, 1024, 8192]), grid_runs)
    more = {r["name"]: r["lr"] for r in sb.extend(rows)}
    # LAMB at 64 is inside its grid: nothing; at 8192 x2 won: x4; AdamW at 1024 x0.5 won: x0.25
    assert more == pytest.approx({"lamb-8192-x4": 1.5e-2 * 128 ** 0.5 * 4, "adamw-1024-x0.25": 1.5e-3 * 4 * 0.25})
    fake_run(grid_runs, "lamb-8192-x4", [7.0, 6.5])  # x4 wins too: x8, the last doubling allowed
    fake_run(grid_runs, "lamb-8192-x8", [7.0, 6.4])  # and x8 wins: no x16
    runs = sb.with_extensions(sb.plan(["lamb"], [8192]), grid_runs)
    assert [r["name"] for r in runs] == ["lamb-8192-x0.5", "lamb-8192-x1", "lamb-8192-x2", "lamb-8192-x4",
                                         "lamb-8192-x8"]
    best = sb.best_points(sb.results(runs, grid_runs))[("lamb", 8192)]
    assert (best["name"], best["at_edge"]) == ("lamb-8192-x8", True)
    assert sb.extend(sb.results(runs, grid_runs)) == []
