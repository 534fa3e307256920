"""Faults met during training: preemption signals and non-finite steps.

Non-finite steps. A step whose loss or gradients are not finite must not reach the weights or the optimizer state
(momentum, LARS/LAMB moments). DeepSpeed 0.19 already skips such a step in every mode but one: the fp16 loss
scaler skips overflows, and ZeRO-1/2 (fp32 and bf16) and BF16_Optimizer skip a step whose gradient norm is not
finite. Plain fp32 without ZeRO calls the optimizer directly; :func:`skip_nonfinite_steps` gives it the same
rule. In all modes a skipped step leaves weights, optimizer state and the lr schedule where they were and
increments ``engine.skipped_steps``, which the step records log.

A small all-reduce (:class:`StepAgreement`) makes all ranks take the same decision: stop for a signal, count a
skipped step, stop after too many skipped steps in a row. It runs about once a second, also between the
micro-steps of a gradient accumulation, so a step of hundreds of micro-batches cannot outlast a scheduler's grace
period (30 s after SIGTERM, then SIGKILL), and after every skipped fp16 step (whether a rank saw a non-finite
loss).

:class:`StepGuard` puts these together for a training loop: it is called once before and once after each
micro-step and answers what to do (go on, the step was fine, it was skipped, stop, save and exit).

Host reads. On a GPU, reading a device tensor on the host (``.item()``, ``bool()``, ``.tolist()``) waits for
every kernel queued before it, so the host stops running ahead of the device. Nothing here reads a device tensor
on a step that is neither skipped nor logged, with two documented exceptions, each one read where the rule cannot
be decided otherwise:

- fp16: the count of non-finite losses is read on a step the loss scaler skipped (:meth:`StepGuard.after_micro`),
  to tell a bad step from an overflow skip; a step that was taken had finite losses and reads nothing. DeepSpeed's
  fp16 step itself reads its overflow flag once a step, which is how the host knows a step was skipped.
- fp32 without ZeRO: :func:`skip_nonfinite_steps` reads one flag (are all gradient norms finite?) before the
  optimizer runs, once a step, because a skipped step must leave weights, optimizer state and the lr schedule as
  they were and only the host can hold the schedule back; ZeRO-1/2 read their overflow flag the same way
  (DeepSpeed's ``has_overflow``). On a CPU the read waits for nothing.

The stop-signal agreement all-reduces a CPU tensor (a gloo group beside NCCL): no device synchronisation.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

import torch


def skip_nonfinite_steps(engine: Any) -> bool:
    """Give a plain optimizer (fp32, no ZeRO) DeepSpeed's skip rule; return whether it was needed.

    The gradients are already averaged over ranks when the optimizer runs, so every rank reaches the same answer
    without a collective. The answer costs one host read a step (the module's "Host reads": a documented
    exception). The engine reads ``optimizer.overflow`` after the step: True counts a skipped step and holds the lr
    schedule, as for an fp16 overflow.
    """
    opt = engine.optimizer
    if hasattr(opt, "overflow"):  # DeepSpeed's own wrappers decide (ZeRO, BF16_Optimizer, fp16 optimizers)
        return False
    step = opt.step

    def guarded_step(closure: Any = None) -> Any:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        # The one host read a step of this mode: the decision must be known before the optimizer runs.
        opt.overflow = bool(grads) and not bool(torch.stack(list(norms)).isfinite().all())
        if opt.overflow:
            return None
        return step(closure) if closure is not None else step()

    opt.overflow = False
    opt.step = guarded_step
    return True


class StepAgreement:
    """What all ranks agree on: stop signals, and (fp16) whether a step was bad, with one 3-number all-reduce.

    SIGTERM/SIGINT (a preempted job) raise a flag here; the ranks agree to save the same step and stop even when
    the signal reached only some of them (the deepspeed launcher signals its ranks one after another and kills a
    rank still alive 30 s later). Loader workers ignore the signals (train.data), so they cannot end a rank first.

    The all-reduce runs every :attr:`every` micro-steps, a number the ranks agree on in the same all-reduce so that
    about :data:`AGREE_SECONDS` pass between two agreements whatever the step time: a signal is acted on within
    seconds, also in the middle of a long gradient accumulation, while a fast step pays for no collective at all.
    The tensor is on the CPU (a gloo group beside NCCL on GPU jobs): no device synchronisation.
    """

    AGREE_SECONDS = 1.0  # between two agreements; a scheduler's grace after SIGTERM is 30 s

    def __init__(self, group: Any = None) -> None:
        self.signum, self.name = 0, ""
        self.group = group
        self.every = 1  # micro-steps between agreements (the first micro-step agrees, and measures)
        self._count, self._since = 0, time.perf_counter()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._raise)

    def _raise(self, signum: int, frame: Any) -> None:
        self.signum, self.name = signum, signal.Signals(signum).name

    def due(self) -> bool:
        """Count one micro-step; True when the ranks agree after it (the same answer on every rank)."""
        self._count += 1
        return self._count >= self.every

    def agree(self, bad: bool = False) -> tuple[bool, int]:
        """All-reduce (max) [bad on any rank, the largest signal number, seconds per micro-step]; return the first
        two and set the next interval from the third.

        Act on the returned signal, not on ``self.signum``: a signal arriving after the all-reduce reaches some
        ranks before their check and others after it; the agreed value is the same everywhere, and a later
        signal is agreed on next time."""
        seconds = (time.perf_counter() - self._since) / max(self._count, 1)
        flags = torch.tensor([float(bad), float(self.signum), seconds], dtype=torch.float64)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
        bad_any, signum, slowest = flags.tolist()
        self.every = max(1, min(100_000, int(self.AGREE_SECONDS / max(slowest, 1e-6))))
        self._count, self._since = 0, time.perf_counter()
        if signum and not self.signum:
            self.signum, self.name = int(signum), signal.Signals(int(signum)).name
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


@dataclass
class Verdict:
    """What the loop does after a micro-step (:meth:`StepGuard.after_micro`)."""

    completed: bool  # an optimizer step ended with this micro-step (taken or skipped)
    bad: bool = False  # ... and it was skipped on some rank for a non-finite loss or gradients
    give_up: bool = False  # ... and that made too many bad steps in a row: stop the run
    signum: int = 0  # a stop signal the ranks agreed on: save and exit (mid-accumulation too)


class StepGuard:
    """The reliability rules around one optimizer step, for any DeepSpeed training loop::

        x = guard.before_micro(x, step)      # snapshot BatchNorm statistics at a step's first micro-batch
        loss = ...; engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        verdict = guard.after_micro(loss, boundary, step)

    After a skipped step it puts the BatchNorm running statistics back (they move in the forward pass, and NaN
    statistics would stay forever); with fp16 it counts non-finite losses on the device (only those make a bad
    step: overflow skips are how the loss scaler finds its scale) and reads the count only after a skipped step;
    it agrees across ranks on signals about every :attr:`StepAgreement.AGREE_SECONDS` (between micro-steps too)
    and after every skipped fp16 step; it counts bad steps in a row (:class:`BadStepStreak`). It reads no device
    tensor on a step that was taken (the module's "Host reads").
    ``inject_nan`` (1-based optimizer steps) makes this rank's inputs NaN there: a testing aid.
    """

    def __init__(self, engine: Any, *, max_skipped_steps: int, inject_nan: tuple[int, ...] | set[int] = (),
                 signal_group: Any = None):
        self.engine = engine
        self.agreement = StepAgreement(signal_group)
        self.streak = BadStepStreak(max_skipped_steps)
        self.inject_nan = set(inject_nan)
        self.buffers = list(engine.module.buffers())
        self._saved = [b.detach().clone() for b in self.buffers]
        self._first_micro = True
        self._skipped_before = 0
        self._nonfinite = torch.zeros((), device=engine.device)  # this step's non-finite losses (fp16 rule)

    def before_micro(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Call with each micro-batch's input before the forward; ``step`` is the number of steps completed."""
        if self._first_micro:
            if self.buffers:
                torch._foreach_copy_(self._saved, self.buffers)
            self._skipped_before = self.engine.skipped_steps
            self._first_micro = False
        return x * float("nan") if step + 1 in self.inject_nan else x

    def after_micro(self, loss: torch.Tensor, boundary: bool, step: int) -> Verdict:
        """Call after ``engine.step()`` with the micro-batch's loss, whether it was a step's last micro-batch, and
        the number of steps completed before it."""
        fp16 = self.engine.fp16_enabled()
        if fp16:
            self._nonfinite += ~torch.isfinite(loss.detach())
        due = self.agreement.due()
        if not boundary:  # between micro-steps: only a signal can interrupt
            return Verdict(False, signum=self.agreement.agree()[1] if due else 0)
        self._first_micro = True
        skipped = self.engine.skipped_steps > self._skipped_before
        if skipped:
            self.restore_buffers()
        if fp16 and skipped:
            # The loss scaler's overflow skips are normal; a bad step is a non-finite loss on any rank. A non-finite
            # loss makes non-finite gradients, which the scaler skips: only a skipped step can be bad, so the
            # count is read here only (one host read on a skipped step, none on the others). DeepSpeed decided the
            # skip from all-reduced gradients or an all-reduced overflow flag: every rank is here together.
            bad, signum = self.agreement.agree(bool(self._nonfinite.item() > 0))
            self._nonfinite.zero_()
        else:  # DeepSpeed decided the skip from the all-reduced gradients: the same answer on every rank
            if fp16:
                self._nonfinite.zero_()  # finite losses only (the step was taken): nothing to read
            bad, signum = skipped, self.agreement.agree()[1] if due else 0
        return Verdict(True, bad, self.streak.update(step + 1, bad), signum)

    def restore_buffers(self) -> None:
        """Put the BatchNorm statistics back to where they were before this step's first micro-batch."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self._saved)

    @property
    def signal_name(self) -> str:
        return self.agreement.name
