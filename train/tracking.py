"""Run records: metrics.jsonl in the run folder, and wandb on rank 0 (online when logged in, else offline).

Every record goes to both with one step axis, ``samples`` (training samples seen), the axis DeepSpeed's own
monitor uses, so wandb never drops a record as out of order. A wandb failure prints one warning and turns wandb
off for the rest of the run; training never depends on it. Nothing secret (API keys, the environment) is
written to the run folder.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def git_commit() -> str | None:
    """The commit of the code being run, with '-dirty' when the tree has changes; None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def wandb_logged_in() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or a netrc entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Writes records to ``metrics.jsonl`` and to wandb. Create it on rank 0 only."""

    def __init__(self, out_dir: Path, *, use_wandb: bool, project: str, group: str | None, name: str,
                 tags: list[str], config: dict[str, Any], resume_id: str | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self.wandb = None
        self.wandb_id: str | None = None
        if use_wandb:
            try:
                import wandb

                mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
                self.wandb = wandb.init(
                    project=project, group=group, name=name, tags=tags, config=config, dir=str(out_dir),
                    mode=mode, id=resume_id, resume="allow" if resume_id else None,
                    settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))
                self.wandb_id = self.wandb.id
                wandb.define_metric("samples")
                wandb.define_metric("*", step_metric="samples")
            except Exception as e:  # noqa: BLE001 (any wandb failure must leave training running)
                self._wandb_failed("start", e)

    def _wandb_failed(self, what: str, e: Exception) -> None:
        print(f"WARNING: wandb failed to {what} ({type(e).__name__}: {e}); continuing without wandb "
              f"(metrics.jsonl is still written)", file=sys.stderr, flush=True)
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        self.wandb = None

    def log(self, record: dict[str, Any], to_wandb: bool = True) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None and to_wandb:
            try:
                prefix = record.get("kind", "step")
                data = {f"{prefix}/{k}": v for k, v in record.items()
                        if k not in ("kind", "samples") and isinstance(v, (int, float)) and v is not None}
                data["samples"] = record["samples"]
                self.wandb.log(data, step=record["samples"])
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("log", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            try:
                for k, v in values.items():
                    self.wandb.summary[k] = _clean(v)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("write the summary", e)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("finish", e)
