"""Numerical faults through the real launcher: a non-finite step is skipped, counted and leaves no trace in the
weights, the optimizer state or the BatchNorm statistics (SGD, LARS, LAMB; fp32 and bf16; ZeRO 0, 1, 2); too many
in a row stop the run with a message naming the step and the last good checkpoint."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import launch, read_metrics, write_config

from train.checkpoints import load_file

pytestmark = pytest.mark.launcher

PARAMS = {"SGD": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
          "LARS": {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-4, "trust_coefficient": 0.001},
          "LAMB": {"lr": 0.01, "weight_decay": 0.01}}


def config(opt: str, stage: int, precision: str) -> dict:
    """Global batch 64 = 16 per rank x 2 accumulation x 2 ranks; 10 steps per epoch on 640 samples; the lr warms
    up linearly over the 10 steps so that every step runs at a different lr."""
    lr = PARAMS[opt]["lr"]
    cfg = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": stage},
           "gradient_clipping": 0.0, "optimizer": {"type": opt, "params": PARAMS[opt]},
           "scheduler": {"type": "WarmupMultiStepLR", "params": {
               "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_epochs": 1, "warmup_type": "linear",
               "milestones_epochs": [30], "gamma": 0.1}},
           "training": {"epochs": 2}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def run_args(tmp_path: Path, fashion_mnist_dir: Path, cfg: dict, precision: str) -> list[str]:
    return ["--deepspeed_config", str(write_config(tmp_path / "c.json", cfg)), "--dataset", "fashion-mnist",
            "--data-dir", str(fashion_mnist_dir), "--arch", "resnet_small", "--train-subset", "640",
            "--val-subset", "64", "--precision", precision, "--no-wandb", "--log-interval", "1", "--save-interval", "1",
            "--keep-checkpoints", "0", "--output-dir", str(tmp_path / "run")]  # every step's checkpoint is compared


def checkpoint_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every file of a DeepSpeed checkpoint (model with its BatchNorm buffers, optimizer partitions),
    by file and key path; read as --resume reads them, with torch.load(weights_only=True)."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for f in sorted(tag_dir.glob("*.pt")):
        walk(f.name, load_file(f))
    return out


def equal_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("opt,stage,precision,resume", [
    ("SGD", 0, "fp32", False), ("LARS", 1, "fp32", True), ("LAMB", 2, "fp32", True), ("LARS", 0, "bf16", True),
    ("LAMB", 1, "bf16", False)])
def test_nonfinite_steps_are_skipped_counted_and_leave_no_trace(tmp_path, fashion_mnist_dir, opt, stage, precision,
                                                                resume):
    """Rank 0's inputs are NaN in steps 3 and 4 (both of its micro-batches; the small ResNet's BatchNorm layers see
    them): both steps are skipped on both ranks. The checkpoints after steps 2 and 4 then hold identical tensors,
    weights, optimizer state and BatchNorm statistics alike, bit for bit, while step 5 changes them; the lr schedule
    holds for the two steps; the logs count them. Step 10 ends the epoch and is also an interval save: it is
    written once, never over the checkpoint 'latest' names.

    With ``resume``, exact resume of the layer-wise optimizers (trust ratios over DeepSpeed's flat ZeRO partitions)
    in each ZeRO stage, and inside a run of skipped steps: a copy of the run folder rewound to its step-3
    checkpoint (after the first skipped step, mid-epoch) and resumed, the same step 4 skipped again, ends with the
    uninterrupted run's weights bit for bit."""
    run = tmp_path / "run"
    args = [*run_args(tmp_path, fashion_mnist_dir, config(opt, stage, precision), precision),
            "--max-steps", "11", "--inject-nan", "3", "4"]
    launch(args)
    saves = [r["step"] for r in read_metrics(run) if r["kind"] == "checkpoint"]
    assert saves == list(range(1, 12))  # step 10 once, though both the interval and the epoch's end ask for it
    ckpt = run / "checkpoints"
    after = {s: checkpoint_tensors(ckpt / f"step{s}") for s in (2, 3, 4, 5)}
    assert equal_bitwise(after[2], after[3]) and equal_bitwise(after[2], after[4])
    assert not equal_bitwise(after[4], after[5])  # the comparison can fail: a real step changes the state
    assert all(torch.isfinite(t.float()).all() for t in after[5].values() if t.is_floating_point())

    steps = {r["step"]: r for r in read_metrics(run) if r["kind"] == "step"}
    assert [steps[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert [steps[s]["nonfinite_losses"] for s in range(1, 7)] == [0, 0, 2, 2, 0, 0]  # 2 micro-batches, 1 rank
    assert steps[11]["skipped_steps"] == 2
    assert all(math.isfinite(steps[s]["loss"]) for s in range(1, 7))  # the finite rank's loss is still reported
    # Linear warmup over 10 steps: step t runs at lr(t - 1 - skipped before it) = peak * (t - 1 - skipped) / 10.
    peak = PARAMS[opt]["lr"]
    want = [peak * n / 10 for n in (0, 1, 2, 2, 2, 3)]
    assert [steps[s]["lr"] for s in range(1, 7)] == pytest.approx(want)
    final = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    if not resume:
        return
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "model.pt").unlink()
    (copy / "checkpoints" / "latest").write_text("step3")
    out = launch([str(copy) if x == str(run) else x for x in args] + ["--resume"])
    assert "resumed from" in out.stdout and "epoch 0, step 3" in out.stdout
    resumed = {r["step"]: r for r in read_metrics(copy) if r["kind"] == "step"}
    assert list(resumed) == list(range(1, 12)) and resumed[11]["skipped_steps"] == 2
    assert equal_bitwise(final, torch.load(copy / "model.pt", weights_only=True))
    step3 = torch.load(copy / "checkpoints" / "step3" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert not equal_bitwise({k: v.float() for k, v in final.items()}, {k: v.float() for k, v in step3.items()})


def test_too_many_bad_steps_in_a_row_stop_the_run_at_the_last_good_checkpoint(tmp_path, fashion_mnist_dir):
    """NaN from step 3 on, --max-skipped-steps 3: the run stops after step 5 naming steps 3-5 and the checkpoint of
    step 2; 'latest' names step 2 again (steps 3 and 4 were saved inside the streak), and --resume restarts there."""
    run = tmp_path / "run"
    args = run_args(tmp_path, fashion_mnist_dir, config("LARS", 1, "fp32"), "fp32")
    proc = launch([*args, "--max-steps", "8", "--inject-nan", "3", "4", "5", "6", "7", "--max-skipped-steps", "3",
                   "--log-interval", "4"], check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "stopping at step 5: steps 3-5 (3 in a row, --max-skipped-steps 3) were skipped" in out
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step2'}" in out
    assert (run / "checkpoints" / "latest").read_text() == "step2"
    logged = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert [r["step"] for r in logged] == [3, 4, 5]  # bad steps are always logged (the interval is 4)
    assert [r["skipped_steps"] for r in logged] == [1, 2, 3] and [r["nonfinite_losses"] for r in logged] == [2, 2, 2]
    resumed = launch([*args, "--resume", "--max-steps", "4"])
    assert "epoch 0, step 2" in resumed.stdout
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [3, 4] and steps[-1]["skipped_steps"] == 0  # steps 3-5 rewound


def test_a_diverging_run_stops_instead_of_training_on_nan(tmp_path, fashion_mnist_dir):
    """No injection: plain SGD at lr 1e12 overflows the weights within a few steps. The run must stop with the
    message, and no step record may report a non-finite loss as if it were a number."""
    cfg = config("SGD", 0, "fp32")
    cfg["optimizer"]["params"] = {"lr": 1e12}
    del cfg["scheduler"]
    args = run_args(tmp_path, fashion_mnist_dir, cfg, "fp32")
    proc = launch([*args, "--max-steps", "20", "--max-skipped-steps", "3"], check=False)
    assert proc.returncode != 0
    assert "were skipped because the loss or the gradients were not finite" in proc.stdout + proc.stderr
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert len(steps) < 20 and steps[-1]["skipped_steps"] >= 3
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in steps)


@pytest.mark.gpu
def test_fp16_nan_loss_is_skipped_by_the_loss_scaler_and_counted(tmp_path, fashion_mnist_dir):
    """fp16 (GPU): the loss scaler skips the injected steps; they are counted, the state is unchanged."""
    run = tmp_path / "run"
    cfg = config("LARS", 1, "fp32")
    cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    launch([*run_args(tmp_path, fashion_mnist_dir, cfg, "fp16"), "--max-steps", "6", "--inject-nan", "3", "4"],
           ranks=1)
    ckpt = run / "checkpoints"
    assert equal_bitwise(checkpoint_tensors(ckpt / "step2"), checkpoint_tensors(ckpt / "step4"))
    steps = {r["step"]: r for r in read_metrics(run) if r["kind"] == "step"}
    assert steps[4]["skipped_steps"] - steps[2]["skipped_steps"] == 2
    assert steps[3]["nonfinite_losses"] == 4  # 4 micro-batches on the one rank
