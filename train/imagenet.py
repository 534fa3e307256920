"""Train a ResNet with DeepSpeed from one JSON config: Goyal et al.'s large-minibatch recipe, LARS and LAMB.

    deepspeed --hostfile hosts train/imagenet.py --deepspeed_config ds_configs/8k.json --data-dir /data/imagenet
    deepspeed --num_gpus 2 train/imagenet.py --deepspeed_config ds_configs/demo.json --dataset fashion-mnist
    python train/imagenet.py --deepspeed_config ds_configs/demo.json --dataset fashion-mnist --arch resnet_small

The JSON owns the experiment (batch, precision, ZeRO, optimizer, schedule, epochs: see train/config.py); the
command line owns the run (data, architecture, seed, output folder, length overrides). Read top to bottom: the
arguments, ``main`` (data, then train/loop.py's set-up and epoch loop), ``train_one_epoch`` (forward, backward,
step) and ``evaluate``. The parts every entry point shares live beside this file: the step guard (faults.py), the
checkpointer (checkpoints.py), the engine (engine.py), the records (tracking.py); docs/architecture.md maps them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does this): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from train import cli, diagnostics, distributed  # noqa: E402
from train.checkpoints import Position  # noqa: E402
from train.config import Resolved, check_world_size, load_json  # noqa: E402
from train.data import DATASETS, GlobalBatchSampler, build_data, eval_shard, to_model_input  # noqa: E402
from train.engine import engine_dtype  # noqa: E402
from train.loop import (  # noqa: E402
    RunParts,
    begin,
    build_run,
    end_epoch,
    end_micro_step,
    end_run,
    start_epoch,
    train_epochs,
)
from train.models import ARCHS, build_model, input_channels  # noqa: E402
from train.noise_scale import NoiseScaleMonitor  # noqa: E402
from train.precision import bf16_speedup  # noqa: E402
from train.tracking import error_summary  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_run_arguments(p)
    cli.add_engine_arguments(p)
    p.add_argument("--dataset", default="imagenet", choices=DATASETS)
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="ImageNet: folder with train/ and val/; Fashion-MNIST: folder of the four IDX files "
                        "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--arch", default="resnet50", choices=ARCHS, metavar="NAME",
                   help=f"model: {', '.join(ARCHS)}")
    p.add_argument("--image-size", type=cli.int_at_least(8), default=None,
                   help="training crop size (default 224 for ImageNet and synthetic, 28 for Fashion-MNIST)")
    p.add_argument("--channels-last", default=True, action=argparse.BooleanOptionalAction,
                   help="NHWC memory layout for convolutions (faster on CPUs and on tensor-core GPUs)")
    p.add_argument("--train-subset", type=cli.int_at_least(1), default=None,
                   help="use only the first N training samples")
    p.add_argument("--val-subset", type=cli.int_at_least(1), default=None,
                   help="use only the first N validation samples")
    p.add_argument("--eval-batch", type=cli.int_at_least(1), default=256, help="validation batch per rank")
    p.add_argument("--workers", type=cli.int_at_least(0), default=None,
                   help="data loader processes per rank (ImageNet)")
    p.add_argument("--noise-scale-interval", type=cli.int_at_least(0), default=0, metavar="N",
                   help="estimate the gradient noise scale (McCandlish et al. 2018) every N optimizer steps; 0: off")
    p.add_argument("--noise-scale-ema", type=float, default=0.95, help="moving-average factor of that estimate")
    diagnostics.add_arguments(p)  # --trust-ratio-interval
    return p


@dataclass(kw_only=True)
class ImageRun(RunParts):
    """One training run: the parts every run holds (train/loop.py), the images, their memory layout and the
    noise-scale monitor (its estimate is kept in every checkpoint)."""

    data: Any
    memory_format: torch.memory_format
    val_indices: list[int]  # this rank's share of the validation set
    noise: NoiseScaleMonitor = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.noise = NoiseScaleMonitor(self.engine, interval=self.args.noise_scale_interval,
                                       ema=self.args.noise_scale_ema)

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.float(), target,
                                                 label_smoothing=self.resolved.training["label_smoothing"])

    def client_state(self) -> dict[str, Any]:
        return super().client_state() | {"noise_scale": self.noise.estimator.state_dict()}

    def load_client_state(self, client: dict[str, Any]) -> None:
        if client.get("noise_scale"):
            self.noise.estimator.load_state_dict(client["noise_scale"])


# ---------------------------------------------------------------------------------------------------------------
# Set-up and the loop over epochs


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("DeepSpeed").setLevel(args.ds_log_level.upper())
    cfg = load_json(args.deepspeed_config)  # bad JSON fails here, before anything heavy
    diagnostics.check_optimizer(cfg, args.trust_ratio_interval)  # an optimizer that cannot record: refused now
    check_world_size(cfg, args.micro_batch, distributed.launched_world_size())  # e.g. a resume on fewer ranks
    world = distributed.init(args.dist_timeout)
    image_size = args.image_size or (28 if args.dataset == "fashion-mnist" else 224)
    channels = input_channels(args.arch, 1 if args.dataset == "fashion-mnist" else 3)
    data = build_data(args.dataset, args.data_dir, channels=channels, image_size=image_size, workers=args.workers,
                      seed=args.seed)
    num_train = min(data.info.num_train, args.train_subset or data.info.num_train)
    num_val = min(data.info.num_val, args.val_subset or data.info.num_val)
    # Inputs in NHWC make every convolution run NHWC; the parameters stay contiguous (DeepSpeed flattens them).
    memory_format = torch.channels_last if args.channels_last and args.arch != "mlp" else torch.contiguous_format

    def probe(micro: int) -> float:  # bf16's speed-up on this model at the run's micro batch (CPU, auto precision)
        x = torch.randn(micro, channels, image_size, image_size).contiguous(memory_format=memory_format)
        model = build_model(args.arch, data.info.num_classes, channels, image_size)
        return bf16_speedup(model, x, torch.nn.functional.cross_entropy,
                            torch.randint(0, data.info.num_classes, (micro,)))

    run = build_run(ImageRun, args, cfg, world, num_train=num_train, probe=probe, model=lambda resolved: build_model(
        args.arch, data.info.num_classes, channels, image_size,
        zero_init_residual=resolved.training["zero_init_residual"]),
        data=data, memory_format=memory_format, val_indices=eval_shard(num_val, world.size, world.rank))
    derived = run.resolved.derived() | {"dataset": args.dataset, "num_train": num_train, "num_val": num_val,
                                        "arch": args.arch, "image_size": image_size}
    pos = begin(run, derived, args.dataset, lambda: describe(run.resolved, args.dataset, num_train))
    train_epochs(run, pos, num_train, train_one_epoch, epoch_record)
    return finish(run, pos)


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
        f"precision choice: {r.precision_reason}" if r.precision_reason else "",
    ]).rstrip()


# ---------------------------------------------------------------------------------------------------------------
# One epoch: forward, backward, step


def train_one_epoch(run: ImageRun, sampler: GlobalBatchSampler, pos: Position) -> float:
    """Train from ``pos`` to the epoch's end (or --max-steps); return the lr of the last step."""
    engine, dtype = run.engine, engine_dtype(run.engine)
    lr = start_epoch(run, sampler, pos)
    for x, y in run.data.train_batches(sampler):
        x = run.guard.before_micro(to_model_input(x, engine.device, dtype, run.memory_format), pos.global_step)
        y = y.to(engine.device, non_blocking=True)
        run.noise.maybe_measure(pos.global_step, x, y, run.loss_fn)  # every N steps, before the first forward
        logits = engine(x).float()
        loss = run.loss_fn(logits, y)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        lr = engine.get_lr()[0] if boundary else lr  # the lr this step runs at (the schedule moves on in step())
        engine.step()
        run.meter.add(loss, (logits.argmax(1) == y).sum(), y.numel(), y.numel())
        if end_micro_step(run, pos, sampler, loss, boundary, lr, extra=run.noise.last):
            break
    end_epoch(run)
    return lr


def epoch_record(run: ImageRun, pos: Position, sampler: GlobalBatchSampler, lr: float) -> dict[str, Any]:
    """The epoch's record (training totals over all ranks, then validation), logged and printed."""
    totals = run.meter.epoch_totals(run.data.skipped)  # before evaluation: its time and images are not training's
    val = evaluate(run, run.val_indices)
    record = {"kind": "epoch", "epoch": pos.epoch + pos.step_in_epoch / sampler.steps_per_epoch,
              "step": pos.global_step, "samples": pos.samples, "train_loss": totals["train_loss"],
              "train_error": totals["train_error"], **val, "skipped_images": int(totals["skipped"]),
              "skipped_steps": run.engine.skipped_steps, "epoch_time": totals["epoch_time"],
              "images_per_sec": totals["images_per_sec"], "lr": lr}
    run.history.append(record)
    if run.log:
        run.log.log(record)
    run.world.say(f"epoch {record['epoch']:.3g}/{run.resolved.epochs} | train loss {record['train_loss']:.4f} error "
                  f"{record['train_error']:.2f}% | val top-1 error {val['val_top1_error']:.2f}% top-5 "
                  f"{val['val_top5_error']:.2f}% | {record['epoch_time']:.1f} s, {record['images_per_sec']:.0f} "
                  f"images/s")
    return record


@torch.no_grad()
def evaluate(run: ImageRun, indices: list[int]) -> dict[str, float]:
    """Top-1/top-5 error (%) and loss over the whole validation set, each sample counted once across ranks."""
    engine, dtype = run.engine, engine_dtype(run.engine)
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=engine.device)  # correct1, correct5, loss, count
    count = 0  # on the host: a count built on the device would be a host-to-device copy per batch
    for x, y in run.data.val_batches(indices, run.args.eval_batch):
        if y.numel() == 0:
            continue
        # the training layout (channels_last by default): the cuDNN algorithms training chose, not a second set
        x = to_model_input(x, engine.device, dtype, run.memory_format)
        y = y.to(engine.device, non_blocking=True)
        logits = engine(x).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums[:3] += torch.stack([hit[:, 0].sum(), hit.any(1).sum(),
                                 torch.nn.functional.cross_entropy(logits, y, reduction="sum")]).double()
        count += y.numel()
    sums[3] = count  # a fill with a host number: no copy, no synchronisation
    torch.distributed.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    engine.train()
    return {"val_top1_error": 100 * (1 - c1 / n), "val_top5_error": 100 * (1 - c5 / n), "val_loss": loss / n,
            "val_samples": int(n)}


def finish(run: ImageRun, pos: Position) -> dict[str, Any]:
    """Goyal's figure (median top-1 error of the last 5 epochs), the final weights (model.pt), the summary."""
    result: dict[str, Any] = {"steps": pos.global_step, "samples": pos.samples, **error_summary(run.history)}
    if run.world.is_main:
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                 for k, v in run.engine.module.state_dict().items()}
        torch.save(state, run.out_dir / "model.pt")
    return end_run(run, pos, result)


if __name__ == "__main__":
    cli.entry(main, get_args_parser())
