"""Optimizers for large-batch training: SGD (Goyal et al.), LARS/LARC and LAMB, exact under DeepSpeed.

Use::

    optimizer = build_optimizer("lars", model, {"lr": 10.0, "momentum": 0.9, "weight_decay": 5e-5})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    print(bind_deepspeed(engine))   # every rank, once, before the first step

The registry is data: each name maps to a class and the options its variant presets (timm style).
With the Hugging Face Trainer: ``optimizers.hf.LayerwiseTrainer`` builds the optimizer and binds it (not imported
here: it needs transformers and accelerate).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._layerwise import FlatLayout, LayerwiseOptimizer, Segment
from .deepspeed_layout import DeepSpeedBinding, bind_deepspeed
from .lamb import LAMB, lamb
from .lars import LARS, lars
from .param_groups import NORM_LAYER_TYPES, build_param_groups
from .sgd import SGD, sgd

__all__ = [
    "KNOWN_OPTIMIZERS", "LAMB", "LARS", "NORM_LAYER_TYPES", "SGD", "DeepSpeedBinding", "FlatLayout",
    "LayerwiseOptimizer", "OptimizerSpec", "Segment", "bind_deepspeed", "build_optimizer", "build_param_groups",
    "lamb", "lars", "optimizer_spec", "sgd",
]


@dataclass(frozen=True)
class OptimizerSpec:
    """One registry entry: the class and the options the variant fixes."""

    cls: type[torch.optim.Optimizer]
    preset: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(SGD, {}, "momentum SGD (torch form; Goyal's Caffe2 form with lr_in_momentum=True)"),
    "lars": OptimizerSpec(LARS, {"clip": False}, "LARS, You et al. 2017"),
    "larc": OptimizerSpec(LARS, {"clip": True}, "LARS with apex's clipped ratio min(trust / lr, 1)"),
    "lamb": OptimizerSpec(LAMB, {}, "LAMB, You et al. 2019"),
}

#: Names accepted by ``build_optimizer`` (case-insensitive).
KNOWN_OPTIMIZERS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def optimizer_spec(name: str) -> OptimizerSpec:
    """Registry entry for ``name`` (case-insensitive); ValueError listing the known names otherwise."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")
    return _REGISTRY[key]


def _accepted_keys(cls: type) -> list[str]:
    sig = inspect.signature(cls)  # the constructor's parameters, without self
    return [k for k, p in sig.parameters.items() if k not in ("self", "params") and p.kind != p.VAR_KEYWORD]


def build_optimizer(name: str, model: torch.nn.Module, params: Mapping[str, Any], *,
                    exclude_norm_and_bias: bool = True) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``model``'s parameters with options ``params`` (a DeepSpeed-style dict).

    ``params["weight_decay"]`` (default 0 for every optimizer, LAMB included, whose class default is 0.01) goes to
    the decayed group; with ``exclude_norm_and_bias`` normalisation
    parameters and biases form a second group with no weight decay and no trust ratio (``build_param_groups``).
    Other keys are the class's keyword arguments (see ``KNOWN_OPTIMIZERS`` and each class); unknown keys, and keys
    contradicting the variant's preset (``"larc"`` with ``clip=False``), raise ValueError.
    """
    spec = optimizer_spec(name)
    kwargs = dict(params)
    weight_decay = kwargs.pop("weight_decay", 0.0)
    accepted = _accepted_keys(spec.cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    for key, value in spec.preset.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"optimizer {name!r} fixes {key}={value!r}; got {key}={kwargs[key]!r}")
        kwargs[key] = value
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = build_param_groups(model, weight_decay, exclude_norm_and_bias=exclude_norm_and_bias)
    kwargs["weight_decay"] = weight_decay
    return spec.cls(groups, **kwargs)
