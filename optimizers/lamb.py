"""LAMB: layer-wise adaptive moments for large-batch training.

Paper: You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv:1904.00962, Algorithm 2 (LAMB).

For each layer ``l`` (one model parameter tensor) at step ``t``::

    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    m_hat = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t)          (bias_correction=True)
    u_l = m_hat / (sqrt(v_hat) + eps) + wd * w_l                        (decoupled weight decay, as AdamW)
    r_l = ||w_l|| / ||u_l||            (1 if ||w_l|| == 0 or ||u_l|| == 0)
    r_l = min(r_l, max_trust_ratio)    (if max_trust_ratio is set: a clamp on the ratio)
    r_l = max(r_l, min_trust_ratio)    (if min_trust_ratio is set; neither clamp touches the 1 of a zero norm)
    w_l <- w_l - lr * r_l * u_l

``max_trust_ratio`` and ``min_trust_ratio`` clamp the ratio as DeepSpeed's FusedLamb does (``max_coeff``, default
10, and ``min_coeff``, default 0.01, applied only where both norms are non-zero; DeepSpeedExamples' bing_bert BERT
recipe sets 0.3 and 0.01). NVIDIA's fused LAMB (apex ``FusedLAMB``, DeepLearningExamples' ``FusedLAMBAMP``) does
not clamp the ratio. It is not the paper's scaling function phi, which is applied to the weight norm,
``r_l = phi(||w_l||) / ||u_l||`` with e.g. ``phi(z) = min(max(z, gamma_l), gamma_u)``: a bound on ``||w_l||``
bounds the ratio only together with ``||u_l||``. Left unset, ``phi(z) = z``, the paper's choice in its experiments.

Param groups with ``adapt=False`` skip the ratio (``r_l = 1``): AdamW with that group's ``weight_decay``.

Defaults: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_trust_ratio=None, min_trust_ratio=None``
(the paper's BERT settings: eps 1e-6, wd 0.01; phi(z) = z). Keyword names follow torch.optim.AdamW. The
weight-decay default is the class's only: ``optimizers.build_optimizer("lamb", model, params)`` (and so every
config) takes ``weight_decay`` from ``params`` with a default of 0, as for every optimizer there; set it explicitly
(0.01 for the paper's BERT).

What differs from other implementations: NVIDIA's fused LAMB (apex ``FusedLAMB`` and DeepLearningExamples'
``FusedLAMBAMP``, ``max_grad_norm`` 1.0 by default) and timm's Lamb clip the global gradient norm inside the
optimizer (every gradient divided by ``||g||_global / max_grad_norm`` where that exceeds 1) before the moments;
here no clipping happens inside the optimizer: clip before ``step()`` (DeepSpeed's ``gradient_clipping`` scales
every gradient by the same rule, ``max / ||g||_global`` where that is below 1). NVIDIA also adapts only groups with
weight decay (unless ``use_nvlamb``), as ``build_param_groups``' ``adapt=False`` group does. DeepSpeed's FusedLamb
clamps the ratio to [0.01, 10]; here only with ``min_trust_ratio`` / ``max_trust_ratio``. ``maximize=True``
ascends (``-g`` in place of ``g``). Norms are of real layers even on DeepSpeed's flat ZeRO/bf16 partitions once
``bind_deepspeed`` has run. No ``.item()`` or other host sync in ``step()``: zero norms go through
``torch.where`` and the step count is a Python int.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._layerwise import (
    FlatLayout,
    LayerwiseOptimizer,
    NormPlan,
    expand,
    fused_flat,
    layer_norms,
    recorded_norms,
    trust_ratio,
)
from ._validation import check_number

__all__ = ["LAMB", "lamb"]


def _bias_corrections(step: int, beta1: float, beta2: float, bias_correction: bool) -> tuple[float, float]:
    if not bias_correction:
        return 1.0, 1.0
    return 1.0 - beta1**step, 1.0 - beta2**step


def _single_tensor_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                        steps: list[int], plan: NormPlan | None, *, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, max_trust_ratio: float | None, bias_correction: bool,
                        group_step: int | None = None, min_trust_ratio: float | None = None,
                        maximize: bool = False) -> None:
    updates = []
    for w, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        m.mul_(beta1).add_(g, alpha=-(1.0 - beta1) if maximize else 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bc1, bc2 = _bias_corrections(step, beta1, beta2, bias_correction)
        m_hat = m / bc1
        v_hat = v / bc2
        updates.append(m_hat / (v_hat.sqrt() + eps) + weight_decay * w)
    if plan is not None:
        w_norms, u_norms = layer_norms(params, updates, plan, foreach=False)
        ratios = trust_ratio(w_norms, u_norms, max_ratio=max_trust_ratio, min_ratio=min_trust_ratio)
        if plan.recorded is not None:  # diagnostics: the same formula on the per-layer norms
            plan.recorded["ratio"] = ratios if plan.layer_index is None else trust_ratio(
                plan.recorded["w"], plan.recorded["x"], max_ratio=max_trust_ratio, min_ratio=min_trust_ratio)
    for i, (w, u) in enumerate(zip(params, updates, strict=True)):
        if plan is not None:
            u = u * ratios[i].to(u.dtype)
        w.add_(u, alpha=-lr)


def _foreach_lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  steps: list[int], plan: NormPlan | None, *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, max_trust_ratio: float | None, bias_correction: bool,
                  group_step: int | None = None, min_trust_ratio: float | None = None,
                  maximize: bool = False,
                  flat: tuple[Tensor, Tensor, Tensor, Tensor, FlatLayout] | None = None) -> None:
    """Multi-tensor LAMB. With s = sqrt(bc2) / bc1 the update is u = s * u' where
    u' = m / (sqrt(v) + eps * sqrt(bc2)) + (wd / s) * w; the trust ratio ||w|| / ||u|| times u equals
    ||w|| / ||u'|| times u', so s only survives where the ratio is 1 or clamped. This saves the passes that
        form m_hat and v_hat. Tensors are bucketed by step count and dtype: each bucket takes its own fp16-safe choice
    and its ratios in its own dtype (a group may mix fp32 and fp16 tensors).

    ``flat``: (w, g, m, v, layout) of one bound flat partition whose segments ``params`` are: the elementwise work
    then runs on the whole tensors, the norms on segment views of the one update buffer, and the ratio is applied
    per element (``FlatLayout.per_element``; see ``_layerwise.FUSED_FLAT_DEVICES``): elementwise the same
    operations as on the segments, in one kernel each instead of one per segment."""
    clamps: dict[str, Any] = dict(max_ratio=max_trust_ratio, min_ratio=min_trust_ratio)  # trust_ratio's keywords
    segment_params = params
    if flat is not None and params:
        layout = flat[4]
        params, grads, exp_avgs, exp_avg_sqs, steps = [flat[0]], [flat[1]], [flat[2]], [flat[3]], steps[:1]
    if not params:
        if plan is not None:
            layer_norms(params, params, plan, foreach=True)  # a bound group's all_reduce needs every rank
            if plan.recorded is not None:  # the other ranks' ||u'||: scale as they do, with the group's step
                if group_step is None:
                    raise ValueError("lamb: a recorded step of a rank holding only padding of a bound group needs "
                                     "group_step (the group's step number) to scale ||u'|| to ||u||")
                bc1, bc2 = _bias_corrections(group_step, beta1, beta2, bias_correction)
                _record_update_norms(plan, math.sqrt(bc2) / bc1, clamps)
        return
    if maximize:  # m = lerp(m, -g) = -lerp(-m, g), exactly (negation is exact); v takes g^2 either way
        torch._foreach_neg_(exp_avgs)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_neg_(exp_avgs)
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    buckets: dict[tuple[int, torch.dtype], list[int]] = {}
    for i, step in enumerate(steps):
        buckets.setdefault((step, params[i].dtype), []).append(i)
    updates: list[Tensor] = [torch.empty(0)] * len(params)
    scales = [0.0] * len(params)
    for (step, _), idx in buckets.items():
        bc1, bc2 = _bias_corrections(step, beta1, beta2, bias_correction)
        scale = math.sqrt(bc2) / bc1
        # One fresh buffer per step, as torch's AdamW: 1 / (sqrt(v) + eps') in place, then times m. A second
        # allocation (torch._foreach_div) costs more than the extra pass on CPU, where large blocks come back as
        # fresh pages every step.
        part = torch._foreach_sqrt([exp_avg_sqs[i] for i in idx])
        if eps * math.sqrt(bc2) * torch.finfo(params[idx[0]].dtype).max > 1.0:
            torch._foreach_add_(part, eps * math.sqrt(bc2))
            torch._foreach_reciprocal_(part)
            torch._foreach_mul_(part, [exp_avgs[i] for i in idx])
        else:  # fp16: 1 / (sqrt(v) + eps sqrt(bc2)) would overflow (above 65,504) where v = 0, and eps sqrt(bc2)
            # underflow; divide m by sqrt(v^) + eps as the single-tensor path does, then scale to u'.
            torch._foreach_mul_(part, 1.0 / math.sqrt(bc2))
            torch._foreach_add_(part, eps)
            part = torch._foreach_div([exp_avgs[i] for i in idx], part)
            torch._foreach_mul_(part, 1.0 / math.sqrt(bc2))
        if weight_decay != 0.0:
            torch._foreach_add_(part, [params[i] for i in idx], alpha=weight_decay / scale)
        if plan is None:
            torch._foreach_add_([params[i] for i in idx], part, alpha=-lr * scale)
        for i, u in zip(idx, part, strict=True):
            updates[i], scales[i] = u, scale
    if plan is None:
        return
    if flat is not None:
        whole = updates[0].view(-1)
        segment_updates = [whole.narrow(0, seg.start, seg.numel) for seg in layout.segments]
        w_norm, u_norm = layer_norms(segment_params, segment_updates, plan, foreach=True)
    else:
        w_norm, u_norm = layer_norms(params, updates, plan, foreach=True)
    if len(set(scales)) == 1:
        layer_scale: float | Tensor = scales[0]
    else:  # tensors at different step counts (some skipped steps without a gradient): rare, one small copy
        layer_scale = torch.tensor(scales, dtype=w_norm.dtype, device=w_norm.device)
    ratio = trust_ratio(w_norm, u_norm * layer_scale, **clamps) * layer_scale
    if plan.recorded is not None:
        _record_update_norms(plan, layer_scale, clamps)
    if flat is not None:
        params[0].addcmul_(updates[0], layout.per_element(ratio.to(params[0].dtype)).view_as(params[0]), value=-lr)
        return
    for dtype, idx in _by_dtype(params).items():
        if len(idx) == len(params):
            torch._foreach_addcmul_(params, updates, list(ratio.to(dtype).unbind(0)), value=-lr)
        else:
            ratios = ratio.to(dtype)
            torch._foreach_addcmul_([params[i] for i in idx], [updates[i] for i in idx], [ratios[i] for i in idx],
                                    value=-lr)


def _by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[int]]:
    out: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault(t.dtype, []).append(i)
    return out


def _record_update_norms(plan: NormPlan, scale: float | Tensor, clamps: dict[str, Any]) -> None:
    """Diagnostics: ||u|| = s ||u'|| and the ratio ||w|| / ||u|| (clamped) it gives; one scale per group when bound
    (one flat tensor per rank, at one step count on every rank)."""
    assert plan.recorded is not None
    plan.recorded["x"] = plan.recorded["x"] * scale
    plan.recorded["ratio"] = trust_ratio(plan.recorded["w"], plan.recorded["x"], **clamps)


def lamb(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
         steps: list[int], plan: NormPlan | None, lr: float, beta1: float, beta2: float, eps: float,
         weight_decay: float, max_trust_ratio: float | None = None, bias_correction: bool = True,
         foreach: bool | None = None, group_step: int | None = None, min_trust_ratio: float | None = None,
         maximize: bool = False, flat: tuple[Tensor, Tensor, Tensor, Tensor, FlatLayout] | None = None) -> None:
    """Functional LAMB step over layer segments (see the module docstring).

    ``steps[i]`` is the step number (1 on the first step) of segment ``i``; ``plan`` maps segments to layers
    (``NormPlan()``: each segment is a layer; ``None``: no trust ratio). ``foreach=None`` picks the multi-tensor
    path. ``group_step``: the group's step number, needed only by a recorded step (``plan.record``) of a rank that
    holds no segment of a bound group (only padding), to scale the other ranks' update norms as they do.
    """
    kwargs: dict[str, Any] = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                  max_trust_ratio=max_trust_ratio, bias_correction=bias_correction,
                                  group_step=group_step, min_trust_ratio=min_trust_ratio, maximize=maximize)
    if foreach is False:
        _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, plan, **kwargs)
    else:
        _foreach_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, plan, **kwargs, flat=flat)


class LAMB(LayerwiseOptimizer):
    """LAMB; keyword names follow torch.optim.AdamW."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, *, max_trust_ratio: float | None = None,
                 min_trust_ratio: float | None = None, bias_correction: bool = True, foreach: bool | None = None,
                 maximize: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, max_trust_ratio=max_trust_ratio, min_trust_ratio=min_trust_ratio,
                        bias_correction=bias_correction, adapt=True, foreach=foreach, maximize=maximize)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
        check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
        check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        group.setdefault("min_trust_ratio", None)  # state dicts saved before these options existed
        group.setdefault("maximize", False)
        if group["max_trust_ratio"] is not None:
            check_number("max_trust_ratio", group["max_trust_ratio"], low=0.0, low_open=True)
        if group["min_trust_ratio"] is not None:
            check_number("min_trust_ratio", group["min_trust_ratio"], low=0.0)
            if group["max_trust_ratio"] is not None and group["min_trust_ratio"] > group["max_trust_ratio"]:
                raise ValueError(f"min_trust_ratio {group['min_trust_ratio']!r} exceeds max_trust_ratio "
                                 f"{group['max_trust_ratio']!r}; expected min_trust_ratio <= max_trust_ratio")
        if not isinstance(group["maximize"], bool):
            raise ValueError(f"maximize must be True or False; got {group['maximize']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            steps = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                steps.append(state["step"])
            params, grads, states, stepped, counts, plan = self._gather(group, ("exp_avg", "exp_avg_sq"))
            beta1, beta2 = group["betas"]
            if self.record:  # diagnostics: ||g|| (the step itself needs only ||w|| and ||u||), before w moves
                w_norm, g_norm = recorded_norms(params, grads, plan)
                plan.record = group["adapt"]
            flat = None
            if (group["adapt"] and group["foreach"] is not False and len(stepped) == 1
                    and fused_flat(stepped[0].device) and (layout := self.layout_of(stepped[0]))):
                p = stepped[0]
                assert p.grad is not None  # _gather keeps only parameters with a gradient
                flat = (p, p.grad, self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"], layout)
            lamb(params, grads, states["exp_avg"], states["exp_avg_sq"], steps=expand(steps, counts), flat=flat,
                 plan=plan if group["adapt"] else None, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                 weight_decay=group["weight_decay"], max_trust_ratio=group["max_trust_ratio"],
                 bias_correction=group["bias_correction"], foreach=group["foreach"],
                 group_step=max(steps) if steps else None, min_trust_ratio=group["min_trust_ratio"],
                 maximize=group["maximize"])
            if self.record:
                rec = plan.recorded or {}
                self._add_record(plan, stepped, w_norm, g_norm, rec.get("ratio"), rec.get("x"))
        return loss
