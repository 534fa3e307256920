"""benchmarks/gpu_check.sh, the one-command GPU check, in its CPU-runnable parts: the waited-on-data rule and the
report from given numbers, the stage bookkeeping (time-outs, skips, the report always written), the wheelhouse's
size check, and a dry run on the CPU that writes a complete report."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, child_env

from benchmarks.gpu import gpu_waited, junit_summary, render_report, workers_needed, write_report

CHECK = REPO / "benchmarks" / "gpu_check.sh"
WHEELHOUSE = REPO / "benchmarks" / "wheelhouse.sh"


def bash(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=child_env(PYTHON=sys.executable, **env))


# ---------------------------------------------------------------------------------------------------------------
# The rule and the formulas, from given numbers


@pytest.mark.parametrize("synthetic,end_to_end,want", [
    (3000.0, 2849.0, True),    # 0.95 x 3000 = 2850: one image/s under it
    (3000.0, 2851.0, False),   # one image/s over it
    (3000.0, 3100.0, False),   # end to end faster than synthetic (noise): no wait
    (3200.0, 2000.0, True),
    (None, 2000.0, None), (3000.0, None, None), (0.0, 100.0, None),
])
def test_gpu_waited_when_end_to_end_falls_more_than_5_percent_below_synthetic(synthetic, end_to_end, want):
    assert gpu_waited(synthetic, end_to_end) is want


def test_gpu_waited_tolerance_is_a_fraction_of_the_synthetic_rate():
    assert gpu_waited(1000.0, 899.0, tolerance=0.1) is True    # 0.9 x 1000 = 900
    assert gpu_waited(1000.0, 901.0, tolerance=0.1) is False


def test_workers_needed_divides_the_synthetic_rate_by_the_rate_per_loader_process():
    # 16 processes at 6,240 images/s = 390 each (the per-core figure); 3,000 / 390 = 7.69 -> 8
    assert workers_needed(3000.0, 6240.0, 16) == 8
    assert workers_needed(3900.0, 6240.0, 16) == 10  # exactly 10.0: no rounding up
    assert workers_needed(None, 6240.0, 16) is None and workers_needed(3000.0, 6240.0, 0) is None


def rows(synthetic: float, loader: float, jpeg: float, wait: float = 0.2) -> dict:
    return {"arch": "resnet50", "precision": "fp16", "image_size": 224, "micro": 256, "workers": 16, "steps": 32,
            "intervals": 5, "jpeg_images": 1024, "rows": [
                {"source": "synthetic", "micro": 256, "images_per_s": synthetic, "peak_gib": 21.5, "data_wait": 0.0},
                {"source": "loader", "micro": 256, "images_per_s": loader, "peak_gib": math.nan,
                 "data_wait": math.nan},
                {"source": "jpeg", "micro": 256, "images_per_s": jpeg, "peak_gib": 21.6, "data_wait": wait}]}


STAGES = [{"stage": "install", "rc": 0, "seconds": 12.3, "limit": 120},
          {"stage": "resnet50 synthetic", "rc": 124, "seconds": 120.0, "limit": 120},
          {"stage": "jpeg pipeline", "rc": 1, "seconds": 40.0, "limit": 150},
          {"stage": "pytest -m gpu", "rc": None, "seconds": 0, "limit": 3, "note": "the budget of 500 s was spent"}]


def test_report_says_the_gpu_waited_and_which_targets_were_met():
    text = render_report({"device": "NVIDIA H200 (143771 MiB)", "torch": "2.11.0"}, STAGES,
                         rows(3200.0, 2400.0, 2000.0), None)
    assert "**GPU waited on data: yes**" in text
    assert "end to end / synthetic = 0.625" in text        # 2000 / 3200
    assert "0.95 x 3,200 = 3,040" in text
    assert re.search(r"\| synthetic .*\| 3,200 images/s \| >= 3,000 .*\| \*\*met\*\* \|", text)
    assert re.search(r"\| end to end from JPEGs \| 2,000 images/s \| >= 2,500 \| \*\*not met\*\* \|", text)
    assert re.search(r"\| JPEG pipeline alone, 16 processes \| 2,400 images/s \| >= the synthetic rate \| "
                     r"\*\*not met\*\* \|", text)
    # 2,400 / 16 = 150 images/s per process; ceil(3,200 / 150) = 22
    assert "at the measured 150 images/s per process: 22" in text
    assert "decode on the GPU" in text
    assert "| jpeg: peak memory, time waiting for the next batch | 21.60 GiB, 20.0% of the wall clock |" in text
    assert "| NVIDIA H200 (143771 MiB) |" in text


def test_report_says_no_wait_when_the_pipeline_keeps_up():
    text = render_report({}, [], rows(3200.0, 6000.0, 3100.0), None)  # 3100 >= 0.95 x 3200 = 3040
    assert "**GPU waited on data: no**" in text and "decode on the GPU" not in text
    assert re.search(r"\| end to end from JPEGs \| 3,100 images/s \| >= 2,500 \| \*\*met\*\* \|", text)


def test_report_records_each_stage_outcome():
    text = render_report({}, STAGES, {}, None)
    assert "| install | ok | 12 (120) |" in text
    assert "| resnet50 synthetic | **timed out** (rc 124) | 120 (120) |" in text
    assert "| jpeg pipeline | **failed** (rc 1) | 40 (150) |" in text
    assert "| pytest -m gpu | skipped: the budget of 500 s was spent | 0 (3) |" in text
    assert "**GPU waited on data: unknown**" in text and "not measured" in text


def test_junit_summary_counts(tmp_path):
    (tmp_path / "pytest.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1" '
        'time="12.5"><testcase classname="tests.test_faults" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_x" name="test_b"><error message="y"/></testcase>'
        '<testcase classname="tests.test_x" name="test_c"/><testcase classname="tests.test_x" name="test_d"/>'
        '<testcase classname="tests.test_x" name="test_e"><skipped/></testcase></testsuite></testsuites>')
    got = junit_summary(tmp_path / "pytest.xml")
    assert (got["passed"], got["failed"], got["errors"], got["skipped"]) == (2, 1, 1, 1)  # 5 - 1 - 1 - 1 = 2
    assert got["failures"] == ["tests.test_faults::test_a", "tests.test_x::test_b"]
    assert junit_summary(tmp_path / "missing.xml") is None


def test_report_from_a_folder_with_broken_or_missing_files(tmp_path):
    (tmp_path / "stages.jsonl").write_text('{"stage": "info", "rc": 0, "seconds": 1, "limit": 60}\nnot json\n')
    (tmp_path / "results_synthetic.json").write_text("{truncated")
    (tmp_path / "results_jpeg.json").write_text(json.dumps(rows(3000.0, 6000.0, 2900.0)))
    text = write_report(tmp_path, tmp_path / "gpu_report.md")
    assert (tmp_path / "gpu_report.md").read_text() == text
    assert "| info | ok | 1 (60) |" in text
    assert "**GPU waited on data: no**" in text  # 2900 >= 0.95 x 3000 = 2850
    assert "No result (the stage did not run" in text


# ---------------------------------------------------------------------------------------------------------------
# The scripts


def test_scripts_parse():
    for script in (CHECK, WHEELHOUSE):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_wheelhouse_size_check(tmp_path):
    (tmp_path / "a-1.0-py3-none-any.whl").write_bytes(b"\0" * (2 * 2**20))
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "fashion-mnist" / "x.gz").write_bytes(b"\0")  # data files count too: 2 MiB and a byte
    over = bash(str(WHEELHOUSE), "--dir", str(tmp_path), "--check", "--max-mib", "2")
    assert over.returncode == 1 and "holds 2097153 bytes, over the 2 MiB limit" in over.stderr
    under = bash(str(WHEELHOUSE), "--dir", str(tmp_path), "--check", "--max-mib", "3")
    assert under.returncode == 0 and "1 wheels, 2.0 MiB (2097153 bytes in files; limit 3 MiB)" in under.stdout


def test_bad_arguments_are_named():
    proc = bash(str(CHECK), "--budget", "ten", "--workers", "14")
    assert proc.returncode == 2 and "--budget and --workers take whole numbers (got 'ten', '14')" in proc.stderr
    proc = bash(str(CHECK), "--workers", "0")
    assert proc.returncode == 2 and "--workers must be at least 1 (got 0)" in proc.stderr
    proc = bash(str(CHECK), "--gpus", "2")
    assert proc.returncode == 2 and "unknown argument '--gpus'" in proc.stderr


def test_install_stage_without_a_deepspeed_wheel_says_how_to_make_one(tmp_path):
    proc = bash(str(CHECK), "--_install", str(tmp_path), str(tmp_path / "venv"))
    assert proc.returncode == 3 and "run benchmarks/wheelhouse.sh" in proc.stdout


# the correctness tier (pytest) before the JPEG stage
STAGE_ORDER = ["install", "info", "probes", "resnet50 synthetic", "pytest -m gpu", "jpeg pipeline"]


def test_a_spent_budget_skips_the_stages_and_still_writes_the_report(tmp_path):
    proc = bash(str(CHECK), "--out", str(tmp_path), "--dry-run", "--budget", "69")  # 69 - 60 s: under 10 s
    assert proc.returncode == 0, proc.stderr
    stages = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == STAGE_ORDER
    assert all(s["rc"] is None for s in stages)
    text = (tmp_path / "gpu_report.md").read_text()
    assert "| resnet50 synthetic | skipped: the budget of 69 s was spent |" in text
    assert "**GPU waited on data: unknown**" in text


def test_dry_run_on_cpu_writes_a_complete_report(tmp_path):
    """Every stage for real with a tiny model (resnet18, 32 px, 2 loader processes): about 30 s of CPU."""
    proc = bash(str(CHECK), "--out", str(tmp_path), "--dry-run", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    stages = {s["stage"]: s for s in map(json.loads, (tmp_path / "stages.jsonl").read_text().splitlines())}
    for name in ("info", "probes", "resnet50 synthetic", "jpeg pipeline"):
        assert stages[name]["rc"] == 0, log[-4000:]
    assert stages["pytest -m gpu"]["rc"] is not None and stages["install"]["rc"] is None
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["dry_run"] is True and info["torch"] and info["cores"] >= 1
    syn = json.loads((tmp_path / "results_synthetic.json").read_text())["rows"]
    jpg = {r["source"]: r for r in json.loads((tmp_path / "results_jpeg.json").read_text())["rows"] if r["micro"] == 4}
    assert [r["source"] for r in syn] == ["synthetic", "synthetic"] and set(jpg) == {"loader", "jpeg"}
    assert all(r["images_per_s"] > 0 for r in [*syn, *jpg.values()])
    text = (tmp_path / "gpu_report.md").read_text()
    assert "**dry run on CPU**" in text
    waited = jpg["jpeg"]["images_per_s"] < 0.95 * syn[1]["images_per_s"]  # at the main micro batch, 4
    assert f"**GPU waited on data: {'yes' if waited else 'no'}**" in text
    assert re.search(r"\d+ passed, \d+ failed, \d+ errors, \d+ skipped", text)
    assert "0 passed" in text  # no GPU test can pass on a CPU: they are skipped
    # the report was rewritten after every stage (a kill at any point leaves the stages done)
    assert re.findall(r"=== report written after: (.+)", log) == ["start", *STAGE_ORDER[1:], "end"]
    assert [s for s in stages] == STAGE_ORDER
    probes = json.loads((tmp_path / "probes.json").read_text())
    assert probes["shm"]["ok"] is not None and probes["nccl"]["ok"] is None  # no CUDA: skipped, said so
    assert "| nvjpeg | skipped | no CUDA device |" in text
    assert "is not covered on one GPU" in text  # the NCCL split-layer path, with its CPU proof named
    micros = sorted(r["micro"] for r in syn)
    assert micros == [2, 4] and "| synthetic at micro batch 2 |" in text  # the smoke's stand-ins for 32 and 256


def test_a_killed_check_leaves_the_report_of_the_stages_done(tmp_path):
    """SIGTERM (a caller's time limit) during the dry run, once the info stage is done: the trap records the stage
    under way as interrupted, writes the report and exits 143; nothing after it ran."""
    proc = subprocess.Popen(["bash", str(CHECK), "--out", str(tmp_path), "--dry-run"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(PYTHON=sys.executable))
    stages = tmp_path / "stages.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"info"' not in (stages.read_text() if stages.exists() else ""):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    text = (tmp_path / "gpu_report.md").read_text()
    assert "| info | ok |" in text
    assert "jpeg pipeline" not in text and "pytest -m gpu |" not in text
    done = [json.loads(line) for line in stages.read_text().splitlines()]
    assert done[-1]["rc"] == 143 or done[-1]["stage"] == "info", done  # the stage under way, if any


def test_python_probe_reads_the_wheels_abi_tag(tmp_path):
    """The image's Python against the carried wheels: cp312 ABI tags say 3.12; abi3 and pure wheels fit any."""
    from benchmarks.gpu import probes, wheel_python

    for name in ("pydantic_core-2.33.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                 "psutil-7.0.0-cp36-abi3-manylinux_2_12_x86_64.whl", "hjson-3.1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert wheel_python(tmp_path) == "3.12"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    got = probes(tmp_path)["python"]
    assert got["ok"] is (here == "3.12") and f"Python {here}; wheels built for 3.12" in got["detail"]
    (tmp_path / "msgpack-1.1.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"")
    assert wheel_python(tmp_path) == "3.11, 3.12"  # a mixed folder matches neither
