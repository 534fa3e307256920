"""Per-layer trust ratios, logged every N optimizer steps (``--trust-ratio-interval N``; 0, the default: off).

LARS and LAMB scale each layer's step by a trust ratio (You et al. 2017, arXiv:1708.03888, eq. 6: ``eta ||w|| /
(||g|| + wd ||w||)``; You et al. 2019, arXiv:1904.00962: ``||w|| / ||u||`` with ``u`` the Adam update, clamped at
``max_trust_ratio`` when set). On a diagnostics step rank 0 writes one record to metrics.jsonl::

    {"kind": "layers", "step": S, "samples": ..., "optimizer": "LARS", "ratio": "applied",
     "layers": [{"name": "stem.0.weight", "w_norm": ..., "g_norm": ..., "trust_ratio": ..., "adapted": true}, ...]}

one entry per parameter tensor (every one, on every record), named as in ``model.state_dict()``, in the model's
order. The numbers are the ones
the optimizer computed during that step (``optimizers._layerwise.RecordsLayers``: the step is asked to record just
before it runs), so they are by construction what it applied, and they are exact under ZeRO-1/2 and bf16: the
per-layer norms come from the layouts ``bind_deepspeed`` built, summed across ranks by the step's own all-reduce
(every rank then holds every layer's norm, so rank 0 reports the layers that lie in other ranks' partitions too).
``g_norm`` is the gradient the optimizer stepped with (DeepSpeed's unscaled, rank-averaged one); ``w_norm`` is the
weight before the step.

* LARS: ``trust_ratio`` as applied (eta, weight decay and eps of the group).
* LARC: the clipped factor it applied, ``min(r / lr, 1)`` with ``r`` LARS's ratio: a factor on the global lr, not a
  local lr like LARS's ``r``, so ``"ratio": "larc_clipped"`` (LARS and LAMB: ``"applied"``).
* LAMB: ``trust_ratio = ||w|| / ||u||`` after clamping, and ``u_norm`` = ``||u||``.
* SGD: the ratio LARS would apply with its default eta 0.001 and eps 1e-8 and the group's weight decay
  (``optimizers.sgd.LARS_ETA``); ``"ratio": "lars_would_apply"`` says so.
* Layers without layer-wise adaptation (batch-norm parameters and biases in ``build_param_groups``' second group):
  ``"trust_ratio": null, "adapted": false``: no ratio is applied, their lr is the global one. Their norms are logged.
* A parameter the forward pass did not use: DeepSpeed hands the optimizer a zero gradient for it (ZeRO-0's
  all-reduce zero-fills a missing one, ZeRO-1/2's flat partitions hold zeros), so in every stage ``g_norm`` is 0
  and the ratio is the one that step applied (weight decay only; LARS: 1). An optimizer that gets no gradient at
  all skips the parameter (used without DeepSpeed's all-reduce); its entry then has ``||w||`` read from the
  parameter, ``"g_norm": 0.0`` and ``"trust_ratio": null`` (no step, nothing applied).

Cost: with the interval at 0 nothing is created and a step does no extra work. On a diagnostics step: one extra
norm pass where the step computes none (adapt=False groups, LAMB's ``||g||``, SGD), one host read of the norms,
and the record. Under ZeRO-1/2 and bf16 the norms of the groups that do not need them for the step take one more
all-reduce each. To wandb (rank 0) go only the adapted layers' finite ratios, each as a scalar
``trust_ratio/<name>`` (the norms, and the null ratios, stay in metrics.jsonl).
A step skipped for non-finite gradients records nothing (the optimizer did not run).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from optimizers import KNOWN_OPTIMIZERS
from optimizers._layerwise import LayerStats, RecordsLayers
from optimizers.deepspeed_layout import bind_layouts, inner_optimizer, whole_layer_ids
from optimizers.lamb import LAMB
from optimizers.lars import LARS
from optimizers.sgd import SGD
from train import cli
from train.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-ratio-interval", type=cli.int_at_least(0), default=0, metavar="N",
                   help="every N optimizer steps, log each layer's ||w||, ||g|| and trust ratio (a 'layers' record "
                        "in metrics.jsonl, trust_ratio/<layer> in wandb); 0: off")


def check_optimizer(cfg: dict[str, Any], interval: int) -> None:
    """Refuse ``--trust-ratio-interval`` with an optimizer that cannot record (anything but SGD, LARS, LARC, LAMB)
    from the config alone, before the engine's start-up cost; a config without an optimizer type is left to the
    config's own checks."""
    optimizer = cfg.get("optimizer")
    if interval <= 0 or not isinstance(optimizer, dict) or "type" not in optimizer:
        return
    if str(optimizer["type"]).lower() not in KNOWN_OPTIMIZERS:
        raise ConfigError(f"--trust-ratio-interval {interval} needs one of our optimizers "
                          f"({', '.join(KNOWN_OPTIMIZERS)}: optimizers/); the config's optimizer type is "
                          f"{optimizer['type']!r}")


class TrustRatioMonitor:
    """Asks the optimizer to record its per-layer norms on every ``interval``-th step and writes them (rank 0).

    Create it on every rank (the recorded norms are summed across ranks by the step's all-reduce), after a resume,
    with the number of the next optimizer step; call :meth:`after_step` after every completed optimizer step.
    """

    def __init__(self, engine: Any, interval: int, next_step: int):
        self.interval = interval
        optimizer = inner_optimizer(engine)
        if not isinstance(optimizer, RecordsLayers):
            raise ConfigError(f"--trust-ratio-interval needs one of our optimizers (SGD, LARS, LARC, LAMB: "
                              f"optimizers/); the config's optimizer is {type(optimizer).__name__}")
        self.optimizer: RecordsLayers = optimizer
        self.binding = bind_layouts(engine)  # SGD's flat partitions (LARS and LAMB are bound already)
        self.names = [name for name, _ in engine.module.named_parameters()]
        self.params = list(engine.module.parameters())
        self.tensor_layer = whole_layer_ids(engine)
        # whether each layer's group adapts (for a layer the optimizer skipped: it had no gradient at all)
        self.adapted = [False] * len(self.names)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self.tensor_layer:
                    self.adapted[self.tensor_layer[id(p)]] = bool(group.get("adapt", True))
        clipped = isinstance(self.optimizer, LARS) and any(g["clip"] for g in self.optimizer.param_groups)
        self.kind = "lars_would_apply" if isinstance(self.optimizer, SGD) else "larc_clipped" if clipped else "applied"
        self.arm(next_step)

    @classmethod
    def create(cls, engine: Any, interval: int, next_step: int) -> TrustRatioMonitor | None:
        """The monitor, or None when ``interval`` is 0 (then nothing at all happens)."""
        return cls(engine, interval, next_step) if interval > 0 else None

    def arm(self, step: int) -> None:
        """Make the optimizer record its next step when that is step number ``step`` (1-based) and due."""
        self.optimizer.record = step % self.interval == 0

    def after_step(self, step: int, samples: int, log: Any) -> dict[str, Any] | None:
        """After optimizer step ``step``: the record of that step if it was recorded (written by rank 0 to ``log``,
        a train.tracking.RunLog), and the optimizer armed for the next step."""
        stats = self.optimizer.take_records()
        self.arm(step + 1)
        if not stats or log is None:
            return None
        record: dict[str, Any] = {"kind": "layers", "step": step, "samples": samples,
                                  "optimizer": type(self.optimizer).__name__, "ratio": self.kind,
                                  "layers": self.layers(stats)}
        log.log(record, wandb_extra={f"trust_ratio/{e['name']}": e["trust_ratio"] for e in record["layers"]
                                     if e["trust_ratio"] is not None})
        return record

    def layers(self, stats: list[LayerStats]) -> list[dict[str, Any]]:
        """One entry per parameter tensor in the model's order, from the recorded groups."""
        entries: dict[int, dict[str, Any]] = {}
        for s in stats:
            ids = list(s.layers) if s.layers is not None else [self.tensor_layer[id(t)] for t in s.tensors or []]
            columns = [s.w_norm, s.g_norm] + ([s.ratio] if s.ratio is not None else []) + (
                [s.u_norm] if s.u_norm is not None else [])
            rows = torch.stack([c.double() for c in columns], 1).tolist() if ids else []  # one host read per group
            for layer, row in zip(ids, rows, strict=True):
                entry = {"name": self.names[layer], "w_norm": _finite(row[0]), "g_norm": _finite(row[1]),
                         "trust_ratio": _finite(row[2]) if s.ratio is not None else None,
                         "adapted": s.ratio is not None}
                if s.u_norm is not None:
                    entry["u_norm"] = _finite(row[-1])
                entries[layer] = entry
        for i, name in enumerate(self.names):  # not stepped (no gradient at all): the weight did not move
            if i not in entries:
                entries[i] = {"name": name, "w_norm": _finite(float(self.params[i].detach().double().norm())),
                              "g_norm": 0.0, "trust_ratio": None, "adapted": self.adapted[i]}
        if isinstance(self.optimizer, LAMB):
            for entry in entries.values():
                entry.setdefault("u_norm", None)
        return [entries[i] for i in range(len(self.names))]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
