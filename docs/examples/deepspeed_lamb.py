"""Our LAMB in a DeepSpeed script of your own, ZeRO-0 then ZeRO-2 (docs/own-program.md).

Run from the repository root: PYTHONPATH=. deepspeed --num_gpus 2 docs/examples/deepspeed_lamb.py weights.pt
"""
import sys

import deepspeed
import torch
from torch import nn

import optimizers

weights = {}
for stage in (0, 2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.LayerNorm(33), nn.ReLU(), nn.Linear(33, 4))
    optimizer = optimizers.build_optimizer("lamb", model, {"lr": 0.01, "weight_decay": 0.01})
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told
              "zero_allow_untested_optimizer": True}  # ZeRO asks for this with any optimizer not its own
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    print(optimizers.bind_deepspeed(engine))  # on every rank, after initialize, before the first step
    data = torch.Generator().manual_seed(engine.global_rank)
    for _ in range(5):
        x, y = torch.randn(8, 16, generator=data), torch.randint(0, 4, (8,), generator=data)
        engine.backward(nn.functional.cross_entropy(engine(x.to(engine.device)), y.to(engine.device)))
        engine.step()
    weights[stage] = [p.detach().float().cpu().clone() for p in engine.module.parameters()]
if engine.global_rank == 0:
    torch.save(weights, sys.argv[-1])  # the launcher passes --local_rank=N first
