"""analysis/ on run folders made by short real runs of train/imagenet.py (Fashion-MNIST, MLP, one process each).

Every expected number is read here from the runs' own metrics.jsonl, independently of analysis.runs: the final
error is the last epoch record's, the median-5 error the middle of the sorted last five (Goyal et al. 2017,
arXiv:1706.02677: "median error of the final 5 epochs"), a group's spread the sample standard deviation. The
published numbers come from the papers (Goyal et al. 2017, Table 1; the torchlars reproduction's README).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child_env

from analysis import compare
from analysis.runs import RunError, find_run_dirs, load_run, method_label

# name -> (global batch, micro batch, optimizer block, scheduler block, seed)
EPOCHS, TRAIN, VAL = 6, 1024, 256


def sgd(lr: float) -> dict:
    return {"type": "SGD", "params": {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}}


def multistep(lo: float, hi: float, warmup_epochs: float) -> dict:
    return {"type": "WarmupMultiStepLR", "params": {"warmup_min_lr": lo, "warmup_max_lr": hi,
                                                    "warmup_num_epochs": warmup_epochs, "warmup_type": "linear",
                                                    "milestones_epochs": [5], "gamma": 0.1}}


RUNS = {
    # Goyal's recipe at 64: lr 0.1 x 64/256; its warmup starts at min(0.1, lr) = lr, so it is flat.
    "sgd-64": (64, 64, sgd(0.025), multistep(0.025, 0.025, 1), 0),
    "sgd-256-seed0": (256, 128, sgd(0.1), multistep(0.025, 0.1, 1), 0),
    "sgd-256-seed1": (256, 128, sgd(0.1), multistep(0.025, 0.1, 1), 1),
    "sgd-256-nowarmup": (256, 128, sgd(0.1), multistep(0.1, 0.1, 0), 0),
    "lars-256": (256, 128, {"type": "LARS", "params": {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-4,
                                                       "trust_coefficient": 0.001}},
                 {"type": "WarmupPolyLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2.0,
                                                     "warmup_num_epochs": 1, "warmup_type": "linear",
                                                     "total_num_epochs": "auto", "end_lr": 1e-4, "power": 2.0}}, 0),
}
NOISE_RUN = "sgd-64"  # also measures the gradient noise scale, where train/imagenet.py has the flag
HAS_NOISE_FLAG = "--noise-scale-interval" in (REPO / "train" / "imagenet.py").read_text()


def run_parallel(cmds: list[list[str]], jobs: int = 2, timeout: float = 300) -> None:
    """Run train/imagenet.py commands, ``jobs`` at a time (the runs are start-up bound, not compute bound)."""
    pending, running = list(cmds), []
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < jobs:
            cmd = pending.pop(0)
            running.append((cmd, subprocess.Popen([sys.executable, "train/imagenet.py", *cmd], cwd=REPO,
                                                  env=child_env(), stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)))
        cmd, proc = running.pop(0)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        if proc.returncode:
            raise AssertionError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{out[-4000:]}")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, fashion_mnist_dir) -> Path:
    root = tmp_path_factory.mktemp("analysis")
    cmds = []
    for name, (batch, micro, opt, sched, seed) in RUNS.items():
        cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": 0},
               "optimizer": opt, "scheduler": sched, "training": {"epochs": EPOCHS}}
        (root / f"{name}.json").write_text(json.dumps(cfg))
        cmd = ["--deepspeed_config", str(root / f"{name}.json"), "--dataset", "fashion-mnist", "--data-dir",
               str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", str(TRAIN), "--val-subset", str(VAL),
               "--seed", str(seed), "--run-name", name, "--output-dir", str(root / "runs" / name), "--no-wandb",
               "--log-interval", "1"]
        if name == NOISE_RUN and HAS_NOISE_FLAG:
            cmd += ["--noise-scale-interval", "2"]
        cmds.append(cmd)
    run_parallel(cmds)
    return root / "runs"


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path) -> dict:
    """The numbers the table must show, read straight from metrics.jsonl."""
    recs = jsonl(run)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    last5 = sorted(e["val_top1_error"] for e in epochs[-5:])
    return {"final": epochs[-1]["val_top1_error"], "median5": last5[2], "epochs": epochs,
            "steps": [r for r in recs if r["kind"] == "step"], "time": sum(e["epoch_time"] for e in epochs)}


def table_rows(md: str, section: str) -> list[dict[str, str]]:
    lines = [ln for ln in md.split(section, 1)[1].splitlines()]
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("|")):]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_command_writes_figures_table_and_summary(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main([str(runs_dir), "--out", str(out)]) == 0
    for name in compare.FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "table.md").read_text()
    assert len(summary["runs"]) == len(RUNS) and f"{len(RUNS)} runs ->" in capsys.readouterr().out

    by_name = {r["name"]: r for r in summary["runs"]}
    rows = {r["run"]: r for r in table_rows(table, "## Runs")}
    for name in RUNS:
        want = expected(runs_dir / name)
        assert by_name[name]["median5_top1_error"] == want["median5"]
        assert by_name[name]["final_top1_error"] == want["final"]
        assert by_name[name]["epochs"] == EPOCHS
        assert by_name[name]["train_time_s"] == pytest.approx(want["time"])
        assert rows[name]["median-5 top-1 err. (%)"] == f"{want['median5']:.2f}"
        assert rows[name]["final top-1 err. (%)"] == f"{want['final']:.2f}"
        assert rows[name]["batch"] == f"{RUNS[name][0]:,}"
    # The methods, from the configs: Goyal's flat warmup at 64 counts as his recipe.
    assert {n: r["method"] for n, r in by_name.items()} == {
        "sgd-64": "SGD, linear scaling, gradual warmup", "sgd-256-seed0": "SGD, linear scaling, gradual warmup",
        "sgd-256-seed1": "SGD, linear scaling, gradual warmup", "sgd-256-nowarmup": "SGD, linear scaling, no warmup",
        "lars-256": "LARS"}
    # Seeds of one (method, batch) are one group: mean and sample std of their median-5 errors.
    a, b = expected(runs_dir / "sgd-256-seed0")["median5"], expected(runs_dir / "sgd-256-seed1")["median5"]
    group = next(g for g in summary["groups"] if g["batch"] == 256 and g["method"].endswith("gradual warmup"))
    assert group["n"] == 2 and group["mean"] == pytest.approx((a + b) / 2)
    assert group["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
    grouped = table_rows(table, "## By method and batch")
    assert len(grouped) == 4  # (sgd warmup, 64), (sgd warmup, 256), (sgd no warmup, 256), (LARS, 256)
    assert "paper top-1" not in table and "not shown" in table  # Fashion-MNIST: no published numbers


def test_fig1_one_line_per_method_on_a_log2_batch_axis(runs_dir):
    runs = [load_run(p) for p in find_run_dirs([runs_dir])]
    fig = compare.plot_error_vs_batch(runs)
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.lines if (ln.get_gid() or "").startswith("method:")}
    assert set(lines) == {"method:SGD, linear scaling, gradual warmup", "method:SGD, linear scaling, no warmup",
                          "method:LARS"}
    warm = lines["method:SGD, linear scaling, gradual warmup"]
    m64 = expected(runs_dir / "sgd-64")["median5"]
    m256 = [expected(runs_dir / f"sgd-256-seed{s}")["median5"] for s in (0, 1)]
    assert list(warm.get_xdata()) == [64, 256]
    assert list(warm.get_ydata()) == pytest.approx([m64, sum(m256) / 2])
    assert list(lines["method:LARS"].get_ydata()) == [expected(runs_dir / "lars-256")["median5"]]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64", "256"]
    final = compare.plot_error_vs_batch(runs, metric="final")
    finals = {ln.get_gid(): ln for ln in final.axes[0].lines}
    assert list(finals["method:LARS"].get_ydata()) == [expected(runs_dir / "lars-256")["final"]]


def test_fig2_each_batch_overlaid_on_the_smallest(runs_dir):
    runs = [load_run(p) for p in find_run_dirs([runs_dir])]
    fig = compare.plot_train_error_vs_epochs(runs)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 1 and visible[0].get_title() == "batch 256 vs 64"  # one panel per larger batch
    lines = {ln.get_gid(): ln for ln in visible[0].lines}
    assert set(lines) == {f"run:{n}" for n in RUNS}  # the 64 reference and every 256 run
    for name in RUNS:
        epochs = expected(runs_dir / name)["epochs"]
        assert list(lines[f"run:{name}"].get_xdata()) == [e["epoch"] for e in epochs]
        assert list(lines[f"run:{name}"].get_ydata()) == [e["train_error"] for e in epochs]
    assert lines["run:sgd-64"].get_linestyle() == "--" and lines["run:lars-256"].get_linestyle() == "-"


def test_fig3_lr_schedules_show_the_warmup(runs_dir):
    runs = [load_run(p) for p in find_run_dirs([runs_dir])]
    fig = compare.plot_lr_schedule(runs)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"SGD", "LARS"}
    assert {ln.get_gid() for ln in panels["SGD"].lines} == {f"run:{n}" for n in RUNS if n.startswith("sgd")}
    for name in RUNS:
        ax = panels["LARS" if name.startswith("lars") else "SGD"]
        line = next(ln for ln in ax.lines if ln.get_gid() == f"run:{name}")
        steps = expected(runs_dir / name)["steps"]
        assert list(line.get_xdata()) == [s["epoch"] for s in steps]
        assert list(line.get_ydata()) == [s["lr"] for s in steps]
    warm = [s["lr"] for s in expected(runs_dir / "sgd-256-seed0")["steps"]]
    assert warm[0] == pytest.approx(0.025) and warm[0] < warm[1] < warm[2] and max(warm) == pytest.approx(0.1)


def test_imagenet_runs_get_the_papers_numbers(runs_dir, tmp_path):
    """The same real runs relabelled as ImageNet runs: the paper column shows Goyal et al. Table 1 at 256
    (23.60 +- 0.12, with or without warmup: at 256 the recipe's warmup starts at its target) and torchlars' LARS
    accuracy 73.79% at 256 as error 26.21; the footnotes cite both."""
    for name in RUNS:
        shutil.copytree(runs_dir / name, tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["derived"]["dataset"] = "imagenet"
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    runs = [load_run(tmp_path / n) for n in RUNS]
    md = compare.table_markdown(runs)
    rows = {r["run"]: r["paper top-1 err. (%)"] for r in table_rows(md, "## Runs")}
    footnotes = {ln[1]: ln for ln in md.splitlines() if ln.startswith("[")}

    def cited(cell: str) -> str:
        return footnotes[cell.rsplit("[", 1)[1][0]]

    assert rows["sgd-256-seed0"].startswith("23.60 ± 0.12 [") and "arXiv:1706.02677" in cited(rows["sgd-256-seed0"])
    assert rows["sgd-256-nowarmup"] == rows["sgd-256-seed0"]
    assert rows["lars-256"].startswith("26.21 [") and "torchlars" in cited(rows["lars-256"])
    assert rows["sgd-64"] == "—"  # Goyal has no 64
    grouped = {(r["method"], r["batch"]): r["paper top-1 err. (%)"] for r in table_rows(md, "## By method and batch")}
    assert grouped[("LARS", "256")] == rows["lars-256"]


def test_published_numbers_match_research_notes():
    """Goyal et al. 2017, Table 1 / Fig. 3 and 8k without warmup (24.84); torchlars' reported accuracies."""
    from analysis.papers import paper_error

    goyal = {256: 23.60, 512: 23.48, 1024: 23.53, 2048: 23.49, 4096: 23.56, 8192: 23.74, 16384: 24.79,
             32768: 27.55, 65536: 33.96}
    for batch, err in goyal.items():
        assert paper_error("SGD", "linear", True, batch).top1_error == err
    assert paper_error("SGD", "linear", False, 8192).top1_error == 24.84
    assert paper_error("SGD", "linear", False, 16384) is None  # no published no-warmup number there
    assert paper_error("SGD", "sqrt", True, 8192) is None
    for batch, acc in {256: 73.79, 8192: 73.78, 16384: 73.36, 32768: 72.26}.items():
        assert paper_error("LARS", "linear", True, batch).top1_error == pytest.approx(100 - acc)
    assert paper_error("LAMB", "sqrt", True, 32768) is None


def test_method_labels_from_lr_rules():
    assert method_label("SGD", "none", False) == "SGD, no scaling, no warmup"
    assert method_label("sgd", "sqrt", True) == "SGD, sqrt scaling, gradual warmup"
    assert method_label("LAMB", "other", False) == "LAMB, no warmup"


@pytest.mark.skipif(not HAS_NOISE_FLAG, reason="train/imagenet.py has no --noise-scale-interval yet")
def test_noise_scale_is_read_from_step_records_and_marked(runs_dir, tmp_path):
    """The run logged B_simple in its step records; the predicted critical batch is the median of those values
    (one run), drawn as a vertical line in fig1 and printed in the table."""
    values = [s["noise_scale"] for s in expected(runs_dir / NOISE_RUN)["steps"]
              if isinstance(s.get("noise_scale"), float)]
    assert len(values) >= 10 and all(v > 0 for v in values)
    ordered = sorted(values)
    median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    runs = [load_run(p) for p in find_run_dirs([runs_dir])]
    fig = compare.plot_error_vs_batch(runs)
    marker = next(ln for ln in fig.axes[0].lines if ln.get_gid() == "critical-batch")
    assert marker.get_xdata()[0] == pytest.approx(median)
    assert compare.summary_dict(runs)["critical_batch"]["b_noise"] == pytest.approx(median)
    row = {r["run"]: r for r in table_rows(compare.table_markdown(runs), "## Runs")}[NOISE_RUN]
    assert row["B_noise (median / last)"] == f"{median:,.0f} / {values[-1]:,.0f}"


def test_bad_inputs_name_the_path(runs_dir, tmp_path, capsys):
    def fails(*paths: Path) -> str:
        assert compare.main([*map(str, paths), "--out", str(tmp_path / "o")]) == 2
        return capsys.readouterr().err

    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "notes.txt").write_text("hello")
    assert f"{tmp_path / 'not-a-run'} is not a run folder" in fails(tmp_path / "not-a-run")
    assert f"{tmp_path / 'missing'} does not exist" in fails(tmp_path / "missing")

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(runs_dir / "sgd-64" / "config.json", empty / "config.json")
    (empty / "metrics.jsonl").write_text("")
    assert f"{empty / 'metrics.jsonl'} is empty" in fails(empty)
    (empty / "metrics.jsonl").unlink()
    assert f"{empty}: no metrics.jsonl" in fails(empty)

    broken = tmp_path / "broken"
    shutil.copytree(runs_dir / "sgd-64", broken)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    assert f"{broken / 'metrics.jsonl'}:4: not valid JSON" in fails(broken)
    (broken / "config.json").write_text('{"run_name": "x"}')
    assert f"{broken / 'config.json'}: no derived.global_batch" in fails(broken)
    assert "Traceback" not in capsys.readouterr().err

    # A run killed mid-write leaves a torn last line: dropped with a warning, the rest is read.
    torn = tmp_path / "torn"
    shutil.copytree(runs_dir / "sgd-64", torn)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "ste')
    run = load_run(torn)
    assert "torn last line dropped" in capsys.readouterr().err
    assert run.median5_top1 == expected(runs_dir / "sgd-64")["median5"]
    with pytest.raises(RunError, match="expected ENTITY/PROJECT"):
        compare.collect_runs([str(torn)], "just-a-project")


def test_wandb_offline_is_skipped_with_a_message(runs_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert compare.main([str(runs_dir / "sgd-64"), "--wandb", "team/largebatch/study", "--out",
                         str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "wandb: offline (WANDB_MODE=offline)" in err and "team/largebatch/study" in err
    assert (tmp_path / "o" / "table.md").exists()
    assert compare.main(["--wandb", "team/largebatch", "--out", str(tmp_path / "o2")]) == 2
    assert "no runs to compare" in capsys.readouterr().err
