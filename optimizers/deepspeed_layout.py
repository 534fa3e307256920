"""Make layer-wise optimizers exact under DeepSpeed's optimizer wrappers (0.19.x).

What each DeepSpeed mode hands the client optimizer to step (read from deepspeed 0.19.8's source):

==========================================  ===========================  ============================================
mode                                        engine.optimizer             tensors the client optimizer steps
==========================================  ===========================  ============================================
fp32, ZeRO off                              the client optimizer         the model's parameters
fp16, ZeRO off; bf16, ZeRO off              FP16_UnfusedOptimizer        one fp32 copy per parameter (grads unscaled)
ZeRO-1/2 (fp32, fp16 or bf16)               DeepSpeedZeroOptimizer       ONE flat fp32 partition per group and rank
bf16 + ZeRO-1 + fp32 grad accumulation      BF16_Optimizer               ONE flat fp32 partition per group and rank
==========================================  ===========================  ============================================

A flat partition is the rank's slice of the concatenation of all parameters of a param group, with alignment
padding between parameters and at the end; a parameter can straddle two ranks. ``bind_deepspeed`` reads where
each model parameter lies in the flat buffer (the model's low-precision parameters are views into it), intersects
that with this rank's partition, and gives the inner optimizer a ``FlatLayout`` (segments, layer ids, the
data-parallel group) for each flat partition. Per-parameter fp32 copies are declared whole layers, and the
zero-gradient step that FP16_UnfusedOptimizer takes inside ``deepspeed.initialize`` is undone. Any other
wrapper (ZeRO-3, ZeRO-Offload, the fused FP16_Optimizer, ...), and tensor or pipeline parallelism
(``engine.mpu``), raise instead of silently computing norms over flat chunks or shards.

Exact means: the weights of plain PyTorch stepping the same optimizer on the mean gradient, when every parameter
has a gradient every step. Under ZeRO-1/2 a parameter without one (an unused branch) gets a zero gradient in the
flat buffer and is stepped: LARS applies its weight decay, LAMB advances its moments and applies its weight decay,
momentum keeps moving it, where plain PyTorch skips it. Stages agree with ZeRO-0 to fp32 rounding (the sums over
ranks and micro-steps are taken in another order), not bit for bit; tests/test_optimizers_deepspeed.py measures
both against float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._layerwise import FlatLayout, LayerwiseOptimizer, RecordsLayers, Segment

__all__ = ["DeepSpeedBinding", "Piece", "bind_deepspeed", "bind_layouts", "inner_optimizer", "param_group_layers",
           "stepped_pieces", "whole_layer_ids"]


@dataclass(frozen=True)
class DeepSpeedBinding:
    """What ``bind_deepspeed`` did, for logging: ``print(binding)`` on rank 0."""

    wrapper: str
    layout: str
    tensors: int = 0
    layers_here: int = 0
    split_layers: tuple[int, ...] = ()
    padding: int = 0
    undid_init_step: bool = False

    def __str__(self) -> str:
        undo = "; undid the zero-gradient step taken in deepspeed.initialize" if self.undid_init_step else ""
        if self.layout in ("not layer-wise", "model parameters"):
            return f"bind_deepspeed: {self.wrapper}: {self.layout}, nothing to bind{undo}"
        split = f", {len(self.split_layers)} layer(s) split across ranks {list(self.split_layers)}"
        return (f"bind_deepspeed: {self.wrapper}: {self.tensors} {self.layout} bound, {self.layers_here} layers "
                f"on this rank{split if self.split_layers else ''}, {self.padding} padding elements{undo}")


def _offset_in(flat: Tensor, t: Tensor) -> int:
    """Element offset of ``t`` inside ``flat``; raises if ``t`` is not a contiguous view into ``flat``."""
    size = flat.element_size()
    delta = t.data_ptr() - flat.data_ptr()
    offset = delta // size
    if (t.dtype != flat.dtype or delta % size or not t.is_contiguous() or offset < 0
            or offset + t.numel() > flat.numel()):
        raise RuntimeError("bind_deepspeed: a model parameter is not a contiguous view into its group's flat "
                           "buffer; this DeepSpeed version's layout is not understood")
    return offset


def _intersect(pieces: list[tuple[int, int, int]], start: int, numel: int) -> list[Segment]:
    """Segments of partition ``[start, start + numel)`` from (flat offset, numel, layer) of each parameter."""
    segments = []
    for offset, n, layer in sorted(pieces):
        lo, hi = max(offset, start), min(offset + n, start + numel)
        if lo < hi:
            segments.append(Segment(lo - start, hi - lo, layer))
    return segments


def _holds(inner: RecordsLayers, i: int, hp: Tensor) -> bool:
    """Whether param group ``i`` of ``inner`` steps exactly the one tensor ``hp``."""
    return i < len(inner.param_groups) and len(inner.param_groups[i]["params"]) == 1 and (
        inner.param_groups[i]["params"][0] is hp)


def _group_size(group: Any) -> int:
    return dist.get_world_size(group=group) if dist.is_initialized() else 1


def _flat_layout(inner: RecordsLayers, hp: Tensor, pieces: list[tuple[int, int, int]], part_start: int,
                 num_layers: int, group: Any, sizes: dict[int, int], split: set[int]) -> FlatLayout:
    segments = _intersect(pieces, part_start, hp.numel())
    layout = FlatLayout(hp.numel(), tuple(segments), num_layers, group if _group_size(group) > 1 else None,
                        group_layers=tuple(sorted({layer for _, _, layer in pieces})))
    inner.set_layout(hp, layout)
    for seg in segments:
        if seg.numel != sizes[seg.layer]:
            split.add(seg.layer)
    return layout


def _check_padding_zero(hp: Tensor, layout: FlatLayout) -> None:
    mask = torch.ones(hp.numel(), dtype=torch.bool, device=hp.device)
    for seg in layout.segments:
        mask[seg.start:seg.start + seg.numel] = False
    if bool(hp.detach().view(-1)[mask].ne(0).any()):  # once, at bind time
        raise RuntimeError("bind_deepspeed: padding elements of a flat partition are not zero; layout misread")


def _bind_flat(wrapper: Any, inner: RecordsLayers, what: str, hps: list[Tensor], flats: list[Tensor],
               partitions: list[list[Tensor]], pieces_of: Any, num_layers: int,
               sizes: dict[int, int]) -> DeepSpeedBinding:
    """Bind every flat fp32 partition ``hps[i]``: the rank's slice ``partitions[i][rank]`` of ``flats[i]``, whose
    parameters ``pieces_of(i, flat)`` gives as (offset in flat, numel, layer)."""
    split: set[int] = set()
    padding = 0
    layers_here: set[int] = set()
    for i, hp in enumerate(hps):
        if not _holds(inner, i, hp):
            raise RuntimeError(f"bind_deepspeed: param group {i} of the inner optimizer does not hold the {what} "
                               f"fp32 partition of group {i}; layout not understood")
        group = wrapper.real_dp_process_group[i]
        flat = flats[i]
        part = partitions[i][dist.get_rank(group=group)]
        if part.numel() != hp.numel():
            raise RuntimeError(f"bind_deepspeed: {what} partition of group {i} has {part.numel()} elements, its fp32 "
                               f"copy {hp.numel()}")
        layout = _flat_layout(inner, hp, pieces_of(i, flat), _offset_in(flat, part), num_layers, group, sizes, split)
        _check_padding_zero(hp, layout)
        padding += layout.padding
        layers_here.update(seg.layer for seg in layout.segments)
    return DeepSpeedBinding(type(wrapper).__name__, f"flat {what} partition(s)", len(hps), len(layers_here),
                            tuple(sorted(split)), padding)


def _bind_zero_1_2(wrapper: Any, inner: RecordsLayers, layer_of: dict[int, int], num_layers: int,
                   sizes: dict[int, int]) -> DeepSpeedBinding:
    if getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "zenflow", False):
        raise NotImplementedError("bind_deepspeed: ZeRO-Offload / ZenFlow keep the fp32 partition on the CPU and "
                                  "step it elsewhere; layer-wise optimizers are bound for ZeRO-1/2 without offload")

    def pieces_of(i: int, flat: Tensor) -> list[tuple[int, int, int]]:
        pieces = []
        for p, offset, meta in zip(wrapper.round_robin_bit16_groups[i], wrapper.round_robin_bit16_offsets[i],
                                   wrapper.round_robin_bit16_meta[i], strict=True):
            if p.numel() == meta.numel() and _offset_in(flat, p) != offset:
                raise RuntimeError("bind_deepspeed: ZeRO's recorded parameter offset disagrees with its storage")
            pieces.append((offset, meta.numel(), layer_of[id(p)]))
        return pieces

    return _bind_flat(wrapper, inner, "ZeRO", wrapper.single_partition_of_fp32_groups, wrapper.bit16_groups_flat,
                      wrapper.parallel_partitioned_bit16_groups, pieces_of, num_layers, sizes)


def _bind_bf16(wrapper: Any, inner: RecordsLayers, layer_of: dict[int, int], num_layers: int,
               sizes: dict[int, int]) -> DeepSpeedBinding:
    def pieces_of(i: int, flat: Tensor) -> list[tuple[int, int, int]]:
        return [(_offset_in(flat, p), p.numel(), layer_of[id(p)]) for p in wrapper.bf16_groups[i]]

    return _bind_flat(wrapper, inner, "bf16", wrapper.fp32_groups_flat_partition, wrapper.bf16_groups_flat,
                      wrapper.bf16_partitioned_groups, pieces_of, num_layers, sizes)


def _undo_init_step(engine: Any, wrapper: Any) -> bool:
    """Undo the zero-gradient step FP16_UnfusedOptimizer takes inside ``deepspeed.initialize``.

    ``FP16_UnfusedOptimizer.initialize_optimizer_states`` (deepspeed 0.19.8) sets every gradient to zero and calls
    the inner ``step()`` to create optimizer state. That is a real step: weight decay moves the fp32 master weights
    (LAMB: ``u = wd * w`` with trust ratio ``1 / wd`` shrinks every weight by ``lr``), the momentum buffers start
    at ``wd * w`` and LAMB's step count at 1. The model's low-precision parameters are not touched by it and the
    fp32 copies were cloned from them, so copying them back and dropping the optimizer state restores exactly the
    state before that step. Done only before the first training step (``engine.global_steps == 0``), and always
    then: a stateless optimizer (momentum 0 with weight decay) leaves no state behind, but its weights moved too.
    """
    inner = wrapper.optimizer
    if engine.global_steps != 0:
        return False
    with torch.no_grad():
        for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for lp, hp in zip(lp_group, hp_group, strict=True):
                hp.copy_(lp)
                inner.state.pop(hp, None)
    return True


def _bind_unfused(engine: Any, wrapper: Any, layer_of: dict[int, int]) -> DeepSpeedBinding:
    inner = wrapper.optimizer
    repaired = _undo_init_step(engine, wrapper)
    count = 0
    for i, (lp_group, hp_group) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)):
        if inner.param_groups[i]["params"] is not hp_group:
            raise RuntimeError(f"bind_deepspeed: param group {i} of the inner optimizer does not hold the fp32 copies")
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp.shape != hp.shape or id(lp) not in layer_of:
                raise RuntimeError("bind_deepspeed: an fp32 copy does not match its model parameter")
            if isinstance(inner, LayerwiseOptimizer):
                inner.declare_whole_layer(hp)
            count += 1
    layout = "per-parameter fp32 copies" if isinstance(inner, LayerwiseOptimizer) else "not layer-wise"
    return DeepSpeedBinding(type(wrapper).__name__, layout, count, count, undid_init_step=repaired)


def _refuse_model_parallel(engine: Any, inner: Any) -> None:
    """Layer-wise optimizers with tensor or pipeline parallelism (``engine.mpu``): not supported yet.

    A tensor-parallel rank holds a shard of a layer; its norm is not the layer's norm, and a trust ratio from it
    differs from rank to rank. Elementwise optimizers (SGD) are exact on shards and pass.
    """
    mpu = getattr(engine, "mpu", None)
    if mpu is not None and isinstance(inner, LayerwiseOptimizer):
        raise NotImplementedError(
            f"bind_deepspeed: the engine has a model-parallel unit (engine.mpu = {type(mpu).__name__}: tensor or "
            f"pipeline parallelism); {type(inner).__name__} would take a tensor-parallel shard of a layer for the "
            "whole layer and compute its trust ratio over the shard. Layer-wise optimizers support data parallelism "
            "only (ZeRO 0/1/2); use SGD, or run without engine.mpu.")


def bind_deepspeed(engine: Any) -> DeepSpeedBinding:
    """Bind the layer-wise optimizer inside ``engine`` (from ``deepspeed.initialize``) to the real layers.

    Call once, right after ``deepspeed.initialize`` and before the first step, on every rank. Binds nothing for
    optimizers without trust ratios (SGD, torch optimizers) and for fp32 runs without ZeRO. Under
    FP16_UnfusedOptimizer (fp16/bf16 without ZeRO) it also undoes, for any optimizer, the zero-gradient step that
    wrapper takes during ``deepspeed.initialize`` (see ``_undo_init_step``). Raises ``NotImplementedError`` for
    wrappers whose layout it does not know, and for a layer-wise optimizer under tensor or pipeline parallelism
    (``engine.mpu``), rather than let a trust ratio be computed over a flat chunk of layers or a shard of one.
    """
    wrapper = engine.optimizer
    if wrapper is None:
        raise ValueError("bind_deepspeed: the engine has no optimizer; pass one to deepspeed.initialize")
    if isinstance(wrapper, torch.optim.Optimizer) and not hasattr(wrapper, "optimizer"):
        name = type(wrapper).__name__
        if not isinstance(wrapper, LayerwiseOptimizer):
            return DeepSpeedBinding(name, "not layer-wise")
        _refuse_model_parallel(engine, wrapper)
        model_params = {id(p) for p in engine.module.parameters()}
        if any(id(p) not in model_params for g in wrapper.param_groups for p in g["params"]):
            raise RuntimeError("bind_deepspeed: the optimizer steps tensors that are not the model's parameters")
        return DeepSpeedBinding(name, "model parameters")
    inner = getattr(wrapper, "optimizer", None)
    kind = type(wrapper).__name__
    _refuse_model_parallel(engine, inner)
    params = list(engine.module.parameters())
    layer_of = {id(p): i for i, p in enumerate(params)}
    if kind == "FP16_UnfusedOptimizer":  # for every optimizer: the init-step repair is not about trust ratios
        return _bind_unfused(engine, wrapper, layer_of)
    if not isinstance(inner, LayerwiseOptimizer):
        return DeepSpeedBinding(kind, "not layer-wise")
    sizes = {i: p.numel() for i, p in enumerate(params)}
    if kind == "DeepSpeedZeroOptimizer":
        return _bind_zero_1_2(wrapper, inner, layer_of, len(params), sizes)
    if kind == "BF16_Optimizer":
        return _bind_bf16(wrapper, inner, layer_of, len(params), sizes)
    raise NotImplementedError(
        f"bind_deepspeed: DeepSpeed optimizer wrapper {kind} is not supported with the layer-wise optimizer "
        f"{type(inner).__name__}: its trust ratios would be computed over flat chunks that mix layers. Supported: "
        "no wrapper (fp32), FP16_UnfusedOptimizer (fp16/bf16 without ZeRO), DeepSpeedZeroOptimizer (ZeRO-1/2 "
        "without offload), BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation).")


def inner_optimizer(engine: Any) -> Any:
    """The optimizer that steps the tensors: the client optimizer inside DeepSpeed's wrapper, or the engine's own."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper) if not isinstance(wrapper, RecordsLayers) else wrapper


def bind_layouts(engine: Any) -> DeepSpeedBinding:
    """Give an optimizer that only records per-layer norms (SGD, for diagnostics) the flat layouts that
    ``bind_deepspeed`` gives LARS and LAMB. A layer-wise optimizer is bound already: nothing is done."""
    inner = inner_optimizer(engine)
    kind = type(engine.optimizer).__name__
    if isinstance(inner, LayerwiseOptimizer) or not isinstance(inner, RecordsLayers):
        return DeepSpeedBinding(kind, "not layer-wise" if not isinstance(inner, RecordsLayers) else "bound already")
    params = list(engine.module.parameters())
    layer_of = {id(p): i for i, p in enumerate(params)}
    sizes = {i: p.numel() for i, p in enumerate(params)}
    if kind == "DeepSpeedZeroOptimizer":
        return _bind_zero_1_2(engine.optimizer, inner, layer_of, len(params), sizes)
    if kind == "BF16_Optimizer":
        return _bind_bf16(engine.optimizer, inner, layer_of, len(params), sizes)
    return DeepSpeedBinding(kind, "model parameters" if inner is engine.optimizer else "per-parameter fp32 copies")


def whole_layer_ids(engine: Any) -> dict[int, int]:
    """``id`` of each tensor the inner optimizer steps as one whole layer -> the layer's index in
    ``engine.module.parameters()``: the parameters themselves (fp32, ZeRO-0) or FP16_UnfusedOptimizer's fp32
    copies. Flat partitions are not listed (their layouts name the layers)."""
    params = list(engine.module.parameters())
    ids = {id(p): i for i, p in enumerate(params)}
    wrapper = engine.optimizer
    if type(wrapper).__name__ == "FP16_UnfusedOptimizer":
        for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for lp, hp in zip(lp_group, hp_group, strict=True):
                ids[id(hp)] = ids[id(lp)]
    return ids


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, start + numel)`` of a tensor the inner optimizer steps are elements
    ``[param_start, param_start + numel)`` of the flattened model parameter ``layer`` (its index in
    ``engine.module.parameters()``)."""

    layer: int
    start: int
    param_start: int
    numel: int


def stepped_pieces(engine: Any) -> list[tuple[int, Tensor, list[Piece]]]:
    """Every tensor the inner optimizer steps on this rank, with its param group's index and the pieces of model
    parameters it holds (elements outside every piece are padding): what re-sharding a checkpoint onto this engine
    writes into (train/reshard.py). Known: no wrapper (fp32, ZeRO off: the parameters themselves),
    FP16_UnfusedOptimizer (one fp32 copy per parameter), DeepSpeedZeroOptimizer (ZeRO-1/2 without offload: one flat
    fp32 partition per group, a parameter possibly split across ranks); any other wrapper raises."""
    wrapper = engine.optimizer
    params = list(engine.module.parameters())
    layer_of = {id(p): i for i, p in enumerate(params)}
    kind = type(wrapper).__name__
    out: list[tuple[int, Tensor, list[Piece]]] = []
    if isinstance(wrapper, torch.optim.Optimizer) and not hasattr(wrapper, "optimizer"):
        for i, group in enumerate(wrapper.param_groups):
            out += [(i, p, [Piece(layer_of[id(p)], 0, 0, p.numel())]) for p in group["params"]]
        return out
    if kind == "FP16_UnfusedOptimizer":
        for i, (lp_group, hp_group) in enumerate(zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)):
            out += [(i, hp, [Piece(layer_of[id(lp)], 0, 0, hp.numel())]) for lp, hp in zip(lp_group, hp_group,
                                                                                           strict=True)]
        return out
    if kind == "DeepSpeedZeroOptimizer" and not getattr(wrapper, "cpu_offload", False):
        for i, hp in enumerate(wrapper.single_partition_of_fp32_groups):
            flat = wrapper.bit16_groups_flat[i]
            part = wrapper.parallel_partitioned_bit16_groups[i][dist.get_rank(group=wrapper.real_dp_process_group[i])]
            start = _offset_in(flat, part)
            pieces = []
            for p, offset, meta in zip(wrapper.round_robin_bit16_groups[i], wrapper.round_robin_bit16_offsets[i],
                                       wrapper.round_robin_bit16_meta[i], strict=True):
                lo, hi = max(offset, start), min(offset + meta.numel(), start + hp.numel())
                if lo < hi:
                    pieces.append(Piece(layer_of[id(p)], lo - start, lo - offset, hi - lo))
            out.append((i, hp, pieces))
        return out
    raise NotImplementedError(
        f"stepped_pieces: DeepSpeed optimizer wrapper {kind}"
        f"{' with offload' if kind == 'DeepSpeedZeroOptimizer' else ''} is not understood; "
        f"known: no wrapper (fp32, ZeRO off), FP16_UnfusedOptimizer (fp16/bf16, ZeRO off), "
        f"DeepSpeedZeroOptimizer (ZeRO-1/2 without offload)")


def param_group_layers(engine: Any) -> list[list[int]]:
    """The model parameters of each param group (their indices in ``engine.module.parameters()``), in the order the
    optimizer holds them (DeepSpeed's ZeRO keeps the client optimizer's groups and order)."""
    wrapper = engine.optimizer
    layer_of = {id(p): i for i, p in enumerate(engine.module.parameters())}
    kind = type(wrapper).__name__
    if kind == "FP16_UnfusedOptimizer":
        groups = wrapper.fp16_groups
    elif kind == "DeepSpeedZeroOptimizer":
        groups = wrapper.bit16_groups
    else:
        groups = [g["params"] for g in wrapper.param_groups]
    return [[layer_of[id(p)] for p in g] for g in groups]
