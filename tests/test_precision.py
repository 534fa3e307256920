"""Which precision a run gets, independent of this host's instruction set.

The rule (train/precision.py, train/config.py): on a CPU, --precision auto never picks fp16, even where DeepSpeed's
CPU accelerator claims it (Xeons with avx512_fp16, where fp16 is emulated); on an x86 CPU whose flags name no native
bf16 (avx512_bf16, amx_bf16) fp32 without a probe; else bf16 only when a timed probe measures it at least 1.1x faster
than fp32; else fp32. The claims, the CPU flags and the probe's answer are inputs here, so every branch runs on any
machine; one real run checks that what config.json records is consistent with the rule on this host.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_single

from train.config import choose_precision, resolve
from train.precision import MIN_BF16_SPEEDUP, bf16_speedup, fast_precisions, native_bf16

ALL = ("fp32", "fp16", "bf16")  # what DeepSpeed's CPU accelerator reports on an avx512_fp16 Xeon


def fp16_config() -> dict:
    return {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 64, "fp16": {"enabled": True},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "training": {"epochs": 1}}


def test_cpu_claiming_fp16_never_gets_it_automatically():
    for speedup, want in ((2.4, "bf16"), (1.5, "bf16"), (1.05, "fp32"), (0.4, "fp32")):
        fast, why = fast_precisions("cpu", ALL, lambda s=speedup: s)
        assert "fp16" not in fast and ("bf16" in fast) == (speedup >= MIN_BF16_SPEEDUP)
        assert f"bf16 measured {speedup:.2f}x" in why and "fp16 is never chosen automatically" in why
        r = resolve(fp16_config(), world_size=2, num_train=60000, supported_precisions=ALL, fast_precisions=fast,
                    precision_reason=why)
        assert r.precision == want and r.config_precision == "fp16"
        assert "fp16" not in r.ds_config and (r.ds_config.get("bf16") == {"enabled": True}) == (want == "bf16")
        assert r.notes == [f"WARNING: fp16 is not natively supported (emulated, slow) on this device; running in "
                           f"{want} instead (same optimizer math, different rounding; --precision forces one)"]
        assert r.derived()["precision_reason"] == why


def test_cpu_without_bf16_support_is_not_probed_and_gets_fp32():
    def probe() -> float:
        raise AssertionError("the probe must not run when bf16 is not supported")

    fast, why = fast_precisions("cpu", ("fp32",), probe)
    assert fast == ("fp32",) and "bf16 not supported" in why


# /proc/cpuinfo excerpts (one core each; the flags lines shortened to the flags that matter and a few others)
EPYC_ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
ICELAKE = "processor\t: 0\nmodel name\t: Intel Xeon 8375C\nflags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bitalg\n"
COOPERLAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
AMX_ONLY = "processor\t: 0\nflags\t\t: avx2 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_native_bf16_is_read_from_the_x86_flags_and_unknown_elsewhere():
    assert native_bf16(EPYC_ZEN3) is False and native_bf16(ICELAKE) is False  # AVX-512 without bf16: emulated
    assert native_bf16(COOPERLAKE) is True and native_bf16(SAPPHIRE) is True and native_bf16(AMX_ONLY) is True
    assert native_bf16(GRAVITON3) is None and native_bf16("") is None  # no x86 flags line: the probe decides


def test_cpu_without_native_bf16_gets_fp32_without_a_probe():
    def probe() -> float:
        raise AssertionError("the probe must not run on a CPU whose flags name no native bf16")

    for cpuinfo in (EPYC_ZEN3, ICELAKE):
        fast, why = fast_precisions("cpu", ALL, probe, native_bf16(cpuinfo))
        assert fast == ("fp32",)
        assert "bf16 not measured: this CPU has no native bf16 instructions (none of avx512_bf16, amx_bf16" in why
        r = resolve(fp16_config(), world_size=2, num_train=60000, supported_precisions=ALL, fast_precisions=fast,
                    precision_reason=why)
        assert r.precision == "fp32" and r.derived()["precision_reason"] == why
    for cpuinfo, speedup in ((SAPPHIRE, 3.0), (COOPERLAKE, 0.9), (GRAVITON3, 1.5)):  # native or unknown: measured
        calls: list[int] = []
        fast, why = fast_precisions("cpu", ALL, lambda s=speedup, c=calls: c.append(1) or s, native_bf16(cpuinfo))
        assert calls == [1] and ("bf16" in fast) == (speedup >= MIN_BF16_SPEEDUP) and f"{speedup:.2f}x" in why


def test_gpu_runs_every_supported_precision_without_a_probe():
    def probe() -> float:
        raise AssertionError("no probe on a GPU")

    fast, why = fast_precisions("cuda", ALL, probe)
    assert fast == ALL and why.startswith("cuda:")
    assert resolve(fp16_config(), world_size=4, num_train=10 ** 6, supported_precisions=ALL,
                   fast_precisions=fast).precision == "fp16"


def test_explicit_fp16_on_a_cpu_that_claims_it_is_obeyed_with_one_warning():
    notes: list[str] = []
    assert choose_precision("fp16", "fp16", ALL, ("fp32", "bf16"), notes) == "fp16"
    assert len(notes) == 1 and "emulated and slow" in notes[0] and notes[0].startswith("WARNING: --precision fp16")
    notes.clear()
    assert choose_precision("fp16", "fp16", ALL, ALL, notes) == "fp16" and notes == []  # a GPU: no warning


class VirtualClock:
    """time.perf_counter for train.precision: it moves only when a model's forward says so, so the probe's
    arithmetic is checked exactly on any machine (real sleeps read 0.67 for a 2x speed-up on a loaded one)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __deepcopy__(self, memo: dict) -> VirtualClock:
        return self  # the probe copies the model; the copies keep this one clock


class DtypeTimedNet(torch.nn.Module):
    """A model whose forward takes 60 ms in fp32 and 30 ms in bf16 on the clock; ``delays`` adds time to the first
    steps of a dtype (another program taking the CPU): the probe must still measure a 2x speed-up."""

    def __init__(self, clock: VirtualClock, delays: dict[torch.dtype, list[float]]) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(4)
        self.clock, self.delays = clock, delays

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.delays.get(x.dtype, [])
        self.clock.now += (0.060 if x.dtype == torch.float32 else 0.030) + (extra.pop(0) if extra else 0.0)
        return self.linear(self.bn(x))


@pytest.mark.parametrize("delays", [{}, {torch.bfloat16: [0.5, 0.2, 0.04]}, {torch.float32: [0.3, 0.3]}])
def test_the_probe_measures_the_ratio_of_step_times_and_leaves_the_model_untouched(monkeypatch, delays):
    import train.precision

    clock = VirtualClock()
    monkeypatch.setattr(train.precision, "time", clock)
    torch.manual_seed(0)
    model = DtypeTimedNet(clock, {k: list(v) for k, v in delays.items()})
    before = copy.deepcopy(model.state_dict())
    speedup = bf16_speedup(model, torch.randn(8, 4), torch.nn.functional.cross_entropy, torch.randint(0, 3, (8,)),
                           seconds=1.0)
    assert speedup == pytest.approx(0.060 / 0.030, rel=1e-9)  # each dtype's fastest step; delays only add time
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert all(p.grad is None for p in model.parameters())


def host_has_no_native_bf16() -> bool:
    """This host's answer, read here from /proc/cpuinfo independently of train/precision.py: an x86 flags line
    naming neither avx512_bf16 nor amx_bf16."""
    try:
        flags = [line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.split(":", 1)[0].strip() == "flags"]
    except OSError:
        return False
    return bool(flags) and not any({"avx512_bf16", "amx_bf16"} & set(f) for f in flags)


@pytest.mark.launcher
def test_a_real_cpu_run_records_a_choice_consistent_with_the_rule(tmp_path, fashion_mnist_dir):
    """demo.json asks for fp16: on this CPU the run gets fp32 unprobed where the flags name no native bf16, else
    bf16 or fp32 by the probe it records; never fp16."""
    run = tmp_path / "r"
    out = run_single(["--deepspeed_config", "ds_configs/demo.json", "--dataset", "fashion-mnist", "--data-dir",
                      str(fashion_mnist_dir), "--arch", "resnet_small", "--train-subset", "256", "--val-subset",
                      "64", "--max-steps", "1", "--output-dir", str(run), "--no-wandb"])
    derived = json.loads((run / "config.json").read_text())["derived"]
    if host_has_no_native_bf16():
        assert derived["precision"] == "fp32"
        assert "bf16 not measured: this CPU has no native bf16 instructions" in derived["precision_reason"]
        assert "bf16 measured" not in derived["precision_reason"]
    else:
        speedup = float(re.search(r"bf16 measured ([\d.]+)x", derived["precision_reason"]).group(1))
        assert derived["precision"] == ("bf16" if speedup >= MIN_BF16_SPEEDUP else "fp32")
    assert f"precision: {derived['precision']} (config: fp16)" in out.stdout
    assert f"precision choice: {derived['precision_reason']}" in out.stdout
