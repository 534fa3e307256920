"""Learning-rate schedules of the recipes, built on DeepSpeed's WarmupLR.

Both schedules keep WarmupLR's parameters and state_dict, and add what follows the warmup:

* ``WarmupMultiStepLR`` (Goyal et al. 2017, sec. 2.2 and 5.1): linear warmup from ``warmup_min_lr`` (0.1) to
  ``warmup_max_lr`` (0.1 x batch / 256) over 5 epochs, then the lr is multiplied by ``gamma`` (0.1) at each
  milestone (epochs 30, 60, 80).
* ``WarmupPolyLR`` (the MLCommons ResNet-50 LARS reference): linear warmup, then polynomial decay
  ``end_lr + (max_lr - end_lr) * (1 - (t - W) / (T - W)) ** power`` with power 2 to ``end_lr`` at step T. With
  ``decay_from_start`` the decay counts from step 0, ``(1 - t / T) ** power``, as NVIDIA DeepLearningExamples'
  BERT ``PolyWarmUpScheduler`` does (power 0.5; the lr drops at the end of the warmup to (1 - W / T) ** 0.5).
* ``WarmupExpDecayLR`` (DeepSpeedExamples bing_bert, ``warmup_exp_decay_exp`` with ``--lr_offset``):
  ``min_lr + (max_lr - min_lr) * f(t)``, ``f = (t / W) ** warmup_power`` during the warmup, then
  ``decay_rate ** ((t - W) / decay_num_steps)``.

One difference from DeepSpeed's WarmupLR: there the first two optimizer steps both run at ``warmup_min_lr``
(the constructor sets the lr for iteration -1, the first ``step()`` for iteration 0). Here the optimizer step
with 0-based index t always runs at ``lr(t)``, the pure function below, so the warmup climbs by the same amount
every step as the paper describes. A test checks the lr seen by each optimizer step against the formula.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.lr_schedules import WARMUP_LINEAR_RATE, WarmupLR


def warmup_lr(t: int, min_lr: float, max_lr: float, warmup_steps: int) -> float:
    """Linear warmup: min_lr at step 0, rising by (max_lr - min_lr) / warmup_steps per step, max_lr from then on."""
    if t < warmup_steps:
        return min_lr + (max_lr - min_lr) * t / warmup_steps
    return max_lr


def exp_decay_lr(t: int, *, min_lr: float, max_lr: float, warmup_steps: int, warmup_power: float,
                 decay_rate: float, decay_steps: int) -> float:
    """bing_bert's "EE" schedule at optimizer step t (0-based), its lr offset as ``min_lr``."""
    f = (t / warmup_steps) ** warmup_power if t < warmup_steps else decay_rate ** ((t - warmup_steps) / decay_steps)
    return min_lr + (max_lr - min_lr) * f


def multistep_lr(t: int, *, min_lr: float, max_lr: float, warmup_steps: int, milestones: list[int],
                 gamma: float) -> float:
    """Goyal et al.'s schedule at optimizer step t (0-based)."""
    return warmup_lr(t, min_lr, max_lr, warmup_steps) * gamma ** sum(t >= m for m in milestones)


def poly_lr(t: int, *, min_lr: float, max_lr: float, warmup_steps: int, total_steps: int, end_lr: float,
            power: float, decay_from_start: bool = False) -> float:
    """MLCommons LARS schedule at optimizer step t (0-based); NVIDIA BERT's with ``decay_from_start``."""
    if t < warmup_steps:
        return warmup_lr(t, min_lr, max_lr, warmup_steps)
    if decay_from_start:
        frac = min(1.0, t / max(1, total_steps))
    else:
        frac = min(1.0, (t - warmup_steps) / max(1, total_steps - warmup_steps))
    return end_lr + (max_lr - end_lr) * (1.0 - frac) ** power


class _Schedule(WarmupLR):
    """WarmupLR whose optimizer step t runs at ``self.lr_at(t)``."""

    def __init__(self, optimizer: Any, warmup_min_lr: float = 0.0, warmup_max_lr: float | None = None,
                 warmup_num_steps: int = 0, warmup_type: str = WARMUP_LINEAR_RATE, last_batch_iteration: int = -1):
        if warmup_type != WARMUP_LINEAR_RATE:
            raise ValueError(f"{type(self).__name__} supports warmup_type 'linear' only (Goyal et al.'s gradual "
                             f"warmup), got {warmup_type!r}")
        if not isinstance(warmup_num_steps, int) or warmup_num_steps < 0:
            raise ValueError(f"warmup_num_steps must be an integer >= 0, got {warmup_num_steps!r}")
        self.warmup_steps = warmup_num_steps
        # WarmupLR wants a positive count; its constructor sets the lr through our get_lr (step 0).
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, max(1, warmup_num_steps), warmup_type,
                         last_batch_iteration)

    def lr_at(self, t: int, min_lr: float, max_lr: float) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        t = self.last_batch_iteration + 1  # index of the optimizer step about to run
        return [self.lr_at(t, lo, hi) for lo, hi in zip(self.min_lrs, self.max_lrs, strict=True)]


class WarmupMultiStepLR(_Schedule):
    """Goyal et al.'s gradual warmup followed by step decay at milestones (given in steps)."""

    def __init__(self, optimizer: Any, warmup_min_lr: float = 0.0, warmup_max_lr: float | None = None,
                 warmup_num_steps: int = 0, warmup_type: str = WARMUP_LINEAR_RATE,
                 milestones_steps: list[int] | None = None, gamma: float = 0.1, last_batch_iteration: int = -1):
        self.milestones = sorted(milestones_steps or [])
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
        self.gamma = gamma
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def lr_at(self, t: int, min_lr: float, max_lr: float) -> float:
        return multistep_lr(t, min_lr=min_lr, max_lr=max_lr, warmup_steps=self.warmup_steps,
                            milestones=self.milestones, gamma=self.gamma)


class WarmupPolyLR(_Schedule):
    """Linear warmup, then polynomial decay to ``end_lr`` at ``total_num_steps`` (MLCommons LARS)."""

    def __init__(self, optimizer: Any, warmup_min_lr: float = 0.0, warmup_max_lr: float | None = None,
                 warmup_num_steps: int = 0, warmup_type: str = WARMUP_LINEAR_RATE, total_num_steps: int = 1,
                 end_lr: float = 1e-4, power: float = 2.0, decay_from_start: bool = False,
                 last_batch_iteration: int = -1):
        if not isinstance(total_num_steps, int) or total_num_steps < 1:
            raise ValueError(f"total_num_steps must be a positive integer, got {total_num_steps!r}")
        self.total_steps, self.end_lr, self.power = total_num_steps, end_lr, power
        self.decay_from_start = bool(decay_from_start)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def lr_at(self, t: int, min_lr: float, max_lr: float) -> float:
        return poly_lr(t, min_lr=min_lr, max_lr=max_lr, warmup_steps=self.warmup_steps,
                       total_steps=self.total_steps, end_lr=self.end_lr, power=self.power,
                       decay_from_start=self.decay_from_start)


class WarmupExpDecayLR(_Schedule):
    """bing_bert's warmup (power ``warmup_power``), then exponential decay by ``decay_rate`` every
    ``decay_num_steps``; ``warmup_min_lr`` is its lr offset (the lr at step 0 and the floor of the decay)."""

    def __init__(self, optimizer: Any, warmup_min_lr: float = 0.0, warmup_max_lr: float | None = None,
                 warmup_num_steps: int = 1, warmup_type: str = WARMUP_LINEAR_RATE, warmup_power: float = 2.0,
                 decay_rate: float = 0.9, decay_num_steps: int = 1, last_batch_iteration: int = -1):
        if not isinstance(warmup_num_steps, int) or warmup_num_steps < 1:
            raise ValueError(f"warmup_num_steps must be an integer >= 1, got {warmup_num_steps!r}")
        if not isinstance(decay_num_steps, int) or decay_num_steps < 1:
            raise ValueError(f"decay_num_steps must be an integer >= 1, got {decay_num_steps!r}")
        if not 0 < decay_rate <= 1 or warmup_power <= 0:
            raise ValueError(f"decay_rate must be in (0, 1] and warmup_power > 0, got {decay_rate!r}, "
                             f"{warmup_power!r}")
        self.warmup_power, self.decay_rate, self.decay_steps = warmup_power, decay_rate, decay_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def lr_at(self, t: int, min_lr: float, max_lr: float) -> float:
        return exp_decay_lr(t, min_lr=min_lr, max_lr=max_lr, warmup_steps=self.warmup_steps,
                            warmup_power=self.warmup_power, decay_rate=self.decay_rate, decay_steps=self.decay_steps)


SCHEDULES = {"WarmupMultiStepLR": WarmupMultiStepLR, "WarmupPolyLR": WarmupPolyLR,
             "WarmupExpDecayLR": WarmupExpDecayLR}
