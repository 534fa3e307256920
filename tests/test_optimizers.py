"""Unit tests of optimizers/: formulas against hand computation from the papers, exclusion groups, fast path vs
reference path, flat layouts, argument checks, state_dict, convergence, registry.

Expected values are computed here from the papers' equations, written out independently of optimizers/.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import optimizers
from optimizers import LAMB, LARS, SGD, FlatLayout, Segment, build_optimizer, build_param_groups

DT = torch.float64


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def _fixed_problem() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Two layers (a 2x2 weight and a 3-vector) and three steps of fixed gradients, float64."""
    w = [torch.tensor([[3.0, -4.0], [0.5, 1.0]], dtype=DT), torch.tensor([1.0, -2.0, 2.0], dtype=DT)]
    grads = [
        [torch.tensor([[0.6, 0.8], [-0.1, 0.2]], dtype=DT), torch.tensor([0.3, 0.0, -0.4], dtype=DT)],
        [torch.tensor([[-0.2, 0.5], [0.3, 0.3]], dtype=DT), torch.tensor([1.0, 2.0, -2.0], dtype=DT)],
        [torch.tensor([[0.05, -0.1], [0.0, 0.7]], dtype=DT), torch.tensor([-0.5, 0.25, 0.1], dtype=DT)],
    ]
    return w, grads


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(float(x) ** 2 for x in t.flatten()))


# ----------------------------------------------------------------------------------------------------------------
# LARS, You, Gitman, Ginsburg 2017 (arXiv:1708.03888)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_paper_equation_6_with_momentum(foreach, nesterov):
    """LARS eq. (6): local_lr = eta ||w|| / (||g|| + wd ||w|| + eps); d = local_lr (g + wd w); torch-form momentum
    v = m v + d (v_1 = d), w -= lr v (Nesterov: w -= lr (d + m v)); lr changes every step."""
    lrs, m, wd, eta, eps = [0.5, 1.0, 2.0], 0.9, 0.01, 0.02, 1e-9
    w0, grads = _fixed_problem()
    params = [nn.Parameter(w.clone()) for w in w0]
    opt = LARS(params, lr=lrs[0], momentum=m, weight_decay=wd, trust_coefficient=eta, eps=eps, nesterov=nesterov,
               foreach=foreach)
    expected = [w.clone() for w in w0]
    bufs = [None, None]
    for lr, g_step in zip(lrs, grads, strict=True):
        for i, (w, g) in enumerate(zip(expected, g_step, strict=True)):
            wn, gn = _norm(w), _norm(g)
            local = eta * wn / (gn + wd * wn + eps)
            d = local * (g + wd * w)
            bufs[i] = d.clone() if bufs[i] is None else m * bufs[i] + d
            expected[i] = w - lr * (d + m * bufs[i] if nesterov else bufs[i])
        for group in opt.param_groups:
            group["lr"] = lr
        _set_grads(params, g_step)
        opt.step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [True, False])
def test_larc_clips_the_local_lr_at_the_global_lr(foreach):
    """apex LARC (clip=True): ratio = min(eta ||w|| / (||g|| + wd ||w|| + eps) / lr, 1). With a large eta the
    ratio is clipped to 1 (plain SGD step); with a small one LARC equals LARS."""
    w0, grads = _fixed_problem()
    for eta, clipped in [(10.0, True), (1e-4, False)]:
        params = [nn.Parameter(w.clone()) for w in w0]
        opt = LARS(params, lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=eta, eps=0.0, clip=True,
                   foreach=foreach)
        _set_grads(params, grads[0])
        opt.step()
        for p, w, g in zip(params, w0, grads[0], strict=True):
            ratio = 1.0 if clipped else eta * _norm(w) / _norm(g) / 0.1
            assert (eta * _norm(w) / _norm(g) / 0.1 > 1.0) == clipped
            torch.testing.assert_close(p.detach(), w - 0.1 * ratio * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_zero_norms_give_ratio_one_and_no_nan(foreach):
    """timm/MLPerf convention: ||w|| = 0 or ||g|| = 0 -> trust ratio 1 (the step is the plain SGD step)."""
    zero_w = nn.Parameter(torch.zeros(4, dtype=DT))
    zero_g = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    both = nn.Parameter(torch.zeros(3, dtype=DT))
    opt = LARS([zero_w, zero_g, both], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=0.001,
               foreach=foreach)
    g = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=DT)
    _set_grads([zero_w, zero_g, both], [g, torch.zeros(2, dtype=DT), torch.zeros(3, dtype=DT)])
    opt.step()
    torch.testing.assert_close(zero_w.detach(), -0.1 * g)
    torch.testing.assert_close(zero_g.detach(), torch.tensor([1.0, 2.0], dtype=DT) * (1 - 0.1 * 0.5))
    assert torch.equal(both.detach(), torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("foreach", [True, False])
def test_larc_at_lr_zero_takes_ratio_one_into_the_velocity(foreach):
    """LARC's ratio min(trust / lr, 1) is 1 at lr = 0 (a warmup from 0), however small trust is: the torch-form
    velocity collects the unscaled d_0 = g_0 + wd w, and the next step (lr 0.1) moves w by lr (m d_0 + r_1 d_1)."""
    w0, grads = _fixed_problem()
    m, wd, eta, lr = 0.9, 0.01, 0.05, 0.1
    params = [nn.Parameter(w.clone()) for w in w0]
    opt = LARS(params, lr=0.0, momentum=m, weight_decay=wd, trust_coefficient=eta, eps=0.0, clip=True,
               foreach=foreach)
    _set_grads(params, grads[0])
    opt.step()
    for p, w in zip(params, w0, strict=True):
        assert torch.equal(p.detach(), w)
    for group in opt.param_groups:
        group["lr"] = lr
    _set_grads(params, grads[1])
    opt.step()
    for p, w, g0, g1 in zip(params, w0, grads[0], grads[1], strict=True):
        assert eta * _norm(w) / (_norm(g0) + wd * _norm(w)) < 0.5  # LARS's unclipped ratio would differ from 1
        r1 = min(eta * _norm(w) / (_norm(g1) + wd * _norm(w)) / lr, 1.0)
        v = m * (g0 + wd * w) + r1 * (g1 + wd * w)
        torch.testing.assert_close(p.detach(), w - lr * v, rtol=1e-12, atol=1e-14)


def _step_side_by_side(ours: torch.optim.Optimizer, a: list[torch.Tensor], ref: torch.optim.Optimizer,
                       b: list[torch.Tensor], steps: int) -> None:
    """Step two optimizers over copies of the same parameters with the same random gradients."""
    for _ in range(steps):
        g = [torch.randn_like(p) for p in a]
        _set_grads(a, g)
        _set_grads(b, g)
        ours.step()
        ref.step()


def test_lars_adapt_false_group_is_plain_sgd_momentum():
    """Exclusion groups (MLPerf reference): adapt=False means no trust ratio, i.e. torch.optim.SGD."""
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    ours = LARS([{"params": a, "adapt": False}], lr=0.3, momentum=0.9, weight_decay=1e-2, trust_coefficient=1e-3)
    ref = torch.optim.SGD(b, lr=0.3, momentum=0.9, weight_decay=1e-2)
    _step_side_by_side(ours, a, ref, b, steps=4)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q)


def test_lars_paper_form_with_correction_equals_torch_form():
    """LARS Algorithm 1 puts the lr inside the velocity (v = m v + lr d; w -= v); with Goyal's momentum correction
    (v *= lr_t / lr_{t-1}) it is the torch form step for step."""
    torch.manual_seed(1)
    w0 = [torch.randn(4, 4, dtype=DT), torch.randn(4, dtype=DT)]
    runs = {}
    for in_momentum in (False, True):
        params = [nn.Parameter(w.clone()) for w in w0]
        opt = LARS(params, lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01,
                   lr_in_momentum=in_momentum, momentum_correction=True)
        gen = torch.Generator().manual_seed(2)
        for step in range(6):
            for g in opt.param_groups:
                g["lr"] = 0.1 * (step + 1)
            _set_grads(params, [torch.randn(w.shape, generator=gen, dtype=DT) for w in w0])
            opt.step()
        runs[in_momentum] = params
    for p, q in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# LAMB, You et al. 2019 (arXiv:1904.00962), Algorithm 2
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("max_trust_ratio,min_trust_ratio", [(None, None), (0.5, None), (None, 3.0), (5.0, 4.5)])
def test_lamb_matches_algorithm_2(foreach, max_trust_ratio, min_trust_ratio):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; m^ = m/(1-b1^t); v^ = v/(1-b2^t);
    u = m^/(sqrt(v^)+eps) + wd w; w -= lr * max(min(||w||/||u||, max), min) * u, elementwise in plain Python
    floats. The unclamped ratios here lie between 2.1 and 4.0, so min 3 raises some of them and [4.5, 5] all."""
    lrs, b1, b2, eps, wd = [0.01, 0.02, 0.05], 0.9, 0.99, 1e-6, 0.1
    w0, grads = _fixed_problem()
    params = [nn.Parameter(w.clone()) for w in w0]
    opt = LAMB(params, lr=lrs[0], betas=(b1, b2), eps=eps, weight_decay=wd, max_trust_ratio=max_trust_ratio,
               min_trust_ratio=min_trust_ratio, foreach=foreach)
    ws = [[float(x) for x in w.flatten()] for w in w0]
    raw, applied = [], []
    ms = [[0.0] * len(w) for w in ws]
    vs = [[0.0] * len(w) for w in ws]
    for t, (lr, g_step) in enumerate(zip(lrs, grads, strict=True), start=1):
        for i, g in enumerate(g_step):
            g = [float(x) for x in g.flatten()]
            ms[i] = [b1 * m + (1 - b1) * x for m, x in zip(ms[i], g, strict=True)]
            vs[i] = [b2 * v + (1 - b2) * x * x for v, x in zip(vs[i], g, strict=True)]
            u = [m / (1 - b1**t) / (math.sqrt(v / (1 - b2**t)) + eps) + wd * w
                 for m, v, w in zip(ms[i], vs[i], ws[i], strict=True)]
            ratio = math.sqrt(sum(w * w for w in ws[i])) / math.sqrt(sum(x * x for x in u))
            raw.append(ratio)
            if max_trust_ratio is not None:
                ratio = min(ratio, max_trust_ratio)
            if min_trust_ratio is not None:
                ratio = max(ratio, min_trust_ratio)
            applied.append(ratio)
            ws[i] = [w - lr * ratio * x for w, x in zip(ws[i], u, strict=True)]
        for group in opt.param_groups:
            group["lr"] = lr
        _set_grads(params, g_step)
        opt.step()
    for p, e in zip(params, ws, strict=True):
        torch.testing.assert_close(p.detach().flatten(), torch.tensor(e, dtype=DT), rtol=1e-10, atol=1e-12)
    assert 2.0 < min(raw) < 3.0 < max(raw) < 4.5, raw  # the clamps above act where the docstring says
    if min_trust_ratio is not None or max_trust_ratio is not None:
        assert applied != raw


def test_lamb_min_and_max_trust_ratio_from_a_config_and_in_diagnostics():
    """bing_bert's clamp (DeepSpeedExamples, FusedLamb max_coeff 0.3, min_coeff 0.01) through build_optimizer from a
    config's params; a recorded step reports the clamped ratio it applied, computed here from the recorded norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # ||w|| / ||u|| far below 0.01 on the first step
        model[1].weight.mul_(100.0)  # and far above 0.3
    opt = build_optimizer("lamb", model, {"lr": 0.01, "weight_decay": 0.01, "min_trust_ratio": 0.01,
                                          "max_trust_ratio": 0.3})
    assert opt.param_groups[0]["min_trust_ratio"] == 0.01 and opt.param_groups[0]["max_trust_ratio"] == 0.3
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 4)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.record = True
    opt.step()
    stats = opt.take_records()[0]
    w_norm, u_norm = stats.w_norm, stats.u_norm
    unclamped = w_norm / u_norm
    assert stats.tensors == [model[0].weight, model[1].weight]  # the decayed, adapted group
    assert float(unclamped[0]) < 0.01 and float(unclamped[1]) > 0.3
    torch.testing.assert_close(stats.ratio, unclamped.clamp(0.01, 0.3))
    # the first step of Adam without bias: u = g / (|g| + eps') + wd w, the weight moved by lr * ratio * u
    for i in (0, 2):
        g, w = grads[i], before[i]
        u = g / (g.abs() + 1e-6) + 0.01 * w  # m^ = g, sqrt(v^) = |g| at t = 1
        ratio = min(max(float(w.norm() / u.norm()), 0.01), 0.3)
        torch.testing.assert_close(list(model.parameters())[i].detach(), w - 0.01 * ratio * u, rtol=1e-5,
                                   atol=1e-7)
    with pytest.raises(ValueError, match="min_trust_ratio 0.5 exceeds max_trust_ratio 0.3"):
        build_optimizer("lamb", model, {"lr": 0.01, "min_trust_ratio": 0.5, "max_trust_ratio": 0.3})


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_zero_norms_give_ratio_one_and_no_nan(foreach):
    """||w|| = 0 -> ratio 1 (step lr * u); zero gradient and no decay -> u = 0, nothing moves, no NaN."""
    zero_w = nn.Parameter(torch.zeros(3, dtype=DT))
    still = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))
    opt = LAMB([zero_w, still], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, foreach=foreach)
    g = torch.tensor([0.5, -2.0, 0.0], dtype=DT)
    _set_grads([zero_w, still], [g, torch.zeros(2, dtype=DT)])
    opt.step()
    u = g / (g.abs() + 1e-6)  # first step: m^ = g, sqrt(v^) = |g|
    torch.testing.assert_close(zero_w.detach(), -0.1 * u)
    assert torch.equal(still.detach(), torch.tensor([1.0, -1.0], dtype=DT))


def test_lamb_adapt_false_group_is_adamw():
    """adapt=False: no trust ratio; with decoupled decay that is AdamW (torch.optim.AdamW, Loshchilov & Hutter)."""
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(6, 2, dtype=DT)), nn.Parameter(torch.randn(2, dtype=DT))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    ours = LAMB([{"params": a, "adapt": False}], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    _step_side_by_side(ours, a, ref, b, steps=5)
    # AdamW: w(1 - lr wd) - lr a; LAMB without adaptation: w - lr (a + wd w). The same update, term for term.
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# SGD and Goyal et al.'s momentum correction (arXiv:1706.02677, sec. 2.1 eqs. (9)-(10), appendix)
# ----------------------------------------------------------------------------------------------------------------
def _warmup_run(opt_factory, steps: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(3)
    w0 = [torch.randn(5, 4, dtype=DT), torch.randn(4, dtype=DT)]
    params = [nn.Parameter(w.clone()) for w in w0]
    opt = opt_factory(params)
    gen = torch.Generator().manual_seed(4)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.1 + 0.4 * step / (steps - 1)  # Goyal's gradual warmup: a constant increment per step
        _set_grads(params, [torch.randn(w.shape, generator=gen, dtype=DT) for w in w0])
        opt.step()
    return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_caffe2_form_with_momentum_correction_follows_torch_sgd_through_warmup(nesterov):
    """Goyal eq. (10) form v = m v + lr (g + wd w); w -= v, with v scaled by lr_{t+1}/lr_t at each lr change,
    equals torch.optim.SGD's v = m v + g + wd w; w -= lr v at every step of a linear warmup."""
    kw = dict(momentum=0.9, weight_decay=1e-4, nesterov=nesterov)
    ref = _warmup_run(lambda p: torch.optim.SGD(p, lr=0.1, **kw))
    ours = _warmup_run(lambda p: SGD(p, lr=0.1, lr_in_momentum=True, momentum_correction=True, **kw))
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_caffe2_form_without_momentum_correction_drifts_from_torch_sgd():
    """Without the correction the velocity keeps the old lr (Goyal appendix): a measurable difference."""
    ref = _warmup_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4))
    ours = _warmup_run(lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_in_momentum=True,
                                     momentum_correction=False))
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(ours, ref, strict=True))
    assert diff > 1e-2, f"only {diff:.2e}: the test would not notice a missing correction"


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kw", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
                                dict(momentum=0.8, dampening=0.3, weight_decay=0.0), dict(momentum=0.0)])
def test_default_torch_form_equals_torch_sgd(foreach, kw):
    """Default form is torch.optim.SGD's (Goyal eq. (9)), dampening and Nesterov included."""
    ref = _warmup_run(lambda p: torch.optim.SGD(p, lr=0.1, **kw))
    ours = _warmup_run(lambda p: SGD(p, lr=0.1, foreach=foreach, **kw))
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# Fast path vs reference path, flat layouts
# ----------------------------------------------------------------------------------------------------------------
def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))


VARIANTS = [
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-4, lr_in_momentum=True, momentum_correction=False)),
    ("lars", dict(lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)),
    ("lars", dict(lr=2.0, momentum=0.9, weight_decay=1e-4, nesterov=True, lr_in_momentum=True)),
    ("larc", dict(lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)),
    ("lars", dict(lr=2.0, momentum=0.8, dampening=0.3, weight_decay=1e-4, trust_coefficient=0.01)),
    ("lars", dict(lr=2.0, momentum=0.0, weight_decay=1e-2, trust_coefficient=0.01)),
    ("lamb", dict(lr=0.01, weight_decay=0.01)),
    ("lamb", dict(lr=0.01, weight_decay=0.01, max_trust_ratio=2.0, betas=[0.8, 0.99])),
]


def _train(name: str, kw: dict, steps: int = 4, flat: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _net()
    opt = build_optimizer(name, model, kw)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = kw["lr"] * (step + 1) / steps
        x = torch.randn(8, 3, 6, 6, generator=gen)
        y = torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_foreach_path_equals_single_tensor_path(name, kw):
    """torch._foreach_* fast path == readable single-tensor path (torch.optim.sgd's structure)."""
    fast = _train(name, {**kw, "foreach": True})
    slow = _train(name, {**kw, "foreach": False})
    for (n, p), q in zip(fast.named_parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def _flatten_like_zero(params: list[torch.Tensor], pad_between: int, pad_end: int):
    """One flat tensor holding all params (with padding), as DeepSpeed's ZeRO/bf16 wrappers build it."""
    pieces, segments, offset = [], [], 0
    for layer, p in enumerate(params):
        segments.append(Segment(offset, p.numel(), layer))
        pieces += [p.detach().flatten(), torch.zeros(pad_between, dtype=p.dtype)]
        offset += p.numel() + pad_between
    flat = torch.cat(pieces + [torch.zeros(pad_end, dtype=params[0].dtype)])
    return flat, FlatLayout(flat.numel(), tuple(segments), len(params))


@pytest.mark.parametrize("cls,kw", [(LARS, dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)),
                                    (LAMB, dict(lr=0.05, weight_decay=0.01))], ids=["lars", "lamb"])
@pytest.mark.parametrize("foreach", [True, False])
def test_flat_layout_gives_per_layer_results_and_unbound_flat_does_not(cls, kw, foreach):
    """A flat buffer with padding, bound with a FlatLayout, steps exactly like one tensor per layer; padding stays
    zero. Unbound, the same flat buffer is refused, and with allow_unbound the ratio mixes layers (wrong)."""
    torch.manual_seed(5)
    layers = [torch.randn(4, 3, dtype=DT) * 10, torch.randn(7, dtype=DT), torch.randn(2, 5, dtype=DT) * 0.1]
    grads = [[torch.randn_like(w) for w in layers] for _ in range(3)]
    per_layer = [nn.Parameter(w.clone()) for w in layers]
    ref = cls(per_layer, foreach=foreach, **kw)
    flat_w, layout = _flatten_like_zero(layers, pad_between=3, pad_end=5)
    flat = nn.Parameter(flat_w.clone())
    constructed = [nn.Parameter(w.clone()) for w in layers]
    bound = cls(constructed, foreach=foreach, **kw)
    bound.param_groups[0]["params"] = [flat]  # what ZeRO does to the optimizer it wraps
    bound.set_layout(flat, layout)
    naive = cls([nn.Parameter(w.clone()) for w in layers], foreach=foreach, **kw)
    naive_flat = nn.Parameter(flat_w.clone())
    naive.param_groups[0]["params"] = [naive_flat]
    naive_flat.grad = torch.zeros_like(naive_flat)
    with pytest.raises(RuntimeError, match="bind_deepspeed"):
        naive.step()
    naive.allow_unbound = True
    for g_step in grads:
        _set_grads(per_layer, g_step)
        flat_g, _ = _flatten_like_zero(g_step, pad_between=3, pad_end=5)
        flat.grad = flat_g
        naive_flat.grad = flat_g.clone()
        ref.step()
        bound.step()
        naive.step()
    for seg, p in zip(layout.segments, per_layer, strict=True):
        torch.testing.assert_close(flat.detach()[seg.start:seg.start + seg.numel], p.detach().flatten(),
                                   rtol=1e-12, atol=1e-13)
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    for seg in layout.segments:
        mask[seg.start:seg.start + seg.numel] = False
    assert torch.equal(flat.detach()[mask], torch.zeros(int(mask.sum()), dtype=DT))
    err = max(float((naive_flat.detach()[s.start:s.start + s.numel] - p.detach().flatten()).abs().max())
              for s, p in zip(layout.segments, per_layer, strict=True))
    assert err > 1e-3, "the flat-chunk ratio should differ from per-layer ratios"


@pytest.mark.parametrize("kw", [dict(momentum=0.9, weight_decay=1e-3), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.9, weight_decay=1e-3, lr_in_momentum=True), dict(momentum=0.0,
                                                                                                 weight_decay=1e-2)],
                         ids=["torch-form", "nesterov", "caffe2-form", "no-momentum"])
def test_lars_fused_flat_partition_equals_the_per_segment_step_with_one_kernel_per_term(monkeypatch, kw):
    """Issue 19 item 4: on a bound flat partition LARS steps the whole tensor with a per-element ratio
    (GPU devices; forced on CPU here) instead of one 0-dim-ratio addcmul per segment, which torch's foreach kernels
    cannot fuse. The weights equal the per-segment foreach step to fp32 rounding, padding keeps its value, and the
    profiler counts the addcmul kernels: one per term (weight decay, gradient) instead of one per term and segment."""
    import importlib

    from torch.profiler import ProfilerActivity, profile

    layerwise = importlib.import_module("optimizers._layerwise")

    torch.manual_seed(6)
    layers = [torch.randn(4, 3) * 10, torch.randn(7), torch.randn(2, 5) * 0.1, torch.randn(6)]
    grads = [[torch.randn_like(w) for w in layers] for _ in range(3)]
    counts = {}
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(layerwise, "FUSED_FLAT_DEVICES", ("cpu",) if fused else ())
        flat_w, layout = _flatten_like_zero(layers, pad_between=3, pad_end=5)
        flat_w[layout.segments[1].start - 1] = 7.0  # a non-zero padding element must keep its value
        flat = nn.Parameter(flat_w)
        opt = LARS([nn.Parameter(w.clone()) for w in layers], lr=1.0, trust_coefficient=0.02, foreach=True, **kw)
        opt.param_groups[0]["params"] = [flat]
        opt.set_layout(flat, layout)
        for i, g_step in enumerate(grads):
            flat.grad, _ = _flatten_like_zero(g_step, pad_between=3, pad_end=5)
            if i < 2:
                opt.step()
                continue
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
            counts[fused] = sum(1 for e in prof.events() if e.name == "aten::addcmul_")
        results[fused] = flat.detach().clone()
    torch.testing.assert_close(results[True], results[False], rtol=1e-6, atol=1e-7)  # see the LAMB test below
    assert float(results[True][layout.segments[1].start - 1]) == 7.0
    terms = 2 if kw.get("weight_decay") else 1
    passes = 2 if kw.get("nesterov") else 1  # Nesterov adds d into w as well as into v
    if kw["momentum"] == 0.0:
        passes = 1
    assert counts[True] == terms * passes and counts[False] == terms * passes * len(layers), counts


@pytest.mark.parametrize("kw", [dict(weight_decay=0.01), dict(weight_decay=0.0, max_trust_ratio=0.5,
                                                             min_trust_ratio=0.1)], ids=["decay", "clamped"])
def test_lamb_fused_flat_partition_equals_the_per_segment_step(monkeypatch, kw):
    """LAMB's foreach step on a bound flat partition as one tensor (forced on CPU): the per-segment step to fp32
    rounding, padding kept, and addcmul kernels (v's g^2 term, the ratio-scaled update) one each instead of one per
    segment."""
    import importlib

    from torch.profiler import ProfilerActivity, profile

    layerwise = importlib.import_module("optimizers._layerwise")
    torch.manual_seed(7)
    layers = [torch.randn(4, 3) * 10, torch.randn(7), torch.randn(2, 5) * 0.1, torch.randn(6)]
    grads = [[torch.randn_like(w) for w in layers] for _ in range(3)]
    counts, results = {}, {}
    for fused in (False, True):
        monkeypatch.setattr(layerwise, "FUSED_FLAT_DEVICES", ("cpu",) if fused else ())
        flat_w, layout = _flatten_like_zero(layers, pad_between=3, pad_end=5)
        flat_w[layout.segments[1].start - 1] = 7.0
        flat = nn.Parameter(flat_w)
        opt = LAMB([nn.Parameter(w.clone()) for w in layers], lr=0.05, foreach=True, **kw)
        opt.param_groups[0]["params"] = [flat]
        opt.set_layout(flat, layout)
        for g_step in grads:
            flat.grad, _ = _flatten_like_zero(g_step, pad_between=3, pad_end=5)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
            counts[fused] = sum(1 for e in prof.events() if e.name == "aten::addcmul_")
        results[fused] = flat.detach().clone()
    # Not bit for bit on CPU: a vectorised kernel contracts a * b + c into one FMA in its SIMD lanes but not in the
    # scalar tail, and the tails fall elsewhere on one long tensor than on short segments (a CUDA kernel treats every
    # element alike). Measured: at most 7.5e-9 (weights of size 0.01-20).
    torch.testing.assert_close(results[True], results[False], rtol=1e-6, atol=1e-7)
    assert float(results[True][layout.segments[1].start - 1]) == 7.0
    assert counts == {True: 2, False: 2 * len(layers)}, counts


def test_flat_layout_rejects_overlapping_or_out_of_range_segments():
    with pytest.raises(ValueError, match="segments"):
        FlatLayout(10, (Segment(0, 6, 0), Segment(5, 2, 1)), 2)
    with pytest.raises(ValueError, match="segments"):
        FlatLayout(10, (Segment(8, 3, 0),), 1)
    with pytest.raises(ValueError, match="layer"):
        FlatLayout(10, (Segment(0, 3, 4),), 2)


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}{i}" for i, (n, _) in enumerate(VARIANTS)])
@pytest.mark.parametrize("foreach", [True, False])
def test_step_makes_no_host_sync(monkeypatch, name, kw, foreach):
    """No .item(), bool(tensor), float(tensor), .tolist() or .cpu() in step(): each would stall a GPU stream."""
    torch.manual_seed(0)
    model = _net()
    opt = build_optimizer(name, model, {**kw, "foreach": foreach})
    nn.functional.cross_entropy(model(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 3])).backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in step()")

    for attr in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    opt.step()
    opt.step()
    monkeypatch.undo()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_step_makes_no_cuda_sync(name, kw):
    """CUDA's own sync detector: torch.cuda.set_sync_debug_mode('error') raises on any device-to-host sync."""
    torch.manual_seed(0)
    model = _net().cuda()
    opt = build_optimizer(name, model, kw)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 6, 6, device="cuda")),
                                torch.tensor([0, 1, 2, 3], device="cuda")).backward()
    opt.step()  # the first step allocates state
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------------
# Parameter groups (MLPerf reference / timm practice)
# ----------------------------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # weight 4-D: decay; bias: no decay
        self.bn = nn.BatchNorm2d(4)  # gamma, beta: no decay
        self.fc = nn.Linear(4, 2)  # weight: decay; bias: no decay
        self.ln = nn.LayerNorm(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.head = self.fc  # shared module: its parameters once


def test_exclusion_groups_by_module_type_and_ndim():
    """Norm-layer parameters and biases: weight_decay 0 and adapt False; weights of conv/linear: decayed, adapted."""
    m = _Tiny()
    groups = build_param_groups(m, 5e-5)
    assert len(groups) == 2
    decay, no_decay = groups
    assert [id(p) for p in decay["params"]] == [id(m.conv.weight), id(m.fc.weight)]
    assert decay["weight_decay"] == 5e-5 and "adapt" not in decay
    assert [id(p) for p in no_decay["params"]] == [id(m.conv.bias), id(m.bn.weight), id(m.bn.bias), id(m.fc.bias),
                                                   id(m.ln.weight), id(m.ln.bias)]
    assert no_decay["weight_decay"] == 0.0 and no_decay["adapt"] is False


def test_exclusion_is_by_type_not_by_name():
    """A 2-D parameter owned by a norm layer is excluded because of the module type; a parameter named 'bias' that
    is 2-D is decayed (names are not consulted)."""

    class OddNorm(nn.GroupNorm):
        def __init__(self) -> None:
            super().__init__(1, 2)
            self.extra = nn.Parameter(torch.ones(2, 2))

    class OddLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.ones(2, 2))

    m = nn.Sequential(OddNorm(), OddLinear())
    decay, no_decay = build_param_groups(m, 0.1)
    assert [id(p) for p in decay["params"]] == [id(m[1].bias)]
    assert id(m[0].extra) in {id(p) for p in no_decay["params"]}


def test_exclusion_can_be_switched_off():
    m = _Tiny()
    (group,) = build_param_groups(m, 1e-4, exclude_norm_and_bias=False)
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == 8
    assert len(build_optimizer("lars", m, {"weight_decay": 1e-4}, exclude_norm_and_bias=False).param_groups) == 1


# ----------------------------------------------------------------------------------------------------------------
# Arguments, registry, state_dict, convergence
# ----------------------------------------------------------------------------------------------------------------
BAD = [
    (SGD, dict(lr=-0.1), "lr", "-0.1"),
    (SGD, dict(momentum=1.0), "momentum", "1.0"),
    (SGD, dict(weight_decay=-1e-4), "weight_decay", "-0.0001"),
    (SGD, dict(momentum=0.0, nesterov=True), "nesterov", "0.0"),
    (LARS, dict(lr=-1.0), "lr", "-1.0"),
    (LARS, dict(momentum=-0.1), "momentum", "-0.1"),
    (LARS, dict(trust_coefficient=0.0), "trust_coefficient", "0.0"),
    (LARS, dict(trust_coefficient=-1e-3), "trust_coefficient", "-0.001"),
    (LARS, dict(eps=-1e-8), "eps", "-1e-08"),
    (LARS, dict(weight_decay=-0.5), "weight_decay", "-0.5"),
    (LAMB, dict(lr=-1e-3), "lr", "-0.001"),
    (LAMB, dict(betas=(1.0, 0.999)), r"betas\[0\]", "1.0"),
    (LAMB, dict(betas=(0.9, -0.1)), r"betas\[1\]", "-0.1"),
    (LAMB, dict(eps=-1.0), "eps", "-1.0"),
    (LAMB, dict(weight_decay=-0.01), "weight_decay", "-0.01"),
    (LAMB, dict(max_trust_ratio=0.0), "max_trust_ratio", "0.0"),
    (LAMB, dict(lr=torch.tensor(0.1)), "lr", "tensor"),
]


@pytest.mark.parametrize("cls,kw,arg,value", BAD, ids=[f"{c.__name__}-{a}-{v}" for c, _, a, v in BAD])
def test_bad_arguments_raise_value_error_naming_argument_and_value(cls, kw, arg, value):
    with pytest.raises(ValueError, match=f"{arg}.*{value}"):
        cls([nn.Parameter(torch.ones(2))], **kw)


def test_bad_group_override_is_also_rejected():
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([{"params": [nn.Parameter(torch.ones(2))], "trust_coefficient": -1.0}])


def test_registry_names_variants_and_errors():
    assert optimizers.KNOWN_OPTIMIZERS == ("lamb", "larc", "lars", "sgd")
    m = _Tiny()
    assert isinstance(build_optimizer("LARS", m, {}), LARS)
    larc = build_optimizer("Larc", m, {"lr": 1.0})
    assert isinstance(larc, LARS) and all(g["clip"] for g in larc.param_groups)
    assert not any(g["clip"] for g in build_optimizer("lars", m, {}).param_groups)
    lamb = build_optimizer("lamb", m, {"betas": [0.8, 0.9], "weight_decay": 0.01})
    assert lamb.param_groups[0]["betas"] == (0.8, 0.9) and lamb.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="known: lamb, larc, lars, sgd"):
        build_optimizer("adamw", m, {})
    with pytest.raises(ValueError, match="trust_coeff"):
        build_optimizer("lars", m, {"trust_coeff": 0.001})
    with pytest.raises(ValueError, match="clip"):
        build_optimizer("larc", m, {"clip": False})


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_state_dict_round_trip_continues_identically(name, kw):
    """Train 3 steps, copy the state into a fresh optimizer on a copy of the model, then both take 2 more steps."""
    torch.manual_seed(0)
    model = _net()
    opt = build_optimizer(name, model, kw)
    gen = torch.Generator().manual_seed(9)
    data = [(torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 5, (4,), generator=gen)) for _ in range(5)]

    def step(m, o, x, y):
        for group in o.param_groups:
            group["lr"] *= 1.5  # lr changes: exercises the Caffe2-form momentum correction state
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for x, y in data[:3]:
        step(model, opt, x, y)
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(name, clone, kw)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in data[3:]:
        step(model, opt, x, y)
        step(clone, opt2, x, y)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


ROSENBROCK = [
    ("sgd", dict(lr=5e-4, momentum=0.9, nesterov=True)),
    ("lars", dict(lr=1.0, momentum=0.9, trust_coefficient=0.01, nesterov=True)),
    ("larc", dict(lr=0.002, momentum=0.9, trust_coefficient=0.01)),
    ("lamb", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.0)),
]


@pytest.mark.parametrize("name,kw", ROSENBROCK, ids=[n for n, _ in ROSENBROCK])
def test_converges_on_rosenbrock(name, kw):
    """f(x, y) = (1 - x)^2 + 100 (y - x^2)^2 from (2, 2) (f = 401) to within 0.1 of the minimum (1, 1) in 1000
    steps (timm's optimizer tests use the same function)."""
    p = nn.Parameter(torch.tensor([2.0, 2.0]))
    spec = optimizers.optimizer_spec(name)
    opt = spec.cls([p], **kw, **spec.preset)
    for _ in range(1000):
        opt.zero_grad()
        ((1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2).backward()
        opt.step()
    assert float((p.detach() - torch.tensor([1.0, 1.0])).norm()) < 0.1, p


@pytest.mark.parametrize("name,kw", [("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
                                     ("lars", dict(lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)),
                                     ("larc", dict(lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)),
                                     ("lamb", dict(lr=0.01, weight_decay=0.01))], ids=["sgd", "lars", "larc", "lamb"])
def test_tiny_mlp_fits_a_teacher(name, kw):
    """A 2-layer MLP with batch norm learns a random linear teacher's labels: loss falls below a tenth in 100 steps."""
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x @ torch.randn(10, 3)).argmax(1)
    model = nn.Sequential(nn.Linear(10, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    opt = build_optimizer(name, model, kw)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.1 * first, (first, float(loss.detach()))


@pytest.mark.parametrize("cls,kw", [(LARS, dict(lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)),
                                    (LAMB, dict(lr=0.05, weight_decay=0.01)),
                                    (SGD, dict(lr=0.1, momentum=0.9, lr_in_momentum=True))],
                         ids=["lars", "lamb", "sgd"])
def test_foreach_equals_single_when_a_parameter_skips_steps(cls, kw):
    """A parameter without a gradient in some step lags in step count / momentum age: both paths agree anyway."""
    runs = []
    for foreach in (True, False):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(3, 4, dtype=DT)), nn.Parameter(torch.randn(5, dtype=DT))]
        opt = cls(params, foreach=foreach, **kw)
        gen = torch.Generator().manual_seed(1)
        for step, active in enumerate([(0, 1), (0,), (0, 1), (1,)]):
            for group in opt.param_groups:
                group["lr"] = kw["lr"] * (step + 1)
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=gen, dtype=DT) if i in active else None
            opt.step()
        runs.append(params)
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_bind_deepspeed_refuses_unknown_wrappers_and_ignores_non_layerwise():
    """An optimizer wrapper whose layout bind_deepspeed does not know (here a stand-in for, e.g., ZeRO-3) raises;
    SGD and torch optimizers are left alone. The real wrappers are exercised in test_optimizers_deepspeed.py."""
    from types import SimpleNamespace

    model = _Tiny()

    class DeepSpeedZeroOptimizer_Stage3:  # noqa: N801 - the name DeepSpeed uses
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optimizer = inner

    lars = build_optimizer("lars", model, {})
    with pytest.raises(NotImplementedError, match="DeepSpeedZeroOptimizer_Stage3"):
        optimizers.bind_deepspeed(SimpleNamespace(optimizer=DeepSpeedZeroOptimizer_Stage3(lars), module=model,
                                                  global_steps=0))
    for opt in (build_optimizer("sgd", model, {}), torch.optim.AdamW(model.parameters())):
        for wrapper in (opt, DeepSpeedZeroOptimizer_Stage3(opt)):
            binding = optimizers.bind_deepspeed(SimpleNamespace(optimizer=wrapper, module=model, global_steps=0))
            assert binding.layout == "not layer-wise"
    assert optimizers.bind_deepspeed(SimpleNamespace(optimizer=lars, module=model)).layout == "model parameters"


@pytest.mark.parametrize("name,kw", [
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True, lr_in_momentum=True)),
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4)),
    ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, nesterov=True)),
    ("lars", dict(lr=1.0, momentum=0.0, weight_decay=1e-4)),
    ("larc", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, lr_in_momentum=True)),
], ids=["sgd", "sgd-caffe2-nesterov", "lars", "lars-nesterov", "lars-no-momentum", "larc-caffe2"])
def test_foreach_momentum_step_allocates_no_parameter_sized_buffer(name, kw):
    """The foreach path never forms d = r (g + wd w): torch.optim.SGD's fresh g + wd w buffer costs more than its
    arithmetic on CPU (page faults), and was most of LARS's and SGD's step time on ResNet-50. Allocations are
    read from torch's profiler; a 512x512 weight is 1 MiB, the step's own allocations are the few-byte norms."""
    from torch.profiler import ProfilerActivity, profile

    model = nn.Linear(512, 512, bias=False)
    opt = build_optimizer(name, model, {**kw, "foreach": True}, exclude_norm_and_bias=False)
    model.weight.grad = torch.randn(512, 512)
    opt.step()  # the first step creates the velocity
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < 1024, f"{name} step allocated {biggest} bytes at once (the weight is {512 * 512 * 4})"


# ----------------------------------------------------------------------------------------------------------------
# Edge cases (issue 14): empty adapted groups, fp16 norms and LAMB's fp16 reciprocal, copies of bound optimizers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kw", [(LARS, dict(lr=1.0, momentum=0.9, weight_decay=1e-3)),
                                    (LAMB, dict(lr=0.01, weight_decay=0.01))], ids=["lars", "lamb"])
@pytest.mark.parametrize("foreach", [True, False])
def test_adapted_group_without_any_gradient_is_left_alone_by_both_paths(cls, kw, foreach):
    """No parameter of an adapted group has a gradient this step (a frozen branch): both paths skip the group, as
    torch's optimizers do; the other group still steps. (The single-tensor LAMB path crashed on torch.stack([]).)"""
    idle = [nn.Parameter(torch.randn(3, 2, dtype=DT)), nn.Parameter(torch.randn(4, dtype=DT))]
    busy = nn.Parameter(torch.randn(5, dtype=DT))
    before = [p.detach().clone() for p in idle]
    opt = cls([{"params": idle}, {"params": [busy], "adapt": False}], foreach=foreach, **kw)
    busy.grad = torch.ones(5, dtype=DT)
    start = busy.detach().clone()
    opt.step()
    for p, b in zip(idle, before, strict=True):
        assert torch.equal(p.detach(), b) and p not in opt.state
    assert not torch.equal(busy.detach(), start)


def _fp16_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """An fp16 layer whose norm (256 * sqrt(100,000) = 80,954) is above fp16's largest value (65,504)."""
    w = torch.full((100_000,), 256.0, dtype=torch.float16)
    g = (torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 0.01).to(torch.float16)
    return w, g


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_norms_of_fp16_layers_are_taken_in_fp32(foreach):
    """||w|| = 80,954 overflows fp16; in fp32 the LARS step is eq. (6), checked here in float64 from the fp16 data."""
    w, g = _fp16_problem()
    p = nn.Parameter(w.clone())
    lr, wd, eta = 1.0, 1e-4, 0.001
    opt = LARS([p], lr=lr, momentum=0.0, weight_decay=wd, trust_coefficient=eta, eps=0.0, foreach=foreach)
    p.grad = g.clone()
    opt.step()
    w64, g64 = w.double(), g.double()
    ratio = eta * _norm(w64) / (_norm(g64) + wd * _norm(w64))
    expected = w64 - lr * ratio * (g64 + wd * w64)
    assert torch.isfinite(p.detach()).all()
    torch.testing.assert_close(p.detach().double(), expected, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_on_fp16_layers_stays_finite_and_follows_algorithm_2(foreach):
    """fp16 LAMB: the layer norm (80,954) is taken in fp32, and zero gradients (m = v = 0, where the foreach path's
    1 / (sqrt(v) + eps) was 3e7: inf in fp16, times 0: NaN) give u = wd * w as in the single-tensor path.
    Expected values from Algorithm 2 in float64, first step: m^ = g, sqrt(v^) = |g|."""
    w, _ = _fp16_problem()
    gen = torch.Generator().manual_seed(1)  # |g| in [0.5, 1.5]: v = (1 - b2) g^2 is a normal fp16 number
    g = ((torch.rand(w.numel(), generator=gen) + 0.5) * torch.randn(w.numel(), generator=gen).sign()).half()
    g[::3] = 0.0
    p = nn.Parameter(w.clone())
    lr, wd, eps = 0.01, 0.01, 1e-6
    opt = LAMB([p], lr=lr, eps=eps, weight_decay=wd, foreach=foreach)
    p.grad = g.clone()
    opt.step()
    w64, g64 = w.double(), g.double()
    u = g64 / (g64.abs() + eps) + wd * w64
    expected = w64 - lr * _norm(w64) / _norm(u) * u
    assert torch.isfinite(p.detach()).all()
    torch.testing.assert_close(p.detach().double(), expected, rtol=2e-3, atol=1e-2)


def _bound_flat_lars() -> tuple[LARS, nn.Parameter, FlatLayout]:
    layers = [torch.randn(4, 3, dtype=DT), torch.randn(7, dtype=DT)]
    flat_w, layout = _flatten_like_zero(layers, pad_between=3, pad_end=5)
    opt = LARS([nn.Parameter(w.clone()) for w in layers], lr=1.0, weight_decay=1e-3, trust_coefficient=0.02)
    flat = nn.Parameter(flat_w.clone())
    opt.param_groups[0]["params"] = [flat]  # what ZeRO does to the optimizer it wraps
    opt.set_layout(flat, layout)
    return opt, flat, layout


def test_copy_or_pickle_of_a_bound_optimizer_is_refused_with_the_reason():
    """A copy would lose the layouts (torch's __setstate__ keeps only defaults, state and groups) and step each flat
    partition as one layer, or refuse every step: refused at copy time, saying why and what to do instead."""
    import pickle

    opt, flat, _ = _bound_flat_lars()
    with pytest.raises(TypeError, match="bound to 1 DeepSpeed flat partition.*state_dict.*bind_deepspeed"):
        copy.deepcopy(opt)
    with pytest.raises(TypeError, match="bound to 1 DeepSpeed flat partition"):
        pickle.dumps(opt)
    flat.grad = torch.ones_like(flat)
    opt.step()  # the original is untouched by the refused copy


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_of_an_unbound_layerwise_optimizer_steps_like_the_original(how):
    """An unbound LARS copied with its parameters (copy.deepcopy, or pickle of both together) knows its own tensors
    again and takes the same steps as the original (it refused every step before: its tensors were unknown)."""
    import pickle

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3, dtype=DT)), nn.Parameter(torch.randn(6, dtype=DT))]
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    _set_grads(params, [torch.randn_like(p) for p in params])
    opt.step()
    twin_params, twin = copy.deepcopy((params, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((params, opt)))
    grads = [torch.randn_like(p) for p in params]
    _set_grads(params, grads)
    _set_grads(twin_params, grads)
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p.detach(), q.detach())
