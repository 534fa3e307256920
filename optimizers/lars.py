"""LARS: layer-wise adaptive rate scaling, and its clipped variant LARC.

Paper: You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks", arXiv:1708.03888, eq. (6)
and Algorithm 1; LARC is the clipped ratio of NVIDIA apex (``apex.parallel.LARC``, ``clip=True``).

For each layer ``l`` (one model parameter tensor), with global learning rate ``lr``::

    trust_l = eta * ||w_l|| / (||g_l|| + wd * ||w_l|| + eps)       (paper eq. 6, eta = trust_coefficient)
    trust_l = 1                      if ||w_l|| == 0 or ||g_l|| == 0 (fresh zero-initialised layers; timm, MLPerf)
    trust_l = min(trust_l / lr, 1)   LARC (clip=True): the local lr lr * trust_l never exceeds lr
    d_l     = trust_l * (g_l + wd * w_l)                            (weight decay inside the update)

then momentum SGD along ``d_l`` exactly as ``optimizers.sgd`` (torch form ``v = m v + d; w -= lr v`` by default,
Nesterov optional; ``lr_in_momentum=True`` gives the paper's Algorithm 1 form ``v = m v + lr d; w -= v`` with
Goyal's momentum correction, identical to the torch form when ``momentum_correction=True``).

The MLCommons reference LARS (ResNet-50) is the Algorithm 1 form without the correction: the lr inside
the velocity (``v = m v + lr trust_l (g + wd w); w -= v``) and the velocity not rescaled when the lr changes.
Reproduce it with ``lr_in_momentum=True, momentum_correction=False`` (eta 0.001, momentum 0.9, poly(2) decay;
batch-norm parameters and biases excluded, as ``build_param_groups`` does). During warmup and decay the lr changes
every step, so it is not the torch form; with a constant lr the two are equal.

Param groups with ``adapt=False`` skip the trust ratio (``trust_l = 1``): plain SGD-momentum with their own
``weight_decay``. ``build_param_groups`` puts batch-norm parameters and biases there with ``weight_decay=0``
(MLPerf reference, timm).

``maximize=True`` ascends: ``-g`` in place of ``g`` (the norm ``||g||`` is the same), as torch.optim.SGD.

Defaults: ``lr=1.0, momentum=0.9, weight_decay=0, trust_coefficient=0.001, eps=1e-8, clip=False``
(MLPerf ResNet-50: eta 0.001, momentum 0.9, wd 1e-4 or 5e-5, base lr ~10 for 16k batches).

What differs from other implementations: timm adapts only groups with weight decay; here adaptation is its own
group key. apex LARC folds the ratio into ``p.grad`` and calls an inner SGD; here it is one step. Norms are of
real layers even on DeepSpeed's flat ZeRO/bf16 partitions once ``bind_deepspeed`` has run (see ``_layerwise``).
Zero norms are handled with ``torch.where``: no ``.item()`` or other host sync in ``step()``.

Cost: the ratios of all layers are one vector (one norm per tensor, ``_layerwise.trust_ratio`` on the stack), and
the foreach path folds them, with the weight decay, into the in-place momentum update of ``optimizers.sgd``
(``v = m v + r g + r wd w`` as ``_foreach_addcmul_`` with the ratios as 0-dim tensors): no parameter-sized
temporary, so beyond SGD's passes only the two norm reads of ``w`` and ``g``. On ResNet-50 (CPU) the step takes
less time than ``torch.optim.SGD(foreach=True)``'s, which allocates ``g + wd w`` afresh; docs/benchmarks.md has the
figures (``python -m benchmarks.optimizer``).
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
from .sgd import apply_momentum, momentum_state, validate_momentum_group

__all__ = ["LARS", "lars"]



def lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, fresh: list[bool],
         scales: list[float], plan: NormPlan | None, lr: float, momentum: float, dampening: float,
         weight_decay: float, nesterov: bool, trust_coefficient: float, eps: float, clip: bool,
         lr_in_momentum: bool = False, foreach: bool | None = None, maximize: bool = False,
         flat: tuple[Tensor, Tensor, Tensor | None, FlatLayout] | None = None) -> None:
    """Functional LARS step over layer segments (see the module docstring).

    ``params[i]``/``grads[i]``/``momentum_buffers[i]`` are segments (whole tensors, or views into a flat
    partition); ``plan`` maps segments to layers (``NormPlan()``: each segment is a layer; ``None``: no trust
    ratio, as for ``adapt=False`` groups). ``foreach=None`` picks the multi-tensor path; ``foreach=False`` the
    single-tensor reference path, which forms ``d`` for each tensor as the formula reads. ``flat``: (flat tensor,
    its gradient, its momentum buffer, its layout) when all segments are views into that one tensor: the update
    then runs on the whole tensor with a per-element ratio (0 on padding, which so keeps its value), elementwise
    the same operations as on the segments (see ``_layerwise.FUSED_FLAT_DEVICES``).
    """
    foreach = foreach is not False
    ratios = None
    if plan is not None:  # also with no segments here: a bound group's all_reduce needs every rank (layer_norms)
        w_norm, g_norm = layer_norms(params, grads, plan, foreach=foreach)
        # LARC: min(trust / lr, 1) is trust with coefficient eta / lr, clamped at 1; at lr = 0 it is 1.
        coefficient = (trust_coefficient / lr if lr > 0.0 else math.inf) if clip else trust_coefficient
        args: dict[str, Any] = dict(coefficient=coefficient, weight_decay=weight_decay, eps=eps,
                                    max_ratio=1.0 if clip else None)
        ratio = trust_ratio(w_norm, g_norm, **args)
        if plan.recorded is not None:  # diagnostics: the same elementwise formula on the per-layer norms
            plan.recorded["ratio"] = ratio if plan.layer_index is None else trust_ratio(
                plan.recorded["w"], plan.recorded["x"], **args)
        if flat is not None and params:
            w, g, buf, layout = flat
            apply_momentum([w], [g], [buf] if buf is not None else [], fresh=fresh[:1], scales=scales[:1], lr=lr,
                           momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                           lr_in_momentum=lr_in_momentum, foreach=foreach, maximize=maximize,
                           ratios=[layout.per_element(ratio.to(w.dtype))])
            return
        ratios = list(ratio.to(params[0].dtype).unbind(0)) if params else []
    apply_momentum(params, grads, momentum_buffers, fresh=fresh, scales=scales, lr=lr, momentum=momentum,
                   dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, lr_in_momentum=lr_in_momentum,
                   foreach=foreach, ratios=ratios, maximize=maximize)


class LARS(LayerwiseOptimizer):
    """LARS (``clip=False``) or LARC (``clip=True``); keyword names follow torch.optim.SGD."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, trust_coefficient: float = 0.001,
                 eps: float = 1e-8, clip: bool = False, lr_in_momentum: bool = False,
                 momentum_correction: bool = True, foreach: bool | None = None, maximize: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coefficient=trust_coefficient, eps=eps, clip=clip, adapt=True,
                        lr_in_momentum=lr_in_momentum, momentum_correction=momentum_correction, foreach=foreach,
                        maximize=maximize)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_momentum_group(group)
        check_number("trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True)
        check_number("eps", group["eps"], low=0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            use_momentum = group["momentum"] != 0.0
            fresh, scales = [], []
            if use_momentum:
                for p in group["params"]:
                    if p.grad is not None:
                        is_fresh, scale = momentum_state(self, p, group)
                        fresh.append(is_fresh)
                        scales.append(scale)
            keys = ("momentum_buffer",) if use_momentum else ()
            params, grads, states, stepped, counts, plan = self._gather(group, keys)
            if self.record and not group["adapt"]:  # no trust ratio here: the norms for diagnostics only
                self._add_record(plan, stepped, *recorded_norms(params, grads, plan), None)
            plan.record = self.record and group["adapt"]
            flat = None
            if (group["adapt"] and group["foreach"] is not False and len(stepped) == 1
                    and fused_flat(stepped[0].device) and (layout := self.layout_of(stepped[0]))):
                p = stepped[0]
                assert p.grad is not None  # _gather keeps only parameters with a gradient
                flat = (p, p.grad, self.state[p].get("momentum_buffer"), layout)
            lars(params, grads, states.get("momentum_buffer", []), fresh=expand(fresh, counts) if use_momentum else [],
                 scales=expand(scales, counts) if use_momentum else [], plan=plan if group["adapt"] else None,
                 lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                 weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                 trust_coefficient=group["trust_coefficient"], eps=group["eps"], clip=group["clip"],
                 lr_in_momentum=group["lr_in_momentum"], foreach=group["foreach"], maximize=group["maximize"],
                 flat=flat)
            if plan.recorded is not None:
                self._add_record(plan, stepped, plan.recorded["w"], plan.recorded["x"], plan.recorded["ratio"])
        return loss
