"""bind_deepspeed on real DeepSpeed engines built in this process (a world of one, no launcher).

Issue 14 item 3: the zero-gradient step that DeepSpeed's FP16_UnfusedOptimizer takes inside deepspeed.initialize
(bf16/fp16 without ZeRO) is undone also for a stateless optimizer (momentum 0 with weight decay), which keeps no
state but moved its weights. Item 5: a layer-wise optimizer under tensor or pipeline parallelism (engine.mpu) is
refused with a message; SGD is elementwise and passes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import optimizers

deepspeed = pytest.importorskip("deepspeed")


@pytest.fixture
def single_process(monkeypatch) -> None:
    """A world of one for deepspeed.initialize; the variables go away after the test (children of later tests
    must not inherit them)."""
    if "RANK" not in os.environ:
        from conftest import free_port

        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(key, value)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _config(**extra: Any) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
            "gradient_clipping": 0.0, **extra}


@pytest.mark.parametrize("name,kw", [("lars", dict(lr=1.0, momentum=0.0, weight_decay=0.1)),
                                     ("sgd", dict(lr=1.0, momentum=0.0, weight_decay=0.1))], ids=["lars", "sgd"])
def test_start_up_step_undone_for_a_stateless_optimizer(single_process, name, kw):
    """bf16 without ZeRO: FP16_UnfusedOptimizer steps the optimizer once with zero gradients inside initialize;
    with weight decay that is w <- w - lr wd w (here a 10% shrink) and leaves no state behind when momentum is 0.
    After bind_deepspeed the fp32 copies hold the initial weights again, bit for bit."""
    model = _model()
    initial = [p.detach().float().clone() for p in model.parameters()]
    opt = optimizers.build_optimizer(name, model, kw, exclude_norm_and_bias=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_config(bf16={"enabled": True}))
    wrapper = engine.optimizer
    assert type(wrapper).__name__ == "FP16_UnfusedOptimizer"
    moved = max(float((hp.detach() - w).abs().max()) for hp, w in zip(wrapper.fp32_groups[0], initial, strict=True))
    assert moved > 1e-3, "deepspeed.initialize took no visible step: the test would not discriminate"
    binding = optimizers.bind_deepspeed(engine)
    assert binding.undid_init_step, binding
    for hp, w in zip(wrapper.fp32_groups[0], initial, strict=True):
        assert torch.equal(hp.detach(), w.to(torch.bfloat16).float())  # the bf16 model's weights, exactly
    engine.destroy()


class _WorldOfOneMpu:
    """The model-parallel unit interface DeepSpeed reads (Megatron's names): tensor and pipeline parallel size 1."""

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self) -> Any:
        return dist.group.WORLD

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group(self) -> Any:
        return dist.group.WORLD

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self) -> Any:
        return dist.group.WORLD


@pytest.mark.parametrize("stage", [0, 1])
def test_model_parallel_engine_refused_for_layerwise_optimizers(single_process, stage):
    """An engine built with an mpu (tensor/pipeline parallelism): LARS is refused, naming engine.mpu and why; SGD
    (elementwise, exact on shards) is bound as before."""
    for name, refused in (("lars", True), ("sgd", False)):
        model = _model()
        opt = optimizers.build_optimizer(name, model, {"lr": 0.1})
        cfg = _config(zero_optimization={"stage": stage}, zero_allow_untested_optimizer=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=_WorldOfOneMpu())
        assert engine.mpu is not None
        if refused:
            with pytest.raises(NotImplementedError, match=r"engine\.mpu.*shard"):
                optimizers.bind_deepspeed(engine)
        else:
            assert optimizers.bind_deepspeed(engine).layout == "not layer-wise"
        engine.destroy()
