"""Worker for tests/test_diagnostics.py: per-layer trust-ratio records under real DeepSpeed engines.

Launched as ``deepspeed --num_gpus 2 tests/workers/diag_worker.py --out results.pt --runs fp32-z0:lars ...``.
Each run builds the model of tests/workers/ds_optim_worker.py (a Linear weight straddles the 2 ranks' ZeRO
partitions), binds the optimizer as train/engine.py does, and trains ``STEPS`` steps on the same per-rank data with
``train.diagnostics.TrustRatioMonitor`` at interval 1. Rank 0 saves every run's "layers" records (and the wandb
scalars the monitor passed along) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ds_optim_worker as base  # noqa: E402

import optimizers  # noqa: E402
from train.diagnostics import TrustRatioMonitor  # noqa: E402

STEPS = 3
MAX_TRUST_RATIO = 0.3
UNUSED = "unused"  # the name of the unused parameter of the lars_unused variant's model
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **base.VARIANTS,
    "sgd": ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    "larc": ("larc", base.VARIANTS["lars"][1]),  # at step 1 clips the large Linear's ratio at 1, not the others
    # LAMB with a clamp between the layers' ratios (||w|| / ||u|| 0.11-0.19, and 0.40-0.60 for the large Linear)
    "lamb_clamp": ("lamb", {**base.VARIANTS["lamb"][1], "max_trust_ratio": MAX_TRUST_RATIO}),
    "lars_unused": base.VARIANTS["lars"],  # the model has a parameter the forward pass does not use
    "lamb_pad": base.VARIANTS["lamb"],  # TinyHead: rank 1's share of the tiny weight's group is only padding
}


class ListLog:
    """Stands in for train.tracking.RunLog on rank 0: keeps what the monitor logs."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.wandb: list[dict[str, float]] = []

    def log(self, record: dict[str, Any], wandb_extra: dict[str, float] | None = None) -> None:
        self.records.append(record)
        self.wandb.append(dict(wandb_extra or {}))


def make_model(variant: str) -> torch.nn.Module:
    """tests/workers/ds_optim_worker.py's model; for ``*_unused`` with a (5, 4) parameter outside the forward pass
    (first in ``named_parameters()``, so in the adapted group, whose flat partition it shifts by 20 elements)."""
    model = base.make_model()
    if variant.endswith("_unused"):
        weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
        model.register_parameter(UNUSED, torch.nn.Parameter(weight))
    return model


class TinyHead(torch.nn.Module):
    """make_model's network with its first two logits scaled by a (1, 2) weight that has a param group of its own
    (``lamb_pad``): on 2 ranks ZeRO pads that group to 4 elements, so rank 1's partition of it is only padding."""

    def __init__(self) -> None:
        super().__init__()
        self.body = base.make_model()
        self.tiny = torch.nn.Parameter(torch.tensor([[1.5, 0.5]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return torch.cat([out[:, :2] * self.tiny, out[:, 2:]], 1)


def run(mode: str, variant: str) -> dict[str, Any]:
    import deepspeed
    import deepspeed.comm as dist

    name, params = VARIANTS[variant]
    if variant.endswith("_pad"):
        model: torch.nn.Module = TinyHead()
        groups = optimizers.build_param_groups(model.body, params["weight_decay"])
        groups.append({"params": [model.tiny], "weight_decay": params["weight_decay"]})
        opt = optimizers.LAMB(groups, **params)
    else:
        model = make_model(variant)
        opt = optimizers.build_optimizer(name, model, params)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=base.ds_config(mode))
    binding = optimizers.bind_deepspeed(engine)
    monitor = TrustRatioMonitor(engine, interval=1, next_step=1)
    every_rank = variant.endswith("_pad")  # every rank's records come back (rank 1's differ only if one is wrong)
    log = ListLog() if dist.get_rank() == 0 or every_rank else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[mode.split("-")[0]]
    for step in range(STEPS):
        base.train_step(engine, step, dist.get_rank(), dtype, params["lr"], STEPS)
        monitor.after_step(step + 1, (step + 1) * base.MICRO_BATCH * dist.get_world_size(), log)
    split = monitor.binding if name == "sgd" else binding
    result = {"wrapper": type(engine.optimizer).__name__, "binding": str(split),
              "split_layers": list(getattr(split, "split_layers", ())),
              "records": log.records if log else [], "wandb": log.wandb if log else []}
    if every_rank:  # per rank: its records, and per param group whether its partition is only padding
        flats = getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
        mine = {"records": log.records if log else [],
                "padding_only": [not opt.layout_of(t).segments for t in flats if opt.layout_of(t) is not None]}
        result["ranks"] = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(result["ranks"], mine)
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results file written by rank 0 (torch.save)")
    parser.add_argument("--runs", nargs="+", required=True, help="mode:variant, e.g. fp32-z1:lars")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=300))
    torch.distributed.barrier()
    from train.distributed import exit_process, release_cpu_shm_names

    release_cpu_shm_names()
    results = {spec: run(*spec.split(":")) for spec in args.runs}
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "results": results}, args.out)
    dist.barrier()
    torch.distributed.destroy_process_group()
    exit_process(0)  # DeepSpeed keeps the gloo threads alive: no finalisation with them (train/distributed.py)


if __name__ == "__main__":
    main()
