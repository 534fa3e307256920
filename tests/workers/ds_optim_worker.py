"""Worker for tests/test_optimizers_deepspeed.py: runs LARS and LAMB under real DeepSpeed engines.

Launched as ``deepspeed --num_gpus N tests/workers/ds_optim_worker.py --out results.pt --ckpt-dir DIR --modes ...``.
For each mode (precision x ZeRO stage) it trains the same small model from the same seed on the same per-rank
data for ``--steps`` optimizer steps with a linear lr warmup, once per variant:

* ``lars`` / ``lamb``: the optimizer bound with ``optimizers.bind_deepspeed`` (the exact path);
* ``lars_naive`` / ``lamb_naive``: the same optimizer left unbound (``allow_unbound``), so that its trust ratios
  are computed over DeepSpeed's flat chunks; only in modes that flatten.

For bound variants it also saves a checkpoint before the last step, takes the last step, reloads the checkpoint
and takes the last step again (``resumed``). Rank 0 saves the full fp32 master weights of every run (gathered
with DeepSpeed's own ``safe_get_full_fp32_param``, not with this project's layouts) to ``--out``.

The ``*-acc`` modes (``ACC_MODES``) are the gradient-accumulation set-up: a well-conditioned model (tanh, no batch
norm, a squared loss), ``ACC_GAS`` micro-steps per step, inputs in channels_last as ``train/imagenet.py`` feeds
them, three adapted param groups' worth of structure (two adapted groups, one of them so small that some ranks hold
only its padding when run on 4 ranks, and a group without adaptation), and the variants of ``ACC_VARIANTS``: SGD,
LARS, LARC, LARS in the lr-in-velocity form, LAMB, and in ZeRO-1/2 ``*_noreduce``: bound, but each rank's partial
layer norms are used as if they were whole (the all-reduce removed): a negative control that must fail.

The model and data helpers are importable without DeepSpeed: the test computes its plain-PyTorch reference with
them.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import optimizers  # noqa: E402
import train.engine  # noqa: E402,F401  (DeepSpeed's Muon module without torch._inductor, as in our ranks)

MICRO_BATCH = 4
NUM_CLASSES = 10
# LARS with a trust coefficient large enough that every step moves the weights measurably (~2% per step).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lars": ("lars", {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02}),
    "lamb": ("lamb", {"lr": 0.01, "weight_decay": 0.01}),
}
CPU_MODES = ("fp32-z0", "fp32-z1", "fp32-z2", "bf16-z0", "bf16-z1", "bf16-z1-fp32acc", "bf16-z2")
ACC_MODES = ("fp32-z0-acc", "fp32-z1-acc", "fp32-z2-acc")
ACC_GAS = 2
ACC_STEPS = 3
ACC_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3}),
    "lars": ("lars", {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02}),
    "larc": ("larc", {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02}),
    # The MLCommons reference LARS: lr inside the velocity, no momentum correction (the lr changes every step here).
    "lars_velocity": ("lars", {"lr": 2.0, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02,
                               "lr_in_momentum": True, "momentum_correction": False}),
    "lamb": ("lamb", {"lr": 0.02, "weight_decay": 0.01}),
}
ACC_NEGATIVE = ("lars", "lamb")  # run as f"{name}_noreduce" in ZeRO-1/2
GPU_MODES = ("fp16-z0", "fp16-z1", "fp16-z2")
FLATTENING_MODES = ("fp32-z1", "fp32-z2", "bf16-z1", "bf16-z1-fp32acc", "bf16-z2", "fp16-z1", "fp16-z2")


def make_model(seed: int = 0) -> nn.Module:
    """Conv (no bias) + BN + two Linear layers; odd sizes so that ZeRO pads and splits a layer across 2 ranks.

    Decay group: 189 + 8316 + 330 = 8835 elements; with 2 ranks each holds about half, so the 8316-element
    Linear weight straddles the partition boundary. The first Linear starts 10x larger than default so that
    layers have very different ||w|| / ||g|| (a flat-chunk ratio is then far from every layer's own).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 7, 3, bias=False), nn.BatchNorm2d(7), nn.ReLU(), nn.Flatten(),
        nn.Linear(7 * 6 * 6, 33), nn.ReLU(), nn.Linear(33, NUM_CLASSES),
    )
    with torch.no_grad():
        model[4].weight.mul_(10.0)
    return model


def make_acc_model(seed: int = 0) -> nn.Module:
    """Conv (bias) + tanh + Linear + tanh + Linear(12 -> 1): smooth, no batch norm, a squared loss.

    fp32 rounding stays at its own size through a few steps here (on a ResNet with batch norm over a few samples it
    grows by orders of magnitude per step, so a test there cannot tell rounding from error).
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 12), nn.Tanh(),
                         nn.Linear(12, 1, bias=False))


def acc_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two adapted groups (conv + first Linear weights; the 12-element last weight, with twice the weight decay)
    and one without adaptation or decay (the biases). On 4 ranks ZeRO pads the 12-element group to 16: the last
    rank holds only padding of it."""
    conv, fc1, fc2 = model[0], model[3], model[5]
    return [{"params": [conv.weight, fc1.weight], "weight_decay": weight_decay},
            {"params": [fc2.weight], "weight_decay": 2 * weight_decay},
            {"params": [conv.bias, fc1.bias], "weight_decay": 0.0, "adapt": False}]


def build_acc_optimizer(variant: str, model: nn.Module) -> torch.optim.Optimizer:
    name, params = ACC_VARIANTS[variant]
    spec = optimizers.optimizer_spec(name)
    kwargs = {**params, **spec.preset}
    groups = acc_param_groups(model, kwargs.pop("weight_decay"))
    if spec.cls is optimizers.SGD:
        for g in groups:
            g.pop("adapt", None)
    return spec.cls(groups, **kwargs)


def acc_batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of rank ``rank`` at step ``step``; targets from a fixed smooth teacher."""
    gen = torch.Generator().manual_seed(10000 + 100 * step + 10 * rank + micro)
    x = torch.randn(MICRO_BATCH, 3, 8, 8, generator=gen)
    teacher = torch.Generator().manual_seed(7)
    y = torch.tanh(x.flatten(1) @ torch.randn(3 * 8 * 8, 1, generator=teacher) / 8.0)
    return x, y


def acc_reference_weights(variant: str, world_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Plain PyTorch in ``dtype``: each step's gradient is the mean over every rank's ACC_GAS micro-batches, as
    DeepSpeed's is (loss / accumulation steps, averaged over ranks). Every parameter gets a gradient every step."""
    model = make_acc_model().to(dtype)
    opt = build_acc_optimizer(variant, model)
    base = ACC_VARIANTS[variant][1]["lr"]
    for step in range(ACC_STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(base, step, ACC_STEPS)
        opt.zero_grad()
        for r in range(world_size):
            for m in range(ACC_GAS):
                x, y = acc_batch(step, r, m)
                loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
                (loss / (world_size * ACC_GAS)).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"parameters without a gradient: {missing}"
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of data-parallel rank ``rank`` at step ``step`` (same on every machine)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(MICRO_BATCH, 3, 8, 8, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (MICRO_BATCH,), generator=gen)
    return x, y


def lr_at(base: float, step: int, steps: int) -> float:
    """Linear warmup from base / steps to base: every step changes the lr (exercises LARC and momentum)."""
    return base * (step + 1) / steps


def reference_weights(variant: str, world_size: int, steps: int) -> dict[str, torch.Tensor]:
    """Plain PyTorch, one process: the gradient is the mean over the ranks' micro-batches, as DeepSpeed's is."""
    name, params = VARIANTS[variant]
    model = make_model()
    opt = optimizers.build_optimizer(name, model, params)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(params["lr"], step, steps)
        opt.zero_grad()
        loss = sum(nn.functional.cross_entropy(model(x), y) for x, y in (batch(step, r) for r in range(world_size)))
        (loss / world_size).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"parameters without a gradient: {missing}"  # the exactness claim's condition
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ds_config(mode: str) -> dict[str, Any]:
    precision, stage, *extra = mode.split("-")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": ACC_GAS if "acc" in extra else 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": int(stage[1])},
        "steps_per_print": 10**6,
        "gradient_clipping": 0.0,  # deepspeed 0.19.8 clips at global norm 1.0 unless told otherwise
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
    if precision != "fp32":
        # deepspeed 0.19.8 casts parameters only; batch norm then fails on fp32 running stats unless the buffers
        # are cast too ("expected scalar type BFloat16 but found Float").
        cfg["data_types"] = {"buffer_dtype": precision}
    if "fp32acc" in extra:
        cfg["data_types"]["grad_accum_dtype"] = "fp32"
    if mode.endswith("z1") or mode.endswith("z1-fp32acc"):
        cfg["zero_optimization"]["parameter_alignment"] = True  # padding between parameters, not only at the end
    if stage == "z2":
        cfg["zero_optimization"].update(round_robin_gradients=True, reduce_bucket_size=2000,
                                        allgather_bucket_size=2000)  # reordered flat buffer, several buckets
    return cfg


def full_fp32_weights(engine: Any) -> dict[str, torch.Tensor]:
    """fp32 master weights of every parameter, assembled on every rank (collective).

    Read from DeepSpeed's own bookkeeping, not from this project's layouts. ZeRO-1/2: all_gather the fp32
    partitions and cut parameters at ZeRO's recorded offsets (``deepspeed.utils.safe_get_full_fp32_param`` returns
    wrong values under ``round_robin_gradients=True`` in deepspeed 0.19.8, although training itself is right).
    BF16_Optimizer: ``safe_get_full_fp32_param``. FP16_UnfusedOptimizer: its fp32 copies. No wrapper: the
    parameters.
    """
    import deepspeed
    import deepspeed.comm as dist

    wrapper = engine.optimizer
    by_id: dict[int, torch.Tensor] = {}
    if type(wrapper).__name__ == "FP16_UnfusedOptimizer":
        for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            by_id.update({id(lp): hp for lp, hp in zip(lp_group, hp_group, strict=True)})
    elif type(wrapper).__name__ == "DeepSpeedZeroOptimizer":
        for i, hp in enumerate(wrapper.single_partition_of_fp32_groups):
            group = wrapper.real_dp_process_group[i]
            parts = [torch.empty_like(hp) for _ in range(dist.get_world_size(group=group))]
            dist.all_gather(parts, hp.detach(), group=group)
            flat = torch.cat(parts)
            assert flat.numel() == wrapper.bit16_groups_flat[i].numel(), "unequal ZeRO partitions"
            for p, offset, meta in zip(wrapper.round_robin_bit16_groups[i], wrapper.round_robin_bit16_offsets[i],
                                       wrapper.round_robin_bit16_meta[i], strict=True):
                by_id[id(p)] = flat.narrow(0, offset, meta.numel()).view(meta.shape)
    out = {}
    for name, p in engine.module.named_parameters():
        if id(p) in by_id:
            w = by_id[id(p)]
        elif hasattr(p, "_hp_mapping"):
            w = deepspeed.utils.safe_get_full_fp32_param(p)
        else:
            w = p
        out[name] = w.detach().float().cpu().clone()
    return out


def layout_check(engine: Any, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Whether the bound layouts, summed over all ranks (collective), cover each layer exactly: per layer, the
    segment lengths add up to its size and the squares of the segment values to its squared norm, both compared
    with DeepSpeed's own full weights. (Padding staying zero proves nothing: a zero weight with a zero gradient
    gets a zero update under any layout.)"""
    import deepspeed.comm as dist

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    names = [n for n, _ in engine.module.named_parameters()]
    counts = torch.zeros(len(names), dtype=torch.float64, device=engine.device)
    squares = torch.zeros(len(names), dtype=torch.float64, device=engine.device)
    bound = 0
    for group in inner.param_groups:
        for t in group["params"]:
            layout = inner.layout_of(t) if isinstance(inner, optimizers.LayerwiseOptimizer) else None
            if layout is None:
                continue
            bound += 1
            for seg in layout.segments:
                counts[seg.layer] += seg.numel
                squares[seg.layer] += t.detach().view(-1).narrow(0, seg.start, seg.numel).double().pow(2).sum()
    dist.all_reduce(counts)
    dist.all_reduce(squares)
    want = torch.tensor([float(weights[n].double().pow(2).sum()) for n in names], dtype=torch.float64)
    sizes = [weights[n].numel() for n in names]
    return {"bound": bound, "counts_exact": counts.cpu().tolist() == [float(n) for n in sizes],
            "norm_error": float(((squares.cpu() - want).abs() / want.clamp_min(1e-30)).max())}


def padding_is_zero(engine: Any) -> bool:
    """Whether every padding element of every bound flat partition is still exactly zero."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in inner.param_groups:
        for t in group["params"]:
            layout = inner.layout_of(t) if isinstance(inner, optimizers.LayerwiseOptimizer) else None
            if layout is None:
                continue
            mask = torch.ones(t.numel(), dtype=torch.bool, device=t.device)
            for seg in layout.segments:
                mask[seg.start:seg.start + seg.numel] = False
            if bool(t.detach().view(-1)[mask].ne(0).any()):
                return False
    return True


def train_step(engine: Any, step: int, rank: int, dtype: torch.dtype, base_lr: float, steps: int) -> None:
    x, y = batch(step, rank)
    device = engine.device
    for group in engine.optimizer.param_groups:
        group["lr"] = lr_at(base_lr, step, steps)
    logits = engine(x.to(device=device, dtype=dtype))
    loss = nn.functional.cross_entropy(logits.float(), y.to(device))
    engine.backward(loss)
    engine.step()


def run_acc(mode: str, variant: str) -> dict[str, Any]:
    """A gradient-accumulation run (``ACC_MODES``): ACC_STEPS steps of ACC_GAS micro-steps, channels_last inputs."""
    import deepspeed
    import deepspeed.comm as dist

    noreduce = variant.endswith("_noreduce")
    base_variant = variant.removesuffix("_noreduce")
    model = make_acc_model()
    opt = build_acc_optimizer(base_variant, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(mode))
    binding = optimizers.bind_deepspeed(engine)
    if noreduce:  # negative control: each rank's partial norm of a split layer taken as the layer's norm
        inner = engine.optimizer.optimizer
        for group in inner.param_groups:
            for t in group["params"]:
                inner.layout_of(t).process_group = None
    rank = dist.get_rank()
    base = ACC_VARIANTS[base_variant][1]["lr"]
    for step in range(ACC_STEPS):
        for group in engine.optimizer.param_groups:
            group["lr"] = lr_at(base, step, ACC_STEPS)
        for m in range(ACC_GAS):
            x, y = acc_batch(step, rank, m)
            loss = nn.functional.mse_loss(engine(x.contiguous(memory_format=torch.channels_last)), y)
            engine.backward(loss)
            engine.step()
    weights = full_fp32_weights(engine)
    result: dict[str, Any] = {"binding": str(binding), "weights": weights, "global_steps": int(engine.global_steps),
                              "skipped_steps": int(engine.skipped_steps)}
    if "z0" not in mode and isinstance(opt, optimizers.LayerwiseOptimizer):
        here = torch.tensor([binding.layers_here, len(binding.split_layers)], device=engine.device)
        gathered = [torch.zeros_like(here) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, here)
        result["layers_per_rank"] = [int(t[0]) for t in gathered]
        result["split_per_rank"] = [int(t[1]) for t in gathered]
        inner = engine.optimizer.optimizer
        groups_here = torch.tensor([sum(1 for g in inner.param_groups for t in g["params"]
                                        if inner.layout_of(t).segments)], device=engine.device)
        dist.all_reduce(groups_here, op=dist.ReduceOp.MIN)
        result["min_groups_with_segments"] = int(groups_here)
        result["layout"] = layout_check(engine, weights)
    engine.destroy()
    return result


def run(mode: str, variant: str, steps: int, ckpt_dir: str) -> dict[str, Any]:
    import deepspeed
    import deepspeed.comm as dist

    naive = variant.endswith("_naive")
    name, params = VARIANTS[variant.removesuffix("_naive")]
    model = make_model()
    opt = optimizers.build_optimizer(name, model, params)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(mode))
    rank = dist.get_rank()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode.split("-")[0]]
    if naive:
        opt.allow_unbound = True
        binding = None
    else:
        binding = optimizers.bind_deepspeed(engine)
    result: dict[str, Any] = {"wrapper": type(engine.optimizer).__name__, "binding": str(binding)}
    if binding is not None and mode in FLATTENING_MODES:
        split = torch.tensor([len(binding.split_layers)], device=engine.device)  # NCCL reduces device tensors
        dist.all_reduce(split, op=dist.ReduceOp.MIN)
        result["min_split_layers_per_rank"] = int(split)
    tag = f"{mode}-{variant}"
    for step in range(steps):
        if step == steps - 1 and not naive:
            engine.save_checkpoint(ckpt_dir, tag=tag)
        train_step(engine, step, rank, dtype, params["lr"], steps)
    result["weights"] = full_fp32_weights(engine)
    result["skipped_steps"] = int(engine.skipped_steps)
    result["padding_zero"] = padding_is_zero(engine)
    if binding is not None and mode in FLATTENING_MODES:
        result["layout"] = layout_check(engine, result["weights"])
    if not naive:
        engine.load_checkpoint(ckpt_dir, tag=tag)
        train_step(engine, steps - 1, rank, dtype, params["lr"], steps)
        result["resumed"] = full_fp32_weights(engine)
        result["padding_zero"] &= padding_is_zero(engine)
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results file written by rank 0 (torch.save)")
    parser.add_argument("--ckpt-dir", required=True, help="checkpoint directory shared by the ranks")
    parser.add_argument("--modes", nargs="+", default=list(CPU_MODES), help="default: all CPU modes")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    parser.add_argument("--timeout", type=int, default=300, help="collective time-out in seconds (default 300)")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        # The tests compare runs (a resumed run with the uninterrupted one at atol 1e-7, flat-partition modes with
        # the per-parameter mode): on a GPU only with cuDNN's and cuBLAS's deterministic algorithms (cuBLAS reads
        # CUBLAS_WORKSPACE_CONFIG when its handle is made: set before the first GEMM). warn_only: an op without a
        # deterministic kernel warns in the log instead of stopping every comparison.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before the first collective
    # A rank that skips a collective the others entered (issue 14 item 1) fails within minutes, not hangs.
    deepspeed.init_distributed(dist_backend="gloo" if get_accelerator().device_name() == "cpu" else None,
                               timeout=timedelta(seconds=args.timeout))
    torch.distributed.barrier()  # then free DeepSpeed's CPU shared-memory names (train/distributed.py)
    from train.distributed import exit_process, release_cpu_shm_names

    release_cpu_shm_names()
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        if mode in ACC_MODES:
            negative = [f"{v}_noreduce" for v in ACC_NEGATIVE] if "z0" not in mode else []
            results[mode] = {v: run_acc(mode, v) for v in [*ACC_VARIANTS, *negative]}
        else:
            variants = ["lars", "lamb"] + (["lars_naive", "lamb_naive"] if mode in FLATTENING_MODES else [])
            results[mode] = {v: run(mode, v, args.steps, args.ckpt_dir) for v in variants}
        if dist.get_rank() == 0:
            print(f"[ds_optim_worker] {mode}: {results[mode]['lars']['binding']}", flush=True)
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "steps": args.steps, "results": results}, args.out)
    dist.barrier()
    torch.distributed.destroy_process_group()
    exit_process(0)  # DeepSpeed keeps the gloo threads alive: no finalisation with them (train/distributed.py)


if __name__ == "__main__":
    main()
