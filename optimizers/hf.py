"""Hugging Face Trainer integration: our SGD, LARS, LARC and LAMB, our parameter groups, and the DeepSpeed binding.

Use (with or without ``deepspeed=`` in the TrainingArguments)::

    from optimizers.hf import LayerwiseTrainer

    trainer = LayerwiseTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_zero2.json"),
                               train_dataset=dataset, optimizer="lamb",
                               optimizer_params={"lr": 2e-3, "weight_decay": 0.01, "max_trust_ratio": 10.0})
    trainer.train()
    print(trainer.deepspeed_binding)   # what bind_deepspeed did (None without DeepSpeed)

What it does, and why a subclass (transformers 5.23, ``integrations/deepspeed.py`` and ``trainer.py``):

* ``create_optimizer`` builds ``optimizers.build_optimizer(optimizer, model, optimizer_params)``: normalisation
  parameters and biases in a group without weight decay and without a trust ratio, as our entry points do
  (transformers' own groups exclude them from weight decay only, by parameter name). Under DeepSpeed,
  ``deepspeed_init`` calls exactly this method (``deepspeed_optim_sched``) when the DeepSpeed config has no
  ``"optimizer"`` block, and hands the result to ``deepspeed.initialize`` through accelerate.
* A callback binds at ``on_train_begin``: ``optimizers.bind_deepspeed(trainer.model_wrapped)`` (the engine, which
  a Trainer user never holds), after ``accelerator.prepare`` and any checkpoint load, before the first step. A
  callback because it is the Trainer's public hook between the engine's creation and the first step; it is
  registered by the constructor, so it cannot be forgotten.
* It refuses what would silently lose our optimizer: an optimizer passed through ``optimizers=`` under DeepSpeed
  (``deepspeed_init`` sets ``trainer.optimizer = None`` and calls ``create_optimizer()``: transformers would train
  with its default AdamW), ``optimizer_cls_and_kwargs`` (ours builds the optimizer), and a DeepSpeed config with an
  ``"optimizer"`` block (DeepSpeed would build its own and never call ``create_optimizer``).

transformers (and accelerate, which its Trainer needs) are imported only by this module: ``import optimizers``
does not import them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from . import build_optimizer, optimizer_spec
from .deepspeed_layout import DeepSpeedBinding, bind_deepspeed

__all__ = ["DROPPED_OPTIMIZER", "LayerwiseTrainer"]

#: What transformers does with an optimizer passed through ``Trainer(optimizers=(opt, None))`` under DeepSpeed.
DROPPED_OPTIMIZER = (
    "under DeepSpeed, transformers' deepspeed_init sets trainer.optimizer = None and calls trainer.create_optimizer(), "
    "so an optimizer passed through Trainer(optimizers=(optimizer, scheduler)) is dropped without a warning and a "
    "plain Trainer trains with its default (torch.optim.AdamW)")


class _BindDeepSpeed(TrainerCallback):
    """Binds the layer-wise optimizer inside the Trainer's DeepSpeed engine once per engine, before the first step."""

    def __init__(self, trainer: LayerwiseTrainer) -> None:
        self.trainer = trainer
        self.bound_engine: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if not trainer.is_deepspeed_enabled:
            return
        engine = trainer.model_wrapped
        if not hasattr(engine, "optimizer") or not hasattr(engine, "module"):
            raise RuntimeError(f"LayerwiseTrainer: DeepSpeed is enabled but trainer.model_wrapped is a "
                               f"{type(engine).__name__}, not a DeepSpeed engine; cannot bind the optimizer")
        if self.bound_engine == id(engine):  # a second train() on the same engine: bound already
            return
        trainer.deepspeed_binding = bind_deepspeed(engine)
        self.bound_engine = id(engine)
        if trainer.is_world_process_zero():
            print(trainer.deepspeed_binding, flush=True)


class LayerwiseTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with one of our optimizers (see the module docstring).

    ``optimizer``: a name of ``optimizers.KNOWN_OPTIMIZERS`` (``"sgd"``, ``"lars"``, ``"larc"``, ``"lamb"``);
    ``optimizer_params``: its options as in a DeepSpeed config's ``"params"`` (``lr``, ``weight_decay``, ...);
    ``lr`` defaults to ``args.learning_rate`` and ``weight_decay`` to ``args.weight_decay`` when not given.
    ``exclude_norm_and_bias``: as ``optimizers.build_optimizer``. Every other argument is the Trainer's.
    After ``train()`` under DeepSpeed, ``deepspeed_binding`` says what ``bind_deepspeed`` did.
    """

    def __init__(self, *args: Any, optimizer: str = "lamb", optimizer_params: Mapping[str, Any] | None = None,
                 exclude_norm_and_bias: bool = True, **kwargs: Any) -> None:
        optimizer_spec(optimizer)  # an unknown name fails here, listing the known ones
        passed = kwargs.get("optimizers", (None, None))
        passed_optimizer = passed[0] if isinstance(passed, tuple | list) and passed else None
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("LayerwiseTrainer builds its optimizer itself (optimizer=, optimizer_params=); "
                             "optimizer_cls_and_kwargs is not accepted")
        self.layerwise_optimizer = optimizer.lower()
        self.layerwise_params = dict(optimizer_params or {})
        self.exclude_norm_and_bias = exclude_norm_and_bias
        self.deepspeed_binding: DeepSpeedBinding | None = None
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            if passed_optimizer is not None:
                raise ValueError(
                    f"LayerwiseTrainer: got an optimizer ({type(passed_optimizer).__name__}) through optimizers=; "
                    f"{DROPPED_OPTIMIZER}. Pass its name and options instead: "
                    f"LayerwiseTrainer(..., optimizer={self.layerwise_optimizer!r}, optimizer_params={{...}}).")
            config = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
            if "optimizer" in config:
                raise ValueError(
                    f"LayerwiseTrainer: the DeepSpeed config has an \"optimizer\" block "
                    f"({config['optimizer'].get('type')!r}): DeepSpeed would build that optimizer and transformers "
                    f"would never call create_optimizer(), so {self.layerwise_optimizer!r} would not run. Remove the "
                    "block; LayerwiseTrainer builds the optimizer.")
        elif passed_optimizer is not None:
            raise ValueError(
                f"LayerwiseTrainer: got an optimizer ({type(passed_optimizer).__name__}) through optimizers=; it "
                f"builds {self.layerwise_optimizer!r} itself with our parameter groups. Pass optimizer= and "
                f"optimizer_params=, or use transformers.Trainer for an optimizer of your own. (Also: "
                f"{DROPPED_OPTIMIZER}.)")
        self.add_callback(_BindDeepSpeed(self))

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Our optimizer over our parameter groups (once; transformers calls this again and gets the same one)."""
        if self.optimizer is None:
            params = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay,
                      **self.layerwise_params}
            model = self.model if model is None else model
            if model is None:
                raise ValueError("LayerwiseTrainer.create_optimizer: no model (give Trainer a model, or pass one)")
            self.optimizer = build_optimizer(self.layerwise_optimizer, model, params,
                                             exclude_norm_and_bias=self.exclude_norm_and_bias)
        return self.optimizer

