"""Every exit code an entry point ends with, in one place, each with the sentence a user sees in the README.

`train.cli` re-exports :class:`ExitCode`; it lives in this leaf module so that train/loop.py and
train/checkpoints.py, which `train.cli` imports, can raise with it without an import cycle.
"""

from __future__ import annotations

import enum
import signal
import sys
from typing import NoReturn


class ExitCode(enum.IntEnum):
    """The status of an entry point's process (train/imagenet.py, train/bert.py, train/downpour.py)."""

    OK = 0  # the run finished
    BUG = 1  # an unexpected exception: its traceback is printed, as Python prints it
    BAD_INPUT = 2  # a config, flag, data set or checkpoint the run cannot use: the message says what and why
    BAD_STEPS = 3  # too many bad (non-finite) steps in a row (--max-skipped-steps): the run gave up
    HUNG_RANK = 4  # a collective waited --dist-timeout for another rank: a rank hung or its machine was lost
    SAVE_FAILED = 5  # a checkpoint could not be written (a full disk): every rank stops
    ROLE_FAILED = 6  # Downpour: a shard failed, or more replicas than --max-dead-replicas: one line per failed role
    SIGNAL_BASE = 128  # 128 + N: stopped by signal N (SIGTERM 143, SIGINT 130) after saving a checkpoint

    @classmethod
    def for_signal(cls, signum: int) -> int:
        """128 + N, as a shell reports a process ended by signal N."""
        return int(cls.SIGNAL_BASE) + int(signum)


INTERRUPTED = ExitCode.for_signal(signal.SIGINT)  # Ctrl-C before the run's own handlers: 130, as Python's


def fail(message: str, code: ExitCode) -> NoReturn:
    """Stop with ``code`` after printing ``message`` (each line as it is) on stderr."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def refuse(message: str) -> NoReturn:
    """Stop with bad input found where :func:`train.cli.run` does not turn an exception into a code (the run folder,
    ``--resume``'s checkpoint): the message on stderr, then exit code 2, as for a bad config."""
    print(message if message.startswith("error") else f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(ExitCode.BAD_INPUT)
