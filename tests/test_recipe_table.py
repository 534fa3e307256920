"""The config ladder: checked-in JSON equals the generator's output, and every config obeys its recipe's rule.

Rules: Goyal et al. 2017 (arXiv:1706.02677) lr = 0.1 x batch / 256, gradual warmup
from 0.1 over 5 epochs, lr / 10 at epochs 30, 60, 80 of 90, Nesterov momentum 0.9, wd 1e-4, 32 images per
worker; MLCommons LARS base lr 10.0 (< 16k, 5 warmup epochs), 25.0 (< 32k, 5), 31.2 (else, 25), poly power 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import load_json, resolve

CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
LADDER = {"256": 256, "1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768}
IMAGENET_TRAIN = 1281167


def test_checked_in_configs_equal_generator_output():
    proc = subprocess.run([sys.executable, str(CONFIGS / "generate.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ladder_rung_exists():
    names = {p.stem for p in CONFIGS.glob("*.json")}
    assert set(LADDER) <= names
    assert {f"{o}-{b}" for o in ("lars", "lamb") for b in ("8k", "16k", "32k")} <= names


@pytest.mark.parametrize("name,batch", sorted(LADDER.items()))
def test_sgd_ladder_obeys_goyal(name, batch):
    cfg = load_json(CONFIGS / f"{name}.json")
    assert cfg["train_batch_size"] == batch
    assert cfg["train_micro_batch_size_per_gpu"] == 32
    assert cfg["fp16"]["enabled"] is True and cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed would clip at norm 1.0 by default; Goyal does not clip
    opt = cfg["optimizer"]
    assert opt["type"] == "SGD"
    assert math.isclose(opt["params"]["lr"], 0.1 * batch / 256)
    assert opt["params"]["momentum"] == 0.9 and opt["params"]["nesterov"] is True
    assert opt["params"]["weight_decay"] == 1e-4
    sp = cfg["scheduler"]["params"]
    assert sp["warmup_type"] == "linear"  # DeepSpeed's default is "log"
    assert sp["warmup_min_lr"] == 0.1 and math.isclose(sp["warmup_max_lr"], 0.1 * batch / 256)
    assert sp["warmup_num_epochs"] == 5 and sp["milestones_epochs"] == [30, 60, 80] and sp["gamma"] == 0.1
    assert cfg["training"]["epochs"] == 90 and cfg["training"]["zero_init_residual"] is True

    # On ImageNet with 8 GPUs per node and as many nodes as the batch needs at 32 per GPU:
    world = batch // 32 if batch // 32 <= 1024 else 1024
    r = resolve(cfg, world_size=world, num_train=IMAGENET_TRAIN)
    spe = IMAGENET_TRAIN // batch
    assert r.global_batch == r.micro_batch * r.grad_accum * r.world_size == batch
    assert r.scheduler["params"]["warmup_num_steps"] == 5 * spe
    assert r.scheduler["params"]["milestones_steps"] == [30 * spe, 60 * spe, 80 * spe]
    assert r.total_steps == 90 * spe


@pytest.mark.parametrize("size,batch,lr,warmup", [("8k", 8192, 10.0, 5), ("16k", 16384, 25.0, 5),
                                                  ("32k", 32768, 31.2, 25)])
def test_lars_rungs_follow_mlcommons(size, batch, lr, warmup):
    cfg = load_json(CONFIGS / f"lars-{size}.json")
    assert cfg["train_batch_size"] == batch and cfg["optimizer"]["type"] == "LARS"
    p = cfg["optimizer"]["params"]
    assert p["lr"] == lr and p["momentum"] == 0.9 and p["trust_coefficient"] == 0.001 and p["weight_decay"] == 1e-4
    sp = cfg["scheduler"]["params"]
    assert cfg["scheduler"]["type"] == "WarmupPolyLR" and sp["power"] == 2.0 and sp["end_lr"] == 1e-4
    assert sp["warmup_num_epochs"] == warmup and sp["warmup_min_lr"] == 0.0 and sp["warmup_max_lr"] == lr


@pytest.mark.parametrize("size,batch", [("8k", 8192), ("16k", 16384), ("32k", 32768)])
def test_lamb_rungs_use_square_root_scaling(size, batch):
    cfg = load_json(CONFIGS / f"lamb-{size}.json")
    assert cfg["optimizer"]["type"] == "LAMB"
    assert math.isclose(cfg["optimizer"]["params"]["lr"], 5e-3 * math.sqrt(batch / 2048))


def test_configs_are_self_contained_deepspeed_json():
    for path in CONFIGS.glob("*.json"):
        cfg = json.loads(path.read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "zero_optimization", "optimizer",
                    "scheduler", "training"):
            assert key in cfg, f"{path.name} lacks {key}"
