"""RPC between Downpour's roles: every call waits at most this process's ``--rpc-timeout`` (set once, when the process
joins the RPC world, :func:`set_timeout`), and a call that gets no answer, or whose callee failed, raises
:class:`RpcFailed` naming the callee. The time-out is this module's state; the other modules read it through
:func:`timeout`.
"""

from __future__ import annotations

from typing import Any

from torch.distributed import rpc

from train.ps.setup import Setup


class RpcFailed(Exception):
    """An RPC got no answer within --rpc-timeout, or its callee failed; the message names the callee."""


_RPC_TIMEOUT = 60.0  # this process's --rpc-timeout (set when it joins the RPC world)


def set_timeout(seconds: float) -> None:
    global _RPC_TIMEOUT
    _RPC_TIMEOUT = seconds


def timeout() -> float:
    return _RPC_TIMEOUT


def rpc_options(setup: Setup) -> Any:
    return rpc.TensorPipeRpcBackendOptions(num_worker_threads=max(16, 2 * setup.W + 8),
                                           rpc_timeout=setup.args.rpc_timeout,
                                           init_method="env://")


def wait(future: Any, to: str, what: str) -> Any:
    """The answer of ``future`` (a call to ``to``: ``what``), or :class:`RpcFailed`."""
    try:
        return future.wait()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RpcFailed(f"{to} did not answer {what} within --rpc-timeout {_RPC_TIMEOUT:g} s, or failed "
                        f"({lines[0][:200] if lines else type(e).__name__})") from None


def call_async(to: str, func: Any, *args: Any) -> Any:
    """``func(*args)`` on ``to``, not waited for: its future (wait for it with :func:`wait`)."""
    return rpc.rpc_async(to, func, args=args, timeout=_RPC_TIMEOUT)


def call(to: str, func: Any, *args: Any) -> Any:
    return wait(call_async(to, func, *args), to, func.__name__)
