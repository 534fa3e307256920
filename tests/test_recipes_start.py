"""Every shipped config starts: each JSON under ds_configs/ goes through the code path its entry point uses
(train.config.resolve, then train.engine.build_engine for train/imagenet.py and train/bert.py configs; load_setup and
a parameter-server shard for train/downpour.py's) and takes one optimizer step on a tiny model, in this process
(a world of one, as train.distributed.single_process_env makes it).

What a recipe can get wrong shows in the first three: the optimizer or schedule cannot be built from the config
(every config is built up to ``build_optimizer_and_schedule``, which constructs both for real), or DeepSpeed
refuses the config (one engine and one step for each distinct set of what DeepSpeed is given: optimizer and
scheduler type, precision, ZeRO stage, the top-level and training keys; the tuned study's hundred configs differ
only in numbers, so a dozen engines cover them). The global batch is set to one micro-batch, so one micro-step
is one optimizer step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
ALL = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.json"))


def _kind(cfg: dict[str, Any]) -> str:
    return "downpour" if "downpour" in cfg else "bert" if "bert" in cfg else "images"


def _load(name: str) -> dict[str, Any]:
    from train.config import load_json

    return load_json(CONFIGS / name)


def _one_step_batch(cfg: dict[str, Any]) -> dict[str, Any]:
    """The recipe with its global batch cut to one micro-batch of one rank."""
    cfg = copy.deepcopy(cfg)
    if cfg.get("training", {}).get("momentum_scaling"):
        return cfg  # its momentum is a function of the global batch: kept, and the step takes its micro-steps
    cfg["train_batch_size"] = min(cfg.get("train_micro_batch_size_per_gpu") or 4, 4)
    cfg["train_micro_batch_size_per_gpu"] = cfg["train_batch_size"]
    cfg.pop("gradient_accumulation_steps", None)
    return cfg


def _resolve(cfg: dict[str, Any]) -> Any:
    from deepspeed.accelerator import get_accelerator

    from train.config import resolve

    accel = get_accelerator()
    supported = ("fp32",) + (("fp16",) if accel.is_fp16_supported() else ()) + (
        ("bf16",) if accel.is_bf16_supported() else ())
    # num_train leaves room for Smith et al.'s batch increases (x5 twice) and gives every epoch steps
    return resolve(cfg, world_size=1, num_train=10_000, supported_precisions=supported, fast_precisions=supported)


class TinyImages(nn.Module):
    """Conv, batch norm, bias, linear: every kind of parameter the exclusion rule sorts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    from train.bert import MaskedLM

    return MaskedLM(BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32,
                                               max_position_embeddings=16)))


def _signature(resolved: Any, kind: str) -> tuple:
    ds = resolved.ds_config
    return (kind, resolved.optimizer["type"], (resolved.scheduler or {}).get("type"), resolved.precision,
            resolved.zero_stage, tuple(sorted(ds)), tuple(sorted(k for k, v in resolved.training.items() if v)),
            float(ds.get("gradient_clipping", 0.0)) > 0)


@pytest.fixture(scope="module")
def world():
    """A world of one for deepspeed.initialize; the variables go away after the module (a child process started
    later, e.g. by tests/test_bert.py, must not inherit this world's MASTER_PORT: its rendezvous would meet this
    process's store and fail)."""
    added: list[str] = []
    if "RANK" not in os.environ:
        from train.distributed import single_process_env

        before = set(os.environ)
        single_process_env()
        added = [k for k in os.environ if k not in before]
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        _STARTED.clear()


_STARTED: set[tuple] = set()  # signatures already built into an engine and stepped


def _step(resolved: Any, kind: str) -> Any:
    """build_engine on a tiny model and one optimizer step; the engine."""
    from datetime import timedelta

    from train.engine import build_engine

    torch.manual_seed(0)
    model = _tiny_bert() if kind == "bert" else TinyImages()
    engine, _ = build_engine(resolved, model, timeout=timedelta(minutes=5), trusted_checkpoint=False,
                             say=lambda *_: None)
    n = resolved.micro_batch
    if kind == "bert":
        ids = torch.randint(5, 40, (n, 8))
        labels = torch.where(torch.arange(8) % 3 == 0, ids, torch.full_like(ids, -100))
        inputs: tuple = (ids, torch.ones_like(ids), labels)
    else:
        inputs = (torch.randn(n, 1, 6, 6, dtype=next(engine.module.parameters()).dtype),)
    for _ in range(resolved.grad_accum):  # one optimizer step
        out = engine(*(t.to(engine.device) for t in inputs))
        logits, target = out if kind == "bert" else (out, torch.arange(n, device=engine.device) % 3)
        engine.backward(nn.functional.cross_entropy(logits.float(), target))
        engine.step()
    assert engine.global_steps == 1
    return engine


@pytest.mark.parametrize("name", ALL)
def test_every_shipped_config_starts(world, name):
    cfg = _load(name)
    kind = _kind(cfg)
    if kind == "downpour":
        _downpour_step(name)
        return
    cfg = _one_step_batch(cfg)
    cfg.pop("bert", None)  # train/bert.py takes its block off before resolving
    resolved = _resolve(cfg)
    from train.engine import build_optimizer_and_schedule

    model = _tiny_bert() if kind == "bert" else TinyImages()
    build_optimizer_and_schedule(resolved, model)  # every config: its optimizer and schedule, built for real
    sig = _signature(resolved, kind)
    if sig in _STARTED:
        return
    _step(resolved, kind)
    _STARTED.add(sig)


def _downpour_step(name: str) -> None:
    """train/downpour.py's check of the block (load_setup, which also opens the data), then one shard update from
    a gradient as a replica pushes it (the RPC around it is tested in tests/test_downpour.py)."""
    from train import downpour
    from train.models import build_model
    from train.ps.shard import ParameterShard

    if not os.environ.get("FASHION_MNIST_DIR") and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not here (set FASHION_MNIST_DIR)")
    args = downpour.get_args_parser().parse_args(["--deepspeed_config", str(CONFIGS / name), "--no-wandb"])
    setup = downpour.load_setup(args)
    model = build_model(setup.cfg["model"], 10, 1, 28)
    params = dict(model.named_parameters())
    names = setup.param_shards[0]
    shard = ParameterShard(
        0, {k: params[k].detach().clone() for k in names if k in params}, {}, optimizer=setup.cfg["optimizer"],
        lr=setup.cfg["lr"], initial_accumulator_value=setup.cfg["initial_accumulator_value"])
    before = {k: v.clone() for k, v in shard.fetch(0).items()}
    shard.push(0, {k: torch.ones_like(v) for k, v in before.items()}, {})
    after = shard.fetch(0)
    # one step of a gradient of ones: SGD moves every weight by lr; Adagrad by lr / sqrt(acc0 + 1)
    acc0 = setup.cfg["initial_accumulator_value"] if setup.cfg["optimizer"] == "adagrad" else None
    want = setup.cfg["lr"] if acc0 is None else setup.cfg["lr"] / (math.sqrt(acc0 + 1.0) + 1e-10)
    for k, w in before.items():
        assert torch.allclose(w - after[k], torch.full_like(w, want), rtol=1e-5), k


# ---------------------------------------------------------------------------------------------------------------
# exclude_norm_and_bias means what it says whichever optimizer runs


def test_adamw_recipe_gets_our_parameter_groups(world):
    """Devlin et al.'s AdamW decays neither LayerNorm nor biases; DeepSpeed builds AdamW from model_parameters,
    so the engine's optimizer must hold our two groups: the weights at the recipe's decay, the rest at 0."""
    cfg = _one_step_batch(_load("bert/adamw-256.json"))
    cfg.pop("bert")
    resolved = _resolve(cfg)
    engine = _step(resolved, "bert")
    groups = engine.basic_optimizer.param_groups
    assert type(engine.basic_optimizer).__name__ in ("AdamW", "FusedAdam")
    names = {id(p): n for n, p in engine.module.named_parameters()}
    # ZeRO's optimizer steps flat fp32 partitions; bit16_groups[i] are the module's parameters of group i
    members = getattr(engine.optimizer, "bit16_groups", None) or [g["params"] for g in groups]
    assert len(members) == len(groups)
    decay = {g["weight_decay"]: {names[id(p)] for p in ps} for g, ps in zip(groups, members, strict=True)}
    assert set(decay) == {0.01, 0.0}
    assert all("LayerNorm" in n or n.endswith("bias") for n in decay[0.0])
    assert all(not n.endswith("bias") and "LayerNorm" not in n for n in decay[0.01])
    assert any("LayerNorm" in n for n in decay[0.0]) and any(n.endswith("attention.self.query.weight")
                                                            for n in decay[0.01])
    assert len(decay[0.0]) + len(decay[0.01]) == len(names)

