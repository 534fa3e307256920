"""Elastic resume: a checkpoint of ZeRO stage 0, 1 or 2 continued on another number of ranks or another stage.

A DeepSpeed checkpoint holds the fp32 master weights and the optimizer state in the layout of the run that wrote
it: without ZeRO one tensor per parameter (in ``mp_rank_00_model_states.pt``), under ZeRO-1/2 one flat partition
per param group and rank (``zero_pp_rank_R_mp_rank_00_optim_states.pt``), a parameter possibly split between two
ranks. :func:`read_checkpoint` turns either into one tensor per parameter (:class:`ParameterState`: the master
weights, every elementwise optimizer state such as SGD's and LARS's ``momentum_buffer`` or LAMB's ``exp_avg`` and
``exp_avg_sq``, and each group's scalars such as LAMB's ``step`` or SGD's ``lr_prev``); :func:`apply` writes them
into the partitions of an engine built for the new world (``stepped_pieces`` of optimizers/deepspeed_layout.py says
where each parameter lies there). The module's weights and buffers, the lr schedule, DeepSpeed's step counters and
our position (train/checkpoints.py) are layout-free and come from ``engine.load_checkpoint(...,
load_optimizer_states=False)``, which DeepSpeed accepts on any world size.

Which parts are DeepSpeed's: the checkpoint files and their reader (``engine.load_checkpoint`` for everything but
the optimizer); where each piece of a parameter lies in a saved partition (the ``param_slice_mappings`` and
``param_shapes`` DeepSpeed writes for its universal checkpoints and ``zero_to_fp32``). Ours: reading every state
key, not only Adam's ``exp_avg``/``exp_avg_sq`` (DeepSpeed's ``ds_to_universal`` and its elastic ZeRO loader
assume Adam-like state and lose momentum buffers and per-group step counts of other optimizers), and writing into
the new partitions through the project's own layout code, which also binds LARS and LAMB to them.

Not re-sharded (refused by :func:`check_supported`): fp16 (its loss scaler is not carried yet), the bf16 optimizer
DeepSpeed uses for bf16 + ZeRO-1 with fp32 gradient accumulation (BF16_Optimizer), ZeRO-Offload, and a change of
precision (fp16 and bf16 carry different master and scaler state; train/checkpoints.py refuses it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.checkpoints import MODEL_FILE, CheckpointError, Layout, config_layout, load_file, resume_tag
from train.config import nearest, reachable_world_sizes

OPTIM_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
MASTER = "fp32"  # the key of the master weights beside the optimizer's state keys


class ReshardError(CheckpointError):
    """A checkpoint that cannot be carried into the new layout; the message says why and what to do."""


def engine_layout(engine: Any) -> Layout:
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return Layout(int(engine.dp_world_size), int(engine.zero_optimization_stage()), precision)


def check_supported(saved: Layout, now: Layout, ds_config: dict[str, Any] | None = None) -> None:
    """Refuse what :func:`apply` does not carry, naming it."""
    if saved.precision != now.precision:
        raise ReshardError(f"--resume: the checkpoint was written in {saved.precision}, this run is {now.precision}: "
                           f"fp16 and bf16 carry different master and loss-scaler state; resume with --precision "
                           f"{saved.precision}")
    if "fp16" in (saved.precision, now.precision):
        raise ReshardError(f"--resume: re-sharding fp16 checkpoints ({saved} -> {now}) is not supported yet (the "
                           f"dynamic loss scaler is not carried); resume with {saved.world_size} rank(s) and ZeRO "
                           f"stage {saved.zero_stage}")
    zero = (ds_config or {}).get("zero_optimization") or {}
    if isinstance(zero, dict) and zero.get("offload_optimizer"):
        raise ReshardError("--resume: re-sharding ZeRO-Offload checkpoints is not supported; resume with the run's "
                           "rank count and config")


@dataclass
class ParameterState:
    """A checkpoint's optimizer state, one tensor per parameter (flattened), independent of ranks and stage.

    ``groups``: the parameters of each param group, by name (ZeRO-1/2 checkpoints record names) or by position
    (``#i.j``: ZeRO-0 checkpoints store the optimizer's state by position; :func:`apply` names them from the new
    engine's groups, built by the same code). ``tensors``: per parameter, ``MASTER`` (absent where the module's
    weights are the masters: fp32 without ZeRO) and each elementwise state. ``scalars``: per group, the state that
    is one value per tensor stepped (LAMB's ``step``, SGD's ``lr_prev``)."""

    layout: Layout
    groups: list[list[str]]
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scalars: list[dict[str, Any]] = field(default_factory=list)

    def state_keys(self, group: int) -> list[str]:
        return sorted({k for name in self.groups[group] for k in self.tensors.get(name, {}) if k != MASTER})

    def describe(self) -> list[str]:
        lines = [f"saved layout: {self.layout}"]
        for i, names in enumerate(self.groups):
            numel = sum(self._numel(n) for n in names)
            keys = self.state_keys(i)
            scalars = ", ".join(f"{k}={_plain(v)}" for k, v in sorted(self.scalars[i].items())) or "none"
            lines.append(f"group {i}: {len(names)} parameters, {numel:,} elements; per element: "
                         f"{', '.join([MASTER] * any(MASTER in self.tensors.get(n, {}) for n in names) + keys)}; "
                         f"per group: {scalars}")
            lines += [f"  {n}: {self._numel(n):,} elements" for n in names]
        return lines

    def _numel(self, name: str) -> int:
        return max((t.numel() for t in self.tensors.get(name, {}).values()), default=0)


def _plain(v: Any) -> Any:
    return v.item() if torch.is_tensor(v) and v.numel() == 1 else v


def _agree(into: dict[str, Any], values: dict[str, Any], where: str) -> None:
    """Merge the per-tensor scalars of one group; they must be the same wherever they are kept."""
    for k, v in values.items():
        if k in into:
            a, b = into[k], v
            same = torch.equal(torch.as_tensor(a), torch.as_tensor(b)) if torch.is_tensor(a) or torch.is_tensor(b) \
                else a == b
            if not same:
                raise ReshardError(f"--resume: optimizer state {k!r} differs within {where} ({_plain(a)} and "
                                   f"{_plain(b)}): it is one value per flat partition after re-sharding; resume with "
                                   f"the run's rank count and ZeRO stage")
        else:
            into[k] = v.clone() if torch.is_tensor(v) else v


def read_checkpoint(tag_dir: Path) -> ParameterState:
    """The optimizer state of the checkpoint in ``tag_dir``, one tensor per parameter (see the module docstring)."""
    model = load_file(tag_dir / MODEL_FILE, map_location="cpu")
    layout = config_layout(model.get("ds_config") or {}, int(model.get("dp_world_size", 1)))
    return _read_zero(tag_dir, model, layout) if layout.zero_stage else _read_unpartitioned(model, layout)


def _read_zero(tag_dir: Path, model: dict[str, Any], layout: Layout) -> ParameterState:
    shapes = model.get("param_shapes")
    if not shapes:
        raise ReshardError(f"--resume: {tag_dir / MODEL_FILE} records no param_shapes; cannot re-shard it")
    groups = [list(g.keys()) for g in shapes]
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    scalars: list[dict[str, Any]] = [{} for _ in groups]
    for rank in range(layout.world_size):
        path = tag_dir / (("bf16_" if layout.precision == "bf16" else "") + OPTIM_FILE.format(rank))
        if not path.is_file():
            raise ReshardError(f"--resume: {path} is missing: a ZeRO-{layout.zero_stage} checkpoint of "
                               f"{layout.world_size} ranks has one optimizer file per rank")
        osd = load_file(path, map_location="cpu")["optimizer_state_dict"]
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict) or "state" not in base or "param_slice_mappings" not in osd:
            raise ReshardError(f"--resume: {path} is not a ZeRO-1/2 optimizer file this version reads (an elastic "
                               f"or BF16_Optimizer checkpoint?); resume with the run's rank count and config")
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            fp32 = osd["single_partition_of_fp32_groups"][i]
            size = fp32.numel() + int(osd["group_paddings"][i])
            state = base["state"].get(base["param_groups"][i]["params"][0], {})
            elementwise = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1 and v.numel() == size}
            _agree(scalars[i], {k: v for k, v in state.items() if k not in elementwise}, f"param group {i}")
            for name, frag in mapping.items():
                got = pieces.setdefault(name, {})
                for k, v in [(MASTER, fp32), *elementwise.items()]:
                    got.setdefault(k, []).append(v.narrow(0, frag.start, frag.numel))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for g, group in enumerate(shapes):
        for name, shape in group.items():
            numel = math.prod(shape)
            tensors[name] = {k: torch.cat(v) for k, v in pieces.get(name, {}).items()}
            wrong = {k: t.numel() for k, t in tensors[name].items() if t.numel() != numel}
            if wrong or MASTER not in tensors[name]:
                raise ReshardError(f"--resume: parameter {name} of group {g} ({numel} elements) was found as "
                                   f"{wrong or 'nothing'} in the saved partitions; the checkpoint is incomplete")
    return ParameterState(layout, groups, tensors, scalars)


def _read_unpartitioned(model: dict[str, Any], layout: Layout) -> ParameterState:
    opt = model.get("optimizer")
    if opt is None:
        raise ReshardError("--resume: the checkpoint holds no optimizer state (saved without it); cannot re-shard")
    inner = opt.get("optimizer_state_dict", opt)  # FP16_UnfusedOptimizer (bf16) wraps the optimizer's state_dict
    masters = opt.get("fp32_groups")  # its fp32 copies; fp32 without ZeRO: the module's weights are the masters
    groups: list[list[str]] = []
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: list[dict[str, Any]] = []
    for i, group in enumerate(inner["param_groups"]):
        names: list[str] = []
        merged: dict[str, Any] = {}
        for j, index in enumerate(group["params"]):
            name = f"#{i}.{j}"
            names.append(name)
            state = inner["state"].get(index, {})
            numel = masters[i][j].numel() if masters is not None else None
            ref = masters[i][j] if masters is not None else next(
                (v for v in state.values() if torch.is_tensor(v) and v.dim() > 0), None)
            elementwise = {k: v.reshape(-1) for k, v in state.items()
                           if torch.is_tensor(v) and ref is not None and v.shape == ref.shape and v.dim() > 0}
            _agree(merged, {k: v for k, v in state.items() if k not in elementwise}, f"param group {i}")
            tensors[name] = elementwise | ({MASTER: masters[i][j].reshape(-1).float()} if numel is not None else {})
        groups.append(names)
        scalars.append(merged)
    return ParameterState(layout, groups, tensors, scalars)


def _named(saved: ParameterState, names_of_groups: list[list[str]], numel: dict[str, int]) -> ParameterState:
    """``saved`` with every parameter named as in the new engine's groups; refuse a different grouping."""
    if len(saved.groups) != len(names_of_groups):
        raise ReshardError(f"--resume: the checkpoint has {len(saved.groups)} param groups, this run "
                           f"{len(names_of_groups)}: another optimizer or parameter grouping; resume with the run's "
                           f"config")
    rename: dict[str, str] = {}
    for i, (old, new) in enumerate(zip(saved.groups, names_of_groups, strict=True)):
        if all(n.startswith("#") for n in old):
            if len(old) != len(new):
                raise ReshardError(f"--resume: param group {i} held {len(old)} parameters, now {len(new)}: another "
                                   f"grouping; resume with the run's config")
            rename.update(zip(old, new, strict=True))
        elif sorted(old) != sorted(new):
            raise ReshardError(f"--resume: param group {i} holds other parameters than when saved "
                               f"({sorted(set(old) ^ set(new))[:3]} ...); resume with the run's config")
        else:
            rename.update({n: n for n in old})
    tensors = {rename[k]: v for k, v in saved.tensors.items()}
    for name, state in tensors.items():
        for k, t in state.items():
            if t.numel() != numel[name]:
                raise ReshardError(f"--resume: {k} of {name} has {t.numel()} elements, the parameter {numel[name]}; "
                                   f"another model; resume with the run's config")
    return ParameterState(saved.layout, names_of_groups, tensors, saved.scalars)


def apply(engine: Any, saved: ParameterState) -> None:
    """Write ``saved`` into the optimizer of ``engine`` (built for the new world, its module and schedule already
    loaded with ``load_checkpoint(load_optimizer_states=False)``): the master weights and each state into this
    rank's pieces of every tensor the optimizer steps (padding stays zero), each group's scalars beside them."""
    from optimizers import deepspeed_layout

    params = list(engine.module.named_parameters())
    name_of = [n for n, _ in params]
    saved = _named(saved, [[name_of[i] for i in g] for g in deepspeed_layout.param_group_layers(engine)],
                   {n: p.numel() for n, p in params})
    inner = deepspeed_layout.inner_optimizer(engine)
    exact = saved.layout.precision == "fp32"
    with torch.no_grad():
        for group, tensor, pieces in deepspeed_layout.stepped_pieces(engine):
            flat = tensor.view(-1)
            state: dict[str, Any] = {k: torch.zeros_like(flat) for k in saved.state_keys(group)}
            for pc in pieces:
                name = name_of[pc.layer]
                tensors = saved.tensors[name]
                if MASTER not in tensors:  # fp32 without ZeRO: the module's weights, which DeepSpeed has loaded
                    tensors = {MASTER: params[pc.layer][1].detach().reshape(-1).float(), **tensors}
                for k, t in tensors.items():
                    src = t.narrow(0, pc.param_start, pc.numel).to(flat.device, flat.dtype)
                    dst = flat.narrow(0, pc.start, pc.numel) if k == MASTER else state[k].narrow(0, pc.start, pc.numel)
                    if k == MASTER and exact and not torch.equal(dst, src):  # DeepSpeed loaded the same fp32 weights
                        raise ReshardError(f"--resume: the saved fp32 master weights of {name} differ from the "
                                           f"module's; the saved partitions were misread")
                    dst.copy_(src)
            state = {k: v.view_as(tensor) for k, v in state.items()}
            for k, v in saved.scalars[group].items():
                state[k] = v.clone().to(tensor.device) if torch.is_tensor(v) else v
            inner.state.pop(tensor, None)
            if state:
                inner.state[tensor] = state
    relink = getattr(engine.optimizer, "_link_all_hp_params", None)
    if callable(relink):  # what DeepSpeed's own ZeRO load does after restoring the state (safe_get_* helpers)
        relink()


def resume_resharded(checkpointer: Any, engine: Any, say: Any = print) -> tuple[Any, dict[str, Any]]:
    """``--resume`` into another world size or ZeRO stage: the checkpoint 'latest' names read one tensor per
    parameter, the module, schedule, counters and position loaded by DeepSpeed (``checkpointer.resume`` without
    optimizer states), then the optimizer state written into this world's partitions. Returns what
    ``checkpointer.resume`` returns."""
    tag = resume_tag(checkpointer.dir)
    if tag is None:
        return checkpointer.resume()  # its message: no checkpoint to resume
    saved = read_checkpoint(checkpointer.dir / tag)
    now = engine_layout(engine)
    check_supported(saved.layout, now, engine.config if isinstance(engine.config, dict) else None)
    pos, client = checkpointer.resume(optimizer_states=False)
    apply(engine, saved)
    say(f"re-sharded checkpoint {tag}: {saved.layout} -> {now}")
    return pos, client


# -- the offline converter ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.reshard",
        description="Show how a run's latest checkpoint would resume on another rank count or ZeRO stage, and write "
                    "its optimizer state one tensor per parameter (per_parameter_state.pt beside it) for inspection.")
    parser.add_argument("run_dir", type=Path, help="the run folder (holding config.json and checkpoints/)")
    parser.add_argument("--to-world", type=int, required=True, help="the number of ranks to resume on")
    parser.add_argument("--to-stage", type=int, choices=(0, 1, 2), default=None,
                        help="the ZeRO stage to resume with (default: the run's)")
    parser.add_argument("--dry-run", action="store_true", help="print only; write nothing")
    args = parser.parse_args(argv)
    try:
        derived = json.loads((args.run_dir / "config.json").read_text())["derived"]
        ckpt_dir = args.run_dir / "checkpoints"
        tag = resume_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    except (FileNotFoundError, json.JSONDecodeError, KeyError, CheckpointError) as e:
        print(f"error: {args.run_dir} is not a run folder with a checkpoint ({e})", file=sys.stderr)
        return 2
    if tag is None:
        print(f"error: {args.run_dir / 'checkpoints'} holds no checkpoint ('latest' is missing)", file=sys.stderr)
        return 2
    batch, micro = int(derived["global_batch"]), int(derived["micro_batch"])
    ok = reachable_world_sizes(batch, micro)
    if args.to_world not in ok:
        print(f"error: --to-world {args.to_world} cannot reach the global batch {batch:,} with micro batch {micro} "
              f"per rank; world sizes that can: {nearest(ok, args.to_world)} (all: {', '.join(map(str, ok))})",
              file=sys.stderr)
        return 2
    try:
        saved = read_checkpoint(ckpt_dir / tag)
        target = Layout(args.to_world, saved.layout.zero_stage if args.to_stage is None else args.to_stage,
                        saved.layout.precision)
        check_supported(saved.layout, target)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = ckpt_dir / tag / "per_parameter_state.pt"
    print(f"checkpoint {ckpt_dir / tag}")
    print("\n".join(saved.describe()))
    print(f"target layout: {target}: global batch {batch:,} = {micro} micro x {batch // (micro * args.to_world)} "
          f"accumulation x {args.to_world} ranks (was x {batch // (micro * saved.layout.world_size)} accumulation x "
          f"{saved.layout.world_size})")
    print(f"--resume on {args.to_world} rank(s) re-shards this state into the new partitions when the engine is built")
    if args.dry_run:
        print(f"would write {out}")
        return 0
    torch.save({"layout": vars(saved.layout), "groups": saved.groups, "tensors": saved.tensors,
                "scalars": saved.scalars}, out)
    print(f"wrote {out} ({sum(t.numel() for s in saved.tensors.values() for t in s.values()):,} elements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
