"""The benchmark commands run end to end (tiny sizes; the figures themselves are in docs/benchmarks.md)."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, child_env


def test_pipeline_benchmark_prints_ratios_against_torchvision():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--images", "24", "--rounds", "1",
                           "--batch", "8", "--size", "160x120"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "24 JPEGs 160x120 q90" in proc.stdout
    assert "ratio ours/baseline" in proc.stdout and "baseline torchvision ImageFolder+PIL" in proc.stdout


def test_train_step_benchmark_prints_fp32_and_bf16_ratios_against_plain_torch():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--rounds", "1", "--steps", "4",
                           "--log-interval", "2", "--micro-batch", "2", "--accum", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name"))
    assert f"CPU: {model}," in proc.stdout
    for precision in ("fp32", "bf16"):  # the printed ratio is the printed rates' quotient, per precision
        m = re.search(rf"round 1 {precision}: images/s .* ([\d.]+), train/imagenet.py +([\d.]+) \(step time "
                      rf"([\d.]+)x\)", proc.stdout)
        assert m, proc.stdout
        base, ours, ratio = map(float, m.groups())
        assert abs(ratio - base / ours) < 0.002 * base / ours, (base, ours, ratio)
        assert f"{precision}: median images/s" in proc.stdout
    assert "bf16 model + fp32 master weights" in proc.stdout


def test_optimizer_benchmark_prints_both_cases_with_the_cpu_model():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.optimizer", "--arch", "resnet18", "--repeats", "1",
                           "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else (platform.processor() or platform.machine())
    out = proc.stdout
    assert f"{cpu}, 1 thread, our groups" in out and f"{cpu}, 1 thread, all 62 tensors" in out, out
    assert out.count("x CPU torch SGD (foreach)") == 6 and out.count("x CPU torch AdamW (foreach)") == 4, out
    assert out.count("x CPU our SGD (foreach)") == 2 and out.count(" faults ") == 14, out


def test_noise_scale_benchmark_prints_each_interval_against_the_loop_without_the_monitor():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.noise_scale", "--steps", "2", "--repeats", "1",
                           "--micro", "8"], cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"(off \(interval 0\)|interval \d+) +([\d.]+) CPU ms/step +x([\d.]+) of off", proc.stdout)
    assert [r[0] for r in rows] == ["off (interval 0)", "interval 10", "interval 1"], proc.stdout
    off = float(rows[0][1])
    for _, ms, ratio in rows:  # each printed ratio is the printed times' quotient
        assert abs(float(ratio) - float(ms) / off) < 0.01 * float(ms) / off + 0.002
