"""Two nodes on one machine, started the way the README tells cluster users; the weights equal one node's, bit for bit.

A hostfile of two distinct loopback names (``localhost`` and ``127.0.0.1``, one slot each) makes the deepspeed
launcher see two nodes of one rank each. Without ssh: two ``deepspeed --hostfile H --no_ssh --node_rank K`` processes
run at the same time. With ssh: a private sshd on a loopback port and the plain ``deepspeed --hostfile H`` command,
which reaches both "nodes" through pdsh. Both train 3 fp32 steps of the small ResNet and must give exactly the weights
of the same config on one node with 2 ranks (``--num_gpus 2``).

Why exactly, and what had to be pinned (measured, 3 steps, ZeRO-1, 768 images): the gradient all-reduce is gloo's in
both layouts (DeepSpeed's CPU shared-memory all-reduce serves only ``inference_all_reduce``, tensor-parallel
inference), and a sum of two operands does not depend on their order (a + b == b + a in IEEE arithmetic). What
differed was the number of intra-op threads: on CPU the training script gives each rank cpu_count // LOCAL_SIZE
threads unless OMP_NUM_THREADS is set, so one slot per node means twice the threads of two slots on one node, and
the convolutions split their sums by thread: max abs weight difference 3.5e-4 with the default threads (the step-1
loss already differs), 0.0 with ``OMP_NUM_THREADS=1`` on both sides (and 0.0 between one node at 2 threads per rank
and two nodes at their default 2). The bound is therefore 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DEEPSPEED, REPO, child_env, free_port, launch, read_metrics

from train import hostfile

pytestmark = pytest.mark.launcher

HOSTS = ("localhost", "127.0.0.1")
PINNED = {"OMP_NUM_THREADS": "1"}  # the same intra-op threads per rank in both layouts (see the module docstring)
STEPS = 3
TIMEOUT = 240.0


def train_args(data_dir: Path, run: Path) -> list[str]:
    return ["--deepspeed_config", "ds_configs/demo.json", "--dataset", "fashion-mnist", "--data-dir", str(data_dir),
            "--arch", "resnet_small", "--train-subset", "768", "--val-subset", "100", "--max-steps", str(STEPS),
            "--precision", "fp32", "--no-wandb", "--log-interval", "1", "--output-dir", str(run)]


def write_hostfile(path: Path) -> Path:
    path.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
    assert hostfile.parse(path) == {host: 1 for host in HOSTS}
    return path


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["kind"] == "step"}


def assert_same_run(run: Path, reference: Path) -> None:
    assert json.loads((run / "config.json").read_text())["derived"]["world_size"] == 2
    assert sorted(step_losses(run)) == list(range(1, STEPS + 1))
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    diff = max_abs_diff(a, b)
    assert diff == 0.0, f"max abs weight difference to one node {diff:.3g}; expected 0 (bit for bit)"
    assert step_losses(run) == step_losses(reference)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            tails = "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs)
            raise AssertionError(f"multi-node job not done within {timeout:.0f} s:\n{tails}") from None
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, f"{log.name}: exit {proc.returncode}:\n{log.read_text()[-4000:]}"


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, fashion_mnist_dir) -> Path:
    """The reference: the same config on one node with 2 ranks."""
    run = tmp_path_factory.mktemp("one_node") / "run"
    launch(train_args(fashion_mnist_dir, run), ranks=2, timeout=TIMEOUT, env=child_env(**PINNED))
    return run


def test_two_nodes_without_ssh_match_one_node(tmp_path, fashion_mnist_dir, one_node):
    """The README's command for clusters without ssh, once per node, both at the same time."""
    hosts = write_hostfile(tmp_path / "hosts")
    run, port = tmp_path / "run", free_port()
    procs, logs = [], []
    try:
        for node in range(len(HOSTS)):
            log = tmp_path / f"node{node}.log"
            cmd = [DEEPSPEED, "--hostfile", str(hosts), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "train/imagenet.py", *train_args(fashion_mnist_dir, run)]
            with log.open("w") as out:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=child_env(**PINNED), stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            logs.append(log)
        wait_all(procs, logs, TIMEOUT)
    finally:
        for proc in procs:
            kill_group(proc)
    for node, log in enumerate(logs):  # each launcher saw 2 nodes of 1 rank and started its own
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in log.read_text()
    assert_same_run(run, one_node)


def find_sshd() -> str | None:
    return shutil.which("sshd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def start_sshd(folder: Path) -> tuple[subprocess.Popen, Path]:
    """A private sshd on a loopback port with a fresh host key, accepting one fresh user key; returns the daemon and
    the folder of an ``ssh`` wrapper that uses the matching client settings (put it first on PATH)."""
    folder.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    port = free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n")
    (folder / "ssh_config").write_text(
        f"Host {' '.join(HOSTS)}\n  Port {port}\n  IdentityFile {folder / 'user_key'}\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec "{shutil.which("ssh")}" -F "{folder / "ssh_config"}" "$@"\n')
    wrapper.chmod(0o755)
    if os.geteuid() == 0:  # sshd run by root wants its privilege separation folder (the service unit creates it)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = (folder / "sshd.log").open("w")
    daemon = subprocess.Popen([find_sshd(), "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise AssertionError(f"sshd exited ({daemon.returncode}):\n{(folder / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return daemon, bin_dir
        except OSError:
            time.sleep(0.1)
    daemon.kill()
    raise AssertionError(f"sshd did not listen on 127.0.0.1:{port} within 10 s:\n{(folder / 'sshd.log').read_text()}")


def stop_sshd(daemon: subprocess.Popen) -> None:
    """The daemon and the sessions it started (rank processes of a job that did not end): only this test's sshd."""
    try:
        sessions = psutil.Process(daemon.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        sessions = []
    for proc in sessions:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    kill_group(daemon)


def test_two_nodes_through_pdsh_and_ssh_match_one_node(tmp_path, fashion_mnist_dir, one_node):
    """The README's command for clusters with passwordless ssh: ``deepspeed --hostfile H``; DeepSpeed's ssh check,
    then pdsh starts one launcher per host over ssh (node rank from pdsh's %n)."""
    missing = [name for name, path in (("sshd (Debian: openssh-server)", find_sshd()),
                                       ("ssh, ssh-keygen (Debian: openssh-client)", shutil.which("ssh-keygen")),
                                       ("pdsh (Debian: pdsh)", shutil.which("pdsh"))) if path is None]
    if missing:
        pytest.skip(f"the pdsh path needs {', '.join(missing)}; .ci/run installs them as root")
    hosts = write_hostfile(tmp_path / "hosts")
    home = tmp_path / "home"  # the launcher reads ~/.deepspeed_env and exports its lines to every node
    home.mkdir()
    # PATH too, as on a cluster whose login shell lacks the job's environment: an ssh session's default PATH found
    # another ninja (the system's 1.11 against the venv's 1.13, whose build logs disagree), and every node rebuilt
    # DeepSpeed's CPU communication op (about 45-50 CPU-s), as did the next local run.
    # And a TORCH_EXTENSIONS_DIR set here: without it the nodes build into ~/.cache, apart from the local runs.
    exports = {**PINNED, "PATH": os.environ.get("PATH", "")}
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        exports["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    (home / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in exports.items()))
    daemon, ssh_bin = start_sshd(tmp_path / "sshd")
    env = child_env(HOME=str(home), PATH=f"{ssh_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    run, log = tmp_path / "run", tmp_path / "pdsh.log"
    cmd = [DEEPSPEED, "--hostfile", str(hosts), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train/imagenet.py", *train_args(fashion_mnist_dir, run)]
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        wait_all([proc], [log], TIMEOUT)
    finally:
        if proc is not None:
            kill_group(proc)
        stop_sshd(daemon)
    text = log.read_text()
    assert "Running on the following workers: localhost,127.0.0.1" in text
    node_ranks = {}  # pdsh prefixes each remote line with its host; each host's launcher saw 2 nodes of 1 rank
    for host in HOSTS:
        found = re.findall(rf"^{re.escape(host)}: .*nnodes=2, num_local_procs=1, node_rank=(\d+)$", text, re.M)
        assert len(found) == 1, f"{host}: {found}"
        node_ranks[host] = int(found[0])
    assert sorted(node_ranks.values()) == [0, 1]
    assert_same_run(run, one_node)
