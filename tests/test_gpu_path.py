"""The GPU path's host synchronisations and start-up order, proven on the CPU in this process (issue 19).

A GPU run pays for every host read of a device tensor (``.item()``, ``bool()``, ``.tolist()``: the host waits for
the queue to drain) and for every ``synchronize``. On the CPU neither costs anything, so these tests count them
instead: the real training loop (train/imagenet.py's ``train_one_epoch`` over a real DeepSpeed engine, a world of
one) with every read counted by its caller, DeepSpeed's ``synchronize`` calls counted, the start-up order of
``set_device`` and ``init_distributed`` with a fake accelerator that says "cuda", the normalisation constants made
once per device, and benchmarks/gpu.py's engine against the one training builds.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, free_port

deepspeed = pytest.importorskip("deepspeed")

READS = ("item", "__bool__", "tolist", "__float__", "__int__")


@pytest.fixture
def world_of_one(monkeypatch) -> None:
    """A world of one for deepspeed.initialize; the variables go away after the test."""
    if "RANK" not in os.environ:
        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(key, value)
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # StepAgreement takes them
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


# Reads of tensors that live on the host in a GPU run too: the sampler's CPU permutation, and the stop-signal
# agreement's CPU tensor (a gloo group beside NCCL). They wait for no device.
HOST_SIDE = {("train/data.py", "__iter__"), ("train/faults.py", "agree")}


def _caller(depth: int = 2) -> str:
    """Who read: 'ours' (this repository's train/, optimizers/, benchmarks/), 'host' (ours, of a tensor that is on
    the host in a GPU run too: HOST_SIDE), 'deepspeed' or 'torch'."""
    code = sys._getframe(depth).f_code
    if "deepspeed" in code.co_filename:
        return "deepspeed"
    p = Path(code.co_filename).resolve()
    if p.is_relative_to(REPO) and p.parts[len(REPO.parts)] in ("train", "optimizers", "benchmarks"):
        return "host" if (p.relative_to(REPO).as_posix(), code.co_name) in HOST_SIDE else "ours"
    return "torch"


def count_reads(monkeypatch, counter: Counter, raise_for_ours: list[bool] | None = None) -> None:
    """Count every host read of a tensor by its caller; with ``raise_for_ours[0]`` set, one of ours raises."""
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *a: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            who = _caller()
            counter[who] += 1
            if raise_for_ours and raise_for_ours[0] and who == "ours":
                raise AssertionError(f"host read Tensor.{_name} in a step that neither skipped nor logged")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, read)


# ---------------------------------------------------------------------------------------------------------------
# Finding 1: the device is set before the first collective


def test_a_gpu_rank_sets_its_device_before_init_distributed(monkeypatch):
    """LOCAL_RANK=3 on a 'cuda' accelerator: set_device(3) must come before deepspeed.init_distributed (which binds
    NCCL to cuda:3 but leaves the current device at 0 for the run-folder claim's collectives)."""
    import deepspeed.accelerator

    from train import distributed

    calls: list[str] = []

    class FakeCuda:
        def device_name(self, index: Any = None) -> str:
            return "cuda"

        def set_device(self, index: int) -> None:
            calls.append(f"set_device {index}")

    class Stop(Exception):
        pass

    def init_distributed(**kw: Any) -> None:
        calls.append("init_distributed")
        raise Stop

    for key, value in dict(RANK="3", LOCAL_RANK="3", WORLD_SIZE="4", LOCAL_SIZE="4", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeCuda())
    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    with pytest.raises(Stop):
        distributed.init(1.0)
    assert calls == ["set_device 3", "init_distributed"]


# ---------------------------------------------------------------------------------------------------------------
# Finding 3: the normalisation constants are made once per device


def test_normalize_constants_are_made_once_per_device(monkeypatch):
    """The second batch on a device builds no tensor from Python lists (on a GPU: a pageable host-to-device copy,
    a stream sync). The 'meta' device stands for a GPU: torch.tensor refuses it, and refuses anything on a second
    call; the values are (x / 255 - mean) / std computed here by hand."""
    from train import jpeg

    mean, std = (0.25, 0.5, 0.75), (0.2, 0.4, 0.8)
    real_tensor = torch.tensor
    made: list[Any] = []

    def tensor(data: Any, *a: Any, device: Any = None, **kw: Any) -> torch.Tensor:
        if device is not None and torch.device(device).type != "cpu":
            raise AssertionError(f"torch.tensor built on {device}: a host-to-device copy per call")
        made.append(data)
        return real_tensor(data, *a, device=device, **kw)

    monkeypatch.setattr(torch, "tensor", tensor)
    getattr(jpeg, "_NORMALIZE_CONSTANTS", {}).clear()
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    for device in ("meta", "cpu"):
        first = jpeg.normalize_uint8(x.to(device), mean, std)
        before = len(made)
        second = jpeg.normalize_uint8(x.to(device), mean, std)
        assert len(made) == before, f"constants rebuilt on the second call on {device}"
        assert first.device.type == second.device.type == device
    want = (x.float() / 255 - torch.as_tensor(mean).view(1, 3, 1, 1)) / torch.as_tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(second, want, rtol=1e-6, atol=1e-6)
    assert len(made) == 4  # scale and shift, once for meta and once for cpu
    s1, _ = jpeg.normalize_constants("cpu", mean, std)
    assert s1 is jpeg.normalize_constants(torch.device("cpu"), list(mean), list(std))[0]


# ---------------------------------------------------------------------------------------------------------------
# Findings 2 and 4: the real loop, reads and synchronize counted


def _cfg(precision: str, stage: int) -> dict[str, Any]:
    cfg = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}},
           "training": {"epochs": 1}}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 4}
    return cfg


def _loop(tmp_path: Path, monkeypatch, precision: str, stage: int, steps: int = 4) -> dict[str, Any]:
    """train_one_epoch for ``steps`` optimizer steps of 2 micro-steps; reads per step by caller, synchronize calls,
    reads inside StepGuard.after_micro per step (raising for ours on steps that neither skip nor log)."""
    from deepspeed.accelerator import get_accelerator

    from train import imagenet, loop
    from train.checkpoints import Position
    from train.config import resolve
    from train.data import GlobalBatchSampler, build_data
    from train.distributed import World
    from train.engine import build_engine
    from train.faults import StepAgreement
    from train.models import build_model

    monkeypatch.setattr(StepAgreement, "AGREE_SECONDS", 1e9)  # after the first micro-step's agreement: none
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(_cfg(precision, stage)))
    args = imagenet.get_args_parser().parse_args(
        ["--deepspeed_config", str(cfg_path), "--dataset", "synthetic", "--arch", "resnet_small_narrow",
         "--image-size", "8", "--log-interval", "1000", "--no-wandb", "--max-steps", str(steps)])
    data = build_data("synthetic", None, channels=3, image_size=8, workers=0, seed=0, synthetic_size=(64, 8))
    resolved = resolve(json.loads(cfg_path.read_text()), world_size=1, num_train=64, precision=precision)
    torch.manual_seed(0)
    model = build_model("resnet_small_narrow", data.info.num_classes, 3, 8)
    engine, _ = build_engine(resolved, model, timeout=timedelta(minutes=5), trusted_checkpoint=True,
                             say=lambda *_: None)
    world = World(0, 1, "cpu", timedelta(minutes=5))
    run = imagenet.ImageRun(args=args, world=world, resolved=resolved, engine=engine, ds_config={}, run_name="r",
                            out_dir=tmp_path, max_steps=steps, data=data, memory_format=torch.channels_last,
                            val_indices=list(range(8)))
    sampler = GlobalBatchSampler(64, 8, 4, 1, 0, 0)
    sampler.set_epoch(0, 0)

    counter: Counter = Counter()
    strict = [False]
    per_step: list[dict[str, int]] = []
    in_guard: list[int] = []
    syncs = [0]
    accelerator = get_accelerator()
    synchronize = accelerator.synchronize

    def counted_sync(*a: Any, **kw: Any) -> Any:
        syncs[0] += 1
        return synchronize(*a, **kw)

    after_micro, after_step = run.guard.after_micro, loop.after_step

    def guarded_after_micro(loss: torch.Tensor, boundary: bool, step: int) -> Any:
        before = counter["ours"]
        # steps 2 .. steps-1: neither the first (it agrees) nor the last (it logs); no skip expected (checked below)
        strict[0] = boundary and 1 <= step < steps - 1 and engine.skipped_steps == 0
        try:
            verdict = after_micro(loss, boundary, step)
        finally:
            strict[0] = False
        if boundary:
            in_guard.append(counter["ours"] - before)
        return verdict

    def marked_after_step(*a: Any, **kw: Any) -> None:
        after_step(*a, **kw)
        per_step.append(dict(counter))
        counter.clear()

    monkeypatch.setattr(run.guard, "after_micro", guarded_after_micro)
    monkeypatch.setattr(loop, "after_step", marked_after_step)
    monkeypatch.setattr(accelerator, "synchronize", counted_sync)
    count_reads(monkeypatch, counter, strict)
    pos = Position()
    imagenet.train_one_epoch(run, sampler, pos)
    monkeypatch.undo()
    result = {"per_step": per_step, "in_guard": in_guard, "syncs": syncs[0], "steps": pos.global_step,
              "skipped": engine.skipped_steps, "wrapper": type(engine.optimizer).__name__}
    # evaluate (finding 5): the training layout reaches the model; the figures against a computation by hand
    layouts: list[bool] = []
    hook = engine.module.register_forward_pre_hook(
        lambda m, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    indices = list(range(data.info.num_val))
    val = imagenet.evaluate(run, indices)
    hook.remove()
    with torch.no_grad():
        engine.module.eval()
        x, y = next(iter(data.val_batches(indices, len(indices))))
        from train.engine import engine_dtype

        logits = engine.module(x.to(engine_dtype(engine)).contiguous(memory_format=torch.channels_last)).float()
        engine.module.train()
    top1 = 100 * (1 - (logits.argmax(1) == y).double().mean().item())
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    result.update(layouts=layouts, val=val, want_top1=top1, want_loss=loss, val_n=len(indices))
    engine.destroy()
    return result


# (precision, ZeRO stage) -> our reads on a step that neither skips nor logs: fp32 without ZeRO reads the skip
# rule's one flag (train/faults.py, "Host reads"); every other mode reads nothing of ours.
# fp16 is refused by DeepSpeed's CPU accelerator ("Type fp16 is not supported"): its rule is tested on StepGuard
# itself below.
MODES = [("fp32", 0, 1), ("fp32", 1, 0), ("bf16", 1, 0)]


@pytest.mark.parametrize("precision,stage,ours", MODES, ids=[f"{p}-z{s}" for p, s, _ in MODES])
def test_a_step_with_no_host_sync(tmp_path, monkeypatch, world_of_one, precision, stage, ours):
    """The real loop, 4 optimizer steps of 2 micro-steps: on steps 2-3 (neither the first, which agrees on
    signals, nor the last, which logs) our code reads the host ``ours`` times per step; StepGuard.after_micro
    raises if it reads there; DeepSpeed's synchronize (its throughput timer) is never called."""
    got = _loop(tmp_path, monkeypatch, precision, stage)
    assert got["steps"] == 4 and got["skipped"] == 0, got
    assert got["syncs"] == 0, f"get_accelerator().synchronize called {got['syncs']} times in 8 micro-steps"
    quiet = got["per_step"][1:3]
    assert [s.get("ours", 0) for s in quiet] == [ours, ours], got
    assert got["in_guard"][1:3] == [0, 0], got
    assert got["per_step"][3].get("ours", 0) >= 1  # the logging step reads (the record's all-reduced sums)
    assert got["layouts"] and all(got["layouts"]), "evaluate must feed the model channels_last, as training does"
    assert got["val"]["val_samples"] == got["val_n"]
    assert got["val"]["val_top1_error"] == pytest.approx(got["want_top1"], abs=1e-9)
    assert got["val"]["val_loss"] == pytest.approx(got["want_loss"], rel=1e-2 if precision == "bf16" else 1e-5)


class _Fp16Engine:
    """What StepGuard reads of a DeepSpeed fp16 engine: fp16_enabled, skipped_steps (the host's count, from the loss
    scaler's own overflow read), module buffers, device. DeepSpeed's CPU accelerator refuses fp16, so no real fp16
    engine runs here."""

    def __init__(self) -> None:
        self.module = torch.nn.BatchNorm1d(3)
        self.device = torch.device("cpu")
        self.skipped_steps = 0

    def fp16_enabled(self) -> bool:
        return True


def test_fp16_guard_reads_nothing_on_a_taken_step_and_once_on_a_skipped_one(monkeypatch, world_of_one):
    """StepGuard.after_micro with fp16: Tensor.item/__bool__/tolist raise on a step the loss scaler took (the
    losses were finite: nothing to read); on a skipped step it reads the non-finite count once and tells a bad
    step (a NaN loss) from an overflow skip (finite losses)."""
    import torch.distributed as dist

    from train.faults import StepAgreement, StepGuard

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    monkeypatch.setattr(StepAgreement, "AGREE_SECONDS", 1e9)
    engine = _Fp16Engine()
    guard = StepGuard(engine, max_skipped_steps=10)
    finite, nan = torch.tensor(2.5), torch.tensor(float("nan"))
    x = torch.zeros(4, 3)
    for step in (0, 1):  # step 0 agrees on signals (the first micro-step measures); step 1 is a quiet one
        guard.before_micro(x, step)
        guard.after_micro(finite, False, step)
        guard.before_micro(x, step)
        counter: Counter = Counter()
        count_reads(monkeypatch, counter, [step == 1])
        verdict = guard.after_micro(finite, True, step)
        monkeypatch.undo()
        monkeypatch.setattr(StepAgreement, "AGREE_SECONDS", 1e9)
        assert verdict.completed and not verdict.bad
    assert counter["ours"] == 0
    for loss, bad in ((nan, True), (finite, False)):  # skipped by the scaler: a bad step, then an overflow skip
        guard.before_micro(x, 2)
        engine.skipped_steps += 1
        counter = Counter()
        count_reads(monkeypatch, counter)
        verdict = guard.after_micro(loss, True, 2)
        monkeypatch.undo()
        assert verdict.completed and verdict.bad is bad
        assert counter["ours"] == 1  # the count of non-finite losses (the agreement's CPU tensor is 'host')


# ---------------------------------------------------------------------------------------------------------------
# Finding 6: benchmarks/gpu.py measures the engine training gets


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # fp16: refused by DeepSpeed's CPU accelerator
def test_gpu_benchmark_engine_is_the_training_engine(world_of_one, precision):
    """benchmarks.gpu.engine_for at micro batch 256 against the engine train/imagenet.py builds from
    ds_configs/256.json with --micro-batch 256 on one rank (global batch 256: the same batch): the same wrapper
    over the same optimizer class, ZeRO stage, clipping, buffer dtype, and DeepSpeed config."""
    from benchmarks.gpu import engine_for, wrapper_name
    from train.config import load_json, resolve
    from train.engine import build_engine
    from train.models import build_model

    bench, bench_cfg = engine_for("resnet_small_narrow", 256, precision, 8, 10)
    resolved = resolve(load_json(REPO / "ds_configs" / "256.json"), world_size=1, num_train=1_281_167,
                       micro_batch=256, precision=precision)
    torch.manual_seed(0)
    model = build_model("resnet_small_narrow", 10, 3, 8, zero_init_residual=resolved.training["zero_init_residual"])
    train, train_cfg = build_engine(resolved, model, timeout=timedelta(minutes=5), trusted_checkpoint=True,
                                    say=lambda *_: None)
    assert wrapper_name(bench) == wrapper_name(train) == "DeepSpeedZeroOptimizer over SGD"
    assert type(bench.optimizer.optimizer).__module__ == "optimizers.sgd"  # ours, not torch.optim.SGD
    assert bench.gradient_clipping() == train.gradient_clipping() == 0.0
    assert bench.zero_optimization_stage() == 1
    assert bench_cfg == train_cfg and bench_cfg["timers"] == {"throughput": {"enabled": False}}
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert {b.dtype for b in bench.module.buffers() if b.is_floating_point()} == {want}
    bench.destroy()
    train.destroy()
