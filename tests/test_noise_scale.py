"""The gradient noise scale (McCandlish et al. 2018, arXiv:1812.06162): estimator and training-loop monitor.

Truths come from closed forms, not from the code under test: E|G_B|^2 = |G|^2 + tr(Sigma)/B for a mean of B
i.i.d. per-example gradients (the paper's eq. 2.2 / appendix A.1), and for linear regression with Gaussian inputs
the per-example gradient covariance follows from Isserlis' theorem. The monitor is compared with gradients computed
independently with ``loss.backward()`` on a copy of the model.

Run as a script (``deepspeed --num_gpus 2 tests/test_noise_scale.py --out DIR``) this file is the 2-rank worker of
``test_monitor_two_ranks_zero2_matches_independent_gradients``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.noise_scale import NoiseScaleEstimator, NoiseScaleMonitor, unbiased_estimates  # noqa: E402


def test_estimates_invert_the_expected_norms_exactly():
    """Plugging E|G_B|^2 = |G|^2 + tr(Sigma)/B at two sizes into the estimators gives |G|^2 and tr(Sigma) back."""
    g2, trace = 0.37, 52.0
    for b_small, b_big in [(1, 2), (16, 32), (32, 256), (7, 1000)]:
        est = unbiased_estimates(g2 + trace / b_small, g2 + trace / b_big, b_small, b_big)
        assert est == pytest.approx((g2, trace), rel=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        unbiased_estimates(1.0, 1.0, 32, 32)


def test_moving_averages_are_bias_corrected_and_the_ratio_is_of_the_averages():
    """ema=0.5, two updates: avg = (0.5 * 0.5 * a1 + 0.5 * a2) / (1 - 0.5^2), for |G|^2 and tr(Sigma) alike."""
    est = NoiseScaleEstimator(ema=0.5)
    assert math.isnan(est.noise_scale) and est.values()["grad_norm_sq"] != est.values()["grad_norm_sq"]
    a = unbiased_estimates(3.0, 2.0, 4, 8)  # |G|^2 = 1, tr = 8
    b = unbiased_estimates(5.0, 2.0, 4, 8)  # |G|^2 = -1, tr = 24
    first = est.update(3.0, 2.0, 4, 8)
    assert first == pytest.approx({"grad_norm_sq": a[0], "trace_sigma": a[1], "noise_scale": a[1] / a[0]})
    second = est.update(5.0, 2.0, 4, 8)
    g2 = (0.25 * a[0] + 0.5 * b[0]) / 0.75
    tr = (0.25 * a[1] + 0.5 * b[1]) / 0.75
    assert second["grad_norm_sq"] == pytest.approx(g2) and second["trace_sigma"] == pytest.approx(tr)
    assert math.isnan(second["noise_scale"])  # averaged |G|^2 = (0.25 - 0.5) / 0.75 < 0: undefined, not negative
    restored = NoiseScaleEstimator()
    restored.load_state_dict(est.state_dict())
    assert restored.values()["trace_sigma"] == pytest.approx(tr) and restored.count == 2
    with pytest.raises(ValueError, match="ema"):
        NoiseScaleEstimator(ema=1.0)


def test_estimator_is_unbiased_on_sampled_gradients_with_known_covariance():
    """Per-example gradients g = G + L z, z ~ N(0, I): Sigma = L L^T is known. 8 'ranks' of 16 examples each, as
    in data parallel training; the averages over 4,000 trials land within 3% of |G|^2 and tr(Sigma)."""
    gen = torch.Generator().manual_seed(0)
    dim, ranks, micro, trials = 40, 8, 16, 4000
    G = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.15  # B_simple about 70
    L = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) * torch.linspace(0.2, 2.0, dim)
    true_g2, true_trace = float(G @ G), float(torch.trace(L @ L.T))
    z = torch.randn(trials, ranks, micro, dim, generator=gen, dtype=torch.float64)
    per_rank = G + (z @ L.T).mean(2)  # (trials, ranks, dim): each rank's micro-batch mean gradient
    small = per_rank.square().sum(-1).mean(1)  # |G_small|^2 averaged over ranks
    big = per_rank.mean(1).square().sum(-1)
    est = NoiseScaleEstimator(ema=0.999)
    g2s, traces = [], []
    for s, b in zip(small.tolist(), big.tolist(), strict=True):
        g2, tr = unbiased_estimates(s, b, micro, micro * ranks)
        g2s.append(g2)
        traces.append(tr)
        est.update(s, b, micro, micro * ranks)
    mean_g2, mean_trace = sum(g2s) / trials, sum(traces) / trials
    assert mean_g2 == pytest.approx(true_g2, rel=0.03)
    assert mean_trace == pytest.approx(true_trace, rel=0.03)
    # The moving average (about 1,000 trials wide here) is less precise: within 5% of the truth.
    assert est.noise_scale == pytest.approx(true_trace / true_g2, rel=0.05)
    # Not a trivial pass: the naive |G_big|^2 overestimates |G|^2 by tr(Sigma)/B_big, by half here.
    assert sum(big.tolist()) / trials > 1.4 * true_g2


def linear_regression_truth(dim: int, d: torch.Tensor, noise_std: float) -> tuple[float, float]:
    """Loss 0.5 (x.w - y)^2, y = x.w* + eps, x ~ N(0, I), eps ~ N(0, s^2), d = w - w*: the per-example gradient is
    x (x.d - eps), so G = d and (Isserlis) E[g g^T] = |d|^2 I + 2 d d^T + s^2 I, Sigma = (|d|^2 + s^2) I + d d^T."""
    d2 = float(d @ d)
    return d2, dim * (d2 + noise_std ** 2) + d2


def test_monitor_is_unbiased_on_linear_regression():
    """The monitor (one process: halves of each micro-batch) on fresh batches of a linear regression whose
    |G|^2 = 1 and tr(Sigma) = 20 * 2 + 1 = 41 are known. Over 2,000 measurements (standard errors about 1.2% for
    |G|^2 and 0.8% for tr(Sigma)) the means land within 5% and 3% of the truth, and B_simple within 5% of 41."""
    torch.manual_seed(0)
    dim, batch, noise_std = 20, 64, 1.0
    model = nn.Linear(dim, 1, bias=False)
    w_star = torch.zeros(dim)
    with torch.no_grad():
        model.weight.copy_(torch.randn(dim) / math.sqrt(dim))
        model.weight.div_(model.weight.norm())  # |d| = 1
    true_g2, true_trace = linear_regression_truth(dim, model.weight.detach()[0] - w_star, noise_std)
    assert (true_g2, true_trace) == pytest.approx((1.0, 41.0))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (out.squeeze(1) - y).square().mean()

    mon = NoiseScaleMonitor(model, interval=1, ema=0.9995)
    g2s, traces = [], []
    for step in range(2000):
        x = torch.randn(batch, dim)
        y = x @ w_star + noise_std * torch.randn(batch)
        assert mon.maybe_measure(step, x, y, loss_fn) is not None
        r = mon.last_raw
        assert (r["b_small"], r["b_big"]) == (batch // 2, batch)
        g2, tr = unbiased_estimates(r["g_small_sq"], r["g_big_sq"], r["b_small"], r["b_big"])
        g2s.append(g2)
        traces.append(tr)
    assert sum(g2s) / len(g2s) == pytest.approx(true_g2, rel=0.05)
    assert sum(traces) / len(traces) == pytest.approx(true_trace, rel=0.03)
    assert mon.last["noise_scale"] == pytest.approx(true_trace / true_g2, rel=0.05)
    assert mon.estimator.count == 2000 and model.weight.grad is None


class TinyNet(nn.Module):
    """Batch norm (running statistics the monitor must restore) and dropout (RNG it must not consume)."""

    def __init__(self, dim: int = 12, classes: int = 5, dropout: float = 0.2, norm: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.BatchNorm1d(16) if norm else nn.Identity(), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def flat_grad_by_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The independent computation: .backward() on a copy, .grad read back (no autograd.grad)."""
    model.zero_grad(set_to_none=True)
    ce(model(x), y).backward()
    return torch.cat([p.grad.detach().double().reshape(-1) for p in model.parameters()])


@pytest.fixture
def single_process(monkeypatch) -> None:
    """A world of one for deepspeed.initialize in this process; the variables are removed afterwards, so that
    train/imagenet.py children started by later tests do not inherit them (and this process's port)."""
    if "RANK" not in os.environ:
        from conftest import free_port

        for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                               MASTER_PORT=str(free_port())).items():
            monkeypatch.setenv(key, value)


def ds_engine(model: nn.Module, *, micro: int, accum: int, world: int = 1, stage: int = 0,
              precision: str = "fp32") -> object:
    import logging

    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    cfg = {"train_batch_size": micro * accum * world, "train_micro_batch_size_per_gpu": micro,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def test_monitor_matches_independent_gradients_and_leaves_no_trace(single_process):
    """One process, a real DeepSpeed engine (fp32, ZeRO 0): |G_small|^2 is the mean of the two halves' squared
    gradient norms, |G_big|^2 the squared norm of their mean, both computed here with .backward() on a copy; the
    first update's |G|^2 = 2|G_big|^2 - |G_small|^2 and tr(Sigma) = 2h (|G_small|^2 - |G_big|^2) for halves of h.
    The measurement leaves the BN running statistics, the RNG state and every .grad as they were."""
    torch.manual_seed(0)
    engine = ds_engine(TinyNet(), micro=24, accum=1)
    x, y = torch.randn(24, 12), torch.randint(0, 5, (24,))
    reference = copy.deepcopy(engine.module)
    buffers = {k: v.clone() for k, v in engine.module.state_dict().items() if "running" in k or "batches" in k}
    rng = torch.get_rng_state()

    # Dropout draws masks: the monitor restores the RNG state, so the copy below draws the same masks after it.
    mon = NoiseScaleMonitor(engine, interval=5)
    assert mon.maybe_measure(3, x, y, ce) is None  # not a measurement step
    rec = mon.maybe_measure(5, x, y, ce)
    assert mon.maybe_measure(5, x[:4], y[:4], ce) is None  # once per step, whatever the micro-batches
    assert torch.equal(torch.get_rng_state(), rng)
    g1 = flat_grad_by_backward(reference, x[:12], y[:12])
    g2 = flat_grad_by_backward(reference, x[12:], y[12:])
    small = 0.5 * float(g1 @ g1 + g2 @ g2)
    big = float(((g1 + g2) / 2) @ ((g1 + g2) / 2))
    raw = mon.last_raw
    assert (raw["b_small"], raw["b_big"]) == (12, 24)
    assert raw["g_small_sq"] == pytest.approx(small, rel=1e-5)
    assert raw["g_big_sq"] == pytest.approx(big, rel=1e-5)
    assert rec["grad_norm_sq"] == pytest.approx(2 * big - small, rel=1e-4)
    assert rec["trace_sigma"] == pytest.approx(24 * (small - big), rel=1e-4)
    # One measurement of a tiny net at initialisation: |G|^2 may come out negative, and B_simple is then undefined.
    if 2 * big - small > 0:
        assert rec["noise_scale"] == pytest.approx(24 * (small - big) / (2 * big - small), rel=1e-4)
    else:
        assert math.isnan(rec["noise_scale"])
    after = engine.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())
    assert all(p.grad is None for p in engine.module.parameters()) and engine.module.training


def test_interval_zero_never_runs_the_model():
    calls = []
    model = TinyNet()
    model.register_forward_hook(lambda *_: calls.append(1))
    mon = NoiseScaleMonitor(model, interval=0)
    assert all(mon.maybe_measure(step, torch.randn(8, 12), torch.zeros(8, dtype=torch.long), ce) is None
               for step in range(20))
    assert calls == [] and mon.last == {}
    with pytest.raises(ValueError, match="interval"):
        NoiseScaleMonitor(model, interval=-1)


def test_fp16_gradients_are_scaled_and_overflow_is_skipped():
    """A half-precision module: the monitor scales the loss (as fp16 training does) and agrees with fp32 to fp16
    precision; an overflowing scale skips the measurement and halves the scale."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    fp32 = NoiseScaleMonitor(copy.deepcopy(model), interval=1)
    fp32.measure(x, y, ce)
    half = NoiseScaleMonitor(copy.deepcopy(model).half(), interval=1)
    half.measure(x.half(), y, ce)
    assert half.last_raw["g_small_sq"] == pytest.approx(fp32.last_raw["g_small_sq"], rel=2e-2)
    assert half.last_raw["g_big_sq"] == pytest.approx(fp32.last_raw["g_big_sq"], rel=2e-2)
    over = NoiseScaleMonitor(copy.deepcopy(model).half(), interval=1, fp16_scale=2.0 ** 30)
    assert over.measure(x.half(), y, ce) is None and over.skipped == 1 and over.fp16_scale == 2.0 ** 29


def train_steps(engine, data, monitor: NoiseScaleMonitor | None, accum: int, dtype: torch.dtype) -> None:
    """A training loop shaped like train/imagenet.py's, with the monitor called before each engine forward."""
    step = 0
    for i, (x, y) in enumerate(data):
        x = x.to(dtype)
        if monitor is not None:
            monitor.maybe_measure(step, x, y, ce)
        engine.backward(ce(engine(x), y))
        engine.step()
        if (i + 1) % accum == 0:
            step += 1


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_training_is_unchanged_by_the_monitor(stage, precision, single_process):
    """Same seed, same batches, with and without the monitor measuring at every step (2 accumulation micro-steps
    per step): the weights and BN statistics after 6 steps are bit-identical, in each ZeRO stage and precision.
    (No batch norm in bf16: DeepSpeed keeps BN's running statistics in fp32 next to bf16 weights, which torch's CPU
    batch_norm refuses.)"""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(12)]
    states = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        engine = ds_engine(TinyNet(norm=precision == "fp32"), micro=16, accum=2, stage=stage, precision=precision)
        mon = NoiseScaleMonitor(engine, interval=1) if with_monitor else None
        train_steps(engine, data, mon, accum=2, dtype=dtype)
        states.append({k: v.detach().float().clone() for k, v in engine.module.state_dict().items()})
        if mon is not None:
            assert mon.estimator.count == 6 and math.isfinite(mon.last["trace_sigma"])
    without, with_ = states
    changed = [k for k in without if not torch.equal(without[k], with_[k])]
    assert changed == []


@pytest.mark.launcher
def test_monitor_two_ranks_zero2_matches_independent_gradients(tmp_path):
    """2 CPU ranks (gloo) through the real launcher, ZeRO-2: B_small = 8 (a rank's micro-batch), B_big = 16; each
    rank also recomputes both ranks' gradients with .backward() on a copy (it holds all the data). Training with the
    monitor gives the same weights as without it."""
    from conftest import launch

    launch([str(Path(__file__).relative_to(Path(__file__).resolve().parent.parent)), "--out", str(tmp_path)],
           ranks=2, timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert (res["b_small"], res["b_big"]) == (8, 16)
        assert res["g_small_sq"] == pytest.approx(res["expected_small"], rel=1e-5)
        assert res["g_big_sq"] == pytest.approx(res["expected_big"], rel=1e-5)
        assert res["changed_with_monitor"] == []
    assert results[0]["g_big_sq"] == results[1]["g_big_sq"]  # all-reduced: the same number on every rank
    assert results[0]["g_small_sq"] == results[1]["g_small_sq"]
    assert results[0]["expected_small"] != pytest.approx(results[0]["local_small"])  # the ranks' norms differ


def _worker(out: Path) -> None:
    """The 2-rank worker: rank r takes rows [8r, 8r + 8) of a batch every rank can rebuild from the seed."""
    import deepspeed

    deepspeed.init_distributed()
    torch.distributed.barrier()  # then free DeepSpeed's CPU shared-memory names (train/distributed.py)
    from train.distributed import exit_process, release_cpu_shm_names

    release_cpu_shm_names()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8 * world, 12, generator=gen), torch.randint(0, 5, (8 * world,), generator=gen))
               for _ in range(6)]
    mine = [(x[8 * rank:8 * rank + 8], y[8 * rank:8 * rank + 8]) for x, y in batches]

    torch.manual_seed(0)
    engine = ds_engine(TinyNet(dropout=0.0), micro=8, accum=1, world=world, stage=2)
    reference = copy.deepcopy(engine.module)
    mon = NoiseScaleMonitor(engine, interval=1)
    mon.measure(*mine[0], ce)
    grads = [flat_grad_by_backward(reference, batches[0][0][8 * r:8 * r + 8], batches[0][1][8 * r:8 * r + 8])
             for r in range(world)]
    mean = sum(grads) / world
    result = dict(mon.last_raw, expected_small=sum(float(g @ g) for g in grads) / world,
                  expected_big=float(mean @ mean), local_small=float(grads[rank] @ grads[rank]))

    states = []
    for with_monitor in (False, True):
        torch.manual_seed(0)
        engine = ds_engine(TinyNet(dropout=0.0), micro=8, accum=1, world=world, stage=2)
        train_steps(engine, mine, NoiseScaleMonitor(engine, interval=1) if with_monitor else None, 1, torch.float32)
        states.append({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
    result["changed_with_monitor"] = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()
    exit_process(0)  # DeepSpeed keeps the gloo threads alive: no finalisation with them (train/distributed.py)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    _worker(parser.parse_args().out)
