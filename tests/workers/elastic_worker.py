"""Worker for tests/test_elastic.py: one launch of a chain of elastic resumes (issue 23).

Launched as ``deepspeed --num_gpus N tests/workers/elastic_worker.py --plan plan.json --out results.pt``. The plan
lists runs; each builds a tiny model (ds_optim_worker's accumulation model: tanh, no batch norm, three param groups,
a layer split across ranks) with SGD, LARS or LAMB (or ``adamw``: DeepSpeed's AdamW built from the config) under
ZeRO stage S on the N ranks of this launch, resumes from ``root/checkpoints`` (written by an earlier launch, maybe
on another rank count or stage) unless it starts at step 0, trains to ``stop`` and saves through
train/checkpoints.py's Checkpointer. The global batch is always
``GLOBAL_MICROS`` micro-batches of ``MICRO_BATCH``: rank r takes micro-batches ``r * accum .. r * accum + accum - 1``
of each step, as train/data.py's GlobalBatchSampler hands them out, so every world size sees the same samples.

``resume``: ``"reshard"`` (train/reshard.py), ``"deepspeed"`` (DeepSpeed's own load: only where the layout is the
run's), or a negative control: ``"weights"`` (the module and counters only, the optimizer state left fresh) or
``"reshard-no-masters"`` (re-sharded, but the fp32 masters taken from the bf16 module, as DeepSpeed's
``_restore_from_bit16_weights`` does). ``precision``: ``"fp32"`` (default) or ``"bf16"``.

Rank 0 writes, per run: the full fp32 master weights and every optimizer state per parameter, gathered from
DeepSpeed's own bookkeeping (ZeRO's recorded offsets, not this project's layouts), the per-group scalar state, and
each step's loss (mean over the global batch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ds_optim_worker import (  # noqa: E402
    ACC_VARIANTS,
    acc_param_groups,
    build_acc_optimizer,
    full_fp32_weights,
    lr_at,
    make_acc_model,
)

import optimizers  # noqa: E402

MICRO_BATCH = 2
GLOBAL_MICROS = 12  # micro-batches per step: 1 rank x 12, 2 x 6, 3 x 4
TOTAL_STEPS = 6
ADAMW_LR = 0.01  # "adamw": DeepSpeed's own optimizer from the config ({"type": "AdamW", "torch_adam": true})


def micro_batch(step: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``k`` (0 .. GLOBAL_MICROS - 1) of the global batch of ``step``; targets from a smooth teacher."""
    gen = torch.Generator().manual_seed(20000 + 1000 * step + k)
    x = torch.randn(MICRO_BATCH, 3, 8, 8, generator=gen)
    teacher = torch.Generator().manual_seed(7)
    return x, torch.tanh(x.flatten(1) @ torch.randn(3 * 8 * 8, 1, generator=teacher) / 8.0)


def ds_config(stage: int, world: int, precision: str = "fp32") -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": MICRO_BATCH * GLOBAL_MICROS, "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GLOBAL_MICROS // world, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**6, "gradient_clipping": 0.0,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if stage == 1:
        cfg["zero_optimization"]["parameter_alignment"] = True  # padding between parameters, not only at the end
    if stage == 2:
        cfg["zero_optimization"].update(round_robin_gradients=True, reduce_bucket_size=2000,
                                        allgather_bucket_size=2000)  # reordered flat buffer, several buckets
    return cfg


def full_states(engine: Any) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """Every elementwise optimizer state per parameter (collective) and each group's other state, read from
    DeepSpeed's own bookkeeping: ZeRO-1/2 all_gathers each state's partitions and cuts at ZeRO's recorded offsets."""
    import deepspeed.comm as dist

    wrapper = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    scalars: list[dict[str, Any]] = []
    if type(wrapper).__name__ == "DeepSpeedZeroOptimizer":
        inner = wrapper.optimizer
        for i, hp in enumerate(wrapper.single_partition_of_fp32_groups):
            state = inner.state.get(hp, {})
            scalars.append({k: v for k, v in state.items() if not (torch.is_tensor(v) and v.numel() == hp.numel())})
            for key, value in state.items():
                if not (torch.is_tensor(value) and value.numel() == hp.numel()):
                    continue
                parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, value.detach().contiguous())
                flat = torch.cat(parts)
                for p, offset, meta in zip(wrapper.round_robin_bit16_groups[i], wrapper.round_robin_bit16_offsets[i],
                                           wrapper.round_robin_bit16_meta[i], strict=True):
                    piece = flat.narrow(0, offset, meta.numel()).view(meta.shape)
                    out.setdefault(names[id(p)], {})[key] = piece.clone()
    else:
        inner = getattr(wrapper, "optimizer", wrapper)
        if type(wrapper).__name__ == "FP16_UnfusedOptimizer":  # bf16 without ZeRO: fp32 copies of the parameters
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
                names.update({id(hp): names[id(lp)] for lp, hp in zip(lp_group, hp_group, strict=True)})
        for group in inner.param_groups:
            merged: dict[str, Any] = {}
            for p in group["params"]:
                state = inner.state.get(p, {})
                out[names[id(p)]] = {k: v.detach().clone() for k, v in state.items()
                                     if torch.is_tensor(v) and v.shape == p.shape}
                merged.update({k: v for k, v in state.items() if not (torch.is_tensor(v) and v.shape == p.shape)})
            scalars.append(merged)
    return out, [{k: float(v) for k, v in s.items()} for s in scalars]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import deepspeed
    import deepspeed.comm as dist

    from train import reshard
    from train.checkpoints import Checkpointer, Position

    world, rank = dist.get_world_size(), dist.get_rank()
    accum = GLOBAL_MICROS // world
    model = make_acc_model()
    precision = spec.get("precision", "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = ds_config(spec["stage"], world, precision)
    if spec["opt"] == "adamw":  # DeepSpeed builds its own optimizer from the config (torch's AdamW here)
        config["optimizer"] = {"type": "AdamW", "params": {"lr": ADAMW_LR, "weight_decay": 0.01, "torch_adam": True}}
        groups = [{k: v for k, v in g.items() if k != "adapt"} for g in acc_param_groups(model, 0.01)]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_acc_optimizer(spec["opt"], model),
                                          config=config)
        optimizers.bind_deepspeed(engine)
    root = Path(spec["root"])
    checkpointer = Checkpointer(engine, root, rank, lambda: {}, keep=0)
    start = 0
    if spec.get("resume"):
        say = print if rank == 0 else (lambda *_: None)
        if spec["resume"] == "reshard":
            pos, _ = reshard.resume_resharded(checkpointer, engine, say)
        elif spec["resume"] == "reshard-no-masters":  # a negative control: the masters from the bf16 module
            saved = reshard.read_checkpoint(checkpointer.dir / (checkpointer.dir / "latest").read_text())
            for tensors in saved.tensors.values():
                tensors.pop(reshard.MASTER, None)
            pos, _ = checkpointer.resume(optimizer_states=False)
            reshard.apply(engine, saved)
        else:
            pos, _ = checkpointer.resume(optimizer_states=spec["resume"] == "deepspeed")
        start = pos.global_step
    base = ADAMW_LR if spec["opt"] == "adamw" else ACC_VARIANTS[spec["opt"]][1]["lr"]
    losses = {}
    for step in range(start, spec["stop"]):
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(base, step, TOTAL_STEPS)
        total = torch.zeros(1)
        for a in range(accum):
            x, y = micro_batch(step, rank * accum + a)
            loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        losses[step + 1] = float(total) / GLOBAL_MICROS
    if spec.get("save", True):
        stop = spec["stop"]
        checkpointer.save(Position(0, stop, stop, stop * MICRO_BATCH * GLOBAL_MICROS), steps_per_epoch=10**6)
    states, scalars = full_states(engine)
    result = {"weights": full_fp32_weights(engine), "states": states, "scalars": scalars, "losses": losses,
              "start": start, "global_steps": int(engine.global_steps), "skipped": int(engine.skipped_steps),
              "wrapper": type(engine.optimizer).__name__}
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="JSON list of runs (see the module docstring)")
    parser.add_argument("--out", required=True, help="results file written by rank 0 (torch.save)")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=120))
    torch.distributed.barrier()
    from train.distributed import exit_process, release_cpu_shm_names

    release_cpu_shm_names()
    results = {spec["name"]: run(spec) for spec in json.loads(Path(args.plan).read_text())}
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "results": results}, args.out)
    dist.barrier()
    torch.distributed.destroy_process_group()
    exit_process(0)


if __name__ == "__main__":
    main()
