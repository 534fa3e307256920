"""Shared test helpers: the repo root, the real deepspeed launcher, the Fashion-MNIST folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def launch(args: list[str], *, ranks: int = 2, timeout: float = 600, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run train/imagenet.py (or another script given first in args) through the real deepspeed launcher."""
    script = args[0] if args and args[0].endswith(".py") else "train/imagenet.py"
    rest = args[1:] if args and args[0].endswith(".py") else args
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *rest]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_single(args: list[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run train/imagenet.py as one plain python process."""
    proc = subprocess.run([sys.executable, "train/imagenet.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {FASHION_MNIST}: install Debian's dataset-fashion-mnist "
                    f"(tests/run.sh does) or set FASHION_MNIST_DIR")
    return FASHION_MNIST


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def pytest_collection_modifyitems(config, items):
    """The GPU tier runs only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (GPU tier)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """Safety net for DeepSpeed's CPU all-reduce buffers (66 MB each in RAM-backed /dev/shm; see
    train/distributed.py): remove any that runs started by this session left, e.g. a rank killed during start-up."""
    import time

    start = time.time()
    yield
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_*"):
        try:
            if path.stat().st_mtime >= start:
                path.unlink()
        except FileNotFoundError:
            pass


_exit_status: int | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End pytest as an entry point ends (train/distributed.exit_process): tests that call deepspeed.initialize in
    this process leave its gloo threads running to the end, where a finalising interpreter aborts now and then
    (exit -6 after every test passed). The summary is printed by now; the exit code is pytest's."""
    if _exit_status is not None and "deepspeed" in sys.modules:
        from train.distributed import exit_process

        exit_process(_exit_status)
