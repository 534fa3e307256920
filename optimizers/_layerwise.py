"""Per-layer norms that stay exact when a wrapper flattens and shards the parameters.

A layer-wise optimizer (LARS, LAMB) needs ``||w||`` and ``||g||`` (or ``||u||``) of each real layer. Plain
PyTorch hands it one tensor per layer, and the norm of the tensor is the norm of the layer. DeepSpeed's ZeRO-1/2
and bf16 wrappers instead hand it ONE flat fp32 partition per param group and rank: a slice of the concatenation
of many layers, cut wherever the partition boundary falls, with alignment padding. The norm of that slice is not
the norm of any layer.

A ``FlatLayout`` says, for one stepped tensor, which element ranges (``Segment``) belong to which layer and which
process group holds the other pieces. Each step computes one partial squared norm per segment, sums them per
layer with ``index_add_``, sums across ranks with one ``all_reduce`` for all layers of the param group, and reads
each segment's layer norm back with ``index_select``. Elements outside every segment are padding: they enter no
norm and the optimizers never write them.

``optimizers.deepspeed_layout.bind_deepspeed`` builds the layouts from a DeepSpeed engine. Without a layout, each
stepped tensor is taken to be one whole layer. As a guard against a forgotten binding, a layer-wise optimizer
refuses to step a tensor that it was not constructed with and whose shape is not the shape of any parameter it was
constructed with (the signature of a wrapper having swapped in flat partitions), unless ``allow_unbound`` is set.
Per-parameter copies (DeepSpeed's fp16/bf16 wrapper without ZeRO) keep their shapes and pass: they are exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ._eager import EagerBookkeeping

#: Devices on which a bound flat partition (ZeRO-1/2, bf16) is stepped as ONE tensor with a per-element ratio
#: (:meth:`FlatLayout.per_element`) instead of one 0-dim ratio per segment. torch 2.14's foreach kernels take their
#: fused multi-tensor path only when corresponding tensors have equal sizes, so ``_foreach_addcmul_`` with a list of
#: 0-dim ratios launches one kernel per segment on a GPU (161 on ResNet-50); no foreach overload takes
#: per-tensor scalars that live on the device (``ScalarList`` and the ``Tensor scalars`` overload are read on the
#: host). The price is one partition-sized ratio buffer per step, which on CPU (where every foreach op is a loop of
#: per-tensor ops anyway) costs page faults and saves nothing: CPU keeps the per-segment form.
FUSED_FLAT_DEVICES: tuple[str, ...] = ("cuda", "xpu", "hpu", "mps")


def fused_flat(device: torch.device) -> bool:
    """Whether LARS and LAMB step a bound flat partition on ``device`` as one tensor (``FUSED_FLAT_DEVICES``)."""
    return device.type in FUSED_FLAT_DEVICES


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, start + numel)`` of a flat tensor, all belonging to layer ``layer``."""

    start: int
    numel: int
    layer: int


@dataclass(eq=False)
class FlatLayout:
    """Which elements of one stepped tensor belong to which layer of the model.

    ``num_layers`` is the number of layers the segment ids index (the model's parameter count), the same on every
    rank. ``process_group`` is the group whose ranks hold the other pieces of the same layers; ``None`` means
    every layer is complete on this rank and nothing is summed across ranks. ``group_layers``: every layer of the
    param group, on any rank (what a recorded step reports; empty: the layers of this rank's segments).
    """

    numel: int
    segments: tuple[Segment, ...]
    num_layers: int
    process_group: Any = None
    group_layers: tuple[int, ...] = ()
    _index_cache: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)
    _run_cache: dict[torch.device, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        end = 0
        for seg in self.segments:
            if seg.numel <= 0 or seg.start < end or seg.start + seg.numel > self.numel:
                raise ValueError(f"segments must be non-empty, sorted, disjoint and inside {self.numel} elements; "
                                 f"got {seg} after element {end}")
            if not 0 <= seg.layer < self.num_layers:
                raise ValueError(f"segment layer {seg.layer} outside [0, {self.num_layers})")
            end = seg.start + seg.numel

    def layer_index(self, device: torch.device) -> Tensor:
        """Layer id of each segment, cached on ``device`` so that step() copies nothing host-to-device."""
        if device not in self._index_cache:
            ids = [seg.layer for seg in self.segments]
            self._index_cache[device] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._index_cache[device]

    def per_element(self, values: Tensor) -> Tensor:
        """``values[i]`` (one per segment) repeated over segment ``i``'s elements, 0 on padding: a tensor of
        ``numel`` elements built by two kernels (index_select, repeat_interleave with its output size given, so no
        host sync); the runs of segments and padding are cached on the device."""
        device = values.device
        if device not in self._run_cache:
            slots, lengths, end, zero = [], [], 0, len(self.segments)
            for i, seg in enumerate(self.segments):
                if seg.start > end:
                    slots.append(zero)
                    lengths.append(seg.start - end)
                slots.append(i)
                lengths.append(seg.numel)
                end = seg.start + seg.numel
            if end < self.numel:
                slots.append(zero)
                lengths.append(self.numel - end)
            self._run_cache[device] = (torch.tensor(slots, dtype=torch.long, device=device),
                                       torch.tensor(lengths, dtype=torch.long, device=device))
        slots_t, lengths_t = self._run_cache[device]
        padded = torch.cat([values, values.new_zeros(1)])
        return padded.index_select(0, slots_t).repeat_interleave(lengths_t, output_size=self.numel)

    @property
    def padding(self) -> int:
        return self.numel - sum(seg.numel for seg in self.segments)


@dataclass
class NormPlan:
    """How the per-segment norms of one param group combine into per-layer norms.

    ``layer_index is None``: each segment is a whole layer (plain per-parameter tensors) and nothing is summed.
    ``dtype``/``device``: of the norms, also when this rank holds no segment of the group (only padding) and still
    takes part in the group's ``all_reduce``. ``record``: :func:`layer_norms` leaves its per-layer norms in
    ``recorded`` (``"w"``, ``"x"``; the optimizer adds the ``"ratio"`` it applied), for diagnostics.
    ``group_layers``: the layers (ids) of a bound group on every rank; set only for a step that records.
    """

    layer_index: Tensor | None = None
    num_layers: int = 0
    process_group: Any = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    record: bool = False
    recorded: dict[str, Tensor] | None = None
    group_layers: tuple[int, ...] = ()


def layer_norms(xs: Sequence[Tensor], ys: Sequence[Tensor], plan: NormPlan, foreach: bool) -> tuple[Tensor, Tensor]:
    """Norms of the layers that segments ``xs[i]``/``ys[i]`` belong to, as two vectors of ``len(xs)`` (>= fp32).

    One norm kernel per segment, one ``index_add_`` and at most one ``all_reduce`` for all layers; no host sync.
    Norms are computed in fp32 at least (an fp16 norm overflows above 65,504). With no segments at all (no
    gradient this step, or a rank whose share of the group is only padding) the vectors are empty, and a bound
    group's ``all_reduce`` still takes place: every rank of the group must enter it every step.
    """
    tensors = list(xs) + list(ys)
    dtype = plan.dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    if not tensors:
        stacked = torch.zeros(0, dtype=dtype, device=plan.device)
    elif not foreach:
        stacked = torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])
    elif all(_blas_dot_norm(t) for t in tensors):
        # On CPU torch's norm kernel runs on one thread whatever torch.get_num_threads() says (torch 2.14: 245 us
        # for 2.4M floats at 1 and at 2 threads), while BLAS's dot uses them all (175 us, then 91 us) and, summing
        # in blocks, is also the more accurate of the two (5e-6 against 4e-5 relative error at 2.4M elements).
        flats = [t.view(-1) for t in tensors]
        stacked = torch.stack([torch.dot(f, f) for f in flats]).sqrt_()
    else:
        stacked = torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))  # on CUDA: one fused kernel
    stacked = stacked.to(dtype)
    n = len(xs)
    if plan.layer_index is None:
        if plan.record:  # each segment is a whole layer
            plan.recorded = {"w": stacked[:n], "x": stacked[n:]}
        return stacked[:n], stacked[n:]
    squares = (stacked * stacked).view(2, n)
    per_layer = squares.new_zeros(2, plan.num_layers).index_add_(1, plan.layer_index, squares)
    if plan.process_group is not None:
        dist.all_reduce(per_layer, op=dist.ReduceOp.SUM, group=plan.process_group)
    per_layer.sqrt_()
    if plan.record:  # every layer of the group, also those of other ranks: the all-reduce brought them here
        ids = torch.tensor(plan.group_layers, dtype=torch.long, device=per_layer.device)
        plan.recorded = {"w": per_layer[0].index_select(0, ids), "x": per_layer[1].index_select(0, ids)}
    per_segment = per_layer.index_select(1, plan.layer_index)
    return per_segment[0], per_segment[1]


def _blas_dot_norm(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.is_contiguous()


def trust_ratio(w_norm: Tensor, x_norm: Tensor, *, coefficient: float = 1.0, weight_decay: float = 0.0,
                eps: float = 0.0, max_ratio: float | None = None, min_ratio: float | None = None) -> Tensor:
    """Layer-wise trust ratios, elementwise over vectors of layer norms (one tensor op each, no host sync)::

        ratio = coefficient * ||w|| / (||x|| + weight_decay * ||w|| + eps),  at most max_ratio, at least min_ratio,
        ratio = 1 where ||w|| == 0 or ||x|| == 0                              (fresh zero-initialised layers)

    LARS (eq. 6): ``x = g``, ``coefficient = eta``; LARC: ``coefficient = eta / lr``, ``max_ratio = 1``;
    LAMB: ``x = u`` (the Adam update with weight decay), ``coefficient = 1``, ``max_ratio = max_trust_ratio``,
    ``min_ratio = min_trust_ratio``. The clamps do not apply to the 1 of a zero norm (as DeepSpeed's FusedLamb).
    """
    ratio = coefficient * w_norm / (x_norm + weight_decay * w_norm + eps)
    if max_ratio is not None or min_ratio is not None:
        ratio = ratio.clamp_(min=min_ratio, max=max_ratio)
    return torch.where((w_norm > 0.0) & (x_norm > 0.0), ratio, 1.0)


@dataclass
class LayerStats:
    """Per-layer norms of one param group at a step taken with ``record`` set (see :class:`RecordsLayers`).

    Either ``layers`` (model layer ids: a group bound to flat partitions, every layer of the group on every rank)
    or ``tensors`` (the stepped tensors, each one whole layer) names the entries of the vectors. ``ratio``: the
    trust ratio the optimizer applied (LARS, LAMB) or that LARS would apply (SGD); None for a group without
    layer-wise adaptation (its lr is applied as it is). ``u_norm``: LAMB's update norm ``||u||``.
    """

    w_norm: Tensor
    g_norm: Tensor
    ratio: Tensor | None
    layers: tuple[int, ...] | None = None
    tensors: list[Tensor] | None = None
    u_norm: Tensor | None = None


class RecordsLayers:
    """Mixin: flat layouts (``set_layout``), and per-layer norms of the step taken while ``record`` is True.

    A diagnostics step sets ``record = True`` just before the optimizer steps; the step then appends one
    :class:`LayerStats` per param group to ``records`` (``take_records`` empties it). The norms are the very ones
    the step computed (one extra norm pass where it computes none: adapt=False groups, LAMB's ``||g||``, SGD), with
    the same all-reduce, so every rank must record the same steps. With ``record`` False a step does nothing more.
    """

    record: bool = False
    param_groups: list[dict[str, Any]]  # the torch.optim.Optimizer's: every class with this mixin is one

    def _init_layouts(self) -> None:
        self._layouts: dict[int, tuple[weakref.ref[Tensor], FlatLayout]] = {}
        self.records: list[LayerStats] = []

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` copy: torch's state plus the public switches set on this object
        (``record``, ``allow_unbound``); refused once flat layouts are bound (``bind_deepspeed``, ``bind_layouts``)."""
        bound = [layout for ref, layout in self.__dict__.get("_layouts", {}).values() if ref() is not None]
        if bound:
            raise TypeError(
                f"{type(self).__name__} is bound to {len(bound)} DeepSpeed flat partition(s) (bind_deepspeed): the "
                "layouts name tensors of this process and its data-parallel process group, which a copy or a pickle "
                "cannot carry, and the copy would step each flat partition as one layer. Save state_dict() (or "
                "engine.save_checkpoint), build a new optimizer and engine, and call bind_deepspeed on it.")
        state = cast(dict[str, Any], super().__getstate__())  # torch.optim.Optimizer's: a dict
        for key in ("record", "allow_unbound"):
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]  # also called by torch's load_state_dict, on this object
        if "_layouts" not in self.__dict__:  # a copy or an unpickled object: no layouts, no records yet
            self._init_layouts()

    def set_layout(self, tensor: Tensor, layout: FlatLayout) -> None:
        """Declare how the elements of ``tensor`` (a tensor this optimizer steps) map onto the model's layers."""
        if tensor.numel() != layout.numel:
            raise ValueError(f"layout describes {layout.numel} elements, tensor has {tensor.numel()}")
        if not tensor.is_contiguous():
            raise ValueError("a flat layout needs a contiguous tensor")
        self.__dict__.setdefault("_layouts", {})[id(tensor)] = (weakref.ref(tensor), layout)

    def layout_of(self, tensor: Tensor) -> FlatLayout | None:
        entry = self.__dict__.get("_layouts", {}).get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return None

    def take_records(self) -> list[LayerStats]:
        """The :class:`LayerStats` recorded since the last call (empty if no step ran with ``record`` set)."""
        out, self.records = self.__dict__.get("records", []), []
        return out

    def _add_record(self, plan: NormPlan, stepped: list[Tensor], w_norm: Tensor, g_norm: Tensor,
                    ratio: Tensor | None, u_norm: Tensor | None = None) -> None:
        if plan.layer_index is None:
            stats = LayerStats(w_norm, g_norm, ratio, tensors=list(stepped), u_norm=u_norm)
        else:
            stats = LayerStats(w_norm, g_norm, ratio, layers=plan.group_layers, u_norm=u_norm)
        self.__dict__.setdefault("records", []).append(stats)

    def _segment_views(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor], NormPlan]:
        """Params and grads of ``group`` as segment views, the stepped tensors and the norm plan (for optimizers
        without ``_gather``: SGD)."""
        params: list[Tensor] = []
        grads: list[Tensor] = []
        stepped: list[Tensor] = []
        layouts: list[FlatLayout | None] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            layout = self.layout_of(p)
            if layout is None:
                params.append(p)
                grads.append(p.grad)
            else:
                params += [p.view(-1).narrow(0, s.start, s.numel) for s in layout.segments]
                grads += [p.grad.view(-1).narrow(0, s.start, s.numel) for s in layout.segments]
            stepped.append(p)
            layouts.append(layout)
        return params, grads, stepped, LayerwiseOptimizer._plan(layouts, stepped, record=True)


def recorded_norms(xs: Sequence[Tensor], ys: Sequence[Tensor], plan: NormPlan) -> tuple[Tensor, Tensor]:
    """Per-layer norms of ``xs`` and ``ys`` as a recorded step reports them (every layer of a bound group)."""
    probe = replace(plan, record=True, recorded=None)
    layer_norms(xs, ys, probe, foreach=True)
    assert probe.recorded is not None
    return probe.recorded["w"], probe.recorded["x"]


class LayerwiseOptimizer(RecordsLayers, EagerBookkeeping):
    """Base class: tracks the constructed parameters and the flat layouts bound by ``bind_deepspeed``.

    Subclasses call ``_gather(group, *state_keys)`` in ``step()`` to get segment views and the norm plan.
    """

    #: Step tensors without a layout that the optimizer was not constructed with, each as one layer. Only for
    #: demonstrating the naive (wrong) behaviour under a flattening wrapper; leave False in real runs.
    allow_unbound: bool = False

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._constructed: dict[int, weakref.ref[Tensor]] = {}
        self._constructed_shapes: set[torch.Size] = set()
        self._init_layouts()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        for p in group["params"]:
            if p.is_complex():
                self.param_groups.pop()
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters (got one of dtype {p.dtype}, shape "
                    f"{tuple(p.shape)}): its trust ratio and update are defined for real tensors. Optimize "
                    "torch.view_as_real(parameter) as a real parameter instead.")
        for p in group["params"]:
            self._constructed[id(p)] = weakref.ref(p)
            self._constructed_shapes.add(p.shape)

    def _validate_group(self, group: dict[str, Any]) -> None:  # overridden by subclasses
        pass

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict, on this very object
        if "_constructed" not in self.__dict__:  # a copy or an unpickled object: it steps the tensors it holds
            self._constructed, self._constructed_shapes = {}, set()
            for group in self.param_groups:
                for p in group["params"]:
                    self._constructed[id(p)] = weakref.ref(p)
                    self._constructed_shapes.add(p.shape)

    # -- layouts ---------------------------------------------------------------------------------------------------
    def declare_whole_layer(self, tensor: Tensor) -> None:
        """Declare that ``tensor`` (e.g. a wrapper's fp32 copy of one parameter) holds exactly one whole layer."""
        self._constructed[id(tensor)] = weakref.ref(tensor)

    def _is_whole_layer(self, tensor: Tensor) -> bool:
        """Constructed with it or declared, or shaped like a constructed parameter (a per-parameter copy)."""
        ref = self._constructed.get(id(tensor))
        return (ref is not None and ref() is tensor) or tensor.shape in self._constructed_shapes

    def _gather(self, group: dict[str, Any], state_keys: Sequence[str]) -> tuple[
            list[Tensor], list[Tensor], dict[str, list[Tensor]], list[Tensor], list[int], NormPlan]:
        """Collect the tensors of ``group`` that have gradients, as segment views.

        Returns params, grads (both as lists of segment views), state views per key (state tensors must already
        exist, shaped like the parameter), the stepped tensors, the number of segments of each, and the norm plan.
        """
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: dict[str, list[Tensor]] = {key: [] for key in state_keys}
        stepped: list[Tensor] = []
        counts: list[int] = []
        layouts: list[FlatLayout | None] = []
        for p in group["params"]:
            layout = self.layout_of(p)
            if p.grad is None:
                if layout is not None and layout.process_group is not None:
                    raise RuntimeError("a flat partition bound to a process group has no gradient; skipping it "
                                       "would desynchronise the all_reduce of layer norms across ranks")
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if layout is None and not self.allow_unbound and not self._is_whole_layer(p):
                raise RuntimeError(
                    f"{type(self).__name__} is stepping a tensor of shape {tuple(p.shape)}, not the shape of any "
                    "parameter it was constructed with, so its trust ratio would mix layers. "
                    "DeepSpeed's ZeRO, bf16 and fp16 wrappers replace parameters with (flat) fp32 copies: call "
                    "optimizers.bind_deepspeed(engine) once after deepspeed.initialize; with the Hugging Face "
                    "Trainer, train with optimizers.hf.LayerwiseTrainer, which builds the optimizer and binds it.")
            state = self.state[p]
            tensors = [p, p.grad] + [state[key] for key in state_keys]
            if layout is None:
                views = [[t] for t in tensors]
            else:
                views = [[t.view(-1).narrow(0, s.start, s.numel) for s in layout.segments] for t in tensors]
            params += views[0]
            grads += views[1]
            for key, v in zip(state_keys, views[2:], strict=True):
                states[key] += v
            stepped.append(p)
            counts.append(len(views[0]))
            layouts.append(layout)
        return params, grads, states, stepped, counts, self._plan(layouts, stepped, record=self.record)

    @staticmethod
    def _plan(layouts: list[FlatLayout | None], stepped: list[Tensor], record: bool) -> NormPlan:
        """The norm plan of one param group; ``group_layers`` (what a recorded step reports) only when ``record``,
        so that a step with diagnostics off does no extra work."""
        dtype = torch.promote_types(stepped[0].dtype, torch.float32) if stepped else torch.float32
        device = stepped[0].device if stepped else torch.device("cpu")
        bound = [layout for layout in layouts if layout is not None]
        if not bound:
            return NormPlan(dtype=dtype, device=device)
        if len(bound) != len(layouts):
            raise RuntimeError("a param group mixes tensors with and without a flat layout; bind all or none")
        first = bound[0]
        if any(b.num_layers != first.num_layers or b.process_group is not first.process_group for b in bound):
            raise RuntimeError("tensors of one param group are bound to different layer counts or process groups")
        index = torch.cat([b.layer_index(device) for b in bound]) if len(bound) > 1 else first.layer_index(device)
        group_layers: tuple[int, ...] = ()
        if record:
            group_layers = tuple(sorted({layer for b in bound for layer in b.group_layers}) or sorted(
                {seg.layer for b in bound for seg in b.segments}))
        return NormPlan(index, first.num_layers, first.process_group, dtype, device, group_layers=group_layers)


def expand(values: Sequence[Any], counts: Sequence[int]) -> list[Any]:
    """Repeat ``values[i]`` ``counts[i]`` times (per-tensor values to per-segment values)."""
    return [v for v, c in zip(values, counts, strict=True) for _ in range(c)]
