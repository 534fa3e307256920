"""The lr schedules against the papers' formulas, step by step, on a real torch optimizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from train.schedules import SCHEDULES, WarmupMultiStepLR, WarmupPolyLR


def lrs_seen(schedule_cls, steps: int, **params) -> list[float]:
    """The lr each optimizer step runs at, stepping the schedule after each step as DeepSpeed's engine does."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=123.0)
    sched = schedule_cls(opt, **params)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_goyal_gradual_warmup_and_step_decay():
    """Goyal et al. sec. 2.2: start at 0.1, add a constant amount every iteration, reach 0.1k after 5 epochs;
    sec. 5.1: divide by 10 at epochs 30, 60, 80. Here k = 32 (8k), 10 steps per epoch."""
    k, spe = 32, 10
    seen = lrs_seen(WarmupMultiStepLR, 90 * spe, warmup_min_lr=0.1, warmup_max_lr=0.1 * k,
                    warmup_num_steps=5 * spe, milestones_steps=[30 * spe, 60 * spe, 80 * spe], gamma=0.1)
    increment = (0.1 * k - 0.1) / (5 * spe)
    for t in range(5 * spe):
        assert math.isclose(seen[t], 0.1 + increment * t), t
    assert math.isclose(seen[5 * spe], 3.2)
    assert math.isclose(seen[30 * spe - 1], 3.2) and math.isclose(seen[30 * spe], 0.32)
    assert math.isclose(seen[60 * spe], 0.032) and math.isclose(seen[80 * spe], 0.0032)
    assert math.isclose(seen[-1], 0.0032)
    # constant increments: no two equal consecutive warmup lrs (DeepSpeed's WarmupLR repeats its first lr)
    assert all(b > a for a, b in zip(seen[:5 * spe], seen[1:5 * spe + 1], strict=True))


def test_mlcommons_poly_schedule():
    """MLCommons LARS: linear warmup from 0 over W steps, then (lr - end) * (1 - (t - W) / (T - W))^2 + end."""
    W, T, lr, end = 25, 200, 31.2, 1e-4
    seen = lrs_seen(WarmupPolyLR, T, warmup_min_lr=0.0, warmup_max_lr=lr, warmup_num_steps=W, total_num_steps=T,
                    end_lr=end, power=2.0)
    for t in range(T):
        want = lr * t / W if t < W else end + (lr - end) * (1 - (t - W) / (T - W)) ** 2
        assert math.isclose(seen[t], want, rel_tol=1e-12, abs_tol=1e-12), t
    assert seen[0] == 0.0 and math.isclose(seen[W], lr)


def test_state_dict_resumes_the_schedule():
    params = dict(warmup_min_lr=0.1, warmup_max_lr=1.6, warmup_num_steps=7, milestones_steps=[12], gamma=0.1)
    full = lrs_seen(WarmupMultiStepLR, 20, **params)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = WarmupMultiStepLR(opt, **params)
    for _ in range(9):
        s.step()
    state = s.state_dict()
    opt2 = torch.optim.SGD([p], lr=1.0)
    s2 = WarmupMultiStepLR(opt2, **params)
    s2.load_state_dict(state)
    s2.step(s2.last_batch_iteration)  # re-apply the lr of the restored position, as DeepSpeed's load does not
    assert math.isclose(opt2.param_groups[0]["lr"], full[9])


def test_rejects_log_warmup_and_bad_gamma():
    p = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="warmup_type 'linear' only"):
        WarmupMultiStepLR(torch.optim.SGD([p], lr=1.0), warmup_type="log")
    with pytest.raises(ValueError, match="gamma must be in"):
        WarmupMultiStepLR(torch.optim.SGD([p], lr=1.0), gamma=2.0)


def test_every_bert_recipe_warms_up_from_its_first_step():
    """Devlin et al., You et al., NVIDIA DeepLearningExamples and bing_bert all warm up from the first step: step t
    (0-based) runs at min + (peak - min) x (t / W) ** q (q = 1, bing_bert's q = warmup_power). After the warmup each
    recipe follows its source's decay, written out here: linear to 0 over the steps after the warmup (Devlin, You),
    (1 - t / T) ** 0.5 counted from step 0 (NVIDIA's PolyWarmUpScheduler), rate ** ((t - W) / D) (bing_bert).
    DeepSpeed's own WarmupDecayLR, the control, fails this: it runs the first two steps at warmup_min_lr, so every
    warmup step gets the previous step's lr."""
    W, T = 10, 100

    def expected(kind: str, p: dict, t: int) -> float:
        lo, hi = p["warmup_min_lr"], p["warmup_max_lr"]
        if t < W:
            return lo + (hi - lo) * (t / W) ** p.get("warmup_power", 1.0)
        if kind == "WarmupExpDecayLR":
            return lo + (hi - lo) * p["decay_rate"] ** ((t - W) / p["decay_num_steps"])
        frac = t / T if p.get("decay_from_start") else (t - W) / (T - W)
        return p["end_lr"] + (hi - p["end_lr"]) * (1 - frac) ** p["power"]

    def follows(seen: list[float], kind: str, p: dict) -> bool:
        return all(math.isclose(seen[t], expected(kind, p, t), rel_tol=1e-9, abs_tol=1e-15) for t in range(T))

    configs = sorted((Path(__file__).resolve().parent.parent / "ds_configs" / "bert").glob("*.json"))
    assert len(configs) >= 8
    kinds = set()
    for path in configs:
        sched = json.loads(path.read_text())["scheduler"]
        kind, p = sched["type"], dict(sched["params"])
        assert kind in SCHEDULES, f"{path.name}: {kind} is not one of train.schedules' schedules"
        kinds.add((kind, p.get("power"), bool(p.get("decay_from_start"))))
        for key in ("warmup_num_epochs", "total_num_epochs", "warmup_num_steps", "total_num_steps"):
            p.pop(key, None)  # the demo counts in epochs; here every recipe runs on W and T steps
        if kind == "WarmupPolyLR":
            p.update(total_num_steps=T)
        seen = lrs_seen(SCHEDULES[kind], T, warmup_num_steps=W, **p)
        assert follows(seen, kind, p), (path.name, seen[:W + 2])
    assert {("WarmupPolyLR", 1.0, False), ("WarmupPolyLR", 0.5, True), ("WarmupExpDecayLR", None, False)} <= kinds
    control = dict(warmup_min_lr=0.0, warmup_max_lr=1e-4, end_lr=0.0, power=1.0)
    deepspeed_seen = lrs_seen(WarmupDecayLR, T, warmup_min_lr=0.0, warmup_max_lr=1e-4, warmup_num_steps=W,
                              total_num_steps=T, warmup_type="linear")
    assert deepspeed_seen[:3] == [0.0, 0.0, 1e-4 / W]  # the control: one step late
    assert not follows(deepspeed_seen, "WarmupPolyLR", control)
