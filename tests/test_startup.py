"""What a rank imports before its first step: DeepSpeed's Muon module without torch._inductor, our optimizers
without torch._dynamo."""

from __future__ import annotations

import json
import re
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


OPTIMIZER_PROBE = """
import json, sys, torch
{build}
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
opts = [make(model.parameters()) for make in makers]
for opt in opts:
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules, "steps": [len(o.state) for o in opts]}}))
"""

OURS = """
from optimizers import LAMB, LARS, SGD
makers = [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: LARS(p, lr=0.1, momentum=0.9), lambda p: LAMB(p, lr=0.01)]
"""


def test_our_optimizers_build_step_and_checkpoint_without_importing_torch_dynamo():
    """torch decorates Optimizer.add_param_group, zero_grad, state_dict and load_state_dict with
    ``torch._disable_dynamo``, whose first call imports torch._dynamo (1.8 CPU-s, about 70 MB a rank): our
    optimizers call the undecorated methods in eager code (optimizers/_eager.py). The control, torch's SGD, imports
    it: if a torch release stops doing so, this test says the mixin can go."""
    ours = subprocess.run([sys.executable, "-c", OPTIMIZER_PROBE.format(build=OURS)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(ours.stdout.strip().splitlines()[-1]) == {"dynamo": False, "steps": [4, 4, 4]}
    torch_sgd = "makers = [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)]"
    control = subprocess.run(
        [sys.executable, "-c", OPTIMIZER_PROBE.format(build=torch_sgd)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(control.stdout.strip().splitlines()[-1]) == {"dynamo": True, "steps": [4]}


def test_a_compiled_caller_breaks_the_graph_at_our_optimizers_bookkeeping_as_at_torchs():
    """Under torch.compile the mixin hands over to torch's decorated methods: dynamo splits a caller into the same
    graphs at the same skipped Optimizer methods as it does for torch's own optimizers."""
    import torch._dynamo

    from optimizers import SGD

    def bookkeeping(opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        opt.zero_grad()
        y = y + 1
        state = opt.state_dict()
        opt.load_state_dict(state)
        return y * len(state["param_groups"])

    seen = {}
    for name, cls in (("ours", SGD), ("torch", torch.optim.SGD)):
        torch._dynamo.reset()
        opt = cls([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
        explained = torch._dynamo.explain(bookkeeping)(opt, torch.ones(2))
        skipped = [re.search(r"`(Optimizer\.\w+)`", str(b.reason)) for b in explained.break_reasons]
        seen[name] = (explained.graph_count, explained.op_count, [m and m.group(1) for m in skipped])
    assert seen["ours"] == seen["torch"] and "Optimizer.zero_grad" in seen["torch"][2]
