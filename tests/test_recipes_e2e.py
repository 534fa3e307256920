"""The shipped LARS and LAMB rungs (8k, 16k, 32k) run end to end through train/imagenet.py on CPU."""

from __future__ import annotations

import json
import math

import pytest
from conftest import launch, read_metrics, run_single

pytestmark = pytest.mark.launcher


@pytest.mark.parametrize("name", ["lars-8k", "lars-32k", "lamb-8k", "lamb-32k"])
def test_layerwise_rung_runs_one_step(tmp_path, fashion_mnist_dir, name):
    """Two optimizer steps of the config, unchanged, on Fashion-MNIST (one process, an MLP to keep it short): the
    ends of each ladder. The 16k rungs differ from them only in numbers, which tests/test_recipe_table.py holds
    against the generator, and tests/test_recipes_start.py takes a step of every shipped config."""
    batch = {"8k": 8192, "16k": 16384, "32k": 32768}[name.split("-")[1]]
    run = tmp_path / "run"
    out = run_single(["--deepspeed_config", f"ds_configs/{name}.json", "--dataset", "fashion-mnist", "--data-dir",
                      str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", str(batch), "--val-subset", "128",
                      "--max-steps", "2", "--micro-batch", "512", "--output-dir", str(run), "--no-wandb",
                      "--precision", "fp32"])  # not about precision: no probe (train/precision.py) on any CPU
    assert "bind_deepspeed: DeepSpeedZeroOptimizer: 2 flat ZeRO partition(s) bound" in out.stdout
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(math.isfinite(s["loss"]) for s in steps)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["derived"]["global_batch"] == batch and cfg["optimizer"]["type"] in ("LARS", "LAMB")
    # Linear warmup from 0: step 1 runs at lr 0, step 2 at peak / warmup_steps (1 step per epoch here).
    warmup = cfg["scheduler"]["params"]["warmup_num_steps"]
    assert [s["lr"] for s in steps] == pytest.approx([0.0, cfg["derived"]["lr"] / warmup])


def test_lars_32k_on_two_ranks_binds_a_layer_split_across_ranks(tmp_path, fashion_mnist_dir):
    """lars-32k as shipped (ZeRO-1, micro batch 32) on 2 CPU ranks: the flat partitions are bound to the real layers,
    including the layer that the partition boundary cuts in two (the MLP's first weight: 100,352 of its 101,770
    parameters; the small ResNet, 20x the compute per image, gave the same result)."""
    run = tmp_path / "run"
    out = launch(["--deepspeed_config", "ds_configs/lars-32k.json", "--dataset", "fashion-mnist", "--data-dir",
                  str(fashion_mnist_dir), "--arch", "mlp", "--train-subset", "32768", "--val-subset", "256",
                  "--max-steps", "1", "--output-dir", str(run), "--no-wandb", "--precision", "fp32"])
    assert "batch: 32 micro x 512 accumulation x 2 ranks = 32,768 global" in out.stdout
    assert "layer(s) split across ranks" in out.stdout
    steps = [r for r in read_metrics(run) if r["kind"] == "step"]
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"])
