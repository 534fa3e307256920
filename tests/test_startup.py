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
import torch, deepspeed.runtime.compiler as c
ns = o.zeropower_via_newtonschulz5
print(json.dumps({{"inductor": "torch._inductor" in sys.modules,
                   "muon_is_an_optimizer": issubclass(m.MuonWithAuxAdam, torch.optim.Optimizer),
                   "not_compiled_yet": getattr(ns, "compiled", 1) is None and ns.__wrapped__.__module__ == o.__name__,
                   "compile_restored": c.compile() is torch.compile}}))
"""


def probe(first: str) -> dict[str, bool]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_rank_imports_deepspeeds_muon_module_without_torch_inductor():
    """DeepSpeed 0.19's ZeRO and bf16 optimizers import its Muon module in every run; decorated with
    torch.compile at import, it pulls in torch._inductor (1.2 CPU-s and 48 MB a rank). After train.engine (which
    every entry point imports before deepspeed.initialize) the module is the real one and inductor is not loaded.
    The control, the same imports without train.engine, loads inductor: if a DeepSpeed release stops doing so, this
    test says the work-around can go."""
    ours = probe("import train.engine")
    assert ours == {"inductor": False, "muon_is_an_optimizer": True, "not_compiled_yet": True,
                    "compile_restored": True}
    control = probe("")
    assert control["inductor"] and control["muon_is_an_optimizer"] and not control["not_compiled_yet"]


def test_lazy_compile_compiles_on_the_first_call_once_and_gives_the_functions_result():
    from torch._dynamo.utils import counters

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + x

    before = counters["stats"]["unique_graphs"]
    g = lazy_compile(backend="eager")(f)
    assert g.compiled is None and g.__wrapped__ is f and counters["stats"]["unique_graphs"] == before
    x = torch.linspace(-1, 1, 7)
    assert torch.equal(g(x), torch.sin(x) * 2 + x)
    compiled = g.compiled
    assert compiled._torchdynamo_orig_callable is f  # what torch.compile(f) returns
    assert counters["stats"]["unique_graphs"] == before + 1  # dynamo traced f once, on the first call
    g(x)
    assert g.compiled is compiled and counters["stats"]["unique_graphs"] == before + 1
