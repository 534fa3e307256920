"""SGD with momentum, in the form of torch.optim.SGD or in Goyal et al.'s Caffe2 form with momentum correction.

Paper: Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv:1706.02677, sec. 2.1
and appendix ("momentum correction").

Two ways to write momentum SGD with L2 weight decay ``wd`` and learning rate ``lr_t`` at step ``t``:

* torch form (default, ``lr_in_momentum=False``), Goyal eq. (9) and torch.optim.SGD::

      d_t = g_t + wd * w_t
      v_t = m * v_{t-1} + (1 - dampening) * d_t        (v_1 = d_1)
      w_{t+1} = w_t - lr_t * v_t                       (Nesterov: w_t - lr_t * (d_t + m * v_t))

* Caffe2 form (``lr_in_momentum=True``), Goyal eq. (10), the LARS paper's Algorithm 1 and the MLPerf reference::

      v_t = m * c_t * v_{t-1} + (1 - dampening) * lr_t * d_t    (v_1 = lr_1 * d_1)
      w_{t+1} = w_t - v_t                              (Nesterov: w_t - (lr_t * d_t + m * v_t))

  with the momentum correction ``c_t = lr_t / lr_{t-1}`` (``momentum_correction=True``), which keeps
  ``v_caffe2 = lr_t * v_torch`` and so makes the two forms identical step for step; without it (``c_t = 1``) the
  velocity remembers old learning rates and the forms drift apart whenever the lr changes (warmup, decay).

Why the torch form is the default: it needs no correction and no memory of the previous lr, it is what
torch.optim.SGD (and so every PyTorch recipe and checkpoint) does, and it is identical to the corrected Caffe2
form. The Caffe2 form is here to reproduce Caffe2/TF-style recipes and to show why the correction matters.
If ``lr_{t-1}`` was 0 (a warmup that starts at 0), ``c_t`` is undefined and taken as 1; the Caffe2 velocity then
holds nothing of the steps taken at lr 0, while the torch velocity does, so the two forms agree only from the first
step with a positive lr on. Start warmups above 0 when comparing them.

``maximize=True`` ascends (``-g`` in place of ``g``), as torch.optim.SGD's ``maximize``.

Defaults: ``lr=0.1, momentum=0.9, weight_decay=0`` (Goyal: momentum 0.9, wd 1e-4 for ResNet-50, set by the
config). Param-group keys ``weight_decay`` override per group; ``adapt`` is accepted and ignored (SGD has no
trust ratio). Elementwise, so it is exact on DeepSpeed's flat partitions without any binding.

The foreach path adds the ``w`` and ``g`` terms of ``d_t`` into the velocity in place instead of forming ``d_t``
(torch.optim.SGD forms it in a fresh buffer every step): the step allocates no parameter-sized memory.
``apply_momentum`` is the update LARS shares, with its trust ratios as per-tensor factors of ``d_t``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._eager import EagerBookkeeping
from ._layerwise import RecordsLayers, recorded_norms, trust_ratio
from ._validation import check_number

__all__ = ["SGD", "sgd", "apply_momentum"]


def _buckets(keys: list[Any]) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def _single_tensor_momentum(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], fresh: list[bool],
                            scales: list[float], ratios: list[Tensor] | None, *, lr: float, momentum: float,
                            dampening: float, weight_decay: float, nesterov: bool, lr_in_momentum: bool,
                            maximize: bool = False) -> None:
    for i, (w, g) in enumerate(zip(params, grads, strict=True)):
        g = g.neg() if maximize else g
        d = g.add(w, alpha=weight_decay) if weight_decay != 0.0 else g
        if ratios is not None:
            d = d * ratios[i]
        if momentum == 0.0:
            w.add_(d, alpha=-lr)
            continue
        v = bufs[i]
        if lr_in_momentum:  # Caffe2 form, Goyal eq. (10): the velocity carries the lr.
            if fresh[i]:
                v.copy_(d).mul_(lr)
            else:
                v.mul_(momentum * scales[i]).add_(d, alpha=(1.0 - dampening) * lr)
            if nesterov:
                w.sub_(d * lr + v * momentum)
            else:
                w.sub_(v)
        else:  # torch.optim.SGD form, Goyal eq. (9).
            if fresh[i]:
                v.copy_(d)
            else:
                v.mul_(momentum).add_(d, alpha=1.0 - dampening)
            w.add_(d.add(v, alpha=momentum) if nesterov else v, alpha=-lr)


def _foreach_momentum(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], fresh: list[bool],
                      scales: list[float], ratios: list[Tensor] | None, *, lr: float, momentum: float,
                      dampening: float, weight_decay: float, nesterov: bool, lr_in_momentum: bool,
                      maximize: bool = False) -> None:
    """The single-tensor step, with ``d = r (g + wd w)`` never formed: each use of ``d`` is split into a ``w`` term
    and a ``g`` term added in place, so the step allocates no parameter-sized buffer. (torch.optim.SGD forms
    ``g + wd w`` in a fresh buffer; on CPU those pages cost more than the arithmetic: 2.6x an in-place add.)"""
    if not params:
        return

    def add_direction(targets: list[Tensor], idx: list[int], coef: float) -> None:
        """``targets[k] += coef * d[idx[k]]``; the ``w`` term first, so that ``targets`` may be the params."""
        g = [grads[i] for i in idx]
        w = [params[i] for i in idx]
        g_coef = -coef if maximize else coef  # maximize: d = -g + wd w
        if ratios is None:
            if weight_decay != 0.0:
                torch._foreach_add_(targets, w, alpha=coef * weight_decay)
            torch._foreach_add_(targets, g, alpha=g_coef)
        else:
            r = [ratios[i] for i in idx]
            if weight_decay != 0.0:
                torch._foreach_addcmul_(targets, w, r, value=coef * weight_decay)
            torch._foreach_addcmul_(targets, g, r, value=g_coef)

    everything = list(range(len(params)))
    if momentum == 0.0:
        add_direction(params, everything, -lr)
        return
    lr_v = lr if lr_in_momentum else 1.0  # the lr inside the velocity (Caffe2 form) or outside it (torch form)
    for (is_fresh, scale), idx in _buckets(list(zip(fresh, scales, strict=True))).items():
        b = [bufs[i] for i in idx]
        if is_fresh:
            torch._foreach_zero_(b)
            add_direction(b, idx, lr_v)
        else:
            torch._foreach_mul_(b, momentum * scale if lr_in_momentum else momentum)
            add_direction(b, idx, (1.0 - dampening) * lr_v)
    lr_w = 1.0 if lr_in_momentum else lr  # w -= lr_w * v
    if nesterov:
        add_direction(params, everything, -lr)
        torch._foreach_add_(params, bufs, alpha=-momentum * lr_w)
    else:
        torch._foreach_add_(params, bufs, alpha=-lr_w)


def apply_momentum(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, fresh: list[bool],
                   scales: list[float], lr: float, momentum: float, dampening: float, weight_decay: float,
                   nesterov: bool, lr_in_momentum: bool, foreach: bool, ratios: list[Tensor] | None = None,
                   maximize: bool = False) -> None:
    """Momentum step along ``d_i = r_i * (g_i + weight_decay * w_i)`` (torch form, or the Caffe2 form).

    ``r_i = ratios[i]`` (a 0-dim tensor: LARS's trust ratio) or 1 when ``ratios`` is None (SGD). ``bufs[i]`` is
    the velocity of ``params[i]`` (ignored when ``momentum == 0``), ``fresh[i]`` says it is the first step for
    it, ``scales[i]`` is the Caffe2-form momentum correction ``lr_t / lr_{t-1}``. ``maximize``: ascend, with ``-g``
    in place of ``g`` (as torch.optim.SGD). Shared by SGD and LARS.
    """
    fn = _foreach_momentum if foreach else _single_tensor_momentum
    fn(params, grads, bufs, fresh, scales, ratios, lr=lr, momentum=momentum, dampening=dampening,
       weight_decay=weight_decay, nesterov=nesterov, lr_in_momentum=lr_in_momentum, maximize=maximize)


def sgd(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, fresh: list[bool],
        scales: list[float], lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
        lr_in_momentum: bool, foreach: bool | None = None, maximize: bool = False) -> None:
    """Functional SGD step (see the module docstring). ``foreach=None`` picks the multi-tensor path."""
    apply_momentum(params, grads, momentum_buffers, fresh=fresh, scales=scales, lr=lr, momentum=momentum,
                   dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                   lr_in_momentum=lr_in_momentum, foreach=foreach is not False, maximize=maximize)


def validate_momentum_group(group: dict[str, Any]) -> None:
    check_number("lr", group["lr"], low=0.0)
    check_number("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    check_number("dampening", group["dampening"], low=0.0, high=1.0)
    check_number("weight_decay", group["weight_decay"], low=0.0)
    group.setdefault("maximize", False)  # state dicts saved before maximize existed
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"maximize must be True or False; got {group['maximize']!r}")
    if group["nesterov"] and (group["momentum"] <= 0.0 or group["dampening"] != 0.0):
        raise ValueError(f"nesterov=True needs momentum > 0 and dampening = 0; got momentum={group['momentum']!r}, "
                         f"dampening={group['dampening']!r}")


def momentum_state(optimizer: torch.optim.Optimizer, p: Tensor, group: dict[str, Any]) -> tuple[bool, float]:
    """Create the velocity of ``p`` if needed; return (fresh, Caffe2 momentum correction) and record the lr."""
    state = optimizer.state[p]
    lr = group["lr"]
    fresh = "momentum_buffer" not in state
    if fresh:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    prev = state.get("lr_prev", lr)
    scale = lr / prev if group["lr_in_momentum"] and group["momentum_correction"] and prev > 0.0 else 1.0
    state["lr_prev"] = lr
    return fresh, scale


#: The trust ratio an SGD step records for diagnostics (``record``) is the one LARS would apply with its defaults:
#: ``eta * ||w|| / (||g|| + wd ||w|| + eps)`` with the group's weight decay (optimizers.lars, You et al. 2017 eq. 6).
LARS_ETA, LARS_EPS = 0.001, 1e-8


class SGD(RecordsLayers, EagerBookkeeping):
    """Momentum SGD, torch form by default, Caffe2 form with Goyal's momentum correction on request.

    With ``record`` set (diagnostics), a step also records per-layer ``||w||``, ``||g||`` and the trust ratio LARS
    would apply (``LARS_ETA``, ``LARS_EPS``, the group's weight decay; none for ``adapt=False`` groups, which LARS
    does not adapt), exact on DeepSpeed's flat partitions once ``deepspeed_layout.bind_layouts`` has run.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, lr_in_momentum: bool = False,
                 momentum_correction: bool = True, foreach: bool | None = None, maximize: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        lr_in_momentum=lr_in_momentum, momentum_correction=momentum_correction, foreach=foreach,
                        maximize=maximize)
        self._init_layouts()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        validate_momentum_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.record:
                self._record_lars_ratio(group)
            params, grads, bufs, fresh, scales = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SGD does not support sparse gradients")
                if group["momentum"] != 0.0:
                    is_fresh, scale = momentum_state(self, p, group)
                    bufs.append(self.state[p]["momentum_buffer"])
                    fresh.append(is_fresh)
                    scales.append(scale)
                params.append(p)
                grads.append(p.grad)
            sgd(params, grads, bufs, fresh=fresh, scales=scales, lr=group["lr"], momentum=group["momentum"],
                dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                lr_in_momentum=group["lr_in_momentum"], foreach=group["foreach"], maximize=group["maximize"])
        return loss

    def _record_lars_ratio(self, group: dict[str, Any]) -> None:
        """Diagnostics: per-layer norms of ``group`` before the step, and the trust ratio LARS would apply."""
        params, grads, stepped, plan = self._segment_views(group)
        w_norm, g_norm = recorded_norms(params, grads, plan)
        ratio = trust_ratio(w_norm, g_norm, coefficient=LARS_ETA, weight_decay=group["weight_decay"], eps=LARS_EPS) \
            if group.get("adapt", True) else None
        self._add_record(plan, stepped, w_norm, g_norm, ratio)
