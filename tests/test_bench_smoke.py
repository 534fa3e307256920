"""The benchmark commands run end to end (tiny sizes; the figures themselves are in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, child_env


def test_pipeline_benchmark_prints_ratios_against_torchvision():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--images", "24", "--rounds", "1",
                           "--batch", "8", "--size", "160x120"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "24 JPEGs 160x120 q90" in proc.stdout
    assert "ratio ours/baseline" in proc.stdout and "baseline torchvision ImageFolder+PIL" in proc.stdout
