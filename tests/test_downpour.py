"""Downpour SGD (train/downpour.py, train/ps/): real RPC processes on loopback, real data.

Reference results are computed here independently: torch.optim.Adagrad / torch.optim.SGD on one model, fed the
batches that train.data.GlobalBatchSampler gives (the data rule train/downpour.py documents: replica j of W takes
slice j of each global batch of W x b samples).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env, free_port, read_metrics, write_config

from analysis.runs import load_run
from train import cli, downpour
from train.config import ConfigError
from train.data import GlobalBatchSampler, fashion_mnist
from train.models import build_model
from train.ps import shard as ps
from train.ps.records import tau_summary
from train.ps.setup import describe_slices, failure_report

SEED = 0
LR, ACC0 = 0.05, 0.1


def downpour_cfg(replicas: int, shards: int, optimizer: str = "adagrad", epochs: int = 1, **extra) -> dict:
    return {"downpour": {"model": "mlp", "dataset": "fashion-mnist", "replicas": replicas, "shards": shards,
                         "batch_per_replica": 32, "n_fetch": 1, "n_push": 1, "optimizer": optimizer, "lr": LR,
                         "initial_accumulator_value": ACC0, "warmstart_steps": 0, "epochs": epochs, **extra}}


def run_downpour(tmp_path, name: str, cfg: dict, *flags: str, check: bool = True, timeout: float = 300):
    path = write_config(tmp_path / f"{name}.json", cfg)
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "train/downpour.py", "--deepspeed_config", str(path), "--output-dir",
                           str(out), "--no-wandb", "--val-subset", "500", "--log-interval", "5", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"downpour failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, out


def summary(out) -> dict:
    recs = read_metrics(out)
    assert recs[-1]["kind"] == "summary"
    return recs[-1]


@pytest.fixture(scope="module")
def data(fashion_mnist_dir):
    return fashion_mnist(fashion_mnist_dir, 1, SEED, flip=False)


def replay(data, num_train: int, global_batch: int, steps: int, make_opt) -> dict[str, torch.Tensor]:
    """One model, one optimizer, the run's global batches in order: the reference weights."""
    torch.manual_seed(SEED)
    model = build_model("mlp", 10, 1, 28)
    opt = make_opt(model.parameters())
    sampler = GlobalBatchSampler(num_train, global_batch, global_batch, 1, 0, SEED)
    spe = sampler.steps_per_epoch
    done = 0
    for epoch in range(steps // spe + 1):
        sampler.set_epoch(epoch)
        for x, y in data.train_batches(sampler):
            if done == steps:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
    return model.state_dict()


def dean_replay(data, num_train: int, steps: int, n_fetch: int, n_push: int = 1, restarts: tuple[int, ...] = (),
                local_lr: float = LR) -> dict[str, torch.Tensor]:
    """One replica of Dean et al.'s client against torch.optim.Adagrad as the parameter server, in one process: the
    reference weights. The replica's copy takes a plain SGD step at ``local_lr`` with each gradient; every n_fetch
    steps it fetches the server's parameters, which arrive after one more step and replace its copy, less
    local_lr x the gradient it has not pushed yet; every n_push steps it pushes the gradient accrued since the last
    push. At a restart (a resume) it starts from the server's parameters, nothing accrued."""
    torch.manual_seed(SEED)
    server = build_model("mlp", 10, 1, 28)
    opt = torch.optim.Adagrad(server.parameters(), lr=LR, initial_accumulator_value=ACC0)
    local = build_model("mlp", 10, 1, 28)
    local.load_state_dict(server.state_dict())
    accrued = [torch.zeros_like(p) for p in server.parameters()]
    sampler = GlobalBatchSampler(num_train, 32, 32, 1, 0, SEED)
    done, fetched = 0, None
    for epoch in range(steps // sampler.steps_per_epoch + 1):
        sampler.set_epoch(epoch)
        for x, y in data.train_batches(sampler):
            if done == steps:
                break
            if done in restarts:
                local.load_state_dict(server.state_dict())
            elif done % n_fetch == 0:
                fetched = [p.detach().clone() for p in server.parameters()]  # in flight during this step
            local.zero_grad()
            torch.nn.functional.cross_entropy(local(x), y).backward()
            done += 1
            with torch.no_grad():
                for p, a in zip(local.parameters(), accrued, strict=True):
                    a += p.grad
                    p -= local_lr * p.grad
                if fetched is not None:  # arrived: the server's parameters less the steps not pushed yet
                    for p, f, a in zip(local.parameters(), fetched, accrued, strict=True):
                        p.copy_(f - local_lr * a)
                    fetched = None
            if done % n_push == 0 or done == steps:
                for p, a in zip(server.parameters(), accrued, strict=True):
                    p.grad = a.clone()
                    a.zero_()
                opt.step()
    return server.state_dict()


def assert_weights_equal(out, ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    got = torch.load(out / "model.pt", weights_only=True)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=0, msg=f"{k} differs from the reference")


# ---------------------------------------------------------------------------------------------------------------
# In one process: the shard's math


def test_shard_adagrad_equals_torch_adagrad_on_random_gradients():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(5, 3, generator=g)
    shard = ps.ParameterShard(0, {"w": p0}, {}, optimizer="adagrad", lr=LR, initial_accumulator_value=ACC0)
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adagrad([ref], lr=LR, initial_accumulator_value=ACC0)
    for _ in range(7):
        grad = torch.randn(5, 3, generator=g) * 3
        shard.push(0, {"w": grad}, {})
        ref.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(shard.params["w"], ref.detach(), atol=1e-7, rtol=0)
    torch.testing.assert_close(shard.state_sum["w"], opt.state[ref]["sum"], atol=1e-6, rtol=0)


def test_staleness_counts_updates_since_the_replicas_fetch():
    shard = ps.ParameterShard(0, {"w": torch.zeros(2)}, {}, optimizer="sgd", lr=1.0)
    shard.fetch(0)
    shard.fetch(1)
    taus = [shard.push(1, {"w": torch.ones(2)}, {}), shard.push(1, {"w": torch.ones(2)}, {}),
            shard.push(0, {"w": torch.ones(2)}, {})]
    assert taus == [0, 1, 2]  # replica 1 pushes twice on one fetch; replica 0 has missed both of them
    assert shard.params["w"].tolist() == [-3.0, -3.0]
    assert tau_summary(taus)["tau_hist"] == [1, 1, 1]


def test_a_shard_drops_and_counts_a_gradient_that_is_not_finite():
    shard = ps.ParameterShard(0, {"w": torch.zeros(2)}, {}, optimizer="adagrad", lr=1.0, initial_accumulator_value=0)
    assert shard.push(0, {"w": torch.tensor([float("nan"), 1.0])}, {}) is None
    assert shard.push(0, {"w": torch.tensor([3.0, float("inf")])}, {}) is None
    assert shard.push(0, {"w": torch.tensor([2.0, -2.0])}, {}) == 0  # applied: sum 4, p = -lr 2 / sqrt(4)
    assert shard.params["w"].tolist() == [-1.0, 1.0] and shard.state_sum["w"].tolist() == [4.0, 4.0]
    assert shard.drain_taus() == (1, [0], 2)


@pytest.mark.parametrize("flags", [["--dist-timeout", "5.0"], ["--precision", "bf16"], ["--ds-log-level", "INFO"]])
def test_deepspeed_only_flags_are_not_downpour_flags(tmp_path, capsys, flags):
    # the DeepSpeed entry points take them (cli.add_engine_arguments); Downpour's parser does not know them
    path = str(write_config(tmp_path / "c.json", downpour_cfg(2, 2)))
    from train import imagenet
    assert imagenet.get_args_parser().parse_args(["--deepspeed_config", path, *flags])
    with pytest.raises(SystemExit) as exit_info:
        downpour.get_args_parser().parse_args(["--deepspeed_config", path, *flags])
    assert exit_info.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err


def test_partition_cuts_contiguous_slices_of_equal_size_also_across_tensors():
    # The MLP: 784 x 128 + 128 + 128 x 10 + 10 = 101,770 parameters in 4 tensors; 6 shards, more than tensors.
    sizes = {k: v.numel() for k, v in build_model("mlp", 10, 1, 28).named_parameters()}
    assert list(sizes.values()) == [784 * 128, 128, 128 * 10, 10]
    bounds = ps.partition(101_770, 6)
    assert bounds[0][0] == 0 and bounds[-1][1] == 101_770
    assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))  # contiguous, no gaps
    assert {b - a for a, b in bounds} == {16_961, 16_962}  # 101,770 / 6 = 16,961.67
    pieces = describe_slices(sizes, bounds)
    # 5 x 101,770 // 6 = 84,808: the last slice takes the first layer's weight from there to its end (784 x 128)
    assert pieces[0] == ["1.weight[0:16961]"]
    assert pieces[-1] == ["1.weight[84808:100352]", "1.bias", "3.weight", "3.bias"]
    assert ps.assign_buffers(["a", "b", "c"], 2) == [["a", "c"], ["b"]]


def test_six_shards_of_cut_tensors_apply_torch_adagrad():
    """The replica's side (flatten the gradient, send each shard its slice, join the fetched slices) with 6
    ParameterShards on the MLP's 4 tensors equals torch.optim.Adagrad on the whole model."""
    torch.manual_seed(0)
    model, ref = build_model("mlp", 10, 1, 28), build_model("mlp", 10, 1, 28)
    ref.load_state_dict(model.state_dict())
    params = list(model.parameters())
    bounds = ps.partition(sum(p.numel() for p in params), 6)
    flat = ps.flatten(params)
    shards = [ps.ParameterShard(i, {ps.FLAT: flat[a:b]}, {}, optimizer="adagrad", lr=LR,
                                initial_accumulator_value=ACC0) for i, (a, b) in enumerate(bounds)]
    opt = torch.optim.Adagrad(ref.parameters(), lr=LR, initial_accumulator_value=ACC0)
    x, y = torch.randn(3, 16, 1, 28, 28), torch.randint(0, 10, (3, 16))
    for k in range(3):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        g = ps.flatten([p.grad for p in params])
        for shard, (a, b) in zip(shards, bounds, strict=True):
            shard.push(0, {ps.FLAT: g[a:b].clone()}, {})
        ps.load_slices(model, [shard.fetch(0) for shard in shards])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[k]), y[k]).backward()
        opt.step()
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


def test_failure_report_names_every_failed_role_once_the_limit_is_passed():
    one = {"replica 1": "RuntimeError: boom (after step 3)"}
    assert failure_report(one, 1, 4, 3) is None  # tolerated: 1 of 4 lost, 3 allowed
    assert failure_report(one, 1, 4, 0).splitlines() == [
        "error: the Downpour run failed: 1 of 4 replicas failed, --max-dead-replicas allows 0",
        "error: replica 1: RuntimeError: boom (after step 3)"]
    two = {"replica 0": "a", "replica 1": "b"}
    assert failure_report(two, 2, 2, 1).splitlines()[1:] == ["error: replica 0: a", "error: replica 1: b"]
    shard = {"shard 0": "its process died (signal 9)"}
    assert failure_report(shard, 0, 2, 1).splitlines() == [
        "error: the Downpour run failed: shard 0 failed", "error: shard 0: its process died (signal 9)"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a message naming the value and what was expected, before any process starts


@pytest.mark.parametrize("override,message", [
    ({"shards": 101_771}, "downpour.shards = 101771 but model mlp has 101,770 parameters; every shard needs at "
                          "least one"),
    ({"replicas": 0}, "downpour.replicas must be an integer >= 1, got 0"),
    ({"n_push": 0}, "downpour.n_push must be an integer >= 1, got 0"),
    ({"model": "vgg"}, "downpour.model 'vgg' is unknown; known: "),
])
def test_bad_input_is_refused_with_a_clear_message(tmp_path, override, message):
    cfg = downpour_cfg(2, 2)
    cfg["downpour"].update(override)
    path = write_config(tmp_path / "bad.json", cfg)
    args = downpour.get_args_parser().parse_args(["--deepspeed_config", str(path), "--no-wandb"])
    with pytest.raises(ConfigError) as e:
        downpour.load_setup(args)
    assert str(e.value).startswith(message)


def test_roles_under_a_launcher_are_checked(tmp_path, monkeypatch):
    path = write_config(tmp_path / "c.json", downpour_cfg(2, 2))
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "4")

    def role(*roles: str) -> tuple[str, int]:
        args = downpour.get_args_parser().parse_args(["--deepspeed_config", str(path), "--roles", *roles])
        return downpour.launched_role(args, downpour.load_setup(args, data=False))

    assert role("replica1", "shard1") == ("shard", 1)  # LOCAL_RANK 1's entry
    assert downpour.launched_role(downpour.get_args_parser().parse_args(["--deepspeed_config", str(path)]),
                                  downpour.load_setup(downpour.get_args_parser().parse_args(
                                      ["--deepspeed_config", str(path)]), data=False)) == ("replica", 1)  # by RANK
    with pytest.raises(ConfigError, match=r"--roles 'shard2': expected coordinator, shard<i> with i in 0\.\.1 or "):
        role("coordinator", "shard2")
    with pytest.raises(ConfigError, match="expected 2 different roles, one per process this launcher starts"):
        role("replica0", "replica0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4 but the experiment needs 1 coordinator \+ 2 shards \+ 2 "):
        role("replica1", "shard1")


def test_bad_input_on_the_command_line_exits_2_before_any_process_starts(tmp_path, capsys):
    """In this process (cli.run is what the entry point calls): the exit code, the message, no run folder."""
    path, out = write_config(tmp_path / "bad.json", downpour_cfg(2, 2)), tmp_path / "bad"
    args = downpour.get_args_parser().parse_args(["--deepspeed_config", str(path), "--output-dir", str(out),
                                                  "--no-wandb", "--replicas", "0"])
    assert cli.run(downpour.main, args) == 2
    assert "error: downpour.replicas must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Processes over RPC


@pytest.mark.launcher
def test_one_replica_is_deans_client_with_zero_staleness_and_resumes_exactly(tmp_path, data):
    """1 replica, 2 shards, n_fetch = n_push = 1, 320 samples = 10 steps of 32, stopped after 4 steps: the weights
    equal Dean's client replayed in one process (a local SGD step per gradient, torch.optim.Adagrad as the server;
    every push has tau 0); resumed from the checkpoint, where the replica starts from the shards' parameters, they
    equal the replay with that restart after all 10."""
    cfg = downpour_cfg(1, 2)
    _, part = run_downpour(tmp_path, "part", cfg, "--train-subset", "320", "--max-steps", "4")
    assert_weights_equal(part, dean_replay(data, 320, 4, 1))
    s = summary(part)
    assert s["replica_steps"] == [4] and s["samples"] == 4 * 32
    assert s["tau_hist"] == [8]  # 4 pushes x 2 shards, all with staleness 0
    config = json.loads((part / "config.json").read_text())
    assert config["derived"]["global_batch"] == 32 and config["derived"]["optimizer"] == "Adagrad"
    run = load_run(part)  # analysis.compare reads it beside the synchronous runs
    assert run.method == "Downpour SGD, Adagrad at the shards" and run.batch == 32 and run.epochs_done == 0.4

    proc, part = run_downpour(tmp_path, "part", cfg, "--train-subset", "320", "--resume")
    assert "resumed from" in proc.stdout and "replica steps [4]" in proc.stdout
    assert_weights_equal(part, dean_replay(data, 320, 10, 1, restarts=(4,)))  # a fresh Adagrad state would differ
    recs = read_metrics(part)
    assert [r["kind"] for r in recs].count("summary") == 1 and recs[-1]["replica_steps"] == [10]
    assert recs[-1]["tau_hist"] == [20]


@pytest.mark.launcher
@pytest.mark.parametrize("n_push,tau_hist", [(1, [6, 4, 4]), (2, [6, 2])])
def test_n_fetch_k_is_k_local_steps_then_a_fetch(tmp_path, data, n_push, tau_hist):
    """Dean et al.'s client with n_fetch = 3, one replica, 7 steps: the replica steps its own copy with each gradient
    (plain SGD at the shards' lr) and fetches at steps 0, 3, 6, each fetch arriving one step later: the weights
    equal the replay in one process, and not the replay without local steps (k gradients at one stale point, what
    the client did before). n_push = 1: per shard, pushes 1-3 find 0, 1, 2 updates since the fetch at step 0,
    pushes 4-6 the same since the fetch after push 3, push 7 none: tau counts [3, 2, 2] on each of 2 shards.
    n_push = 2 (pushes after steps 2, 4, 6, 7; the fetch at step 3 lands on a copy with step 3 not pushed yet):
    taus 0, 0, 1, 0, counts [3, 1] per shard."""
    cfg = downpour_cfg(1, 2, n_fetch=3, n_push=n_push)
    _, out = run_downpour(tmp_path, "k3", cfg, "--train-subset", "320", "--max-steps", "7")
    assert_weights_equal(out, dean_replay(data, 320, 7, 3, n_push))
    got, stale = torch.load(out / "model.pt", weights_only=True), dean_replay(data, 320, 7, 3, n_push, local_lr=0.0)
    assert max((got[k] - stale[k]).abs().max().item() for k in got) > 1e-4  # the test tells the two apart
    assert summary(out)["tau_hist"] == tau_hist


@pytest.mark.launcher
def test_replicas_with_a_barrier_are_synchronous_sgd(tmp_path, data):
    """W = 2, n_fetch = n_push = 1, a barrier, plain SGD at the shards: both gradients are taken at the same
    parameters and applied in turn, p - lr g1 - lr g2 = p - (2 lr) mean(g): synchronous SGD on 64 samples."""
    ref = replay(data, 256, 64, 4, lambda p: torch.optim.SGD(p, lr=2 * LR))
    _, out = run_downpour(tmp_path, "sync", downpour_cfg(2, 2, "sgd"), "--train-subset", "256", "--barrier")
    assert_weights_equal(out, ref)
    # Per round and shard the first push finds 0 updates since the fetch, the second 1: 4 rounds x 2 shards.
    assert summary(out)["tau_hist"] == [8, 8]


@pytest.mark.launcher
def test_staleness_grows_with_replicas_and_a_killed_replica_leaves_the_run_finishing(tmp_path):
    """Asynchronous W = 2 and W = 4 (one shard, 20 steps each): the mean staleness is above 0 and larger with 4.
    In the W = 4 run replica 3 SIGKILLs itself after its step 5: the others finish their 20 steps, the run ends.
    Every replica takes 50 ms longer per step (--replica-delay, between its fetch and its gradient), as replicas on
    machines of their own overlap: they then interleave (about W - 1 other pushes per step) instead of running in
    bursts of several steps as 2 time-shared cores schedule them, which would make the staleness a property of the
    scheduler rather than of W."""
    def delays(w: int) -> list[str]:
        return ["--replica-delay", *(f"{j}=0.05" for j in range(w))]

    _, two = run_downpour(tmp_path, "w2", downpour_cfg(2, 1), "--train-subset", str(2 * 32 * 20), *delays(2))
    proc, four = run_downpour(tmp_path, "w4", downpour_cfg(4, 1), "--train-subset", str(4 * 32 * 20),
                              "--kill-replica", "3@5", *delays(4), timeout=240)
    assert "replica 3 is lost: its process died (signal 9) after step" in proc.stdout
    s2, s4 = summary(two), summary(four)
    assert s4["dead_replicas"] == [3] and s4["max_dead_replicas"] == 3  # the default: all but one
    assert s4["replica_errors"]["replica 3"].startswith("its process died (signal 9)")
    kinds = [r["kind"] for r in read_metrics(four)]
    assert [r for r in read_metrics(four) if r["kind"] == "step"][-1]["replicas_dead"] == 1  # the last step record
    assert s4["replica_steps"][:3] == [20, 20, 20] and s4["replica_steps"][3] <= 5
    assert (four / "model.pt").exists() and kinds[-3:] == ["epoch", "checkpoint", "summary"]
    assert 0 < s2["tau_mean"] < s4["tau_mean"], (s2["tau_mean"], s4["tau_mean"])


@pytest.mark.launcher
def test_warmstart_lets_one_replica_train_alone_first_and_a_hung_replica_is_found_by_its_heartbeat(tmp_path):
    """Dean et al.'s warmstart: replica 1 starts once replica 0 has done warmstart_steps steps. With 20 (all of
    replica 0's steps) the replicas never overlap, so no push can find another replica's update: staleness 0.
    Replica 0 takes 20 x 0.1 s, replica 1 waits longer than --replica-timeout 1 s and is not counted lost: its
    heartbeat goes on in the warmstart wait. Then it hangs (SIGSTOP: no exit code to see) after its step 2: its
    heartbeat stops, the coordinator counts it lost after 1 s (tolerated: 1 of 2) and the run finishes."""
    proc, out = run_downpour(tmp_path, "warm", downpour_cfg(2, 1, warmstart_steps=20), "--train-subset", "1280",
                             "--replica-delay", "0=0.1", "--replica-timeout", "1", "--heartbeat", "0.2",
                             "--fault", "replica1:hang@2")
    s = summary(out)
    assert s["dead_replicas"] == [1], proc.stdout
    assert s["replica_errors"]["replica 1"].startswith("no heartbeat for --replica-timeout 1 s, after step ")
    assert s["replica_steps"][0] == 20 and s["replica_steps"][1] <= 2
    assert s["tau_hist"] == [20 + s["replica_steps"][1]]  # every push found no other replica's update


@pytest.mark.launcher
def test_a_run_whose_replicas_all_fail_fails_naming_each(tmp_path):
    """Replica 1 raises after its first step; replica 0's inputs are NaN in its steps 1 and 2, and
    --max-skipped-steps 2 stops it there: the run exits 6 (a role failed) with one line per replica and its error,
    and writes no summary (before, every exit counted as "dead", the run evaluated the initial model and exited 0)."""
    faults = ["--fault", "replica1:raise@1", "--inject-nan", "1", "2", "--max-skipped-steps", "2"]
    proc, out = run_downpour(tmp_path, "crash", downpour_cfg(2, 1), "--train-subset", "640", *faults, check=False)
    assert proc.returncode == 6, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    lines = lines[:1] + sorted(lines[1:])
    assert lines[0] == "error: the Downpour run failed: 2 of 2 replicas failed, --max-dead-replicas allows 1"
    assert lines[1].startswith("error: replica 0: RuntimeError: stopping at step 2: 2 pushes in a row (steps 1-2, "
                               "--max-skipped-steps 2) had a gradient that was not finite"), lines
    assert lines[2] == "error: replica 1: RuntimeError: injected fault (--fault replica1:raise@1) (after step 0)"
    assert "summary" not in [r["kind"] for r in read_metrics(out)]


def _popen_downpour(tmp_path, name: str, cfg: dict, *flags: str,
                    new_session: bool = False) -> tuple[subprocess.Popen, object]:
    path = write_config(tmp_path / f"{name}.json", cfg)
    out = tmp_path / name
    proc = subprocess.Popen([sys.executable, "train/downpour.py", "--deepspeed_config", str(path), "--output-dir",
                             str(out), "--no-wandb", "--val-subset", "500", "--log-interval", "5", *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            start_new_session=new_session)
    return proc, out


def _wait_for_record(proc: subprocess.Popen, out, kind: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and any(r["kind"] == kind for r in read_metrics(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before a {kind} record:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {kind} record within {timeout} s")


@pytest.mark.launcher
def test_sigterm_saves_a_consistent_cut_and_the_resumed_w4_run_loses_and_doubles_no_step(tmp_path):
    """W = 4, S = 2, n_push = 1, 30 steps per replica, a checkpoint every 20 replica steps (--keep-checkpoints 2);
    SIGTERM to every process of the run (its process group, as a scheduler or `kill -TERM -PGID` sends it) after
    the first checkpoint: the coordinator saves and exits 143 (128 + 15); the shards, the replicas and the
    forkserver they were forked from ignore it (a forkserver killed by it read as every child dead: exit 6, no
    checkpoint). In every checkpoint
    the replicas' steps summed equal each shard's version (updates applied; one per pushed step) and each shard
    holds the same steps of each replica: every counted step's gradient is in the shards, none beyond. (Before, the
    steps were read first and the shards one at a time while pushes went on.) Resumed, the run ends with 30 steps
    per replica, 4 x 30 = 120 updates in each shard and 2 x 120 = 240 staleness measurements: no step lost or
    doubled across the stop."""
    cfg, delays = downpour_cfg(4, 2), ["--replica-delay", *(f"{j}=0.05" for j in range(4))]
    flags = ["--train-subset", str(4 * 32 * 30), "--save-interval", "20", "--keep-checkpoints", "2", *delays]
    proc, out = _popen_downpour(tmp_path, "term", cfg, *flags, new_session=True)
    _wait_for_record(proc, out, "checkpoint")
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group, whatever the verdict
    seconds = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    assert seconds < 30, f"{seconds:.1f} s from SIGTERM to exit: beyond a scheduler's usual grace of 30 s"
    assert "SIGTERM: saving a checkpoint and stopping" in stdout
    saves = [r for r in read_metrics(out) if r["kind"] == "checkpoint"]
    assert len(saves) >= 2 and sum(saves[-1]["replica_steps"]) < 4 * 30  # the stop's save, mid-run
    for r in saves:
        assert r["shard_versions"] == [sum(r["replica_steps"])] * 2 and r["tag"] == f"step{sum(r['replica_steps'])}"
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == saves[-1]["tag"]
    saved = torch.load(out / "checkpoints" / tag / "ps.pt", weights_only=True)
    for shard in saved["shards"]:
        assert [shard["applied"].get(j, 0) for j in range(4)] == saved["replica_steps"] == saves[-1]["replica_steps"]
    assert len(saved["taus"]) == 2 * sum(saved["replica_steps"])  # one measurement per push and shard, to the cut
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == sorted(
        r["tag"] for r in saves[-2:])  # --keep-checkpoints 2

    proc, out = run_downpour(tmp_path, "term", cfg, *flags, "--resume")
    s = summary(out)
    assert s["replica_steps"] == [30] * 4 and s["dead_replicas"] == []
    assert s["tau_count"] == 2 * 4 * 30
    last = [r for r in read_metrics(out) if r["kind"] == "checkpoint"][-1]
    assert last["replica_steps"] == [30] * 4 and last["shard_versions"] == [120, 120]


def _children(pid: int, marker: bytes = b"") -> list[int]:
    """The processes whose parent is ``pid`` and whose command line holds ``marker``, from /proc."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid and \
                    marker in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _started_children(pid: int) -> tuple[int, list[int]]:
    """The forkserver that coordinator ``pid`` started, and the shards and replicas forked from it."""
    (server,) = _children(pid, b"forkserver")
    return server, _children(server)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.launcher
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_no_shard_or_replica_outlives_a_sigkilled_coordinator(tmp_path):
    """SIGKILL to the coordinator (no handler runs, nothing is stopped): the shards see its process gone (they
    check every 0.5 s) and leave; the replicas' heartbeats and calls fail within --rpc-timeout and they leave; the
    forkserver, held open by every process it forked, then ends. All 2 + 2 processes and the forkserver are gone
    well within the shards' ping time-out (20.5 s here) and 60 s (before, a shard waited on an event with no
    time-out for ever)."""
    proc, out = _popen_downpour(tmp_path, "orphans", downpour_cfg(2, 2), "--train-subset", str(2 * 32 * 200),
                                "--replica-delay", "0=0.05", "1=0.05", "--rpc-timeout", "10", "--heartbeat", "0.5")
    _wait_for_record(proc, out, "step")
    server, children = _started_children(proc.pid)
    assert len(children) == 4, children
    children = sorted(children) + [server]  # forked in rank order: the 2 shards first
    t0 = time.monotonic()
    proc.kill()
    proc.wait(timeout=30)  # not its output: the children hold the pipe until they end
    gone: dict[int, float] = {}
    while len(gone) < len(children) and time.monotonic() - t0 < 60:
        gone.update({pid: time.monotonic() - t0 for pid in children if pid not in gone and not _running(pid)})
        time.sleep(0.1)
    left = [pid for pid in children if pid not in gone]
    for pid in left:  # never leave them behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not left, f"{left} of 4 processes and the forkserver {server} still running 60 s after the coordinator " \
                     "was SIGKILLed"
    shards = max(gone[pid] for pid in children[:2])
    assert shards < 10, f"the shards left {shards:.1f} s after the coordinator's SIGKILL: by their ping time-out " \
                        "(20.5 s), not by seeing its process end"
    print(f"all 4 and the forkserver gone {max(gone.values()):.1f} s after the coordinator's SIGKILL (the shards "
          f"{shards:.1f} s)")


@pytest.mark.launcher
def test_two_torchrun_nodes_with_a_role_map_and_a_shard_that_has_no_data(tmp_path, fashion_mnist_dir):
    """Two torchrun launchers on this machine as two nodes (static rendezvous on a loopback port), the roles split
    1 + 3 by --roles, not by rank: node 0 (torchrun's rank 0) runs only shard0, with a --data-dir that does not
    exist (a shard never reads the data set); node 1 runs the coordinator and both replicas. Both launchers exit 0
    and the run ends with 10 steps per replica and 2 x 10 staleness measurements."""
    path, out, port = write_config(tmp_path / "mn.json", downpour_cfg(2, 1)), tmp_path / "mn", free_port()
    common = ["--deepspeed_config", str(path), "--output-dir", str(out), "--no-wandb", "--val-subset", "500",
              "--train-subset", "640"]
    nodes = [(0, 1, ["--data-dir", str(tmp_path / "no-data-here"), "--roles", "shard0"]),
             (1, 3, ["--data-dir", str(fashion_mnist_dir), "--roles", "coordinator", "replica0", "replica1"])]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc-per-node", str(n), "--node-rank", str(rank),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "train/downpour.py",
                               *common, *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=child_env(OMP_NUM_THREADS="1"))
             for rank, n, flags in nodes]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    s = summary(out)
    assert s["replica_steps"] == [10, 10] and s["tau_count"] == 20 and s["dead_replicas"] == []


@pytest.mark.launcher
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_a_hung_shard_fails_the_run_within_the_rpc_timeout(tmp_path):
    """W = 2, S = 1; the shard is stopped (SIGSTOP: alive, no exit code to see, as a hung host under torchrun looks)
    mid-run. The coordinator's next call to it (its ping, or a drain of the staleness records) gets no answer
    within --rpc-timeout 3 s: the run fails with exit 6, its first line naming the shard and the time-out, well
    within 60 s."""
    proc, out = _popen_downpour(tmp_path, "hung", downpour_cfg(2, 1), "--train-subset", str(2 * 32 * 200),
                                "--replica-delay", "0=0.05", "1=0.05", "--rpc-timeout", "3", "--heartbeat", "0.5")
    _wait_for_record(proc, out, "step")
    children = sorted(_started_children(proc.pid)[1])
    assert len(children) == 3, children
    shard = children[0]  # the processes start in rank order, rank 1 (the shard) first
    t0 = time.monotonic()
    os.kill(shard, signal.SIGSTOP)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if _running(shard):
            os.kill(shard, signal.SIGKILL)
    seconds = time.monotonic() - t0
    assert proc.returncode == 6, stdout
    first = next(ln for ln in stdout.splitlines() if ln.startswith("error: "))
    # the first call to reach the stopped shard names it: the ping, the coordinator's own call, or (on a loaded
    # machine) the replicas' fetches, whose failures the headline traces back to the shard
    assert re.match(r"error: the Downpour run failed: (shard 0 failed|ps0 did not answer \w+ within --rpc-timeout 3 s|"
                    r"2 of 2 replicas failed, .* \(they could not reach ps0 within --rpc-timeout: a hung or lost "
                    r"shard\))", first), first
    assert seconds < 60, f"{seconds:.1f} s from the hang to the exit"
    print(f"exit 6 {seconds:.1f} s after the shard was stopped")
