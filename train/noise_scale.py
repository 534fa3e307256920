"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, measured during training (McCandlish et al. 2018).

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (arXiv:1812.06162): with G the
true gradient and Sigma the per-example gradient covariance, a mini-batch gradient G_B of B examples has
E|G_B|^2 = |G|^2 + tr(Sigma) / B. Measuring |G_B|^2 at two batch sizes B_small < B_big gives unbiased estimates
(their appendix A.1)

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each single estimate is very noisy (|G|^2 may even come out negative), so we keep exponential moving averages of
the two and report the ratio of the averages, B_simple, which predicts the critical batch size: below it,
doubling the batch halves the number of steps; far above it, a larger batch buys almost nothing.

``NoiseScaleEstimator`` is the arithmetic. ``NoiseScaleMonitor`` feeds it from a training loop using the two batch
sizes data-parallel training already has: this rank's micro-batch (B_small = micro batch) and the average over
all ranks (B_big = micro batch x world size); with one rank, the two halves of the micro-batch and the whole.
At a measurement step it runs one extra forward/backward of the bare module with ``torch.autograd.grad`` (the
engine's ``.grad`` buffers and hooks are not touched), all-reduces that gradient, and restores the batch-norm
running statistics and the RNG state, so the training trajectory is exactly the one without the monitor. With
``interval=0`` it does nothing at all. It relies on ``engine.module`` and ``torch.distributed`` only, so it works
with ZeRO stages 0-2 in fp32, bf16 and fp16 (ZeRO-3 partitions the parameters themselves and is refused).

    python -m benchmarks.noise_scale    # the monitor's cost: step time with interval 0, 10 and 1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as torch_dist

KEYS = ("noise_scale", "grad_norm_sq", "trace_sigma")


def unbiased_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from squared gradient norms measured at batch sizes b_small < b_big."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_norm_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_norm_sq, trace_sigma


class NoiseScaleEstimator:
    """Exponential moving averages of the unbiased |G|^2 and tr(Sigma) estimates, and their ratio B_simple.

    The averages are bias-corrected as in Adam (divided by 1 - ema^n after n updates), so the first values are
    means rather than fractions of one; the ratio is the same either way. ``ema=0`` keeps only the last estimate.
    """

    def __init__(self, ema: float = 0.95):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.ema = ema
        self.count = 0
        self._g2 = 0.0  # uncorrected moving averages
        self._trace = 0.0

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> dict[str, float]:
        """Add one measurement; return the current averages (see ``values``)."""
        g2, trace = unbiased_estimates(g_small_sq, g_big_sq, b_small, b_big)
        self._g2 = self.ema * self._g2 + (1.0 - self.ema) * g2
        self._trace = self.ema * self._trace + (1.0 - self.ema) * trace
        self.count += 1
        return self.values()

    @property
    def grad_norm_sq(self) -> float:
        return self._g2 / (1.0 - self.ema ** self.count) if self.count else math.nan

    @property
    def trace_sigma(self) -> float:
        return self._trace / (1.0 - self.ema ** self.count) if self.count else math.nan

    @property
    def noise_scale(self) -> float:
        """B_simple = tr(Sigma) / |G|^2 of the averages; NaN while the averaged |G|^2 is not positive."""
        g2 = self.grad_norm_sq
        return self.trace_sigma / g2 if g2 > 0 else math.nan

    def values(self) -> dict[str, float]:
        return {"noise_scale": self.noise_scale, "grad_norm_sq": self.grad_norm_sq, "trace_sigma": self.trace_sigma}

    def state_dict(self) -> dict[str, float]:
        return {"ema": self.ema, "count": self.count, "g2": self._g2, "trace": self._trace}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.ema, self.count = float(state["ema"]), int(state["count"])
        self._g2, self._trace = float(state["g2"]), float(state["trace"])


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseScaleMonitor:
    """Measures the gradient noise scale every ``interval`` optimizer steps (0: never, at no cost).

    ``engine`` is a DeepSpeed engine (its ``.module`` is used) or a plain ``nn.Module``. Call ``maybe_measure``
    on every rank with the same ``step`` (it all-reduces when the world is larger than one), before the engine's
    own forward of that micro-batch; it measures at most once per step, on the first micro-batch it is given.
    ``loss_fn(output, y)`` must return the mean loss over the batch, the training loss.
    """

    def __init__(self, engine: Any, interval: int, ema: float = 0.95, group: Any = None,
                 fp16_scale: float = 2.0 ** 12):
        if interval < 0:
            raise ValueError(f"interval must be >= 0 (0 turns the monitor off), got {interval}")
        self.module: torch.nn.Module = getattr(engine, "module", engine)
        self.interval = interval
        self.estimator = NoiseScaleEstimator(ema)
        self.group = group
        self.fp16_scale = fp16_scale  # fp16 gradients are computed from loss x scale, halved on overflow
        self.last: dict[str, float] = {}  # the latest averages, {} before the first measurement
        self.last_raw: dict[str, float] = {}  # the latest single measurement: g_small_sq, g_big_sq, b_small, b_big
        self.skipped = 0  # measurements dropped: non-finite gradients or unequal micro-batches across ranks
        self._measured_step: int | None = None
        if interval and any(p.numel() == 0 for p in self.module.parameters()):
            raise ValueError("NoiseScaleMonitor needs whole parameters on every rank; found empty (partitioned) "
                             "parameters, as ZeRO stage 3 makes them; use ZeRO stage 0-2 or interval 0")

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0 and step != self._measured_step

    def maybe_measure(self, step: int, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, float] | None:
        """Measure if ``step`` is a measurement step not yet measured; return the new averages, else None."""
        if not self.due(step):
            return None
        self._measured_step = step
        return self.measure(x, y, loss_fn)

    def measure(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, float] | None:
        """One measurement on this micro-batch; None when it had to be skipped (see ``skipped``)."""
        world = self._world()
        buffers = [b.detach().clone() for b in self.module.buffers()]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # dropout etc. must not shift the training RNG stream
                raw = self._measure_dp(x, y, loss_fn, world) if world > 1 else self._measure_halves(x, y, loss_fn)
        finally:
            with torch.no_grad():  # batch-norm running statistics as if the extra pass had not happened
                for b, saved in zip(self.module.buffers(), buffers, strict=True):
                    b.copy_(saved)
        if raw is None:
            self.skipped += 1
            return None
        self.last_raw = raw
        self.last = self.estimator.update(raw["g_small_sq"], raw["g_big_sq"], raw["b_small"], raw["b_big"])
        return self.last

    # -----------------------------------------------------------------------------------------------------------

    def _world(self) -> int:
        if torch_dist.is_available() and torch_dist.is_initialized():
            return torch_dist.get_world_size(self.group)
        return 1

    def _flat_grad(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
        """The gradient of the mean loss on (x, y) as one fp32 vector (non-finite if fp16 overflowed)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        half = any(p.dtype == torch.float16 for p in params)
        scale = self.fp16_scale if half else 1.0
        with torch.enable_grad():
            loss = loss_fn(self.module(x), y).float()
            grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                          for g, p in zip(grads, params, strict=True)])
        return flat / scale if scale != 1.0 else flat

    def _finite_or_back_off(self, finite: bool) -> bool:
        if not finite and self.fp16_scale > 1.0:
            self.fp16_scale /= 2.0
        return finite

    def _measure_halves(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, float] | None:
        """One rank: B_small = half the micro-batch (both halves averaged), B_big = both halves."""
        half = x.shape[0] // 2
        if half < 1:
            return None
        g1 = self._flat_grad(x[:half], y[:half], loss_fn)
        g2 = self._flat_grad(x[half:2 * half], y[half:2 * half], loss_fn)
        small = 0.5 * (g1.square().sum() + g2.square().sum())
        big = (0.5 * (g1 + g2)).square().sum()
        if not self._finite_or_back_off(bool(torch.isfinite(small) and torch.isfinite(big))):
            return None
        return {"g_small_sq": small.item(), "g_big_sq": big.item(), "b_small": half, "b_big": 2 * half}

    def _measure_dp(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, world: int) -> dict[str, float] | None:
        """Data parallel: B_small = this rank's micro-batch (|g|^2 averaged over ranks), B_big = all ranks' batches."""
        n = x.shape[0]
        g = self._flat_grad(x, y, loss_fn)
        small = g.square().sum()
        finite = torch.isfinite(small)
        # One small all-reduce first: every rank must agree to skip, or the big one below would hang.
        stats = torch.stack([torch.where(finite, small, torch.zeros_like(small)), (~finite).float(),
                             torch.tensor(float(n), device=g.device), torch.tensor(float(n * n), device=g.device)])
        torch_dist.all_reduce(stats, group=self.group)
        small_mean, bad, n_sum, n_sq_sum = (stats / world).tolist()
        if bad > 0 or not math.isclose(n_sq_sum, n_sum * n_sum):  # equal micro-batches: E[n^2] = E[n]^2
            self._finite_or_back_off(bad == 0)
            return None
        torch_dist.all_reduce(g, group=self.group)
        big = (g / world).square().sum()
        return {"g_small_sq": small_mean, "g_big_sq": big.item(), "b_small": n, "b_big": n * world}
