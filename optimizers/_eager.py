"""``torch.optim.Optimizer``'s bookkeeping without the import of ``torch._dynamo`` that its first call makes.

torch decorates ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` with
``torch._disable_dynamo``, so that ``torch.compile`` graph-breaks at them. That decorator imports ``torch._dynamo``
on its first call, and every optimizer calls ``add_param_group`` in its constructor: every training process pays
for the import although nothing in it compiles. With torch 2.14 on a 2-core AMD EPYC that import takes about 1.8
CPU-seconds, close to what importing torch and DeepSpeed takes together.

``EagerBookkeeping`` (placed before ``torch.optim.Optimizer`` in the bases) runs the undecorated methods in eager
code, and torch's decorated ones while dynamo traces the caller (``torch.compiler.is_compiling()``), so a compiled
caller graph-breaks exactly as it does with torch's own optimizers. Where a torch release no longer exposes the
undecorated function (``__wrapped__``), the decorated one runs: slower to start, never different in result. One
difference remains: torch's decorator also keeps dynamo out of the calls the method makes, so where dynamo runs one
of these methods as plain Python while still watching nested calls (after its recompile limit, say), it could
trace into the undecorated body; that changes speed, not what the method does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_Optimizer = torch.optim.Optimizer


def undecorated(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` without torch's ``_disable_dynamo`` wrapper (``functools.wraps`` keeps it as ``__wrapped__``)."""
    return getattr(method, "__wrapped__", method)


_ADD_PARAM_GROUP = undecorated(_Optimizer.add_param_group)
_ZERO_GRAD = undecorated(_Optimizer.zero_grad)
_STATE_DICT = undecorated(_Optimizer.state_dict)
_LOAD_STATE_DICT = undecorated(_Optimizer.load_state_dict)


class EagerBookkeeping(_Optimizer):
    """Mixin for a ``torch.optim.Optimizer`` subclass: see the module docstring."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():
            return super().add_param_group(param_group)
        return _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if torch.compiler.is_compiling():
            return super().zero_grad(set_to_none)
        return _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        if torch.compiler.is_compiling():
            return super().state_dict()
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if torch.compiler.is_compiling():
            return super().load_state_dict(state_dict)
        return _LOAD_STATE_DICT(self, state_dict)
