"""The coordinator's records of a Downpour run, in the formats train/imagenet.py writes (train/tracking.py's
:class:`RunLog` and :func:`write_run_config`): config.json, then step records (loss, throughput, staleness tau of
the pushes since the last record), epoch records (training totals, the parameters fetched from the shards and
evaluated on the validation samples) and the summary (train/tracking.py's :func:`error_summary`, the replicas'
fates, the staleness of every push), and the final model (model.pt).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.ps import calls
from train.ps import shard as ps
from train.ps.coordinator import Coordinator
from train.ps.setup import Setup, derived, load_data
from train.tracking import RunLog, error_summary, git_commit, write_run_config


@dataclass
class State:
    """Where the coordinator's records stand (saved in the checkpoint)."""

    epochs_logged: int = 0
    next_log: int = 0
    next_save: int = 0
    t0: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    t_epoch: float = field(default_factory=time.perf_counter)
    samples_log: int = 0
    samples_epoch: int = 0
    wall_before: float = 0.0  # wall time of the runs this one resumes
    dropped: int = 0  # pushes the shards dropped (not finite)
    last_saved: str = ""  # the tag of the last checkpoint written (never write one twice)
    taus_interval: list[int] = field(default_factory=list)
    taus_epoch: list[int] = field(default_factory=list)
    taus_all: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


def start_log(setup: Setup, out_dir: Path, run_name: str, wandb_id: str | None, checkpoint: str | None) -> RunLog:
    """config.json (the first start's is kept; a resume adds a line to resumes.jsonl naming ``checkpoint``, the file
    resumed from) and the run's records opened."""
    args = setup.args
    summary_cfg = {"run_name": run_name, "group": args.wandb_group, "config_file": str(args.deepspeed_config),
                   "args": vars(args), "derived": derived(setup), "downpour": setup.cfg,
                   "optimizer": {"type": derived(setup)["optimizer"], "params": {"lr": setup.cfg["lr"]}},
                   "scheduler": None, "training": {"recipe": f"downpour-{setup.cfg['optimizer']}",
                                                   "epochs": setup.cfg["epochs"]},
                   "param_shards": setup.param_shards, "git_commit": git_commit()}
    write_run_config(out_dir, summary_cfg, resumed=args.resume, checkpoint=checkpoint)
    return RunLog(out_dir, use_wandb=not args.no_wandb, project=args.wandb_project, group=args.wandb_group,
                  name=run_name, tags=["downpour", setup.cfg["optimizer"], f"W{setup.W}", f"S{setup.S}"],
                  config=summary_cfg, resume_id=wandb_id, timeout=args.wandb_timeout)


def drain_taus(setup: Setup, state: State) -> None:
    """The staleness of the pushes every shard applied since the last drain, and the pushes it dropped."""
    for i in range(setup.S):
        _, taus, dropped = calls.call(ps.shard_name(i), ps.rpc_drain_taus)
        state.dropped += dropped
        for group in (state.taus_interval, state.taus_epoch, state.taus_all):
            group.extend(taus)


def _rates(c: Coordinator, sums: list[float]) -> tuple[float | None, float | None]:
    loss_sum, correct, n = sums
    return (loss_sum / n, 100 * (1 - correct / n)) if n else (None, None)


def step_record(c: Coordinator, setup: Setup, state: State, log: Any) -> None:
    drain_taus(setup, state)
    with c.cond:
        total, samples, (loss, _) = sum(c.steps), c.samples, _rates(c, c.interval)
        c.interval = [0.0, 0.0, 0.0]
        alive, dead = sum(not d for d in c.dead), sum(c.dead)
    now = time.perf_counter()
    rec = {"kind": "step", "step": total, "epoch": samples / (setup.steps_per_epoch * setup.round_batch),
           "samples": samples, "loss": loss, "lr": setup.cfg["lr"],
           "images_per_sec": (samples - state.samples_log) / max(now - state.t_log, 1e-9),
           "global_batch": setup.round_batch, "wall_time": state.wall(), "replicas_alive": alive,
           "replicas_dead": dead,
           **tau_summary(state.taus_interval)}
    state.t_log, state.samples_log, state.taus_interval = now, samples, []
    log.log(rec)


def epoch_record(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module) -> dict[str, Any]:
    """Training totals since the last epoch record, the parameters fetched from the shards, evaluated."""
    step_record(c, setup, state, log)
    with c.cond:
        total, samples, (loss, err) = sum(c.steps), c.samples, _rates(c, c.epoch_sums)
        c.epoch_sums = [0.0, 0.0, 0.0]
    now = time.perf_counter()
    epoch_time, seen = now - state.t_epoch, samples - state.samples_epoch
    load_from_shards(model, setup)
    val = evaluate(model, setup)
    # evaluation points passed (whole epochs with the default --evals-per-epoch 1)
    state.epochs_logged = samples * setup.args.evals_per_epoch // (setup.steps_per_epoch * setup.round_batch)
    rec = {"kind": "epoch", "epoch": samples / (setup.steps_per_epoch * setup.round_batch), "step": total,
           "samples": samples, "train_loss": loss, "train_error": err, **val, "epoch_time": epoch_time,
           "images_per_sec": seen / max(epoch_time, 1e-9), "lr": setup.cfg["lr"], "wall_time": state.wall(),
           **{k: v for k, v in tau_summary(state.taus_epoch).items() if k != "tau_hist"},
           "tau_hist": tau_summary(state.taus_epoch).get("tau_hist")}
    state.taus_epoch, state.t_epoch, state.samples_epoch = [], time.perf_counter(), samples
    state.history.append(rec)
    log.log(rec)
    print(f"epoch {rec['epoch']:.3g}/{setup.cfg['epochs']} | train loss {_fmt(loss)} | val top-1 error "
          f"{val['val_top1_error']:.2f}% | staleness mean {rec.get('tau_mean', float('nan')):.2f} max "
          f"{rec.get('tau_max', '-')} | {epoch_time:.1f} s, {rec['images_per_sec']:.0f} samples/s", flush=True)
    return rec


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def load_from_shards(model: torch.nn.Module, setup: Setup) -> None:
    shards = [calls.call(ps.shard_name(i), ps.rpc_state) for i in range(setup.S)]
    ps.load_slices(model, [s["params"] | s["buffers"] for s in shards])


@torch.no_grad()
def evaluate(model: torch.nn.Module, setup: Setup) -> dict[str, float]:
    """Top-1/top-5 error (%) and loss over the validation samples (the first --val-subset of the test set, or of
    the held-out training samples with --holdout)."""
    data = load_data(setup.args)
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for x, y in data.val_batches(list(range(setup.num_val)), setup.args.eval_batch):
        logits = model(x).float()
        hit = logits.topk(5, dim=1).indices == y[:, None]
        sums += torch.tensor([hit[:, 0].sum(), hit.any(1).sum(), y.numel(),
                              torch.nn.functional.cross_entropy(logits, y, reduction="sum")], dtype=torch.float64)
    model.train()
    c1, c5, n, loss = sums.tolist()
    return {"val_top1_error": 100 * (1 - c1 / n), "val_top5_error": 100 * (1 - c5 / n), "val_loss": loss / n,
            "val_samples": int(n)}


def last_record(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module) -> None:
    """The last epoch record, if samples came after the last one; else the model fetched from the shards."""
    drain_taus(setup, state)
    if c.samples > state.samples_epoch or not state.history:
        epoch_record(c, setup, state, log, model)
    else:
        load_from_shards(model, setup)


def finish(c: Coordinator, setup: Setup, state: State, log: Any, model: torch.nn.Module,
           out_dir: Path) -> dict[str, Any]:
    """model.pt and the summary (after :func:`last_record` and the last checkpoint)."""
    torch.save({k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               out_dir / "model.pt")
    result = {"steps": sum(c.steps), "samples": c.samples, **error_summary(state.history), "wall_time": state.wall(),
              "replica_steps": list(c.steps), "dead_replicas": [j for j in range(setup.W) if c.dead[j]],
              "replica_errors": dict(c.errors), "max_dead_replicas": setup.max_dead,
              "skipped_pushes": list(c.skipped), "dropped_pushes": state.dropped,
              **{k: v for k, v in tau_summary(state.taus_all).items() if k != "tau_hist"},
              "tau_hist": tau_summary(state.taus_all).get("tau_hist")}
    log.log({"kind": "summary", **result})
    log.summary({k: v for k, v in result.items() if not isinstance(v, list)})
    log.close()
    print(f"done: {json.dumps(result)}; run folder {out_dir}", flush=True)
    return result


def tau_summary(taus: list[int]) -> dict[str, Any]:
    """The staleness distribution of some pushes: mean, median, 90th percentile, max, and counts of 0, 1, 2, ..."""
    if not taus:
        return {"tau_count": 0}
    s = sorted(taus)
    hist = [0] * (s[-1] + 1)
    for t in s:
        hist[t] += 1
    return {"tau_count": len(s), "tau_mean": sum(s) / len(s), "tau_median": s[(len(s) - 1) // 2],
            "tau_p90": s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)], "tau_max": s[-1], "tau_hist": hist}
