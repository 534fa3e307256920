"""docs/examples/deepspeed_lamb.py, a user's own DeepSpeed script, through the real launcher on 2 CPU ranks.

It trains with our LAMB under ZeRO-0 and then ZeRO-2 (bound with ``bind_deepspeed``). The test recomputes the same
five steps in float64 in plain PyTorch (mean of the two ranks' gradients) and asserts that ZeRO-2 equals ZeRO-0
within 10x the rounding control: ZeRO-0's own distance from that float64 run (measured: ZeRO-2 vs ZeRO-0 1.9e-7 of
the update, the control 4.6e-6).
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from conftest import REPO  # noqa: E402
from torch import nn

import optimizers

SCRIPT = REPO / "docs" / "examples" / "deepspeed_lamb.py"


def _float64_reference() -> list[torch.Tensor]:
    """The script's model, data and LAMB, in float64, one process: the mean of rank 0's and rank 1's gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33), nn.ReLU(), nn.Linear(33, 4)).double()
    opt = optimizers.build_optimizer("lamb", model, {"lr": 0.01, "weight_decay": 0.01})
    data = [torch.Generator().manual_seed(rank) for rank in (0, 1)]
    for _ in range(5):
        opt.zero_grad()
        for gen in data:
            x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            (nn.functional.cross_entropy(model(x.double()), y) / 2).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.launcher
def test_users_deepspeed_script_zero2_equals_zero0_within_rounding(tmp_path):
    from conftest import DEEPSPEED, child_env, free_port

    assert len(SCRIPT.read_text().splitlines()) <= 30  # a script a user reads in a minute
    out = tmp_path / "weights.pt"
    env = child_env(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPT), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.exists(), f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "DeepSpeedZeroOptimizer: 2 flat ZeRO partition(s) bound" in proc.stdout
    weights = torch.load(out, weights_only=True)
    ref = _float64_reference()
    torch.manual_seed(0)
    start = [p.detach().double() for p in nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33), nn.ReLU(),
                                                        nn.Linear(33, 4)).parameters()]

    def rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
        num = sum(float((g.double() - w.double()).norm()) ** 2 for g, w in zip(got, want, strict=True))
        den = sum(float((w.double() - s).norm()) ** 2 for w, s in zip(ref, start, strict=True))
        return (num / den) ** 0.5

    control = rel(weights[0], ref)  # fp32 rounding of the ZeRO-0 run
    assert 0.0 < control < 1e-5, control
    assert rel(weights[2], weights[0]) <= 10 * control, (rel(weights[2], weights[0]), control)
    assert rel(weights[2], ref) <= 10 * control
