"""analysis/study_bert.py: the plan (You et al. 2019's square-root rule, arXiv:1904.00962, times a grid), the
configs (both optimizers clipped at global norm 1.0, as Devlin et al.'s AdamW and NVIDIA's LAMB), the best-of-grid
choice (Nado et al. 2021, arXiv:2102.06356) on hand-made run folders, the seeds at each best, and resuming (a
finished run is never run again). No training is launched here: train/bert.py itself is tested in
tests/test_bert.py.
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
                for o in ("adamw", "lamb") for b in (64, 128, 256) for f in (0.5, 1.0, 2.0)}
    assert {(r["optimizer"], r["batch"], r["factor"]): r["lr"] for r in runs} == pytest.approx(expected, rel=1e-12)
    assert len(runs) == len(expected) == len({r["name"] for r in runs})
    assert {r["seed"] for r in runs} == {0}  # the grid is tuned at one seed; the others follow at the best
    # by hand: LAMB at 256 is 4 x the base batch, so twice 1.5e-2; AdamW at 128 is sqrt(2) x 1.5e-3
    lamb = {(r["batch"], r["factor"]): r["lr"] for r in runs if r["optimizer"] == "lamb"}
    assert lamb[(256, 1.0)] == pytest.approx(0.03, rel=1e-12)
    assert [r["lr"] for r in runs if r["name"] == "adamw-128-x1-seed0"] == [pytest.approx(2.1213203436e-3)]
    # a part of the study: only what was asked; an unknown batch is refused with the known ones
    assert {r["name"] for r in sb.plan(["lamb"], [64], [2.0])} == {"lamb-64-x2-seed0"}
    with pytest.raises(sb.StudyError, match=r"unknown batch\(s\) \[100\].*64, 128, 256"):
        sb.plan(batches=[100])


def test_config_same_epochs_for_every_batch_clipping_for_both_and_warmup_a_tenth_of_the_steps():
    num_train = 19457  # sequences: 304 steps per epoch at 64, 76 at 256 (the one left over dropped)
    for batch, steps_per_epoch in ((64, 304), (128, 152), (256, 76)):
        run = next(r for r in sb.plan(["adamw"], [batch], [1.0]))
        cfg = sb.ds_config(run, num_train)
        total = 3 * steps_per_epoch
        assert cfg["training"]["epochs"] == 3 and cfg["training"]["exclude_norm_and_bias"] is True
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"]) == (batch, batch)
        assert cfg["gradient_clipping"] == 1.0  # Devlin et al.'s clip_by_global_norm(grads, 1.0)
        sched = cfg["scheduler"]["params"]
        assert sched["warmup_max_lr"] == cfg["optimizer"]["params"]["lr"] == run["lr"]
        w = {64: 91, 128: 46, 256: 23}[batch]  # a tenth of 912, 456 and 228 steps, rounded
        assert sched["warmup_num_steps"] == w and sched["total_num_steps"] == "auto"
        assert sched["warmup_min_lr"] == pytest.approx(run["lr"] / (w + 1))
        # DeepSpeed's own schedule with these numbers, stepped as the engine does: no step at lr 0; up to the
        # peak, reached at step W + 2, then down (the first two steps share the start, DeepSpeed's way)
        lrs = deepspeed_lrs(sched, total)
        assert min(lrs) > 0 and lrs[0] == lrs[1] == pytest.approx(run["lr"] / (w + 1))
        top = lrs.index(max(lrs))
        assert top == w + 1 and max(lrs) == pytest.approx(run["lr"])
        assert lrs[:top + 1] == sorted(lrs[:top + 1]) and lrs[top:] == sorted(lrs[top:], reverse=True)
        assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["torch_adam"] is True
    lamb = sb.ds_config(sb.plan(["lamb"], [64], [1.0])[0], num_train)
    assert lamb["optimizer"]["type"] == "LAMB" and "torch_adam" not in lamb["optimizer"]["params"]
    assert lamb["gradient_clipping"] == 1.0 and lamb["training"]["exclude_norm_and_bias"] is True  # NVIDIA's LAMB
    assert lamb["optimizer"]["params"]["weight_decay"] == cfg["optimizer"]["params"]["weight_decay"] == 0.01


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
                                 "val_mlm_accuracy": 20.0 + i, "epoch_time": 1.5, "tokens_per_sec": 9000.0}))
    if summary:
        lines.append(json.dumps({"kind": "summary", "final_val_loss": losses[-1]}))
    text = "\n".join(lines) + "\n"
    (d / "metrics.jsonl").write_text(text + ('{"kind": "summ' if torn else ""))


@pytest.fixture
def grid_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    # LAMB at 64: the middle factor wins; at 256: the largest factor wins (an edge), the smallest diverged (nan)
    fake_run(runs_dir, "lamb-64-x0.5-seed0", [6.0, 5.5])
    fake_run(runs_dir, "lamb-64-x1-seed0", [5.9, 5.1])
    fake_run(runs_dir, "lamb-64-x2-seed0", [5.8, 5.3])
    fake_run(runs_dir, "lamb-256-x0.5-seed0", [7.0, float("nan")])
    fake_run(runs_dir, "lamb-256-x1-seed0", [7.5, 7.2])
    fake_run(runs_dir, "lamb-256-x2-seed0", [7.4, 6.9])
    fake_run(runs_dir, "adamw-64-x1-seed0", [5.0, 4.9], summary=False)  # killed before its summary: not a result
    return runs_dir


def test_best_of_grid_lowest_final_loss_flags_the_edge_and_never_a_diverged_run(grid_runs):
    fake_run(grid_runs, "lamb-64-x2-seed1", [5.0, 4.0])  # another seed never takes part in the tuning
    runs = sb.with_extensions(sb.plan(batches=[64, 256]), grid_runs)
    rows = sb.results(runs, grid_runs)
    assert sorted(r["name"] for r in rows) == ["lamb-256-x0.5-seed0", "lamb-256-x1-seed0", "lamb-256-x2-seed0",
                                               "lamb-64-x0.5-seed0", "lamb-64-x1-seed0", "lamb-64-x2-seed0",
                                               "lamb-64-x2-seed1"]
    best = sb.best_points(rows)
    assert set(best) == {("lamb", 64), ("lamb", 256)}
    assert (best[("lamb", 64)]["name"], best[("lamb", 64)]["final_val_loss"], best[("lamb", 64)]["at_edge"]) == \
        ("lamb-64-x1-seed0", 5.1, False)
    assert (best[("lamb", 256)]["name"], best[("lamb", 256)]["final_val_loss"], best[("lamb", 256)]["at_edge"]) \
        == ("lamb-256-x2-seed0", 6.9, True)
    assert best[("lamb", 64)]["tokens"] == [1000, 2000]


def test_seed_stats_mean_and_sample_std_at_the_best_factor(grid_runs):
    fake_run(grid_runs, "lamb-64-x1-seed1", [5.8, 5.3])
    fake_run(grid_runs, "lamb-64-x1-seed2", [6.0, 5.5])
    fake_run(grid_runs, "lamb-64-x2-seed1", [5.0, 4.0])  # not the best factor: not counted
    rows = sb.results(sb.with_extensions(sb.plan(["lamb"], [64]), grid_runs), grid_runs)
    stats = sb.seed_stats(rows, sb.best_points(rows))[("lamb", 64)]
    # by hand: 5.1, 5.3, 5.5: mean 5.3, deviations -0.2, 0, 0.2: sample variance 0.08 / 2 = 0.04, std 0.2
    assert stats["seeds"] == {0: 5.1, 1: 5.3, 2: 5.5} and stats["n"] == 3
    assert (stats["mean"], stats["std"]) == (pytest.approx(5.3), pytest.approx(0.2))
    assert stats["curve"] == pytest.approx([(5.9 + 5.8 + 6.0) / 3, 5.3])
    one = sb.seed_stats(rows, sb.best_points(rows))[("lamb", 64)]
    assert one["accuracy"] == pytest.approx(22.0)  # fake_run: 20 + the epoch (2)
    assert math.isnan(sb.mean_std([5.0])[1]) and sb.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))


def test_outputs_table_marks_the_best_and_the_edge(grid_runs, tmp_path):
    fake_run(grid_runs, "lamb-64-x1-seed1", [5.8, 5.3])
    fake_run(grid_runs, "lamb-64-x1-seed2", [6.0, 5.5])
    out = tmp_path / "out"
    runs = sb.with_extensions(sb.plan(batches=[64, 256]), grid_runs)
    summary = sb.write_outputs(runs, grid_runs, out, {"val_unigram_entropy": 5.5})
    text = (out / "table.md").read_text()
    head, every = text.split("Every run:")
    seeds = {line.split("|")[1].strip() + line.split("|")[2].strip(): line for line in head.splitlines()
             if line.startswith("| LAMB")}
    assert "0: 5.100, 1: 5.300, 2: 5.500" in seeds["LAMB64"] and "5.300 ± 0.200" in seeds["LAMB64"]
    assert "| 0.200 |" in seeds["LAMB64"]  # below the unigram entropy: 5.5 - 5.3
    assert "x2 (edge)" in seeds["LAMB256"] and "6.900 ± nan" in seeds["LAMB256"]
    row = {line.split("|")[1].strip() + line.split("|")[2].strip() + line.split("|")[4].strip()
           + line.split("|")[5].strip(): line for line in every.splitlines() if line.startswith("| LAMB")}
    assert "**best**" in row["LAMB64x10"] and "edge" not in row["LAMB64x10"]
    assert "best factor, another seed" in row["LAMB64x12"]
    assert "**best** (at the grid's edge)" in row["LAMB256x20"]
    assert "5.900 / 5.100" in row["LAMB64x10"] and "nan" in row["LAMB256x0.50"]
    assert "best" not in row["LAMB256x0.50"]
    assert summary["runs_finished"] == 8 and summary["runs_planned"] == 14
    assert summary["best"]["lamb-256"]["mean"] == 6.9 and summary["best"]["lamb-256"]["at_edge"]
    assert summary["best"]["lamb-64"]["final_val_loss_by_seed"] == {"0": 5.1, "1": 5.3, "2": 5.5}
    assert summary["best"]["lamb-64"]["below_unigram_entropy"] == pytest.approx(0.2)
    assert summary["gradient_clipping"] == 1.0 and summary["seeds"] == [0, 1, 2]
    assert (out / "fig1_loss_vs_batch.png").stat().st_size > 10_000
    assert (out / "fig2_loss_vs_tokens.png").stat().st_size > 10_000


def test_finished_runs_are_skipped_and_unfinished_ones_run_again(grid_runs, monkeypatch, capsys):
    fake_run(grid_runs, "lamb-128-x1-seed0", [6.0], summary=False, torn=True)  # killed while writing its summary
    started = []
    monkeypatch.setattr(sb, "run_one", lambda run, runs_dir, info: started.append(run["name"]) or {
        "seconds": 0.0, "cpu_seconds": 0.0})
    before = (grid_runs / "lamb-64-x1-seed0" / "metrics.jsonl").read_text()
    failures = sb.run_all(sb.plan(["lamb"], [64, 128, 256]), grid_runs, {}, jobs=2)
    assert failures == 0
    assert sorted(started) == ["lamb-128-x0.5-seed0", "lamb-128-x1-seed0", "lamb-128-x2-seed0"]
    assert "9 runs, 6 finished before, 3 to run" in capsys.readouterr().out
    assert (grid_runs / "lamb-64-x1-seed0" / "metrics.jsonl").read_text() == before
    # the unfinished run's folder exists, so its command starts it again from scratch (--overwrite)
    cmd = sb.command(sb.plan(["lamb"], [128], [1.0])[0], grid_runs, {"corpus_dir": "c", "tokenizer": "t"})
    assert cmd[-1] == "--overwrite" and cmd[cmd.index("--seed") + 1] == "0"
    assert cmd[cmd.index("--corpus-cache") + 1] == str(grid_runs / "corpus-cache")  # one cache for every run
    other = sb.make_run("lamb", 256, 1.0, seed=2)
    cmd = sb.command(other, grid_runs, {"corpus_dir": "c", "tokenizer": "t"})
    assert "--overwrite" not in cmd and cmd[cmd.index("--seed") + 1] == "2" and other["name"] == "lamb-256-x1-seed2"


def test_follow_extends_at_the_edge_then_runs_the_other_seeds_at_the_best(grid_runs, monkeypatch):
    # A fake train/bert.py: a run's final loss is set here by name; it leaves a finished folder
    losses = {"lamb-256-x4-seed0": 6.7, "lamb-256-x8-seed0": 6.8}  # x4 beats x2 (6.9); x8 does not
    started = []

    def fake_one(run, runs_dir, info):
        started.append(run["name"])
        fake_run(runs_dir, run["name"], [7.0, losses.get(run["name"], 6.0)])
        return {"seconds": 0.0, "cpu_seconds": 0.0}

    monkeypatch.setattr(sb, "run_one", fake_one)
    assert sb.run_all(sb.plan(["lamb"], [64, 256]), grid_runs, {}, jobs=2, follow=True) == 0
    # 64: inside its grid, so seeds 1 and 2 at x1; 256: x2 at the edge -> x4 wins (edge) -> x8 loses -> seeds at x4
    assert sorted(started) == sorted(["lamb-64-x1-seed1", "lamb-64-x1-seed2", "lamb-256-x4-seed0",
                                      "lamb-256-x8-seed0", "lamb-256-x4-seed1", "lamb-256-x4-seed2"])
    assert started.index("lamb-256-x8-seed0") < started.index("lamb-256-x4-seed1")
    # everything done: nothing more to run, and a second call runs nothing
    started.clear()
    assert sb.run_all(sb.plan(["lamb"], [64, 256]), grid_runs, {}, jobs=2, follow=True) == 0 and started == []


def test_a_failed_extension_ends_the_tuning_and_the_seeds_still_run(grid_runs, monkeypatch, capsys):
    started = []

    def fake_one(run, runs_dir, info):
        started.append(run["name"])
        if run["name"] == "lamb-256-x4-seed0":
            raise RuntimeError(f"{run['name']} failed (1)")
        fake_run(runs_dir, run["name"], [7.0, 6.95])
        return {"seconds": 0.0, "cpu_seconds": 0.0}

    monkeypatch.setattr(sb, "run_one", fake_one)
    assert sb.run_all(sb.plan(["lamb"], [256]), grid_runs, {}, jobs=1, follow=True) == 1
    assert started == ["lamb-256-x4-seed0", "lamb-256-x2-seed1", "lamb-256-x2-seed2"]
    assert "lamb-256-x4-seed0 failed (1)" in capsys.readouterr().out


def test_a_finished_run_made_with_another_lr_or_seed_is_refused(grid_runs):
    (grid_runs / "lamb-64-x1-seed0" / "config.json").write_text(json.dumps(
        {"optimizer": {"type": "LAMB", "params": {"lr": 0.02}}, "derived": {"global_batch": 64}}))
    with pytest.raises(sb.StudyError, match=r"made with peak lr 0.02 at batch 64 for 3 epochs \(seed 0, clipping "
                                            r"1.0\), the plan says lr 0.015 at batch 64 for 3 \(seed 0, clipping 1.0"):
        sb.run_all(sb.plan(["lamb"], [64]), grid_runs, {}, jobs=1)
    made = {"optimizer": {"type": "LAMB", "params": {"lr": 0.015}}, "derived": {"global_batch": 64},
            "training": {"epochs": 3}, "args": {"seed": 0}, "deepspeed": {"gradient_clipping": 1.0}}
    (grid_runs / "lamb-64-x1-seed0" / "config.json").write_text(json.dumps(made))
    assert [r["name"] for r in sb.results(sb.plan(["lamb"], [64]), grid_runs)] == [
        "lamb-64-x0.5-seed0", "lamb-64-x1-seed0", "lamb-64-x2-seed0"]
    with pytest.raises(sb.StudyError, match=r"for 3 epochs \(seed 0, clipping 1.0\), the plan says lr 0.015 at "
                                            r"batch 64 for 16"):
        sb.results(sb.plan(["lamb"], [64], epochs=16), grid_runs)  # a 16-epoch side check needs its own folder
    for key, value, says in (("args", {"seed": 1}, r"seed 1, clipping 1.0\)"),
                             ("deepspeed", {"gradient_clipping": 0.0}, r"seed 0, clipping 0.0\)")):
        (grid_runs / "lamb-64-x1-seed0" / "config.json").write_text(json.dumps({**made, key: value}))
        with pytest.raises(sb.StudyError, match=says):
            sb.results(sb.plan(["lamb"], [64]), grid_runs)


def test_a_best_at_the_edge_extends_the_grid_beyond_it_and_no_further_than_two_doublings(grid_runs):
    fake_run(grid_runs, "adamw-128-x0.5-seed0", [5.0, 4.8])  # the smallest factor wins: try x0.25 next
    fake_run(grid_runs, "adamw-128-x1-seed0", [5.0, 4.9])
    fake_run(grid_runs, "adamw-128-x2-seed0", [5.1, 5.0])
    rows = sb.results(sb.plan(batches=[64, 128, 256]), grid_runs)
    more = {r["name"]: r["lr"] for r in sb.extend(rows)}
    # LAMB at 64 is inside its grid: nothing; at 256 x2 won: x4; AdamW at 128 x0.5 won: x0.25
    assert more == pytest.approx({"lamb-256-x4-seed0": 1.5e-2 * 2 * 4, "adamw-128-x0.25-seed0": 1.5e-3 * 2 ** 0.5 / 4})
    fake_run(grid_runs, "lamb-256-x4-seed0", [7.0, 6.5])  # x4 wins too: x8, the last doubling allowed
    fake_run(grid_runs, "lamb-256-x8-seed0", [7.0, 6.4])  # and x8 wins: no x16
    runs = sb.with_extensions(sb.plan(["lamb"], [256]), grid_runs)
    assert [r["name"] for r in runs] == ["lamb-256-x0.5-seed0", "lamb-256-x1-seed0", "lamb-256-x2-seed0",
                                         "lamb-256-x4-seed0", "lamb-256-x8-seed0"]
    best = sb.best_points(sb.results(runs, grid_runs))[("lamb", 256)]
    assert (best["name"], best["at_edge"]) == ("lamb-256-x8-seed0", True)
    assert sb.extend(sb.results(runs, grid_runs)) == []
    # at the last doubling the tuning stops: the other seeds run at x8
    assert [r["name"] for r in sb.next_runs(sb.results(runs, grid_runs), "lamb", 256, 3)] == [
        "lamb-256-x8-seed1", "lamb-256-x8-seed2"]
