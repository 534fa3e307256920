"""What a rank imports before its first step: DeepSpeed's Muon module without torch._inductor."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO, child_env

from train.engine import lazy_compile

PROBE = """
import json, sys
{first}
import deepspeed.runtime.zero.muon.muon_optimizer as m, deepspeed.runtime.zero.muon.original_muon as o
print(json.dumps({{"inductor": "torch._inductor" in sys.modules,
                   "muon_is_an_optimizer": issubclass(m.MuonWithAuxAdam, __import__("torch").optim.Optimizer),
                   "wrapped": hasattr(o.zeropower_via_newtonschulz5, "__wrapped__")}}))
"""


def probe(first: str) -> dict[str, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_rank_imports_deepspeeds_muon_module_without_torch_inductor():
    """DeepSpeed 0.19's ZeRO and bf16 optimizers import its Muon module in every run; decorated with
    torch.compile at import, it pulls in torch._inductor (1 CPU-s and 48 MB a rank). After train.engine (which
    every entry point imports before deepspeed.initialize) the module is the real one and inductor is not loaded.
    The control, the same imports without train.engine, loads inductor: if a DeepSpeed release stops doing so, this
    test says the work-around can go."""
    ours = probe("import train.engine")
    assert ours == {"inductor": False, "muon_is_an_optimizer": True, "wrapped": True}
    control = probe("")
    assert control["inductor"] and control["muon_is_an_optimizer"]


def test_lazy_compile_compiles_on_the_first_call_and_gives_the_functions_result():
    from torch._dynamo.utils import counters

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + x

    before = counters["stats"]["unique_graphs"]
    g = lazy_compile(backend="eager")(f)
    assert counters["stats"]["unique_graphs"] == before and g.__wrapped__ is f  # nothing compiled yet
    x = torch.linspace(-1, 1, 7)
    assert torch.equal(g(x), torch.sin(x) * 2 + x)
    assert counters["stats"]["unique_graphs"] == before + 1  # dynamo traced f once, on the first call
    g(x)
    assert counters["stats"]["unique_graphs"] == before + 1
