"""Faults met during training: preemption signals and non-finite steps.

Non-finite steps. A step whose loss or gradients are not finite must not reach the weights or the optimizer state
(momentum, LARS/LAMB moments). DeepSpeed 0.19 already skips such a step in every mode but one: the fp16 loss
scaler skips overflows, and ZeRO-1/2 (fp32 and bf16) and BF16_Optimizer skip a step whose gradient norm is not
finite. Plain fp32 without ZeRO calls the optimizer directly; :func:`skip_nonfinite_steps` gives it the same
rule. In all modes a skipped step leaves weights, optimizer state and the lr schedule where they were and
increments ``engine.skipped_steps``, which the step records log.

Every optimizer step ends with one small all-reduce (:class:`StepAgreement`) so that all ranks take the same
decision: stop for a signal, count a skipped step, stop after too many skipped steps in a row.
"""

from __future__ import annotations

import signal
from typing import Any

import torch


def skip_nonfinite_steps(engine: Any) -> bool:
    """Give a plain optimizer (fp32, no ZeRO) DeepSpeed's skip rule; return whether it was needed.

    The gradients are already averaged over ranks when the optimizer runs, so every rank reaches the same answer
    without a collective. The engine reads ``optimizer.overflow`` after the step: True counts a skipped step and
    holds the lr schedule, as for an fp16 overflow.
    """
    opt = engine.optimizer
    if hasattr(opt, "overflow"):  # DeepSpeed's own wrappers decide (ZeRO, BF16_Optimizer, fp16 optimizers)
        return False
    step = opt.step

    def guarded_step(closure: Any = None) -> Any:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        opt.overflow = bool(grads) and not bool(torch.stack(norms).isfinite().all())
        if opt.overflow:
            return None
        return step(closure) if closure is not None else step()

    opt.overflow = False
    opt.step = guarded_step
    return True


class StepAgreement:
    """What all ranks agree on after each optimizer step, with one 2-element all-reduce.

    SIGTERM/SIGINT (a preempted job) raise a flag here; the ranks agree to save the same step and stop even when
    the signal reached only some of them (the deepspeed launcher signals its ranks one after another and kills a
    rank still alive 30 s later). Loader workers ignore the signals (train.data), so they cannot end a rank first.
    """

    def __init__(self) -> None:
        self.signum, self.name = 0, ""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._raise)

    def _raise(self, signum: int, frame: Any) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name

    def after_step(self, bad: bool | torch.Tensor, device: Any) -> tuple[bool, int]:
        """Agree on whether this step was bad on any rank and on a signal; return both (signal number or 0).

        Act on the returned signal, not on ``self.signum``: a signal arriving after the all-reduce reaches some
        ranks before their check and others after it; the agreed value is the same everywhere, and a later
        signal is agreed on at the next step."""
        flags = torch.zeros(2, device=device)  # [a rank had a bad step, the largest signal number seen]
        flags[0] = bad
        flags[1] = float(self.signum)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_any, signum = flags.tolist()
        if signum and not self.signum:
            self.signum = int(signum)
            self.name = signal.Signals(self.signum).name
        return bad_any > 0, int(signum)


class BadStepStreak:
    """Counts bad optimizer steps in a row and says when and why to stop.

    A bad step is one DeepSpeed skipped because its loss or gradients were not finite. With fp16 the loss scaler
    also skips steps whose scaled gradients overflow, its normal way of finding a scale; there only a non-finite
    loss counts (the forward pass itself overflowed, which no loss scale fixes).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.length = 0
        self.first = 0  # first step of the current streak

    def update(self, step: int, bad: bool) -> bool:
        """Record step ``step``; True when the run should stop."""
        if not bad:
            self.length = 0
            return False
        if self.length == 0:
            self.first = step
        self.length += 1
        return bool(self.limit) and self.length >= self.limit

    def message(self, step: int, good_checkpoint: str | None) -> str:
        where = (f"the last good checkpoint is {good_checkpoint} ('latest' names it; --resume restarts there)"
                 if good_checkpoint else "no checkpoint with finite weights was saved before them in this run "
                 "(--save-interval saves more often)")
        return (f"stopping at step {step}: steps {self.first}-{step} ({self.length} in a row, --max-skipped-steps "
                f"{self.limit}) were skipped because the loss or the gradients were not finite (inf/NaN); weights, "
                f"optimizer state and BatchNorm statistics are those before step {self.first}; {where}. Usual "
                f"causes: lr too high or warmup too short for the batch, fp16 overflow in the forward pass, bad input "
                f"data")
