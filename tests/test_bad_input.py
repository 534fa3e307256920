"""Bad input at the edges of a run: the hostfile, --resume, names on the command line, unsafe checkpoint files.

(Config and data faults: tests/test_config.py, tests/test_data.py and test_train_e2e.py's fail-fast cases.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import DEEPSPEED, REPO, child_env, run_single, write_config
from test_train_e2e import sgd_config

from train.hostfile import HostfileError, parse

pytestmark = pytest.mark.launcher


def test_a_hostfile_line_that_does_not_parse(tmp_path):
    """The deepspeed runner names the line and stops before any rank starts; `python -m train.hostfile` says where
    and what it expected, for every bad line at once."""
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode1 slots=2\nnode2 slots two\nnode3 slots=0\nnode1 slots=4\n")
    proc = subprocess.run([DEEPSPEED, "--hostfile", str(hosts), "train/imagenet.py", "--deepspeed_config",
                           "ds_configs/demo.json"], cwd=REPO, capture_output=True, text=True, env=child_env(),
                          timeout=120)
    assert proc.returncode != 0
    assert "Hostfile contains a bad entry: node2 slots two" in proc.stderr
    with pytest.raises(HostfileError) as err:
        parse(hosts)
    assert str(err.value).splitlines() == [
        f"{hosts}:3: 'node2 slots two' does not parse; expected 'HOSTNAME slots=N' (N GPUs on that host), one host "
        f"per line; '#' starts a comment",
        f"{hosts}:4: host 'node3' has slots=0; expected at least 1",
        f"{hosts}:5: host 'node1' already listed on line 2; the runner refuses duplicates"]
    cli = subprocess.run([sys.executable, "-m", "train.hostfile", str(hosts)], cwd=REPO, capture_output=True,
                         text=True)
    assert cli.returncode == 2 and cli.stderr.startswith(f"error: {hosts}:3:")
    hosts.write_text("node1 slots=8\nnode2 slots=8  # rack 2\n")
    assert parse(hosts) == {"node1": 8, "node2": 8}
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(HostfileError, match="no hosts; expected lines of the form 'HOSTNAME slots=N'"):
        parse(tmp_path / "empty")


def mlp_args(tmp_path, fashion_mnist_dir, *extra: str) -> list[str]:
    cfg = write_config(tmp_path / "c.json", sgd_config(64, 32))
    return ["--deepspeed_config", str(cfg), "--dataset", "fashion-mnist", "--data-dir", str(fashion_mnist_dir),
            "--arch", "mlp", "--train-subset", "256", "--val-subset", "64", "--no-wandb",
            "--output-dir", str(tmp_path / "run"), *extra]


def test_resume_without_a_checkpoint_says_so_and_keeps_the_folder(tmp_path, fashion_mnist_dir):
    """A run that died before its first save: --resume refuses and points to --overwrite; nothing is deleted."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    proc = run_single(mlp_args(tmp_path, fashion_mnist_dir, "--resume"), check=False)
    assert proc.returncode == 2  # bad input, as a bad config
    assert (f"--resume: no checkpoint in {run / 'checkpoints'} (the run stopped before its first save, or the folder "
            f"is not a run); pass --overwrite instead of --resume to start this run afresh") in proc.stderr
    assert (run / "config.json").read_text() == "{}" and (run / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("flag,value,want", [
    ("--dataset", "imagenet21k",
     "argument --dataset: invalid choice: 'imagenet21k' (choose from 'imagenet', 'fashion-mnist', 'synthetic')"),
    ("--arch", "resnet51", "argument --arch: invalid choice: 'resnet51' (choose from 'resnet101', "),
    ("--precision", "fp8", "argument --precision: invalid choice: 'fp8' (choose from 'auto', 'fp32', 'bf16', 'fp16')"),
])
def test_unknown_names_on_the_command_line_list_the_known_ones(tmp_path, fashion_mnist_dir, flag, value, want):
    """The first case through the entry point (the process exits 2); the others through its parser, which is what
    the entry point runs first (train/cli.entry), in this process."""
    args = [*mlp_args(tmp_path, fashion_mnist_dir), flag, value]
    if flag == "--dataset":
        proc = run_single(args, check=False)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = parse_in_process(args)
    assert code == 2 and want in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def parse_in_process(args: list[str]) -> tuple[int, str]:
    """train/imagenet.py's command-line parser on ``args``: (the exit code it asks for, what it wrote to stderr)."""
    import contextlib
    import io

    from train.imagenet import get_args_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        get_args_parser().parse_args(args)
    return int(stop.value.code), err.getvalue()


@pytest.mark.parametrize("lr", [0, -0.1])
def test_zero_or_negative_lr(tmp_path, fashion_mnist_dir, lr):
    cfg = sgd_config(64, 32, lr=lr, scheduler=False)
    args = mlp_args(tmp_path, fashion_mnist_dir)
    write_config(tmp_path / "c.json", cfg)
    proc = run_single(args, check=False)
    assert proc.returncode == 2
    assert f"error: optimizer lr must be a positive number, got {lr!r}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, fashion_mnist_dir):
    """A checkpoint file with a pickled call in it (here: open(marker, 'w')) is refused with a message naming the
    file; nothing runs. --trusted-checkpoint loads it the old way, and the call does run: what the default avoids.
    Then the same folder with a truncated file, and resumed with another ZeRO stage."""
    args = mlp_args(tmp_path, fashion_mnist_dir, "--max-steps", "2")
    run_single(args)
    tag = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    model_file = tmp_path / "run" / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    state = torch.load(model_file, weights_only=False)
    state["payload"] = Payload()
    torch.save(state, model_file)
    proc = run_single([*args, "--resume"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error (rank 0): checkpoint file {model_file} holds more than tensors and plain DeepSpeed" in proc.stderr
    assert "(it refers to io.open)" in proc.stderr and "pass --trusted-checkpoint" in proc.stderr
    assert not marker.exists()
    run_single([*args, "--resume", "--trusted-checkpoint"])
    assert marker.exists()
    resumes = (tmp_path / "run" / "resumes.jsonl").read_text().splitlines()  # config.json keeps the first start's
    assert json.loads(resumes[-1])["args"]["trusted_checkpoint"] is True

    # A truncated file: named, with what to do, no traceback.
    model_file.write_bytes(model_file.read_bytes()[:1000])
    proc = run_single([*args, "--resume"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error (rank 0): cannot read checkpoint file {model_file}: " in proc.stderr
    assert "the file is truncated or corrupt. Write an earlier tag into checkpoints/latest" in proc.stderr

    # Another ZeRO stage than the run was written with: re-sharded (train/reshard.py), which reads the checkpoint
    # through the same safe loader and refuses the truncated file the same way.
    write_config(tmp_path / "c.json", sgd_config(64, 32, stage=1))
    proc = run_single([*args, "--resume"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "elastic resume: 1 rank(s), ZeRO-0 -> 1 rank(s), ZeRO-1" in proc.stdout
    assert f"error (rank 0): cannot read checkpoint file {model_file}: " in proc.stderr


@pytest.mark.parametrize("flag,value,want", [
    ("--log-interval", "0", "expected an integer >= 1, got 0"),
    ("--save-interval", "-5", "expected an integer >= 0, got -5"),
    ("--max-skipped-steps", "-1", "expected an integer >= 0, got -1"),
    ("--max-steps", "ten", "expected an integer >= 1, got 'ten'"),
    ("--dist-timeout", "0", "expected a positive number, got 0"),
])
def test_out_of_range_flags_name_the_value(tmp_path, fashion_mnist_dir, flag, value, want):
    code, err = parse_in_process([*mlp_args(tmp_path, fashion_mnist_dir), flag, value])
    assert code == 2 and f"argument {flag}: {want}" in err
