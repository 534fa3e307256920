"""The command line every entry point shares: the run's flags, their checks, and errors turned into messages.

The JSON config owns the experiment; these flags own the run (where it writes, how long, how often it logs and
saves, what it does on faults). An entry point adds its own flags (data, model) and calls :func:`run` with its
``main``; every rank then ends with a one-line message and an exit code instead of a traceback for a fault the
user can act on: 2 bad input, 3 too many skipped steps, 4 a collective time-out (a rank hung), 5 a checkpoint that
could not be written (a full disk), 6 a failed Downpour role, 128 + N a signal; 1 is an unexpected exception (its
traceback is printed). train/exits.py's ``ExitCode`` lists them with their sentences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from train import distributed, tracking
from train.checkpoints import DEFAULT_KEEP, CheckpointError, CheckpointSaveError
from train.config import ConfigError
from train.data import DataError
from train.exits import INTERRUPTED, ExitCode


def int_at_least(low: int) -> Any:
    """argparse type: an integer >= low, with a message naming the value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_run_arguments(p: argparse.ArgumentParser, *, wandb_project: str = "largebatch") -> None:
    """The flags of a run, the same for every entry point (Downpour's included); a DeepSpeed entry point adds
    :func:`add_engine_arguments`."""
    p.add_argument("--deepspeed_config", required=True, metavar="FILE",
                   help="the JSON file that defines the experiment (ds_configs/*.json)")
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="override the config's training.epochs")
    p.add_argument("--max-steps", type=int_at_least(1), default=None,
                   help="stop when the run's optimizer step count (from the run's start) reaches N")
    p.add_argument("--micro-batch", type=int_at_least(1), default=None,
                   help="override train_micro_batch_size_per_gpu (changes accumulation, not the global batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, metavar="DIR", help="run folder (default runs/<run name>)")
    p.add_argument("--run-name", default=None, help="default <config name>-seed<seed>, e.g. lars-32k-seed0")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    p.add_argument("--overwrite", action="store_true", help="allow reusing the folder of another run")
    p.add_argument("--save-interval", type=int_at_least(0), default=0,
                   help="also checkpoint every N optimizer steps (0: only at epoch ends and at the end)")
    p.add_argument("--keep-checkpoints", type=int_at_least(0), default=DEFAULT_KEEP, metavar="N",
                   help="keep the newest N checkpoints (besides the one 'latest' names and the last good one); "
                        "0: keep all")
    p.add_argument("--log-interval", type=int_at_least(1), default=10,
                   help="log loss/lr/throughput every N steps")
    p.add_argument("--no-wandb", action="store_true", help="do not log to wandb")
    p.add_argument("--wandb-project", default=wandb_project)
    p.add_argument("--wandb-group", default=None, help="group of runs to compare (a study name)")
    p.add_argument("--wandb-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="the longest rank 0 waits for the wandb server at the start (then it logs offline) and at "
                        "the end")
    p.add_argument("--max-skipped-steps", type=int_at_least(0), default=10, metavar="N",
                   help="stop after N optimizer steps in a row skipped for a non-finite loss or gradients; 0: never")
    p.add_argument("--trusted-checkpoint", action="store_true",
                   help="--resume: load checkpoint files with full pickle (weights_only=False); only for trusted files")
    p.add_argument("--inject-nan", type=int_at_least(1), nargs="+", default=(), metavar="STEP",
                   help="testing aid: rank 0's inputs are NaN in these optimizer steps (1-based)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that act only where DeepSpeed runs the step (train/imagenet.py, train/bert.py): precision, the
    collectives' time-out and DeepSpeed's log level."""
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: the config's on a GPU; on a CPU bf16 where a timed probe shows it faster than fp32, "
                        "else fp32 (never fp16: emulated); the choice and why go to config.json")
    p.add_argument("--dist-timeout", type=positive_float, default=30.0,
                   help="minutes a collective may wait for a dead rank before the run fails (rank 0 waits for "
                        "wandb at most half of it)")
    p.add_argument("--ds-log-level", default="WARNING", help="DeepSpeed's own log level")


def run_dir(args: argparse.Namespace) -> Path:
    """The run folder: ``--output-dir``, else runs/<run name> (``--run-name``, else <config name>-seed<seed>)."""
    return Path(args.output_dir or Path("runs") / (args.run_name or f"{Path(args.deepspeed_config).stem}-seed"
                                                                    f"{args.seed}"))


def recorded_precision(args: argparse.Namespace) -> str | None:
    """``--precision`` for this start: with ``--resume`` and ``auto``, the precision the run was written in (from its
    config.json), since auto measures the machine and may choose otherwise on another one; else as given."""
    if not (getattr(args, "resume", False) and getattr(args, "precision", None) == "auto"):
        return getattr(args, "precision", None)
    try:
        return str(json.loads((run_dir(args) / "config.json").read_text())["derived"]["precision"])
    except (OSError, ValueError, KeyError, TypeError):
        return args.precision  # no record: auto decides, and --resume's own checks apply


def run(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Call ``main(args)``; turn the faults a user can act on into one message and an exit code. A resumed run
    keeps the precision it was written in when ``--precision`` is auto (:func:`recorded_precision`)."""
    rank = os.environ.get("RANK", "0")
    precision = recorded_precision(args)
    if precision != getattr(args, "precision", None):
        if rank == "0":
            print(f"--resume with --precision auto: {precision}, the precision the run was written in",
                  flush=True)
        args.precision = precision
    close_group = True  # False where a peer may be hung or mid-collective: destroying the group could wait on it
    # a process group that was there before main (a program that calls run in-process) is its owner's to destroy
    owned = not distributed.initialized()
    try:
        main(args)
    except (ConfigError, DataError) as e:
        if rank == "0":  # every rank finds the same fault; say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except CheckpointSaveError as e:  # rank 0's message names every rank's error
        if str(e):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return CheckpointSaveError.exit_code
    except CheckpointError as e:  # each rank reads its own files
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except TimeoutError as e:  # a rank that waited for another outside a collective (train/corpus.py's wait)
        close_group = False
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return ExitCode.HUNG_RANK
    except RuntimeError as e:  # gloo and NCCL (DistBackendError) time-outs
        close_group = False
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        limit = f"--dist-timeout {args.dist_timeout:g} min" if hasattr(args, "dist_timeout") else "its time-out"
        print(f"error (rank {rank}): a collective waited {limit} for another rank and gave up "
              f"({str(e).splitlines()[0][:200]}); a rank hung (stuck device, paused or lost machine). "
              f"The job stops; --resume continues from the last checkpoint", file=sys.stderr, flush=True)
        return ExitCode.HUNG_RANK
    except Exception:
        close_group = False
        raise
    finally:
        if close_group and owned:  # a finished run, a fault every rank met, or a signal the ranks agreed on
            distributed.shutdown()
    return ExitCode.OK


def entry(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> NoReturn:
    """An entry point's ``__main__``: parse the command line, :func:`run` ``main``, finish an open wandb run with the
    exit code and end the process through :func:`train.distributed.exit_process` (no interpreter finalisation with
    DeepSpeed's gloo threads alive). A signal's ``SystemExit`` keeps its code; an unexpected exception prints its
    traceback and exits 1, and Ctrl-C before the signal handlers are installed 130, as Python would."""
    try:
        code = distributed.exit_code(run(main, parser.parse_args()))
    except SystemExit as e:
        code = distributed.exit_code(e.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = INTERRUPTED
    except Exception:  # noqa: BLE001 - reported as Python would (torch.distributed's hook adds "[rankN]:"), exit 1
        sys.excepthook(*sys.exc_info())
        code = ExitCode.BUG
    tracking.finish_wandb(code)
    distributed.exit_process(code)
