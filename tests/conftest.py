"""Shared test helpers: the repo root, the real deepspeed launcher, the Fashion-MNIST folder."""

from __future__ import annotations

import base64
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train import REPO
from train.distributed import free_port  # noqa: F401  (the tests import it from here)

sys.path.insert(0, str(REPO / "tests" / "workers"))  # the launcher's worker scripts, which tests also import
FASHION_MNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE",
                   "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in WORLD_VARIABLES:  # a world left in this process by an in-process test is not the child's
        env.pop(key, None)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    env.pop("TEST_CPU_REPORT", None)  # a pytest started by a test must not write over this session's report
    return env


def node_launch(script: str, args: list[str], ranks: int = 2, port: int | None = None) -> list[str]:
    """The command ``deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS`` runs on one machine
    (deepspeed/launcher/runner.py, its single-node branch): DeepSpeed's per-node launcher,
    ``deepspeed.launcher.launch``, which sets each rank's environment, starts the ranks, passes SIGTERM/SIGINT on
    and ends the others when one fails. Tests whose subject is a run, not the ``deepspeed`` command, start it
    directly: the runner in front of it only imports DeepSpeed (2.6 CPU-s) to build this line.
    test_train_e2e checks the line against the one the runner logs; the command's own tests (the README's
    command, hostfiles, many nodes) run the runner."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(ranks))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", "--enable_each_rank_log=None",
            "--log_level=info", script, *args]


def split_script(args: list[str]) -> tuple[str, list[str]]:
    """(script, its arguments): a script given first in ``args``, else train/imagenet.py."""
    return (args[0], args[1:]) if args and args[0].endswith(".py") else ("train/imagenet.py", args)


def launch(args: list[str], *, ranks: int = 2, timeout: float = 600, check: bool = True,
           env: dict[str, str] | None = None, runner: bool = False) -> subprocess.CompletedProcess:
    """Run train/imagenet.py (or another script given first in args) through DeepSpeed's launcher: its per-node
    launcher (:func:`node_launch`), or with ``runner`` the ``deepspeed`` command in front of it."""
    script, rest = split_script(args)
    cmd = ([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *rest] if runner
           else node_launch(script, rest, ranks))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_single(args: list[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run train/imagenet.py (or another script given first in args) as one plain python process."""
    script, rest = split_script(args)
    proc = subprocess.run([sys.executable, script, *rest], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def fashion_mnist_gz_dir() -> Path:
    """Debian's folder of gzip'd IDX files, as a user's run reads it."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {FASHION_MNIST}: install Debian's dataset-fashion-mnist "
                    f"(tests/run.sh does) or set FASHION_MNIST_DIR")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def fashion_mnist_dir(fashion_mnist_gz_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same files as plain IDX (train.data.read_idx reads both), decompressed once per session: every rank of
    every run would otherwise gunzip 31 MB again, about 0.25 CPU-s a rank. The gzip path keeps its own tests
    (test_data's IDX tests, and test_train_e2e's first run reads Debian's folder)."""
    import gzip

    out = tmp_path_factory.mktemp("fashion-mnist")
    for gz in sorted(fashion_mnist_gz_dir.glob("*-ubyte.gz")):
        (out / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    return out


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

    start = time.time()
    yield
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_*"):
        try:
            if path.stat().st_mtime >= start:
                path.unlink()
        except FileNotFoundError:
            pass


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process, and of its children that have been waited for.

    RUSAGE_CHILDREN counts a child once it is reaped, and it includes that child's own reaped descendants: the
    deepspeed launcher waits for ``deepspeed.launcher.launch``, which waits for every rank it started, so a
    launcher test's ranks are in it once ``subprocess.run`` returns."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


_cpu_report: list[tuple[str, float, float, float]] = []  # (test id, own CPU s, children's CPU s, wall s)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With TEST_CPU_REPORT=PATH, account each test's CPU seconds (setup, call and teardown, so a module fixture's
    launch is charged to the test that first needs it, its teardown to the last one)."""
    if not os.environ.get("TEST_CPU_REPORT"):
        yield
        return

    (me0, kids0), t0 = _cpu_seconds(), time.perf_counter()
    yield
    (me1, kids1), t1 = _cpu_seconds(), time.perf_counter()
    _cpu_report.append((item.nodeid, me1 - me0, kids1 - kids0, t1 - t0))


def write_cpu_report(path: Path, rows: list[tuple[str, float, float, float]]) -> None:
    """The per-test table (most CPU first) and the per-file totals, with the load average at the end."""
    lines = [f"{'cpu_s':>8} {'self_s':>8} {'child_s':>8} {'wall_s':>8}  test"]
    for nodeid, me, kids, wall in sorted(rows, key=lambda r: -(r[1] + r[2])):
        lines.append(f"{me + kids:8.1f} {me:8.1f} {kids:8.1f} {wall:8.1f}  {nodeid}")
    files: dict[str, list[float]] = {}
    for nodeid, me, kids, wall in rows:
        f = files.setdefault(nodeid.split("::")[0], [0.0, 0.0, 0.0, 0])
        f[0], f[1], f[2], f[3] = f[0] + me, f[1] + kids, f[2] + wall, f[3] + 1
    lines += ["", f"{'cpu_s':>8} {'self_s':>8} {'child_s':>8} {'wall_s':>8} {'tests':>5}  file"]
    for name, (me, kids, wall, n) in sorted(files.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        lines.append(f"{me + kids:8.1f} {me:8.1f} {kids:8.1f} {wall:8.1f} {n:5d}  {name}")
    total = sum(r[1] + r[2] for r in rows)
    lines.append(f"{total:8.1f} {'':8} {'':8} {sum(r[3] for r in rows):8.1f} {len(rows):5d}  all "
                 f"(load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    path.write_text("\n".join(lines) + "\n")


_exit_status: int | None = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)
    if os.environ.get("TEST_CPU_REPORT") and _cpu_report:
        write_cpu_report(Path(os.environ["TEST_CPU_REPORT"]), _cpu_report)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End pytest as an entry point ends (train/distributed.exit_process): tests that call deepspeed.initialize in
    this process leave its gloo threads running to the end, where a finalising interpreter aborts now and then
    (exit -6 after every test passed). The summary is printed by now; the exit code is pytest's."""
    if _exit_status is not None and "deepspeed" in sys.modules:
        from train.distributed import exit_process

        exit_process(_exit_status)
