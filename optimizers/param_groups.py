"""Parameter groups: which parameters get weight decay and layer-wise adaptation.

Practice of the MLPerf ResNet-50 LARS reference and timm (``param_groups_weight_decay``): parameters of
normalisation layers (batch norm's gamma and beta) and biases get neither weight decay nor a trust ratio. The
decision is made from the module type (``isinstance`` of a normalisation layer) and the tensor rank
(``ndim <= 1``: biases, norm affine parameters, scalar gains), never from substrings of parameter names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["NORM_LAYER_TYPES", "build_param_groups"]

#: Module types whose parameters are normalisation parameters (affine scale and shift).
NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*, lazy variants
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def build_param_groups(model: nn.Module, weight_decay: float, *, exclude_norm_and_bias: bool = True,
                       norm_types: tuple[type[nn.Module], ...] = NORM_LAYER_TYPES) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into at most two optimizer param groups.

    With ``exclude_norm_and_bias`` (default), parameters owned by a module of ``norm_types`` and all parameters
    with ``ndim <= 1`` go to ``{"params": [...], "weight_decay": 0.0, "adapt": False}``; the rest to
    ``{"params": [...], "weight_decay": weight_decay}``. Without it, one group with ``weight_decay``. Empty
    groups are left out (DeepSpeed drops them anyway); frozen parameters are left out; a parameter shared by
    several modules appears once. Order follows ``model.named_modules()``.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, norm_types)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_norm_and_bias and (is_norm or p.ndim <= 1):
                no_decay.append(p)
            else:
                decay.append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "adapt": False})
    return groups
