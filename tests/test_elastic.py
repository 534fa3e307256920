"""Elastic resume (issue 23): a ZeRO checkpoint continued on another rank count or ZeRO stage equals the
uninterrupted run, for SGD, LARS and LAMB, through the real launcher on CPU.

Four launches of tests/workers/elastic_worker.py (1, then 2, then 3, then 2 ranks) carry eleven chains, each saving
at the end of its part and resuming (train/reshard.py) at the start of the next: SGD, LARS and LAMB in fp32 in ZeRO-1
and in ZeRO-2 throughout, and in ZeRO-1 -> ZeRO-2 -> ZeRO-0 -> ZeRO-1; LAMB in bf16 and DeepSpeed's own AdamW (built
from the config) through the same stages. The
global batch is 12 micro-batches of 2, so the accumulation steps are 12, 6, 4 and 6. The first launch also runs each
optimizer and precision uninterrupted on 1 rank in ZeRO-1 (the reference), the second on 2 ranks in ZeRO-2 (the
rounding control: the same run summed in another order). Two negative controls (LAMB resumed without its optimizer
state; bf16 LAMB resumed with masters from the bf16 module) must fail the same comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, child_env, launch, node_launch, read_metrics, run_single, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

import ds_optim_worker  # noqa: E402
import elastic_worker as worker  # noqa: E402

from train.checkpoints import load_file  # noqa: E402
from train.data import GlobalBatchSampler  # noqa: E402

OPTS = ("sgd", "lars", "lamb")
CHAINS = {"z1": (1, 1, 1, 1), "z2": (2, 2, 2, 2), "z1-z2-z0-z1": (1, 2, 0, 1)}
WORLDS = (1, 2, 3, 2)  # grow from 1, grow 2 -> 3 (not a multiple), shrink 3 -> 2 (not a divisor)
STOPS = (2, 4, 5, worker.TOTAL_STEPS)  # each part's last step
# How far past the rounding control a chain may be. fp32: measured at most 1.3x (LAMB ZeRO-1 -> 2 -> 0 -> 1's states
# against the reference). bf16: measured 0.80x; the masters taken from the bf16 module at each resume (the negative
# control) measured 10.5x, so bf16's factor is 3.
ROUNDING_FACTOR = 10
FACTOR = {"fp32": ROUNDING_FACTOR, "bf16": 3}


def _launch(tmp: Path, ranks: int, plan: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (tmp / f"{name}.json").write_text(json.dumps(plan))
    out = tmp / f"{name}.pt"
    cmd = node_launch("tests/workers/elastic_worker.py", ["--plan", str(tmp / f"{name}.json"), "--out", str(out)],
                      ranks)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"launch {name} on {ranks} ranks failed (rc={proc.returncode}):\n{stdout[-6000:]}")
    result = torch.load(out, weights_only=False)
    assert result["world_size"] == ranks
    return {"results": result["results"], "stdout": stdout}


# name -> (optimizer, precision, ZeRO stage of each part, how each part after the first resumes)
RUNS = {**{f"{opt}-{chain}": (opt, "fp32", stages, "reshard") for opt in OPTS for chain, stages in CHAINS.items()},
        "lamb-bf16-z1-z2-z0-z1": ("lamb", "bf16", (1, 2, 0, 1), "reshard"),
        "adamw-z1-z2-z0-z1": ("adamw", "fp32", (1, 2, 0, 1), "reshard"),  # DeepSpeed's AdamW from the config
        "lamb-weights-only": ("lamb", "fp32", (1, 1, 1, 1), "weights"),  # negative controls
        "lamb-bf16-no-masters": ("lamb", "bf16", (1, 2, 0, 1), "reshard-no-masters")}
# uninterrupted runs: the reference (1 rank, ZeRO-1, part 0) and the rounding control (2 ranks, ZeRO-2, part 1)
UNINTERRUPTED = {(opt, precision) for opt, precision, _, _ in RUNS.values()}


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("elastic")
    parts: list[dict[str, Any]] = []
    for part, (ranks, stop) in enumerate(zip(WORLDS, STOPS, strict=True)):
        plan = [{"name": name, "opt": opt, "precision": precision, "stage": stages[part], "root": str(tmp / name),
                 "stop": stop, "resume": resume if part else None}
                for name, (opt, precision, stages, resume) in RUNS.items()]
        if part in (0, 1):
            plan += [{"name": f"{opt}-{precision}-{('ref', 'control')[part]}", "opt": opt, "precision": precision,
                      "stage": part + 1, "root": str(tmp / "unused"), "stop": worker.TOTAL_STEPS, "save": False}
                     for opt, precision in sorted(UNINTERRUPTED)]
        parts.append(_launch(tmp, ranks, plan, f"part{part}"))
    return {"parts": parts, "tmp": tmp}


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ds_optim_worker.make_acc_model().named_parameters()}


def weight_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """max over layers of ||got - want|| / ||want - start||: error relative to the size of the 6-step update."""
    return max(float((got[n] - want[n]).norm() / (want[n] - start[n]).norm()) for n in want)


def state_error(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> float:
    """max over layers and state keys of ||got - want|| / ||want||; every key of ``want`` must be in ``got``."""
    assert want and all(got[n].keys() == want[n].keys() for n in want), (got.keys(), want.keys())
    return max(float((got[n][k] - want[n][k]).norm() / want[n][k].norm()) for n in want for k in want[n])


def errors(chains: dict[str, Any], initial: dict[str, torch.Tensor], name: str) -> tuple[float, ...]:
    """(weight error, state error) of run ``name`` after the last part, and of the rounding control (2 ranks,
    ZeRO-2, uninterrupted), against the reference (1 rank, ZeRO-1, uninterrupted) of its optimizer and precision."""
    opt, precision, _, _ = RUNS[name]
    parts = chains["parts"]
    ref = parts[0]["results"][f"{opt}-{precision}-ref"]
    control = parts[1]["results"][f"{opt}-{precision}-control"]
    got = parts[-1]["results"][name]
    return (weight_error(got["weights"], ref["weights"], initial), state_error(got["states"], ref["states"]),
            weight_error(control["weights"], ref["weights"], initial), state_error(control["states"], ref["states"]))


RESHARDED = [name for name, run in RUNS.items() if run[3] == "reshard"]


@pytest.mark.parametrize("name", RESHARDED)
def test_resumed_on_2_then_3_then_2_ranks_equals_the_uninterrupted_run(chains, initial, name):
    """Weights and every optimizer state (momentum; LAMB's and AdamW's moments and step counts) after 1 -> 2 -> 3
    -> 2 ranks (and the chain's stages) within FACTOR x the rounding control: the uninterrupted run on 2 ranks in
    ZeRO-2 against the reference on 1 in ZeRO-1 (the same steps summed in another order)."""
    w, s, w_control, s_control = errors(chains, initial, name)
    print(f"{name}: weights {w:.2e} (control {w_control:.2e}), states {s:.2e} (control {s_control:.2e})")
    bound = 1e-5 if RUNS[name][1] == "fp32" else 1e-1
    assert 0 < w_control < bound and 0 < s_control < bound, "the rounding control is not at rounding size"
    factor = FACTOR[RUNS[name][1]]
    assert w < factor * w_control, f"{name}: weights {w:.2e} vs control {w_control:.2e}"
    assert s < factor * s_control, f"{name}: states {s:.2e} vs control {s_control:.2e}"
    parts = chains["parts"]
    opt, precision, _, _ = RUNS[name]
    last = parts[-1]["results"][name]
    assert last["scalars"] == parts[0]["results"][f"{opt}-{precision}-ref"]["scalars"]  # step counts, lr_prev
    assert [p["results"][name]["start"] for p in parts] == [0, *STOPS[:-1]]
    assert last["global_steps"] == worker.TOTAL_STEPS and last["skipped"] == 0
    for part in parts[1:]:
        assert "re-sharded checkpoint step" in part["stdout"]


@pytest.mark.parametrize("name", RESHARDED)
def test_every_step_loss_recorded_once_and_equal_to_the_uninterrupted_runs(chains, name):
    """Each part trains only the steps after its checkpoint; the chain's losses, step by step, equal the
    uninterrupted run's to rounding (the same samples in each global batch whatever the rank count)."""
    opt, precision, _, _ = RUNS[name]
    steps: list[int] = []
    losses: dict[int, float] = {}
    for part in chains["parts"]:
        got = part["results"][name]["losses"]
        steps += list(got)
        losses.update(got)
    assert steps == list(range(1, worker.TOTAL_STEPS + 1))
    ref = chains["parts"][0]["results"][f"{opt}-{precision}-ref"]["losses"]
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert all(abs(losses[k] - ref[k]) <= tol * abs(ref[k]) for k in ref), (losses, ref)


@pytest.mark.parametrize("name,what", [("lamb-weights-only", "optimizer state"),
                                       ("lamb-bf16-no-masters", "fp32 master weights")])
def test_negative_controls_fail_the_comparison(chains, initial, name, what):
    """LAMB resumed without its optimizer state (what DeepSpeed's load gives without it), and bf16 LAMB re-sharded
    with the masters taken from the bf16 module (DeepSpeed's ``_restore_from_bit16_weights``) fail the comparison
    the re-sharded chains pass (measured: 1.6e6 and 10.5 x the control)."""
    w, s, w_control, s_control = errors(chains, initial, name)
    print(f"{name} (without the {what}): weights {w:.2e} (control {w_control:.2e}), states {s:.2e} "
          f"(control {s_control:.2e})")
    factor = FACTOR[RUNS[name][1]]
    assert w > factor * w_control or s > factor * s_control, f"only {w:.2e} (states {s:.2e}) off without the {what}"


def test_sampler_global_order_does_not_depend_on_the_world_size():
    """train/data.py: the samples of each step, in global order (rank 0's micro-batches, then rank 1's, ...), are
    the same for 1, 2, 3, 4 and 6 ranks with the same micro batch, from any start step; so are the groups of samples
    that one micro-batch holds (what batch norm normalises together)."""
    n, batch, micro = 600, 24, 2
    orders = {}
    for world in (1, 2, 3, 4, 6):
        ranks = []
        for r in range(world):
            s = GlobalBatchSampler(n, batch, micro, world, r, seed=5)
            s.set_epoch(3, 7)
            ranks.append(list(s))
        accum = batch // (micro * world)
        steps = n // batch - 7
        orders[world] = [[ranks[r][step * accum + a] for r in range(world) for a in range(accum)]
                         for step in range(steps)]
    g = torch.Generator().manual_seed(5 * 100_003 + 3)  # the permutation, computed here independently
    perm = torch.randperm(n, generator=g).tolist()
    want = [[perm[(7 + step) * batch + k * micro:][:micro] for k in range(batch // micro)]
            for step in range(n // batch - 7)]
    for world, got in orders.items():
        assert got == want, f"world size {world}"


def test_a_world_size_that_cannot_reach_the_batch_is_refused_at_once(tmp_path, fashion_mnist_dir):
    """Global batch 64 with micro batch 16 on 3 ranks (as the launcher sets WORLD_SIZE): refused before the data,
    the process group or the engine, naming the world sizes that can (2 or 4), in under 5 s past the imports."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16,
                               "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "training": {"epochs": 1}}))
    env = child_env(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0")
    t0 = time.perf_counter()  # the control: importing the entry point (torch, DeepSpeed), measured here
    subprocess.run([sys.executable, "-c", "import train.imagenet"], cwd=REPO, check=True, timeout=120, env=env,
                   capture_output=True)
    t1 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train/imagenet.py", "--deepspeed_config", str(cfg), "--dataset",
                           "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--arch", "mlp", "--no-wandb",
                           "--output-dir", str(tmp_path / "run"), "--resume"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    seconds = (time.perf_counter() - t1) - (t1 - t0)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("train_batch_size 64 does not divide by train_micro_batch_size_per_gpu 16 x world size 3 = 48; world "
            "sizes that can reach it with this micro batch: 2 or 4 (all: 1, 2, 4)") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 5, f"refused {seconds:.1f} s after the imports"


def test_entry_point_resumes_a_2_rank_zero1_lamb_run_on_1_rank_in_zero2_and_back(tmp_path, fashion_mnist_dir):
    """train/imagenet.py (MLP, Fashion-MNIST, fp32, LAMB, global batch 32 = 8 micro x 2 accumulation x 2 ranks):
    the uninterrupted 6-step run on 2 ranks in ZeRO-1 is the reference; a copy of its folder rewound to the step-3
    checkpoint, resumed on 1 rank in ZeRO-2 (4 accumulation steps, printed) to step 5, then on 2 ranks in ZeRO-1
    again to step 6, ends within ROUNDING_FACTOR x the rounding control (the same 6 steps on 1 rank from the start)
    of the reference; every step is logged once.
    The offline converter, on the reference's folder, refuses 3 ranks naming 2 or 4, and for 1 rank prints both
    layouts and writes the per-parameter state: the masters equal model.pt, the moments' sums of squares equal
    those of the saved partitions."""
    def config(stage: int) -> Path:
        return write_config(tmp_path / f"z{stage}.json", {
            "train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage},
            "gradient_clipping": 0.0, "optimizer": {"type": "LAMB", "params": {"lr": 0.01, "weight_decay": 0.01}},
            "training": {"epochs": 1}})

    def args(stage: int, run: Path) -> list[str]:
        return ["--deepspeed_config", str(config(stage)), "--dataset", "fashion-mnist", "--data-dir",
                str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "256", "--val-subset", "32", "--no-wandb",
                "--precision", "fp32", "--log-interval", "1", "--max-steps", "6", "--output-dir", str(run)]

    ref, resumed, control = tmp_path / "ref", tmp_path / "resumed", tmp_path / "control"
    launch([*args(1, ref), "--save-interval", "3", "--keep-checkpoints", "0"], ranks=2)
    # The offline converter on the saved folder: a world size that cannot reach the batch, then 1 rank in ZeRO-2.
    t0 = time.perf_counter()
    conv = subprocess.run([sys.executable, "-m", "train.reshard", str(ref), "--to-world", "3"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert conv.returncode == 2 and time.perf_counter() - t0 < 30, conv.stderr[-2000:]
    assert ("error: --to-world 3 cannot reach the global batch 32 with micro batch 8 per rank; world sizes that can: "
            "2 or 4 (all: 1, 2, 4)") in conv.stderr
    conv = subprocess.run([sys.executable, "-m", "train.reshard", str(ref), "--to-world", "1", "--to-stage", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=child_env())
    assert conv.returncode == 0, conv.stderr[-2000:]
    for line in ("saved layout: 2 rank(s), ZeRO-1, fp32", "per element: fp32, exp_avg, exp_avg_sq; per group: step=6",
                 "target layout: 1 rank(s), ZeRO-2, fp32: global batch 32 = 8 micro x 4 accumulation x 1 ranks "
                 "(was x 2 accumulation x 2)", "  1.weight: ", "wrote "):
        assert line in conv.stdout, conv.stdout
    step6 = ref / "checkpoints" / "step6"
    written = torch.load(step6 / "per_parameter_state.pt", weights_only=False)["tensors"]
    final = torch.load(ref / "model.pt", weights_only=True)  # written by the entry point, not by the converter
    assert written.keys() == {n for n in final if n.endswith(("weight", "bias"))}
    assert all(torch.equal(written[n]["fp32"], final[n].reshape(-1).float()) for n in written)
    for key in ("exp_avg", "exp_avg_sq"):  # nothing lost or counted twice: the partitions' sums of squares
        parts = [load_file(step6 / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"][
            "base_optimizer_state"]["state"] for r in (0, 1)]
        want = sum(float(state[key].double().pow(2).sum()) for part in parts for state in part.values())
        got = sum(float(t[key].double().pow(2).sum()) for t in written.values())
        assert want > 0 and abs(got - want) <= 1e-12 * want, (key, got, want)
    shutil.copytree(ref, resumed)
    (resumed / "model.pt").unlink()
    (resumed / "checkpoints" / "latest").write_text("step3")
    out = run_single([*args(2, resumed), "--resume", "--max-steps", "5", "--save-interval", "1"])
    assert ("elastic resume: 2 rank(s), ZeRO-1 -> 1 rank(s), ZeRO-2; global batch 32 = 8 micro x 4 accumulation x "
            "1 ranks") in out.stdout
    assert "re-sharded checkpoint step3: 2 rank(s), ZeRO-1, fp32 -> 1 rank(s), ZeRO-2, fp32" in out.stdout
    # Back to the first layout (the node came back): the checkpoint of step 5 is in the 1-rank ZeRO-2 layout, while
    # config.json still records the first start's 2 ranks in ZeRO-1; the layout is read from the checkpoint.
    out = launch([*args(1, resumed), "--resume"], ranks=2)
    assert "re-sharded checkpoint step5: 1 rank(s), ZeRO-2, fp32 -> 2 rank(s), ZeRO-1, fp32" in out.stdout
    assert [r["step"] for r in read_metrics(resumed) if r["kind"] == "step"] == list(range(1, 7))
    run_single(args(2, control))
    start = torch.load(ref / "checkpoints" / "step3" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    want = torch.load(ref / "model.pt", weights_only=True)
    err = weight_error(torch.load(resumed / "model.pt", weights_only=True), want, start)
    control_err = weight_error(torch.load(control / "model.pt", weights_only=True), want, start)
    print(f"entry point 2 ranks ZeRO-1 -> 1 rank ZeRO-2: {err:.2e} (control {control_err:.2e})")
    assert 0 < control_err < 1e-4 and err < ROUNDING_FACTOR * control_err, (err, control_err)
