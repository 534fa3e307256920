"""Train a ResNet with DeepSpeed from one JSON config: Goyal et al.'s large-minibatch recipe, LARS and LAMB.

    deepspeed --hostfile hosts train/imagenet.py --deepspeed_config ds_configs/8k.json --data-dir /data/imagenet
    deepspeed --num_gpus 2 train/imagenet.py --deepspeed_config ds_configs/demo.json --dataset fashion-mnist
    python train/imagenet.py --deepspeed_config ds_configs/demo.json --dataset fashion-mnist --arch resnet_small

The JSON owns the experiment (batch, precision, ZeRO, optimizer, schedule, epochs: see train/config.py); the
command line owns the run (data, architecture, seed, output folder, length overrides). Read top to bottom:
arguments, set-up (distributed, data, config, model, optimizer, engine), the training loop, evaluation, output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does this): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from train.checkpoints import CheckpointError, latest_tag, write_atomically  # noqa: E402
from train.config import ConfigError, Resolved, load_json, resolve  # noqa: E402
from train.data import DATASETS, DataError, GlobalBatchSampler, build_data, eval_shard, to_model_input  # noqa: E402
from train.faults import BadStepStreak, StepAgreement, skip_nonfinite_steps  # noqa: E402
from train.models import ARCHS, build_model, input_channels  # noqa: E402


def int_at_least(low: int) -> Any:
    """argparse type: an integer >= low, with a message naming the value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, metavar="FILE",
                   help="the JSON file that defines the experiment (ds_configs/*.json)")
    p.add_argument("--dataset", default="imagenet", choices=DATASETS)
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="ImageNet: folder with train/ and val/; Fashion-MNIST: folder of the four IDX files "
                        "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--arch", default="resnet50", choices=ARCHS, metavar="NAME",
                   help=f"model: {', '.join(ARCHS)}")
    p.add_argument("--image-size", type=int_at_least(8), default=None,
                   help="training crop size (default 224 for ImageNet and synthetic, 28 for Fashion-MNIST)")
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="override the config's training.epochs")
    p.add_argument("--max-steps", type=int_at_least(1), default=None,
                   help="stop when the run's optimizer step count (from the run's start) reaches N")
    p.add_argument("--micro-batch", type=int_at_least(1), default=None,
                   help="override train_micro_batch_size_per_gpu (changes accumulation, not the global batch)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: the config's, falling back to bf16 where fp16 is unsupported (CPU)")
    p.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction,
                   help="NHWC memory layout for convolutions (faster on CPUs and on tensor-core GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, metavar="DIR", help="run folder (default runs/<run name>)")
    p.add_argument("--run-name", default=None, help="default <config name>-seed<seed>, e.g. lars-32k-seed0")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    p.add_argument("--overwrite", action="store_true", help="allow reusing the folder of another run")
    p.add_argument("--save-interval", type=int_at_least(0), default=0,
                   help="also checkpoint every N optimizer steps (0: only at epoch ends and at the end)")
    p.add_argument("--log-interval", type=int_at_least(1), default=10,
                   help="log loss/lr/images per second every N steps")
    p.add_argument("--train-subset", type=int_at_least(1), default=None, help="use only the first N training samples")
    p.add_argument("--val-subset", type=int_at_least(1), default=None, help="use only the first N validation samples")
    p.add_argument("--eval-batch", type=int_at_least(1), default=256, help="validation batch per rank")
    p.add_argument("--workers", type=int_at_least(0), default=None, help="data loader processes per rank (ImageNet)")
    p.add_argument("--noise-scale-interval", type=int_at_least(0), default=0, metavar="N",
                   help="estimate the gradient noise scale (McCandlish et al. 2018) every N optimizer steps; 0: off")
    p.add_argument("--noise-scale-ema", type=float, default=0.95, help="moving-average factor of that estimate")
    p.add_argument("--no-wandb", action="store_true", help="do not log to wandb")
    p.add_argument("--wandb-project", default="largebatch")
    p.add_argument("--wandb-group", default=None, help="group of runs to compare (a study name)")
    p.add_argument("--max-skipped-steps", type=int_at_least(0), default=10, metavar="N",
                   help="stop after N optimizer steps in a row skipped for a non-finite loss or gradients; 0: never")
    p.add_argument("--trusted-checkpoint", action="store_true",
                   help="--resume: load checkpoint files with full pickle (weights_only=False); only for trusted files")
    p.add_argument("--inject-nan", type=int_at_least(1), nargs="+", default=(), metavar="STEP",
                   help="testing aid: rank 0's inputs are NaN in these optimizer steps (1-based)")
    p.add_argument("--dist-timeout", type=positive_float, default=30.0,
                   help="minutes a collective may wait for a dead rank before the run fails")
    p.add_argument("--ds-log-level", default="WARNING", help="DeepSpeed's own log level")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    return p


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def single_process_env() -> None:
    """Let plain `python train/imagenet.py` run as a world of one."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def build_optimizer_and_schedule(resolved: Resolved, model: torch.nn.Module) -> tuple[Any, Any, dict[str, Any]]:
    """Our optimizers and schedules are built here; DeepSpeed's own names stay in the config for DeepSpeed."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    import optimizers
    from train.schedules import SCHEDULES

    ds_config = dict(resolved.ds_config)
    opt_name = str(resolved.optimizer["type"])
    optimizer = None
    if opt_name.lower() in optimizers.KNOWN_OPTIMIZERS:
        try:
            optimizer = optimizers.build_optimizer(
                opt_name, model, resolved.optimizer["params"],
                exclude_norm_and_bias=resolved.training["exclude_norm_and_bias"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"optimizer {opt_name}: {e}") from None
        ds_config.pop("optimizer")
        if resolved.zero_stage > 0:
            ds_config["zero_allow_untested_optimizer"] = True
    elif opt_name.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, opt_name):
        known = sorted(set(optimizers.KNOWN_OPTIMIZERS) | set(DEEPSPEED_OPTIMIZERS))
        raise ConfigError(f"unknown optimizer type {opt_name!r}; known: {', '.join(known)} "
                          f"(or a torch.optim class name)")

    schedule = None
    if resolved.scheduler is not None:
        sched_name = resolved.scheduler["type"]
        if sched_name in SCHEDULES:
            if optimizer is None:
                raise ConfigError(f"scheduler {sched_name} needs one of our optimizers "
                                  f"({', '.join(optimizers.KNOWN_OPTIMIZERS)}); got {opt_name}")
            try:
                schedule = SCHEDULES[sched_name](optimizer, **resolved.scheduler["params"])
            except (ValueError, TypeError) as e:
                raise ConfigError(f"scheduler {sched_name}: {e}") from None
            ds_config.pop("scheduler")
        elif sched_name not in VALID_LR_SCHEDULES and not hasattr(torch.optim.lr_scheduler, sched_name):
            raise ConfigError(f"unknown scheduler type {sched_name!r}; known: "
                              f"{', '.join(sorted(set(SCHEDULES) | set(VALID_LR_SCHEDULES)))} "
                              f"(or a torch.optim.lr_scheduler class name)")
    return optimizer, schedule, ds_config


def describe(r: Resolved, data_name: str, num_train: int) -> str:
    """What was derived, in one block (printed once on rank 0)."""
    d = r.derived()
    lr = d["lr"]
    rule = f" (= 0.1 x {r.global_batch}/256)" if lr is not None and math.isclose(lr, 0.1 * r.global_batch / 256) \
        else ""
    return "\n".join([
        f"batch: {r.micro_batch} micro x {r.grad_accum} accumulation x {r.world_size} ranks = "
        f"{r.global_batch:,} global",
        f"data: {data_name}, {num_train:,} training samples -> {r.steps_per_epoch:,} steps/epoch x {r.epochs} "
        f"epochs = {r.total_steps:,} optimizer steps",
        f"optimizer: {r.optimizer['type']} peak lr {lr}{rule}; schedule "
        f"{(r.scheduler or {}).get('type', 'none')}: warmup {d['warmup_steps']} steps, decay {d['decay_steps']}",
        f"precision: {r.precision}" + (f" (config: {r.config_precision})" if r.precision != r.config_precision
                                       else "") + f"; ZeRO stage {r.zero_stage}",
    ])


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(engine: Any, data: Any, indices: list[int], batch: int, dtype: torch.dtype) -> dict[str, float]:
    """Top-1/top-5 error (%) and loss over the whole validation set, each sample counted once across ranks."""
    import deepspeed.comm as dist

    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=engine.device)  # correct1, correct5, count, loss
    for x, y in data.val_batches(indices, batch):
        if y.numel() == 0:
            continue
        x, y = to_model_input(x, engine.device, dtype), y.to(engine.device, non_blocking=True)
        logits = engine(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(y.numel(), device=y.device),
                             torch.nn.functional.cross_entropy(logits, y, reduction="sum")]).double()
    dist.all_reduce(sums)
    c1, c5, n, loss = sums.tolist()
    engine.train()
    return {"val_top1_error": 100 * (1 - c1 / n), "val_top5_error": 100 * (1 - c5 / n), "val_loss": loss / n,
            "val_samples": int(n)}


# ---------------------------------------------------------------------------------------------------------------
# Main


def main(args: argparse.Namespace) -> dict[str, Any]:
    single_process_env()
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    from train.checkpoints import fsync_files, load_weights_only
    from train.distributed import set_collective_timeout
    from train.tracking import RunLog, git_commit

    logging.getLogger("DeepSpeed").setLevel(args.ds_log_level.upper())
    cfg = load_json(args.deepspeed_config)  # bad JSON fails here, before anything heavy

    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_SIZE", "1"))))
    timeout = datetime.timedelta(minutes=args.dist_timeout)
    deepspeed.init_distributed(timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_cpu:
        from train.distributed import release_cpu_shm_names

        dist.barrier()  # every rank has mapped every shared-memory buffer
        release_cpu_shm_names()
    is_main = rank == 0

    def say(*msg: Any) -> None:
        if is_main:
            print(*msg, flush=True)

    image_size = args.image_size or (28 if args.dataset == "fashion-mnist" else 224)
    data_channels = 1 if args.dataset == "fashion-mnist" else 3
    channels = input_channels(args.arch, data_channels)
    data = build_data(args.dataset, args.data_dir, channels=channels, image_size=image_size, workers=args.workers,
                      seed=args.seed)
    num_train = min(data.info.num_train, args.train_subset or data.info.num_train)
    num_val = min(data.info.num_val, args.val_subset or data.info.num_val)

    supported = ("fp32",) + (("fp16",) if accel.is_fp16_supported() else ()) + (
        ("bf16",) if accel.is_bf16_supported() else ())
    # bf16 on a CPU without native bf16 instructions is emulated and about 10x slower than fp32.
    slow_bf16 = on_cpu and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    fast = tuple(p for p in supported if not (p == "bf16" and slow_bf16))
    resolved = resolve(cfg, world_size=world, num_train=num_train, epochs=args.epochs, micro_batch=args.micro_batch,
                       precision=args.precision, supported_precisions=supported, fast_precisions=fast)
    for note in resolved.notes:
        say(note)

    config_name = Path(args.deepspeed_config).stem
    run_name = args.run_name or f"{config_name}-seed{args.seed}"
    out_dir = Path(args.output_dir or Path("runs") / run_name)
    ckpt_dir = out_dir / "checkpoints"
    refusal = claim_output_dir(out_dir, args) if is_main else None
    refused = torch.tensor([1.0 if refusal else 0.0])
    dist.broadcast(refused, src=0)  # every rank stops, not only rank 0 (on a node of its own it would hang)
    if refused.item():
        raise SystemExit(refusal or f"rank 0 cannot use the run folder {out_dir}; its message says why")

    torch.manual_seed(args.seed)
    model = build_model(args.arch, data.info.num_classes, channels, image_size,
                        zero_init_residual=resolved.training["zero_init_residual"])
    # Inputs in NHWC make every convolution run NHWC; the parameters stay contiguous (DeepSpeed flattens them).
    memory_format = torch.channels_last if args.channels_last and args.arch != "mlp" else torch.contiguous_format
    optimizer, schedule, ds_config = build_optimizer_and_schedule(resolved, model)
    ds_config.setdefault("steps_per_print", 10 ** 9)  # we print our own progress
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        model_parameters=None if optimizer is not None else model.parameters())
    if optimizer is not None:
        from optimizers import bind_deepspeed

        binding = bind_deepspeed(engine)  # layer-wise optimizers learn the real layers behind flat partitions
        say(binding)
    set_collective_timeout(timeout)  # also for the groups DeepSpeed made (ZeRO's gradient all-reduce)
    if not args.trusted_checkpoint:
        load_weights_only(engine)  # checkpoint files load with torch.load(weights_only=True)
    skip_nonfinite_steps(engine)  # fp32 without ZeRO: a non-finite gradient skips the step as in the other modes
    assert engine.train_micro_batch_size_per_gpu() == resolved.micro_batch
    assert engine.gradient_accumulation_steps() == resolved.grad_accum
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.half if engine.fp16_enabled() else torch.float32
    from train.noise_scale import NoiseScaleMonitor

    noise = NoiseScaleMonitor(engine, interval=args.noise_scale_interval, ema=args.noise_scale_ema)

    # Resume.
    start = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "samples": 0}
    wandb_id = None
    resumed_epochs: list[dict[str, Any]] = []  # epoch records before the checkpoint (for the summary)
    if args.resume:
        check_resume_layout(out_dir / "config.json", resolved)
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise SystemExit(f"--resume: no checkpoint in {ckpt_dir} (the run stopped before its first save, or the "
                             f"folder is not a run); pass --overwrite instead of --resume to start this run afresh")
        start = {k: client[k] for k in start}
        wandb_id = client.get("wandb_id")
        if hasattr(engine.lr_scheduler, "last_batch_iteration"):  # re-apply the lr of the restored position
            engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)
        if is_main:  # metrics.jsonl keeps what led to the checkpoint and drops what a crash made us redo
            resumed_epochs = [r for r in rewind_metrics(out_dir / "metrics.jsonl", start["global_step"])
                              if r["kind"] == "epoch"]
        if client.get("noise_scale"):
            noise.estimator.load_state_dict(client["noise_scale"])
        say(f"resumed from {path}: epoch {start['epoch']}, step {start['global_step']}")

    derived = resolved.derived() | {"dataset": args.dataset, "num_train": num_train, "num_val": num_val,
                                    "arch": args.arch, "image_size": image_size}
    summary_cfg = {"run_name": run_name, "group": args.wandb_group, "config_file": str(args.deepspeed_config),
                   "args": vars(args), "derived": derived, "training": resolved.training,
                   "optimizer": resolved.optimizer, "scheduler": resolved.scheduler, "deepspeed": ds_config,
                   "git_commit": git_commit()}
    log = None
    if is_main:
        say(describe(resolved, args.dataset, num_train))
        (out_dir / "config.json").write_text(json.dumps(summary_cfg, indent=2, default=str) + "\n")
        log = RunLog(out_dir, use_wandb=not args.no_wandb, project=args.wandb_project, group=args.wandb_group,
                     name=run_name, tags=[f"batch-{resolved.global_batch}", str(resolved.optimizer["type"]).lower(),
                                          args.dataset], config=summary_cfg, resume_id=wandb_id)

    sampler = GlobalBatchSampler(num_train, resolved.global_batch, resolved.micro_batch, world, rank, args.seed)
    val_indices = eval_shard(num_val, world, rank)
    label_smoothing = resolved.training["label_smoothing"]

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
    step, samples = start["global_step"], start["samples"]
    max_steps = args.max_steps or resolved.total_steps
    history = resumed_epochs
    stop = step >= max_steps
    streak = BadStepStreak(args.max_skipped_steps)
    good_tag = latest_tag(ckpt_dir) if args.resume else None  # last checkpoint saved outside a run of bad steps
    inject_nan = set(args.inject_nan) if is_main else set()
    last_saved = step if args.resume else -1
    # BatchNorm running statistics move in the forward pass: a skipped step puts them back (NaN would stay forever).
    buffers = list(engine.module.buffers())
    buffers_before = [b.detach().clone() for b in buffers]

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        """Save on every rank; 'latest' moves to the new tag only after every rank has flushed its files."""
        nonlocal good_tag, last_saved
        if step == last_saved:  # on disk already (an interval save at an epoch's end): never rewrite what 'latest'
            return  # names
        if step_in_epoch >= sampler.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        tag = f"step{step}"
        t_save = time.perf_counter()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False, client_state={
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": step, "samples": samples,
            "wandb_id": log.wandb_id if log else None, "noise_scale": noise.estimator.state_dict(),
        })
        fsync_files(ckpt_dir / tag, [f.name for f in (ckpt_dir / tag).iterdir() if f"zero_pp_rank_{rank}_" in f.name
                                     or (is_main and f.name.startswith("mp_rank_"))])  # what this rank wrote
        tensors = [t for t in [*engine.module.parameters(), *buffers] if t.is_floating_point()]
        finite = torch.stack([t.isfinite().all() for t in tensors]).all().float().view(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # also the barrier: every rank's files are on disk
        if is_main:
            write_atomically(ckpt_dir / "latest", tag)
        dist.barrier()
        last_saved = step
        if streak.length == 0 and finite.item() == 1.0:
            good_tag = tag
        if log:
            log.log({"kind": "checkpoint", "step": step, "samples": samples, "tag": tag,
                     "seconds": time.perf_counter() - t_save, "finite": finite.item() == 1.0}, to_wandb=False)

    agreement = StepAgreement()

    epoch = start["epoch"]
    while epoch < resolved.epochs and not stop:
        batch = resolved.batch_at(epoch)
        if batch != sampler.global_batch:  # Smith et al.: a larger batch instead of a smaller lr
            engine.set_train_batch_size(batch)
            sampler = GlobalBatchSampler(num_train, batch, resolved.micro_batch, world, rank, args.seed)
            say(f"epoch {epoch + 1}: global batch {batch:,} ({engine.gradient_accumulation_steps()} accumulation "
                f"steps), {sampler.steps_per_epoch} steps/epoch")
        sampler.set_epoch(epoch, start["step_in_epoch"] if epoch == start["epoch"] else 0)
        step_in_epoch = sampler.start_step
        lr = engine.get_lr()[0]
        data.skipped = 0  # unreadable images met in this epoch (ImageNet folders)
        engine.train()
        t_epoch = t_log = time.perf_counter()
        # Device-side sums, read only at logging intervals: no host synchronisation per micro-step.
        # [sum of finite losses, their count] over the logging interval and over the epoch (finished intervals)
        interval = torch.zeros(2, device=engine.device, dtype=torch.float64)
        epoch_sums = torch.zeros(2, device=engine.device, dtype=torch.float64)
        nonfinite_step = torch.zeros((), device=engine.device)  # this optimizer step's non-finite losses (fp16 rule)
        correct = torch.zeros((), device=engine.device, dtype=torch.long)
        seen, log_steps, micro_interval = 0, 0, 0
        bar = progress(is_main, sampler, resolved, epoch)
        first_micro = True
        for x, y in data.train_batches(sampler):
            x = to_model_input(x, engine.device, dtype, memory_format)  # uint8 ImageNet batches: normalised here
            y = y.to(engine.device, non_blocking=True)
            if step + 1 in inject_nan:
                x = x * float("nan")
            if first_micro and buffers:
                torch._foreach_copy_(buffers_before, buffers)
            first_micro = False
            noise.maybe_measure(step, x, y, loss_fn)  # every N steps, before the step's first forward; all ranks
            logits = engine(x).float()
            loss = loss_fn(logits, y)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                lr = engine.get_lr()[0]  # the lr this optimizer step runs at (the schedule moves on in step())
                skipped_before = engine.skipped_steps
            engine.step()
            finite = torch.isfinite(loss.detach())
            interval += torch.stack([torch.where(finite, loss.detach(), 0.0), finite]).double()
            nonfinite_step += ~finite
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
            micro_interval += 1
            if not boundary:
                continue
            first_micro = True
            skipped = engine.skipped_steps > skipped_before
            if skipped and buffers:
                torch._foreach_copy_(buffers, buffers_before)
            # One all-reduce per optimizer step: whether the step was bad on any rank, and signals.
            bad, signum = agreement.after_step(
                (nonfinite_step > 0).float() if engine.fp16_enabled() else float(skipped), engine.device)
            nonfinite_step.zero_()
            step += 1
            step_in_epoch += 1
            log_steps += 1
            samples += batch
            if bar is not None:
                bar.update(1)
            give_up = streak.update(step, bad)
            logged = (step % args.log_interval == 0 or step >= max_steps or step_in_epoch == sampler.steps_per_epoch
                      or bad or give_up or signum)
            if logged:
                now = time.perf_counter()
                sums = interval.clone()
                dist.all_reduce(sums)  # the loss of the global batch, not of rank 0's share
                loss_sum, finite_count = sums.tolist()
                nonfinite_count = micro_interval * world - finite_count  # every rank runs as many micro-batches
                rec = {"kind": "step", "step": step, "epoch": epoch + step_in_epoch / sampler.steps_per_epoch,
                       "samples": samples, "loss": loss_sum / finite_count if finite_count else None, "lr": lr,
                       "images_per_sec": log_steps * batch / (now - t_log), "global_batch": batch,
                       "loss_scale": engine.optimizer.loss_scale if engine.fp16_enabled() else None,
                       "skipped_steps": engine.skipped_steps, "nonfinite_losses": int(nonfinite_count),
                       **noise.last}
                if log:
                    log.log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}" if finite_count else "nan", lr=f"{rec['lr']:.4g}",
                                    img_s=f"{rec['images_per_sec']:.0f}")
                epoch_sums += interval
                interval.zero_()
                t_log, log_steps, micro_interval = now, 0, 0
            if give_up:
                message = streak.message(step, good_tag and str(ckpt_dir / good_tag))
                if is_main and good_tag and latest_tag(ckpt_dir) != good_tag:
                    write_atomically(ckpt_dir / "latest", good_tag)  # not a checkpoint saved within the streak
                if is_main:
                    print(f"error: {message}", file=sys.stderr, flush=True)
                dist.barrier()
                raise SystemExit(3)
            if args.save_interval and step % args.save_interval == 0 and step < max_steps:
                checkpoint(epoch, step_in_epoch)
            if signum:
                say(f"{agreement.name}: saving a checkpoint at step {step} and stopping; --resume continues")
                checkpoint(epoch, step_in_epoch)
                raise SystemExit(128 + signum)
            if step >= max_steps:
                stop = True
                break
        if bar is not None:
            bar.close()
        epoch_time = time.perf_counter() - t_epoch
        counts = torch.tensor([seen, getattr(data, "skipped", 0)], dtype=torch.float64, device=engine.device)
        stats = torch.cat([epoch_sums + interval, correct.double().view(1), counts])  # [loss, finite, correct, ...]
        dist.all_reduce(stats)
        val = evaluate(engine, data, val_indices, args.eval_batch, dtype)
        record = {"kind": "epoch", "epoch": epoch + step_in_epoch / sampler.steps_per_epoch, "step": step,
                  "samples": samples, "train_loss": stats[0].item() / max(1.0, stats[1].item()),
                  "train_error": 100 * (1 - stats[2].item() / max(1.0, stats[3].item())), **val,
                  "skipped_images": int(stats[4].item()), "skipped_steps": engine.skipped_steps,
                  "epoch_time": epoch_time,
                  "images_per_sec": seen * world / max(epoch_time, 1e-9), "lr": lr}
        history.append(record)
        if log:
            log.log(record)
        say(f"epoch {record['epoch']:.3g}/{resolved.epochs} | train loss {record['train_loss']:.4f} error "
            f"{record['train_error']:.2f}% | val top-1 error {val['val_top1_error']:.2f}% top-5 "
            f"{val['val_top5_error']:.2f}% | {epoch_time:.1f} s, {record['images_per_sec']:.0f} images/s")
        checkpoint(epoch, step_in_epoch)
        epoch += 1

    # Output: Goyal's figure (median top-1 error of the last 5 epochs) and the final weights.
    result: dict[str, Any] = {"steps": step, "samples": samples}
    if history:
        last = [h["val_top1_error"] for h in history[-5:]]
        result |= {"final_val_top1_error": history[-1]["val_top1_error"],
                   "final_val_top5_error": history[-1]["val_top5_error"],
                   "median5_val_top1_error": statistics.median(last)}
    if is_main:
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                 for k, v in engine.module.state_dict().items()}
        torch.save(state, out_dir / "model.pt")
        log.log({"kind": "summary", "samples": samples, **result})
        log.summary(result)
        log.close()
        say(f"done: {json.dumps(result)}; run folder {out_dir}")
    dist.barrier()
    return result


def progress(is_main: bool, sampler: GlobalBatchSampler, r: Resolved, epoch: int) -> Any:
    if not is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=sampler.steps_per_epoch, initial=sampler.start_step, desc=f"epoch {epoch + 1}/{r.epochs}",
                unit="step", dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)


def rewind_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records of steps up to ``step`` (the checkpoint resumed from); return them."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the crash
            continue
        if rec.get("kind") != "summary" and rec.get("step", 0) <= step:
            kept.append(rec)
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def check_resume_layout(saved_config: Path, resolved: Resolved) -> None:
    """Refuse to resume a ZeRO checkpoint into another stage or world size (its partitions would not fit)."""
    try:
        before = json.loads(saved_config.read_text())["derived"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return  # no record of the layout; DeepSpeed's own checks apply
    now = {"zero_stage": resolved.zero_stage, "world_size": resolved.world_size}
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) is not None and before.get(k) != v}
    if "world_size" in changed and max(before.get("zero_stage", 0), resolved.zero_stage) == 0:
        del changed["world_size"]  # without ZeRO every rank holds the whole state
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume: the checkpoints in {saved_config.parent} were written with another layout "
                          f"({what}); resume with the config and rank count of the run, or start afresh with "
                          f"--overwrite")


def claim_output_dir(out_dir: Path, args: argparse.Namespace) -> str | None:
    """Never write into another run's folder unless asked (--resume continues it, --overwrite replaces it).

    Returns why the folder cannot be used, or None once it is ready."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--output-dir {out_dir} exists and is not a folder; choose another --output-dir"
    cfg = out_dir / "config.json"
    if cfg.exists() and not (args.resume or args.overwrite):
        return (f"{out_dir} already holds a run ({cfg}); pass --resume to continue it, --overwrite to replace it, "
                f"or choose another --output-dir / --run-name")
    if args.overwrite and not args.resume:
        for name in ("metrics.jsonl", "model.pt", "config.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # else --resume could load the old run
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def cli(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (ConfigError, DataError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same fault; say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except CheckpointError as e:  # each rank reads its own files
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # gloo and NCCL (DistBackendError) time-outs
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        print(f"error (rank {os.environ.get('RANK', '0')}): a collective waited --dist-timeout "
              f"{args.dist_timeout:g} min for another rank and gave up ({str(e).splitlines()[0][:200]}); a rank hung "
              f"(stuck device, paused or lost machine). The job stops; --resume continues from the last checkpoint",
              file=sys.stderr, flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(cli())
