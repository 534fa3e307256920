"""mypy on optimizers/ and train/ at the strictness of pyproject.toml's [tool.mypy]: type hints that nothing checks
drift from the code. Where DeepSpeed, torchvision or tqdm give no types, their values are Any (the overrides)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO  # noqa: E402


def test_mypy_passes_on_optimizers_and_train(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
