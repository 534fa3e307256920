"""Conformance: every registered optimizer, on both paths (foreach and for-loop), through the same cases.

In the spirit of torch's OptimizerInfo tests (test/test_optim.py) and timm's tests/test_optim.py: what any
torch.optim.Optimizer is expected to do (state_dict round trips, deepcopy, None gradients, closures, schedulers,
add_param_group, dtypes, zero-size tensors, ``maximize``), plus the cases an outside conformance run found broken
(issue 24): mixed fp32/fp16 groups on the foreach path, complex parameters, SGD's deepcopy, ``maximize``.
Expected values come from torch.optim.SGD or from the same optimizer on a negated problem, never from the code
under test alone.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

import optimizers
from optimizers import KNOWN_OPTIMIZERS, build_optimizer, optimizer_spec

#: Options per registered name that move the weights measurably in a few steps (weight decay on, momentum on).
OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "lars": {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02},
    "larc": {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02},
    "lamb": {"lr": 0.01, "weight_decay": 0.01, "max_trust_ratio": 5.0, "min_trust_ratio": 0.01},
}
CASES = [(name, foreach) for name in KNOWN_OPTIMIZERS for foreach in (True, False)]
IDS = [f"{name}-{'foreach' if foreach else 'forloop'}" for name, foreach in CASES]


def test_every_registered_optimizer_has_options_here():
    assert set(OPTIONS) == set(KNOWN_OPTIMIZERS)


def _make(name: str, params: Any, foreach: bool, **extra: Any) -> torch.optim.Optimizer:
    spec = optimizer_spec(name)
    return spec.cls(params, **{**OPTIONS[name], **spec.preset, "foreach": foreach, **extra})


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).to(dtype)


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 5, generator=g).to(dtype), torch.randn(6, 3, generator=g).to(dtype)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list, sign: float = 1.0) -> None:
    for x, y in batches:
        opt.zero_grad()
        (sign * nn.functional.mse_loss(model(x), y)).backward()
        opt.step()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_state_dict_round_trip_is_bit_identical_also_weights_only(name, foreach):
    """Two steps, save (torch.save, loaded with weights_only=True), two more: equal bit for bit to four steps."""
    batches = _batches(4)
    model_a = _model()
    opt_a = build_optimizer(name, model_a, OPTIONS[name] | {"foreach": foreach})
    _train(model_a, opt_a, batches)

    model_b = _model()
    opt_b = build_optimizer(name, model_b, OPTIONS[name] | {"foreach": foreach})
    _train(model_b, opt_b, batches[:2])
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c = _model()
    model_c.load_state_dict(saved["model"])
    opt_c = build_optimizer(name, model_c, OPTIONS[name] | {"foreach": foreach})
    opt_c.load_state_dict(saved["opt"])
    _train(model_c, opt_c, batches[2:])
    for a, c in zip(_weights(model_a), _weights(model_c), strict=True):
        assert torch.equal(a, c)


def _public(opt: torch.optim.Optimizer) -> set[str]:
    return {k for k in vars(opt) if not k.startswith("_")}


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_deepcopy_copies_every_public_attribute_and_steps_alike(name, foreach):
    """torch's test_deepcopy_copies_all_public_attrs: the copy has every public attribute of the original (SGD
    lost ``records``, issue 24), a switch set on the object survives, and the copy steps as the original."""
    model = _model()
    opt = build_optimizer(name, model, OPTIONS[name] | {"foreach": foreach})
    _train(model, opt, _batches(2))
    opt.record = False  # an instance attribute now, as a diagnostics step leaves it
    opt_copy = copy.deepcopy(opt)
    assert _public(opt_copy) == _public(opt), (_public(opt), _public(opt_copy))
    assert opt_copy.records == [] and opt_copy.record is False
    # the copy steps its own deep-copied parameters, which the copied state names
    params_copy = [p for g in opt_copy.param_groups for p in g["params"]]
    for p, q in zip(params_copy, [p for g in opt.param_groups for p in g["params"]], strict=True):
        assert p is not q and torch.equal(p, q)
    batch = _batches(3)[2:]
    # map the copied optimizer's parameters back onto a model: deepcopy of the pair keeps the sharing
    pair_model, pair_opt = copy.deepcopy((model, opt))
    _train(model, opt, batch)
    _train(pair_model, pair_opt, batch)
    for a, b in zip(_weights(model), _weights(pair_model), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_parameter_without_gradient_is_untouched_and_gets_no_state(name, foreach):
    model = _model()
    opt = build_optimizer(name, model, OPTIONS[name] | {"foreach": foreach})
    frozen_out = model[2]
    before = frozen_out.weight.detach().clone()
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model[1](model[0](x)), y[:, :1].expand(6, 4)).backward()  # model[2] gets no gradient
    opt.step()
    assert frozen_out.weight.grad is None and torch.equal(frozen_out.weight, before)
    assert frozen_out.weight not in opt.state or not opt.state[frozen_out.weight]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # set_to_none, torch's default


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_closure_is_called_once_and_its_loss_returned(name, foreach):
    model = _model()
    opt = build_optimizer(name, model, OPTIONS[name] | {"foreach": foreach})
    x, y = _batches(1)[0]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = _weights(model)
    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_scheduler_lr_zero_freezes_weights_without_decay(name, foreach):
    """A LambdaLR that sets lr 0 stops every update (the lr multiplies the whole step here, decay included)."""
    model = _model()
    opt = build_optimizer(name, model, OPTIONS[name] | {"foreach": foreach})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)
    _train(model, opt, _batches(1))
    sched.step()
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = _weights(model)
    _train(model, opt, _batches(2)[1:])
    for a, b in zip(frozen, _weights(model), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_add_param_group_steps_the_new_group(name, foreach):
    model = _model()
    head = nn.Linear(3, 2)
    opt = build_optimizer(name, model, OPTIONS[name] | {"foreach": foreach})
    opt.add_param_group({"params": list(head.parameters())})
    before = head.weight.detach().clone()
    x, _ = _batches(1)[0]
    head(model(x)).square().mean().backward()
    opt.step()
    assert not torch.equal(before, head.weight)
    assert opt.param_groups[-1]["lr"] == OPTIONS[name]["lr"]


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_dtype_is_kept_and_state_follows_it(name, foreach, dtype):
    model = _model(dtype)
    opt = build_optimizer(name, model, OPTIONS[name] | {"foreach": foreach})
    _train(model, opt, _batches(2, dtype))
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor):
                assert value.dtype == dtype


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_zero_size_parameter_is_stepped_without_error(name, foreach):
    empty = nn.Parameter(torch.zeros(0, 3))
    w = nn.Parameter(torch.ones(2, 3))
    opt = _make(name, [empty, w], foreach)
    empty.grad = torch.zeros(0, 3)
    w.grad = torch.full((2, 3), 0.5)
    opt.step()
    assert empty.shape == (0, 3) and not torch.equal(w, torch.ones(2, 3))


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_mixed_fp32_and_fp16_group_equals_the_for_loop_path(name, foreach):
    """Issue 24: LAMB's foreach path chose its fp16-safe branch from a bucket's first dtype and cast every ratio to
    it, so an fp16 tensor behind an fp32 one got inf/NaN. Each tensor must end as when stepped alone."""
    torch.manual_seed(3)
    w32, w16 = torch.randn(4, 3), torch.randn(5).half()
    g32, g16 = torch.randn(4, 3) * 1e-3, (torch.randn(5) * 1e-3).half()
    mixed = [nn.Parameter(w32.clone()), nn.Parameter(w16.clone())]
    alone = [nn.Parameter(w32.clone()), nn.Parameter(w16.clone())]
    opt = _make(name, mixed, foreach)
    opts_alone = [_make(name, [p], False) for p in alone]
    for _ in range(3):
        for p, g in zip(mixed + alone, [g32, g16, g32, g16], strict=True):
            p.grad = g.clone()
        opt.step()
        for o in opts_alone:
            o.step()
    for p, q in zip(mixed, alone, strict=True):
        assert torch.isfinite(p).all(), p
        tol = dict(rtol=1e-6, atol=1e-7) if p.dtype == torch.float32 else dict(rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_maximize_ascends_as_minimizing_the_negated_loss(name, foreach):
    """maximize=True on loss f gives, bit for bit, the weights of maximize=False on -f (torch's definition)."""
    batches = _batches(3)
    up, down = _model(), _model()
    opt_up = build_optimizer(name, up, OPTIONS[name] | {"foreach": foreach, "maximize": True})
    opt_down = build_optimizer(name, down, OPTIONS[name] | {"foreach": foreach})
    _train(up, opt_up, batches, sign=1.0)
    _train(down, opt_down, batches, sign=-1.0)
    for a, b in zip(_weights(up), _weights(down), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="maximize must be True or False; got 'yes'"):
        _make(name, [nn.Parameter(torch.ones(2))], foreach, maximize="yes")


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "forloop"])
def test_sgd_maximize_equals_torch_sgd_maximize(foreach):
    batches = _batches(3)
    ours, ref = _model(), _model()
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True}
    opt = optimizers.SGD(ours.parameters(), **kw, maximize=True, foreach=foreach)
    ref_opt = torch.optim.SGD(ref.parameters(), **kw, maximize=True, foreach=False)
    _train(ours, opt, batches)
    _train(ref, ref_opt, batches)
    # a few fp32 roundings apart: the foreach kernels round otherwise than torch's for-loop (1.3e-7 of a 0.024
    # weight on one CPU); a maximize taken the wrong way would differ by lr x gradient, about 1e-2
    for a, b in zip(_weights(ours), _weights(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,foreach", [c for c in CASES if c[0] != "sgd"], ids=[i for i in IDS if "sgd" not in i])
def test_complex_parameters_are_refused_at_construction_naming_the_optimizer(name, foreach):
    """Issue 24: LARS/LAMB failed inside step() with "gt_cpu not implemented for 'ComplexFloat'", naming nothing."""
    cls = optimizer_spec(name).cls
    real, z = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=rf"^{cls.__name__} does not support complex parameters \(got one of dtype "
                                         r"torch.complex64, shape \(3,\)\).*torch.view_as_real"):
        _make(name, [real, z], foreach)
    opt = _make(name, [real], foreach)
    with pytest.raises(ValueError, match="does not support complex parameters"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1  # the refused group is not left behind


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "forloop"])
def test_sgd_steps_complex_parameters_as_torch_sgd(foreach):
    torch.manual_seed(0)
    start = torch.randn(3, 2, dtype=torch.complex64)
    grads = [torch.randn(3, 2, dtype=torch.complex64) for _ in range(3)]
    ours, ref = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    opt, ref_opt = optimizers.SGD([ours], **kw, foreach=foreach), torch.optim.SGD([ref], **kw, foreach=False)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_tensor_lr_is_refused_with_the_reason(name, foreach):
    with pytest.raises(ValueError, match="lr must be a Python number"):
        _make(name, [nn.Parameter(torch.ones(2))], foreach, lr=torch.tensor(0.1))


@pytest.mark.parametrize("name,foreach", CASES, ids=IDS)
def test_sparse_gradient_is_refused_naming_the_optimizer(name, foreach):
    p = nn.Parameter(torch.ones(3, 2))
    opt = _make(name, [p], foreach)
    p.grad = torch.ones(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match=f"{optimizer_spec(name).cls.__name__} does not support sparse gradients"):
        opt.step()


def test_forgotten_binding_guard_names_both_routes():
    w = nn.Parameter(torch.ones(4, 3))
    opt = optimizers.LAMB([w], lr=0.1)
    flat = torch.zeros(12, requires_grad=True)
    opt.param_groups[0]["params"] = [flat]  # what a ZeRO wrapper hands the optimizer
    flat.grad = torch.ones(12)
    with pytest.raises(RuntimeError, match=r"bind_deepspeed\(engine\).*optimizers\.hf\.LayerwiseTrainer"):
        opt.step()

