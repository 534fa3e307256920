"""Reliability through the real launcher: exact resume, preemption (SIGTERM), a rank killed with SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch
from conftest import DEEPSPEED, REPO, child_env, free_port, launch, read_metrics, write_config
from test_data import make_imagefolder
from test_train_e2e import sgd_config

pytestmark = pytest.mark.launcher

COMMON = ["--deepspeed_config", "ds_configs/demo.json", "--dataset", "fashion-mnist", "--arch", "resnet_small",
          "--val-subset", "200", "--no-wandb", "--log-interval", "1", "--precision", "fp32"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_resume_mid_epoch_is_bit_exact(tmp_path, fashion_mnist_dir):
    """2 ranks, ZeRO-1, fp32: stop after 5 steps (mid-epoch: 10 steps per epoch), resume to 12; the weights equal
    those of an uninterrupted 12-step run bit for bit (same data order, lr, optimizer state, flips)."""
    data = ["--data-dir", str(fashion_mnist_dir), "--train-subset", "2560"]
    launch([*COMMON, *data, "--output-dir", str(tmp_path / "a"), "--max-steps", "12"])
    launch([*COMMON, *data, "--output-dir", str(tmp_path / "b"), "--max-steps", "5"])
    launch([*COMMON, *data, "--output-dir", str(tmp_path / "b"), "--max-steps", "12", "--resume"])
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert max_abs_diff(a, b) == 0.0
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a") if r["kind"] == "step"}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b") if r["kind"] == "step"}
    assert la == lb and sorted(la) == list(range(1, 13))


def start(args: list[str]) -> subprocess.Popen:
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train/imagenet.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_step(run, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        try:
            if any(r["kind"] == "step" and r["step"] >= step for r in read_metrics(run)):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for p in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(p.cmdline()):
            return p
    raise AssertionError(f"rank {rank} not found")


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    """Preemption on the ImageNet path (loader worker processes): SIGTERM to the deepspeed launcher process only,
    which terminates its ranks one after another (and kills a rank still alive 30 s later). Every rank must agree
    to save the same step; the loader workers must not die first."""
    root = make_imagefolder(tmp_path / "imnet", classes=("n01", "n02"), per_class=40, size=(64, 48))
    run = tmp_path / "run"
    args = ["--deepspeed_config", str(write_config(tmp_path / "c.json", sgd_config(8, 4, lr=0.05, epochs=50))),
            "--dataset", "imagenet", "--data-dir", str(root), "--arch", "resnet18", "--image-size", "32",
            "--workers", "1", "--output-dir", str(run), "--no-wandb", "--log-interval", "1"]
    proc = start(args)
    wait_for_step(run, 3, proc)
    launcher = next(p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(
        p.cmdline()))
    launcher.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "SIGTERM: saving a checkpoint at step" in out
    assert "exited unexpectedly" not in out
    saved = int((run / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert saved >= 3
    resumed = launch([*args, "--resume", "--max-steps", str(saved + 2)])
    assert f"step {saved}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run) if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == saved + 2  # no step logged twice after the resume


def test_a_killed_rank_stops_the_launcher_and_resume_loses_at_most_one_interval(tmp_path, fashion_mnist_dir):
    run = tmp_path / "run"
    args = [*COMMON, "--data-dir", str(fashion_mnist_dir), "--train-subset", "12800", "--output-dir", str(run),
            "--save-interval", "2", "--dist-timeout", "1"]
    proc = start(args)
    wait_for_step(run, 5, proc)
    rank_process(proc, 1).kill()  # SIGKILL: no handler runs
    t_kill = time.time()
    proc.communicate(timeout=120)
    exit_after = time.time() - t_kill
    assert proc.returncode != 0
    assert exit_after < 60, f"launcher took {exit_after:.1f} s to exit"
    reached = max(r["step"] for r in read_metrics(run) if r["kind"] == "step")
    saved = int((run / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert reached - saved <= 2  # at most one checkpoint interval lost
    print(f"killed rank: launcher exit after {exit_after:.1f} s; steps lost on resume: {reached - saved}")
    resumed = launch([*args, "--resume", "--max-steps", str(saved + 1)])
    assert "resumed from" in resumed.stdout and f"step {saved}" in resumed.stdout


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lars_resume_is_bit_exact_in_every_zero_stage(tmp_path, fashion_mnist_dir, stage):
    """LARS (layer-wise trust ratios over DeepSpeed's flat ZeRO partitions), 2 ranks, fp32, a checkpoint after every
    step. A copy of the run folder rewound to its step-3 checkpoint (mid-epoch: 10 steps per epoch) and resumed to
    step 8 ends with the weights of the uninterrupted 8-step run, bit for bit."""
    from test_faults import config, run_args

    args = run_args(tmp_path, fashion_mnist_dir, config("LARS", stage, "fp32"), "fp32")
    a, b = tmp_path / "run", tmp_path / "b"
    launch([*args, "--max-steps", "8"])
    shutil.copytree(a, b)
    (b / "model.pt").unlink()
    (b / "checkpoints" / "latest").write_text("step3")
    out = launch([*[str(b) if x == str(a) else x for x in args], "--max-steps", "8", "--resume"])
    assert "resumed from" in out.stdout and "epoch 0, step 3" in out.stdout
    assert [r["step"] for r in read_metrics(b) if r["kind"] == "step"] == list(range(1, 9))
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert max_abs_diff(wa, wb) == 0.0
    step3 = torch.load(b / "checkpoints" / "step3" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert max_abs_diff(wa, {k: v.float() for k, v in step3.items()}) > 0  # the comparison can fail


def test_a_crash_in_the_middle_of_a_save_leaves_latest_at_the_previous_checkpoint(tmp_path, fashion_mnist_dir):
    """ResNet-50 (about 300 MB per checkpoint with ZeRO-1 state), a save after every step. When the folder of a new
    save has its first bytes, every process of the job is frozen (SIGSTOP) while the files are being written,
    checked, then killed with SIGKILL: 'latest' still names the previous checkpoint, and --resume continues from it."""
    run = tmp_path / "run"
    args = ["--deepspeed_config", str(write_config(tmp_path / "c.json", sgd_config(16, 4, stage=1, epochs=5))),
            "--dataset", "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--arch", "resnet50",
            "--image-size", "32", "--train-subset", "320", "--val-subset", "32", "--precision", "fp32",
            "--no-wandb", "--log-interval", "1", "--save-interval", "1", "--output-dir", str(run)]
    proc = start(args)
    ckpt = run / "checkpoints"
    t0 = time.time()
    while not (ckpt / "latest").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "no first checkpoint"
        time.sleep(0.05)
    previous = (ckpt / "latest").read_text()
    new = ckpt / f"step{int(previous.removeprefix('step')) + 1}"
    while not (new.exists() and any(f.stat().st_size > 0 for f in new.iterdir())):  # the first bytes are written
        assert proc.poll() is None and time.time() - t0 < 300, "no second checkpoint"
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGSTOP)  # the whole job: deepspeed runner, launch.py, both ranks
    try:
        sizes_done = {f.name: f.stat().st_size for f in (ckpt / previous).iterdir()}
        sizes_now = {f.name: f.stat().st_size for f in new.iterdir()}
        assert (ckpt / "latest").read_text() == previous
        assert sizes_now != sizes_done, "the save had already finished: the kill did not land in the middle of it"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert (ckpt / "latest").read_text() == previous
    print(f"killed during the save of {new.name}: {len(sizes_now)} of {len(sizes_done)} files begun, "
          f"{sum(sizes_now.values()):,} of {sum(sizes_done.values()):,} bytes written")
    resumed = launch([*args, "--resume", "--max-steps", str(int(previous.removeprefix("step")) + 1)])
    assert f"step {previous.removeprefix('step')}" in resumed.stdout
    assert (ckpt / "latest").read_text() == new.name  # the same tag, now complete, written over the partial one


def test_a_frozen_rank_makes_the_others_time_out_instead_of_hanging(tmp_path, fashion_mnist_dir):
    """A rank that stops answering without dying (SIGSTOP: a hung device, a paused machine) is invisible to the
    launcher; the other rank's next collective must fail after --dist-timeout (here 0.25 min), ending the job."""
    run = tmp_path / "run"
    timeout_s = 15
    args = [*COMMON, "--data-dir", str(fashion_mnist_dir), "--train-subset", "12800", "--output-dir", str(run),
            "--dist-timeout", str(timeout_s / 60)]
    proc = start(args)
    wait_for_step(run, 3, proc)
    rank_process(proc, 1).suspend()
    t_freeze = time.time()
    try:
        out, _ = proc.communicate(timeout=timeout_s + 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    exit_after = time.time() - t_freeze
    assert proc.returncode != 0
    assert timeout_s - 2 <= exit_after < timeout_s + 60, f"job ended {exit_after:.1f} s after the freeze"
    assert "error (rank 0): a collective waited --dist-timeout 0.25 min for another rank and gave up" in out
    print(f"frozen rank: job ended {exit_after:.1f} s after the freeze (timeout {timeout_s} s)")


def test_sigterm_in_a_long_accumulation_is_acted_on_within_the_grace_period(tmp_path, fashion_mnist_dir):
    """Goyal's recipes on few ranks accumulate hundreds of micro-steps per optimizer step (lars-32k on 2 ranks: 512),
    longer than a scheduler's 30 s grace after SIGTERM. Here one step is 500 micro-steps per rank. SIGTERM to the
    launcher in the middle of step 2: the ranks agree between micro-steps, put back the BatchNorm statistics the
    partial step moved, save step 1 and exit well before step 2 could have finished; --resume redoes step 2 from its
    first micro-batch and ends with the weights of an uninterrupted run, bit for bit."""
    micro, accum = 4, 500
    cfg = write_config(tmp_path / "c.json", sgd_config(micro * accum * 2, micro, scheduler=False, epochs=1))
    common = ["--deepspeed_config", str(cfg), "--dataset", "fashion-mnist", "--data-dir", str(fashion_mnist_dir),
              "--arch", "resnet_small", "--train-subset", str(3 * micro * accum * 2), "--val-subset", "64",
              "--precision", "fp32", "--no-wandb", "--log-interval", "1", "--max-steps", "2"]
    run = tmp_path / "run"
    proc = start([*common, "--output-dir", str(run)])
    wait_for_step(run, 1, proc)
    time.sleep(1.0)  # well inside step 2 (a step of 500 micro-steps takes several seconds)
    launcher = next(p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(
        p.cmdline()))
    launcher.send_signal(signal.SIGTERM)
    t_term = time.time()
    out, _ = proc.communicate(timeout=60)
    exit_after = time.time() - t_term
    assert proc.returncode != 0
    assert "SIGTERM: saving a checkpoint at step 1 and stopping (the step under way is dropped" in out, out[-3000:]
    assert "exited unexpectedly" not in out
    assert (run / "checkpoints" / "latest").read_text() == "step1"
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "step"] == [1]
    assert exit_after < 15, f"ranks took {exit_after:.1f} s after SIGTERM (a scheduler kills after 30 s)"
    print(f"SIGTERM mid-accumulation ({accum} micro-steps per step): all ranks out {exit_after:.1f} s after it")

    launch([*common, "--output-dir", str(run), "--resume"])
    launch([*common, "--output-dir", str(tmp_path / "ref")])
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
