"""train/imagenet.py end to end: 2 CPU ranks through the real deepspeed launcher (gloo), real data."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
import torch
import torchvision
from conftest import launch, node_launch, read_metrics, run_single, write_config
from test_data import make_imagefolder

from train.models import SmallResNet

pytestmark = pytest.mark.launcher


def sgd_config(batch: int, micro: int, lr: float = 0.1, stage: int = 0, scheduler: bool = True, **training):
    cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "SGD", "params": {"lr": lr, "momentum": 0.9, "nesterov": True,
                                                   "weight_decay": 1e-4}},
           "training": {"epochs": 1, **training}}
    if scheduler:
        cfg["scheduler"] = {"type": "WarmupMultiStepLR", "params": {
            "warmup_min_lr": lr / 4, "warmup_max_lr": lr, "warmup_num_epochs": 0.25, "warmup_type": "linear",
            "milestones_epochs": [1.5], "gamma": 0.1}}
    return cfg


def test_small_resnet_blocks_equal_torchvisions_basic_block_bit_for_bit(monkeypatch):
    """train.models.BasicBlock stands in for torchvision's (whose import costs a small-ResNet rank 1.8 CPU-s): the
    same seed gives the same state dict (names and values), outputs in train and eval mode, and gradients, as a
    SmallResNet built from torchvision.models.resnet.BasicBlock itself."""
    import train.models

    def build(block_cls: type) -> torch.nn.Module:
        monkeypatch.setattr(train.models, "BasicBlock", block_cls)
        torch.manual_seed(7)
        return SmallResNet(1, 10)

    ours, theirs = build(train.models.BasicBlock), build(torchvision.models.resnet.BasicBlock)
    assert type(ours.blocks[0]) is not type(theirs.blocks[0])
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(16, 1, 28, 28)
    ya, yb = ours(x), theirs(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    a, b = ours.state_dict(), theirs.state_dict()  # the running statistics the training forward moved
    assert all(torch.equal(a[k], b[k]) for k in a)
    ours.eval(), theirs.eval()
    assert torch.equal(ours(x), theirs(x))


def test_fashion_mnist_two_ranks_learns_writes_outputs_and_resumes(tmp_path, fashion_mnist_gz_dir):
    """ZeRO-1, 2 ranks x micro 32 x accumulation 2 = 128; 3,840 images = 30 steps per epoch; then resume. Reads
    Debian's gzip'd files, as the README's demo does."""
    cfg = write_config(tmp_path / "fm.json", sgd_config(128, 32, lr=0.1, stage=1, epochs=2))
    run = tmp_path / "run"
    common = ["--deepspeed_config", str(cfg), "--dataset", "fashion-mnist", "--data-dir", str(fashion_mnist_gz_dir),
              "--arch", "resnet_small", "--train-subset", "3840", "--val-subset", "1000", "--output-dir", str(run),
              "--log-interval", "5", "--no-wandb"]
    first = launch([*common, "--epochs", "1"], runner=True)  # the README's command: the deepspeed runner
    logged = next(line.split("cmd = ", 1)[1] for line in (first.stdout + first.stderr).splitlines()
                  if "cmd = " in line and "deepspeed.launcher.launch" in line)
    port = int(re.search(r"--master_port=(\d+)", logged).group(1))  # the other tests start this line directly
    assert logged.split() == node_launch("train/imagenet.py", [*common, "--epochs", "1"], 2, port)
    assert "batch: 32 micro x 2 accumulation x 2 ranks = 128 global" in first.stdout
    assert "30 steps/epoch" in first.stdout
    recs = read_metrics(run)
    steps = [r for r in recs if r["kind"] == "step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [5, 10, 15, 20, 25, 30]
    assert len(epochs) == 1 and epochs[0]["step"] == 30 and epochs[0]["samples"] == 30 * 128
    assert steps[0]["loss"] < math.log(10) + 0.3 and steps[-1]["loss"] < 0.75 * steps[0]["loss"]
    assert epochs[0]["val_samples"] == 1000
    assert epochs[0]["val_top1_error"] < 80  # chance is 90%
    cfg_out = json.loads((run / "config.json").read_text())
    assert cfg_out["derived"]["grad_accum"] == 2 and cfg_out["derived"]["world_size"] == 2
    assert cfg_out["derived"]["warmup_steps"] == round(0.25 * 30)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step30"

    state = torch.load(run / "model.pt", weights_only=True)
    model = SmallResNet(1, 10)
    model.load_state_dict(state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())

    # A second run into the same folder is refused without --resume (it would overwrite the first). One process
    # shows it as two would: the refusal is rank 0's, and a second rank's exit is not seen here either (the
    # launcher ends the other ranks when rank 0 exits non-zero).
    refused = run_single([*common, "--epochs", "2"], check=False)
    assert refused.returncode == 2 and "already holds a run" in refused.stdout + refused.stderr

    second = launch([*common, "--epochs", "2", "--resume"])
    assert "resumed from" in second.stdout and "epoch 1, step 30" in second.stdout
    recs = read_metrics(run)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [e["step"] for e in epochs] == [30, 60]
    assert [r["step"] for r in recs if r["kind"] == "step"][-1] == 60
    lrs = [r["lr"] for r in recs if r["kind"] == "step" and r["step"] > 45]
    assert all(math.isclose(lr, 0.01) for lr in lrs)  # decayed by 10 at epoch 1.5 (step 45)
    assert epochs[1]["val_top1_error"] < epochs[0]["val_top1_error"]
    summary = read_metrics(run)[-1]  # Goyal's median of the last 5 epochs spans the epochs before the resume too
    assert summary["kind"] == "summary"
    assert summary["median5_val_top1_error"] == pytest.approx(statistics.median(e["val_top1_error"] for e in epochs))


def test_gradient_aggregation_is_normalised_by_the_global_batch(tmp_path, fashion_mnist_dir):
    """Goyal et al. sec. 2.2: the loss is normalised by the total minibatch kn. 2 ranks x 2 accumulation steps
    x micro batch 4 must give the same weights as 1 rank x micro batch 16, step for step (model without BN)."""
    common = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_mnist_dir), "--arch", "mlp",
              "--train-subset", "96", "--val-subset", "64", "--no-wandb", "--max-steps", "6", "--log-interval", "1"]
    one = run_single(["--deepspeed_config", str(write_config(tmp_path / "one.json", sgd_config(16, 16))),
                      "--output-dir", str(tmp_path / "one"), *common])
    two = launch(["--deepspeed_config", str(write_config(tmp_path / "two.json", sgd_config(16, 4))),
                  "--output-dir", str(tmp_path / "two"), *common])
    assert "16 micro x 1 accumulation x 1 ranks" in one.stdout
    assert "4 micro x 2 accumulation x 2 ranks" in two.stdout
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    torch.manual_seed(0)  # the run's --seed: the same initial weights as the runs
    init = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10)).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
        assert (a[k] - init[k]).abs().max() > 1e-3, f"{k} did not train"
    la = [r["loss"] for r in read_metrics(tmp_path / "one") if r["kind"] == "step"]
    lb = [r["loss"] for r in read_metrics(tmp_path / "two") if r["kind"] == "step"]
    assert len(la) == len(lb) == 6 and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(la, lb, strict=True))


def test_imagenet_path_on_generated_jpegs(tmp_path):
    """ImageFolder train/ and val/ of JPEGs, one corrupt file; the final model.pt loads into torchvision."""
    root = make_imagefolder(tmp_path / "imnet", classes=("n01", "n02"), per_class=8, size=(64, 48))
    (root / "train" / "n01" / "3.JPEG").write_bytes(b"\xff\xd8\xff broken")
    cfg = write_config(tmp_path / "im.json", sgd_config(8, 4, lr=0.05))
    run = tmp_path / "run"
    out = launch(["--deepspeed_config", str(cfg), "--dataset", "imagenet", "--data-dir", str(root), "--arch",
                  "resnet18", "--image-size", "32", "--output-dir", str(run), "--no-wandb", "--workers", "1"])
    assert "2 steps/epoch" in out.stdout
    epoch = [r for r in read_metrics(run) if r["kind"] == "epoch"][0]
    assert epoch["val_samples"] == 16 and epoch["skipped_images"] == 1
    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    # gamma = 0 for the last BN of each residual block (Goyal et al. 5.1) survives one small step only as ~0
    assert model.layer1[0].bn2.weight.abs().max() < 0.1


def test_8k_config_runs_on_cpu_in_bf16(tmp_path, fashion_mnist_dir):
    """The shipped 8k config, unchanged, on 2 CPU ranks: 2 x 32 x 128 accumulation, fp16 replaced by bf16."""
    run = tmp_path / "run"
    out = launch(["--deepspeed_config", "ds_configs/8k.json", "--dataset", "fashion-mnist", "--data-dir",
                  str(fashion_mnist_dir), "--arch", "mlp", "--precision", "bf16", "--train-subset", "8192",
                  "--val-subset", "256", "--max-steps", "2", "--output-dir", str(run), "--no-wandb"])
    assert "batch: 32 micro x 128 accumulation x 2 ranks = 8,192 global" in out.stdout
    assert "precision: bf16 (config: fp16); ZeRO stage 1" in out.stdout
    derived = json.loads((run / "config.json").read_text())["derived"]
    assert derived["lr"] == pytest.approx(0.1 * 8192 / 256) and derived["warmup_steps"] == 5
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2]  # 8,192 images: every step ends an epoch
    # Goyal's gradual warmup from 0.1 to 3.2 over 5 epochs (= 5 steps here): step t runs at 0.1 + 3.1 t / 5
    assert [s["lr"] for s in steps] == pytest.approx([0.1, 0.1 + 3.1 / 5])


def test_cpu_auto_precision_prints_one_warning_line(tmp_path, fashion_mnist_dir):
    out = run_single(["--deepspeed_config", "ds_configs/demo.json", "--dataset", "fashion-mnist", "--data-dir",
                      str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "256", "--val-subset", "64",
                      "--max-steps", "1", "--output-dir", str(tmp_path / "r"), "--no-wandb"])
    warnings = [line for line in out.stdout.splitlines() if line.startswith("WARNING: fp16")]
    assert len(warnings) == 1 and "running in" in warnings[0]


@pytest.mark.parametrize("case", ["bad_json", "no_data", "batch", "optimizer", "scheduler"])
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, fashion_mnist_dir, case):
    cfg = sgd_config(256, 32)
    data = ["--dataset", "fashion-mnist", "--data-dir", str(fashion_mnist_dir)]
    if case == "bad_json":
        (tmp_path / "c.json").write_text('{"train_batch_size": 256,\n "optimizer": }')
        want = "c.json:2:15: not valid JSON"
    else:
        if case == "no_data":
            data = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "missing")]
            want = "does not exist"
        elif case == "batch":
            cfg["train_batch_size"] = 100
            want = "train_batch_size 100 does not divide by train_micro_batch_size_per_gpu 32 x world size 1"
        elif case == "optimizer":
            cfg["optimizer"]["type"] = "Adamm"
            want = "unknown optimizer type 'Adamm'; known: "
        else:
            cfg["scheduler"]["type"] = "Cosine"
            want = "unknown scheduler type 'Cosine'; known: "
        write_config(tmp_path / "c.json", cfg)
    proc = run_single(["--deepspeed_config", str(tmp_path / "c.json"), *data, "--arch", "mlp", "--no-wandb",
                       "--output-dir", str(tmp_path / "r")], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert want in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_8k_config_in_fp16_on_a_gpu(tmp_path, fashion_mnist_dir):
    """GPU tier: the shipped config in its own precision (fp16, dynamic loss scale, ZeRO-1) on one GPU."""
    run = tmp_path / "run"
    out = launch(["--deepspeed_config", "ds_configs/8k.json", "--dataset", "fashion-mnist", "--data-dir",
                  str(fashion_mnist_dir), "--arch", "resnet_small", "--train-subset", "16384", "--val-subset",
                  "1000", "--max-steps", "2", "--output-dir", str(run), "--no-wandb"], ranks=1)
    assert "precision: fp16; ZeRO stage 1" in out.stdout
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert steps[-1]["step"] == 2 and steps[-1]["loss_scale"] is not None and steps[-1]["loss_scale"] > 0


def test_batch_increase_changes_accumulation_at_epoch_boundaries(tmp_path, fashion_mnist_dir):
    """Smith et al. 2018 through DeepSpeed's engine.set_train_batch_size: 64 -> 128 -> 256 at epochs 1 and 2."""
    cfg = sgd_config(64, 16, scheduler=False, epochs=3, batch_increase={"milestones_epochs": [1, 2], "factor": 2})
    run = tmp_path / "run"
    run_single(["--deepspeed_config", str(write_config(tmp_path / "c.json", cfg)), "--dataset", "fashion-mnist",
                "--data-dir", str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "1024", "--val-subset", "64",
                "--output-dir", str(run), "--no-wandb", "--log-interval", "1"])
    recs = read_metrics(run)
    assert [r["step"] for r in recs if r["kind"] == "epoch"] == [16, 24, 28]
    assert [r["samples"] for r in recs if r["kind"] == "epoch"] == [1024, 2048, 3072]
    batches = [r["global_batch"] for r in recs if r["kind"] == "step"]
    assert batches == [64] * 16 + [128] * 8 + [256] * 4


def test_training_equals_plain_torch_sgd(tmp_path, fashion_mnist_dir):
    """The whole path (config -> DeepSpeed engine -> our SGD -> schedule) against plain torch.optim.SGD on the same
    batches: Nesterov momentum 0.9, weight decay 1e-4 on weights only (biases excluded), Goyal's linear warmup.
    It fails if DeepSpeed clipped gradients (its default when the config is silent) or scaled the loss."""
    from train.data import GlobalBatchSampler, fashion_mnist
    from train.schedules import multistep_lr

    lr, steps = 0.2, 4
    cfg = sgd_config(32, 32, lr=lr)
    cfg["scheduler"]["params"]["warmup_num_epochs"] = 0.5  # 8 steps per epoch: 4 warmup steps
    run = tmp_path / "run"
    run_single(["--deepspeed_config", str(write_config(tmp_path / "c.json", cfg)), "--dataset", "fashion-mnist",
                "--data-dir", str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "256", "--val-subset", "64",
                "--max-steps", str(steps), "--output-dir", str(run), "--no-wandb"])
    got = torch.load(run / "model.pt", weights_only=True)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": weights, "weight_decay": 1e-4}, {"params": biases, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    data = fashion_mnist(fashion_mnist_dir, channels=1, seed=0)
    data.train = (data.train[0][:256], data.train[1][:256])
    sampler = GlobalBatchSampler(256, 32, 32, 1, 0, seed=0)
    for t, (x, y) in enumerate(data.train_batches(sampler)):
        if t == steps:
            break
        for g in opt.param_groups:
            g["lr"] = multistep_lr(t, min_lr=lr / 4, max_lr=lr, warmup_steps=4, milestones=[12], gamma=0.1)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), k
