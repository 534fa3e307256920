"""Config resolution: batch arithmetic, epochs -> steps, precision fallback, clear errors."""

from __future__ import annotations

import json

import pytest

from train.config import ConfigError, batch_arithmetic, epochs_to_steps, load_json, resolve


def base_cfg(**over):
    cfg = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32, "fp16": {"enabled": True},
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "scheduler": {"type": "WarmupMultiStepLR", "params": {"warmup_min_lr": 0.1, "warmup_max_lr": 0.1,
                                                                  "warmup_num_epochs": 5,
                                                                  "milestones_epochs": [30, 60, 80]}},
           "training": {"epochs": 90}}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("batch,micro,world,accum", [(8192, 32, 256, 1), (8192, 32, 2, 128), (256, 32, 8, 1),
                                                     (32768, 32, 8, 128), (16, 4, 2, 2)])
def test_batch_arithmetic_solves_deepspeed_rule(batch, micro, world, accum):
    assert batch_arithmetic(batch, micro, None, world) == (batch, micro, accum)
    assert batch == micro * accum * world


def test_batch_that_does_not_divide_names_the_numbers():
    with pytest.raises(ConfigError, match=r"train_batch_size 1000 does not divide by .* 32 x world size 3 = 96"):
        batch_arithmetic(1000, 32, None, 3)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 3 disagrees"):
        batch_arithmetic(256, 32, 3, 2)
    with pytest.raises(ConfigError, match="positive integer, got 0"):
        batch_arithmetic(0, 32, None, 1)


def test_epochs_convert_to_steps_of_the_dataset():
    """Goyal: 5 warmup epochs and decay at 30/60/80; ImageNet (1,281,167 images) at 8k has 156 steps/epoch."""
    steps_per_epoch = 1281167 // 8192
    assert steps_per_epoch == 156
    out = epochs_to_steps({"warmup_num_epochs": 5, "milestones_epochs": [30, 60, 80], "gamma": 0.1},
                          steps_per_epoch, 90 * steps_per_epoch)
    assert out == {"warmup_num_steps": 780, "milestones_steps": [4680, 9360, 12480], "gamma": 0.1}
    assert epochs_to_steps({"total_num_epochs": "auto"}, 7, 630) == {"total_num_steps": 630}
    assert epochs_to_steps({"warmup_num_epochs": 0.5}, 234, 702) == {"warmup_num_steps": 117}


def test_resolve_fashion_mnist_8k_on_two_cpu_ranks():
    cfg = base_cfg(train_batch_size=8192)
    r = resolve(cfg, world_size=2, num_train=60000, supported_precisions=("fp32", "bf16"),
                fast_precisions=("fp32", "bf16"))
    assert (r.global_batch, r.micro_batch, r.grad_accum) == (8192, 32, 128)
    assert r.steps_per_epoch == 60000 // 8192 == 7
    assert r.total_steps == 7 * 90
    assert r.scheduler["params"]["warmup_num_steps"] == 35
    assert r.scheduler["params"]["milestones_steps"] == [210, 420, 560]
    assert r.precision == "bf16" and r.config_precision == "fp16"
    assert len(r.notes) == 1 and "fp16 is not supported" in r.notes[0] and "bf16" in r.notes[0]
    assert "fp16" not in r.ds_config and r.ds_config["bf16"] == {"enabled": True}
    assert "training" not in r.ds_config
    assert r.ds_config["data_types"] == {"buffer_dtype": "bf16"}  # BN running stats follow the model's dtype
    assert r.ds_config["gradient_clipping"] == 0.0  # not DeepSpeed's silent default of 1.0


def test_precision_falls_back_to_fp32_without_fast_bf16_and_obeys_explicit_choice():
    r = resolve(base_cfg(), world_size=1, num_train=1000, supported_precisions=("fp32", "bf16"),
                fast_precisions=("fp32",))
    assert r.precision == "fp32" and "fp32" in r.notes[0]
    assert "fp16" not in r.ds_config and "bf16" not in r.ds_config
    r = resolve(base_cfg(), world_size=1, num_train=1000, precision="bf16", supported_precisions=("fp32", "bf16"),
                fast_precisions=("fp32",))
    assert r.precision == "bf16" and r.notes == []
    with pytest.raises(ConfigError, match="--precision fp16 is not supported on this device"):
        resolve(base_cfg(), world_size=1, num_train=1000, precision="fp16", supported_precisions=("fp32", "bf16"))


def test_micro_batch_override_changes_accumulation_not_global_batch():
    r = resolve(base_cfg(train_batch_size=1024), world_size=2, num_train=5000, micro_batch=128)
    assert (r.global_batch, r.micro_batch, r.grad_accum) == (1024, 128, 4)


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(ConfigError, match=r"global batch 8192 is larger than the training set \(1000 samples\)"):
        resolve(base_cfg(train_batch_size=8192), world_size=2, num_train=1000)


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="lr must be a positive number, got -0.1"):
        resolve(base_cfg(optimizer={"type": "SGD", "params": {"lr": -0.1}}), world_size=1, num_train=1000)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in the 'training' block: \['epoch'\]"):
        resolve(base_cfg(training={"epoch": 3}), world_size=1, num_train=1000)
    with pytest.raises(ConfigError, match="enables both fp16 and bf16"):
        resolve(base_cfg(bf16={"enabled": True}), world_size=1, num_train=1000)


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "train_batch_size": 256,\n  "optimizer": {"type": "SGD",}\n}\n')
    with pytest.raises(ConfigError, match=r"bad.json:3:\d+: not valid JSON"):
        load_json(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_json(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_json(tmp_path / "list.json")


def test_batch_increase_schedule_smith():
    """Smith et al. 2018: multiply the batch by the factor the lr would have been divided by, at the same epochs."""
    cfg = base_cfg(train_batch_size=64, train_micro_batch_size_per_gpu=16,
                   training={"epochs": 3, "batch_increase": {"milestones_epochs": [1, 2], "factor": 2}})
    r = resolve(cfg, world_size=2, num_train=1024)
    assert r.epoch_batches == [64, 128, 256]
    assert r.total_steps == 1024 // 64 + 1024 // 128 + 1024 // 256 == 28
    assert r.derived()["epoch_batches"] == [64, 128, 256]
    with pytest.raises(ConfigError, match=r"global batch 2048 at epoch 2, larger than the training set \(1024"):
        resolve(base_cfg(train_batch_size=128, training={"epochs": 3, "batch_increase": {
            "milestones_epochs": [1, 2], "factor": 4}}), world_size=1, num_train=1024)
    with pytest.raises(ConfigError, match="factor must be an integer >= 2, got 1.5"):
        resolve(base_cfg(training={"epochs": 3, "batch_increase": {"milestones_epochs": [1], "factor": 1.5}}),
                world_size=1, num_train=1024)


def test_epochs_count_the_steps_of_each_epoch_when_the_batch_grows():
    """With the batch doubling at epoch 1 (16 then 8 steps per epoch), epoch 1.5 is step 16 + 4 = 20."""
    out = epochs_to_steps({"milestones_epochs": [1, 1.5, 2]}, [16, 8, 4], 28)
    assert out == {"milestones_steps": [16, 20, 24]}
    cfg = base_cfg(train_batch_size=64, train_micro_batch_size_per_gpu=16,
                   training={"epochs": 3, "batch_increase": {"milestones_epochs": [1], "factor": 2}})
    cfg["scheduler"]["params"].update(warmup_num_epochs=0.5, milestones_epochs=[2])
    r = resolve(cfg, world_size=1, num_train=1024)
    assert r.scheduler["params"]["warmup_num_steps"] == 8
    assert r.scheduler["params"]["milestones_steps"] == [16 + 8]
