"""The run folder on a cluster: one job per folder (a lock), one folder for every node (checked), a 'latest' that
names a checkpoint of the folder, the precision a run was written in, and config.json kept from the first start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEEPSPEED, REPO, child_env, free_port, run_single, write_config
from test_train_e2e import sgd_config

pytestmark = pytest.mark.launcher


def mlp_args(tmp_path: Path, data_dir: Path, *extra: str, run: str = "run") -> list[str]:
    cfg = write_config(tmp_path / "c.json", sgd_config(64, 32, stage=1))
    return ["--deepspeed_config", str(cfg), "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--arch", "mlp",
            "--train-subset", "1024", "--val-subset", "64", "--no-wandb", "--precision", "fp32",
            "--output-dir", str(tmp_path / run), *extra]


def start_single(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "train/imagenet.py", *args], cwd=REPO, env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_latest_naming_no_checkpoint_of_the_folder_lists_the_tags(tmp_path, fashion_mnist_dir):
    """DeepSpeed joins whatever 'latest' holds to the folder and stops with a bare AssertionError. A missing tag is
    refused through the entry point, before the engine is built, naming the tags there; a path that leaves the
    folder and a folder that is no checkpoint are refused by the same check."""
    from train.checkpoints import CheckpointError, resume_tag

    args = mlp_args(tmp_path, fashion_mnist_dir, "--max-steps", "3", "--save-interval", "1", "--keep-checkpoints", "0")
    run_single(args)
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "latest").write_text("step9")
    proc = run_single([*args, "--resume"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"--resume: {ckpt / 'latest'} names 'step9', which is not a folder there; the checkpoints there: "
            f"step1, step2, step3. Write one of them into {ckpt / 'latest'}, or start afresh with --overwrite"
            in proc.stderr)
    assert "epoch" not in proc.stdout  # refused before training

    (ckpt / "latest").write_text(str(tmp_path / "elsewhere" / "step2"))
    with pytest.raises(CheckpointError, match="a path, not the name of a checkpoint folder in it"):
        resume_tag(ckpt)
    (ckpt / "latest").write_text("../../run/checkpoints/step2")
    with pytest.raises(CheckpointError, match="a path, not the name"):
        resume_tag(ckpt)
    (ckpt / "global_step7").mkdir()
    (ckpt / "global_step7" / "notes.txt").write_text("another tool's folder")
    (ckpt / "latest").write_text("global_step7")
    with pytest.raises(CheckpointError, match=r"a folder without a model file \(mp_rank_00_model_states.pt\): not a "
                                              r"checkpoint of this run; the checkpoints there: step1, step2, step3\."):
        resume_tag(ckpt)
    (ckpt / "latest").write_text("step2")
    assert resume_tag(ckpt) == "step2"


def test_resume_keeps_precision_and_first_config_and_records_each_resume(tmp_path, fashion_mnist_dir):
    """A run written in fp32: --resume --precision bf16 is refused naming the flag that resumes as written, and
    --precision auto takes fp32 from the record (auto measures the machine and may choose otherwise elsewhere).
    config.json stays byte for byte the first start's; each resume adds a line to resumes.jsonl."""
    run = tmp_path / "run"
    args = mlp_args(tmp_path, fashion_mnist_dir, "--save-interval", "1")
    run_single([*args, "--max-steps", "2"])
    first = (run / "config.json").read_bytes()

    proc = run_single([*args, "--max-steps", "3", "--resume", "--precision", "bf16"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"error: --resume: the checkpoints in {run} were written in another precision (precision fp32 -> bf16): "
            f"fp16 and bf16 carry different master and loss-scaler state; resume with --precision fp32") in proc.stderr
    assert (run / "config.json").read_bytes() == first

    auto = [a if a != "fp32" else "auto" for a in args]
    proc = run_single([*auto, "--max-steps", "3", "--resume", "--log-interval", "3"])
    assert "--resume with --precision auto: fp32, the precision the run was written in" in proc.stdout
    assert "resumed from" in proc.stdout and "step 2" in proc.stdout
    assert (run / "config.json").read_bytes() == first
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert len(resumes) == 1
    rec = resumes[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert rec["checkpoint"] == "step2" and rec["host"] == socket.gethostname() and rec["world_size"] == 1
    assert rec["git_commit"].removesuffix("-dirty") == head
    assert rec["args"]["max_steps"] == 3 and rec["args"]["log_interval"] == 3 and rec["args"]["resume"] is True
    assert rec["precision"] == "fp32"
    assert json.loads(first)["args"]["max_steps"] == 2  # the first start's settings


def test_two_jobs_started_at_once_on_one_folder_one_is_refused(tmp_path, fashion_mnist_dir):
    """Two jobs on the same folder at the same moment both find it empty; the flock on run/.lock lets one in. The
    other stops with a message naming the holder; the winner trains on."""
    args = mlp_args(tmp_path, fashion_mnist_dir, "--epochs", "1000", "--log-interval", "1")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_single(args, log) for log in logs]
    try:
        t0 = time.time()
        while all(p.poll() is None for p in procs):
            assert time.time() - t0 < 180, "neither job was refused: " + logs[0].read_text()[-2000:]
            time.sleep(0.2)
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = procs[1 - loser]
        out = logs[loser].read_text()
        assert procs[loser].returncode != 0
        assert (f"--output-dir {tmp_path / 'run'} is in use by another job (host {socket.gethostname()}, pid "
                f"{winner.pid}, since ") in out, out[-3000:]
        assert "Traceback" not in out
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # the winner goes on to train
            assert winner.poll() is None, logs[1 - loser].read_text()[-3000:]
            time.sleep(0.2)
        assert winner.poll() is None
    finally:
        for p in procs:
            stop(p)
    print(f"two jobs at once: job {loser} refused after {time.time() - t0:.1f} s")


def test_an_output_dir_that_is_not_shared_between_nodes_stops_every_rank(tmp_path, fashion_mnist_dir):
    """Two 'nodes' (deepspeed --no_ssh, one rank each) whose --output-dir is a different local folder: rank 0 writes
    a token there, rank 1 cannot read it; both stop with the message instead of training into two folders."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, procs, logs = free_port(), [], []
    t0 = time.time()
    try:
        for node in range(2):
            log = tmp_path / f"node{node}.log"
            cmd = [DEEPSPEED, "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(node), "--master_addr",
                   "127.0.0.1", "--master_port", str(port), "train/imagenet.py",
                   *mlp_args(tmp_path, fashion_mnist_dir, "--max-steps", "2", run=f"node{node}-local")]
            with log.open("w") as out:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            logs.append(log)
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            stop(p)
    took = time.time() - t0
    assert all(p.returncode != 0 for p in procs), [log.read_text()[-2000:] for log in logs]
    host = socket.gethostname()
    assert (f"error: --output-dir {tmp_path / 'node0-local'} is not one folder shared by every node: rank(s) 1 "
            f"({host}) do not see the file rank 0 ({host}) wrote there") in logs[0].read_text()
    assert not (tmp_path / "node0-local" / "metrics.jsonl").exists()  # stopped before training
    assert not list((tmp_path / "node0-local").glob(".shared-check-*"))
    print(f"unshared output folder: both nodes stopped {took:.1f} s after their start")
