"""Logging through the real wandb library (offline mode), read back with wandb's own reader of its run file.

A real train/imagenet.py run logs to wandb offline; ``wandb leet inspect --json`` (wandb 0.31's reader of the
.wandb transaction log) gives back the config, the history rows and the summary, which must match config.json and
metrics.jsonl exactly: every record present, one step axis (samples) that never goes backwards, nothing dropped.
No API key or other secret from the environment may reach the run folder. The wandb API path of analysis/
(``records_from_history``) is checked on these real history rows; what only an online account can check (the
public API's paging, saving a Report) is listed in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env, read_metrics

from analysis.runs import records_from_history
from train.tracking import RunLog

WANDB = str(Path(sys.executable).parent / "wandb")
FAKE_KEY = "5f3c0ffee0ddba11c0dec0de5eed5a1ad5ca1ab1"  # 40 hex characters, the shape of a wandb API key
FAKE_TOKEN = "tok-do-not-leak-7d1e9b"
HAS_NOISE_FLAG = "--noise-scale-interval" in (REPO / "train" / "imagenet.py").read_text()


def wandb_env(tmp: Path) -> dict[str, str]:
    env = child_env(WANDB_DIR=str(tmp / "wandb-dir"), WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
                    WANDB_CONFIG_DIR=str(tmp / "wandb-config"), WANDB_DATA_DIR=str(tmp / "wandb-data"),
                    LARGEBATCH_TEST_TOKEN=FAKE_TOKEN)
    env["WANDB_API_KEY"] = FAKE_KEY  # present, as on a logged-in machine; WANDB_MODE=offline still wins
    return env


def inspect(run_file: Path, env: dict[str, str]) -> list[dict]:
    proc = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_file)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, fashion_mnist_dir) -> tuple[Path, list[dict], dict[str, str]]:
    tmp = tmp_path_factory.mktemp("wandb")
    run = tmp / "run"
    cmd = [sys.executable, "train/imagenet.py", "--deepspeed_config", "ds_configs/demo.json", "--dataset",
           "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "1024",
           "--val-subset", "256", "--epochs", "2", "--log-interval", "1", "--output-dir", str(run),
           "--precision", "fp32", "--run-name", "demo-wandb-seed0", "--wandb-group", "study-a", "--wandb-project",
           "largebatch-test"]
    if HAS_NOISE_FLAG:
        cmd += ["--noise-scale-interval", "2"]
    env = wandb_env(tmp)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wandb failed" not in proc.stderr
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list(run.rglob("*"))
    return run, inspect(files[0], env), env


def test_config_name_group_and_tags_arrive(offline_run):
    run, records, _ = offline_run
    (run_rec,) = [r["run"] for r in records if r["type"] == "run"]
    config = json.loads((run / "config.json").read_text())
    logged = run_rec["config"]["update"]
    for key in ("run_name", "group", "derived", "optimizer", "scheduler", "training", "git_commit", "args"):
        assert logged[key] == config[key], key
    assert logged["derived"]["global_batch"] == 256 and logged["derived"]["micro_batch"] == 64
    assert run_rec["display_name"] == "demo-wandb-seed0" and run_rec["project"] == "largebatch-test"
    assert run_rec.get("run_group", run_rec.get("group")) == "study-a"
    assert set(run_rec["tags"]) == {"batch-256", "sgd", "fashion-mnist"}
    assert [r["exit"]["exit_code"] if r["exit"] else 0 for r in records if r["type"] == "exit"] == [0]


def test_every_record_arrives_on_one_increasing_step_axis(offline_run):
    run, records, _ = offline_run
    rows = [r["history"] for r in records if r["type"] == "history"]
    steps = [int(r["step"]["num"]) for r in rows]
    assert steps == sorted(set(steps)), "wandb's step axis went backwards or repeated"
    by_step = {int(r["step"]["num"]): r["item"] for r in rows}
    jsonl = [r for r in read_metrics(run) if r["kind"] != "checkpoint"]  # those stay in the run folder
    kinds = [r["kind"] for r in jsonl]
    # demo.json: 256 = 64 micro x 4 accumulation; 1,024 images -> 4 steps per epoch, 2 epochs, logged every step.
    assert kinds.count("step") == 8 and kinds.count("epoch") == 2 and kinds.count("summary") == 1
    for rec in jsonl:
        item = by_step[rec["samples"]]  # step = samples seen, the axis DeepSpeed's monitor uses too
        assert item["samples"] == rec["samples"]
        for key, value in rec.items():
            if key in ("kind", "samples"):
                continue
            name = f"{rec['kind']}/{key}"
            if value is None:  # wandb cannot store null: absent, as the jsonl says null
                assert name not in item, name
            else:
                assert item[name] == pytest.approx(value, rel=1e-12, abs=0), name
    # The final summary carries the run's result.
    summaries = [r["summary"]["update"] for r in records if r["type"] == "summary"]
    final = {k: v for s in summaries for k, v in s.items()}
    (result,) = [r for r in jsonl if r["kind"] == "summary"]
    assert final["final_val_top1_error"] == pytest.approx(result["final_val_top1_error"], rel=1e-12)
    assert final["median5_val_top1_error"] == pytest.approx(result["median5_val_top1_error"], rel=1e-12)


def test_history_rows_turn_back_into_the_jsonl_records(offline_run):
    """analysis.runs.records_from_history is what reads wandb API runs; on the real rows it must rebuild
    metrics.jsonl (less the nulls wandb cannot hold), including rows holding a step and an epoch record."""
    run, records, _ = offline_run
    items = [r["history"]["item"] for r in records if r["type"] == "history"]
    rebuilt = list(records_from_history(items))
    want = [{k: v for k, v in rec.items() if v is not None} for rec in read_metrics(run) if rec["kind"] != "checkpoint"]
    order = {"step": 0, "epoch": 1, "summary": 2}  # within one sample count: step, then epoch, then summary
    want.sort(key=lambda r: (r["samples"], order[r["kind"]]))
    assert len(rebuilt) == len(want)
    for got, exp in zip(rebuilt, want, strict=True):
        assert got.keys() == exp.keys() and got["kind"] == exp["kind"], exp
        assert {k: v for k, v in got.items() if k != "kind"} == pytest.approx(
            {k: v for k, v in exp.items() if k != "kind"}, rel=1e-12), exp["kind"]
    assert sum(1 for it in items if any(k.startswith("epoch/") for k in it)
               and any(k.startswith("step/") for k in it)) == 2  # epoch ends share the step's row


def test_no_secret_reaches_the_run_folder(offline_run):
    run, _, env = offline_run
    checked = 0
    for folder in (run, Path(env["WANDB_DIR"])):
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert FAKE_KEY.encode() not in data, f"API key written to {path}"
                assert FAKE_TOKEN.encode() not in data, f"environment secret written to {path}"
                checked += 1
    assert checked >= 5  # config.json, metrics.jsonl, the .wandb file, wandb's logs, the model


@pytest.mark.filterwarnings("ignore:Pydantic V1 style")  # inside wandb-workspaces
def test_report_panels_name_keys_the_runs_log(offline_run):
    """The wandb Report's panels (built offline, not saved) plot keys that this real run logged."""
    pytest.importorskip("wandb_workspaces", reason="the Report needs wandb-workspaces")
    import wandb_workspaces.reports.v2 as wr

    from analysis.compare import build_report

    run, records, _ = offline_run
    history_keys = {k for r in records if r["type"] == "history" for k in r["history"]["item"]}
    config = json.loads((run / "config.json").read_text())
    report = build_report("team", "largebatch-test", "study-a", (run / "metrics.jsonl").read_text()[:100])
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert grid.runsets[0].project == "largebatch-test" and "study-a" in str(grid.runsets[0].filters)
    for panel in grid.panels:
        if isinstance(panel, wr.ScatterPlot):
            section, key = panel.x.name.split(".", 1)
            assert key in config[section], panel.title
            assert panel.y.name in history_keys, panel.title
        else:
            keys = [panel.x, *panel.y]
            if "step/noise_scale" in keys and not HAS_NOISE_FLAG:
                continue
            assert set(keys) <= history_keys, (panel.title, set(keys) - history_keys)


def test_a_wandb_failure_leaves_metrics_jsonl_running(tmp_path, monkeypatch, capsys):
    """wandb.init rejecting its settings (here an invalid WANDB_MODE) turns wandb off with one warning."""
    monkeypatch.setenv("WANDB_MODE", "not-a-mode")
    for k in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    log = RunLog(tmp_path, use_wandb=True, project="p", group=None, name="n", tags=[], config={"a": 1})
    log.log({"kind": "step", "samples": 32, "loss": float("nan"), "lr": 0.1})
    log.close()
    assert "WARNING: wandb failed to start" in capsys.readouterr().err
    assert log.wandb is None
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"kind": "step", "samples": 32, "loss": None, "lr": 0.1}]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_wandb_server_that_never_answers_costs_bounded_time_and_no_rank_times_out(tmp_path, fashion_mnist_dir):
    """WANDB_BASE_URL points at a loopback listener that accepts connections and never answers (a hung server or a
    proxy black hole); wandb online. wandb.init alone would wait its 90 s init_timeout while rank 1 waits in the
    first collective and, with --dist-timeout 0.25 (15 s), gives up calling rank 0 hung. With --wandb-timeout 5 rank
    0 gives the server 5 s, says so in one line, logs offline instead, and the 2-rank run ends normally."""
    import socket
    import threading
    import time

    from conftest import launch

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def accept_and_hang() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])  # never read, never answered
            except OSError:
                return

    threading.Thread(target=accept_and_hang, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = wandb_env(tmp_path) | {"WANDB_MODE": "online", "WANDB_BASE_URL": url}
    run = tmp_path / "run"
    args = ["--deepspeed_config", "ds_configs/demo.json", "--dataset", "fashion-mnist", "--data-dir",
            str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "512", "--val-subset", "64", "--precision",
            "fp32", "--max-steps", "2", "--output-dir", str(run), "--wandb-timeout", "5", "--dist-timeout", "0.25"]
    t0 = time.time()
    try:
        proc = launch(args, env=env, check=False, timeout=300)
    finally:
        server.close()
        for conn in accepted:
            conn.close()
    took = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert accepted, "wandb never contacted the server"
    assert f"WARNING: the wandb server {url} did not answer within 5 s (" in out
    assert f"logging offline to {run / 'wandb'} (upload later with `wandb sync`)" in out
    assert "a rank hung" not in out
    assert len(list(run.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert [r["kind"] for r in read_metrics(run)][-1] == "summary"
    print(f"hung wandb server: run of 2 steps done in {took:.1f} s (wandb waited 5 s, then offline)")


STOPPED_SCRIPT = r"""
import argparse
from pathlib import Path
from train import cli
from train.tracking import RunLog

def main(args):
    Path(args.out).mkdir()
    log = RunLog(Path(args.out), use_wandb=True, project="largebatch-test", group=None, name="stopped", tags=[],
                 config={"k": 1})
    log.log({"kind": "step", "step": 1, "samples": 8, "loss": 2.0})
    raise SystemExit(143)  # how a SIGTERM the ranks agreed on ends a run: the log is never closed

parser = argparse.ArgumentParser()
parser.add_argument("out")
cli.entry(main, parser)
"""


def test_a_run_stopped_by_a_signal_finishes_its_wandb_run_with_the_exit_code(tmp_path):
    """A run that stops early never reaches RunLog.close, and the entry point's exit skips wandb's atexit hook
    (train/distributed.exit_process): cli.entry finishes the open run itself, so wandb's file ends with the exit
    record (exit code 143), as a finished run's does."""
    env = wandb_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", STOPPED_SCRIPT, str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((tmp_path / "run").rglob("*"))
    records = inspect(files[0], env)
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [143]
    assert [r["history"]["item"]["step/loss"] for r in records if r["type"] == "history"] == [2.0]
