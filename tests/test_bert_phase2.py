"""Phase 2 of a two-phase BERT recipe from a phase-1 DeepSpeed checkpoint (train/bert.py start_from_checkpoint),
in this process on a tiny BERT under bf16 and ZeRO-1 (so the fp32 masters and the module's bf16 copies differ):

* carry "optimizer" (NVIDIA's and bing_bert's phase 2): LAMB's moments equal phase 1's last ones, bit for bit;
  carry "weights" (You et al.): zero, as a fresh LAMB starts. Either way the fp32 masters are phase 1's, the step
  counts are 0 and the lr is phase 2's schedule at step 0, with phase 2's hyperparameters.
* The exported weights (fp32_state_dict, what model/ holds) equal the fp32 masters bit for bit, as DeepSpeed's
  own zero_to_fp32 reads them from the checkpoint, and are not an upcast of the bf16 copies.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch

from tests.test_recipes_start import _resolve, _tiny_bert, world  # noqa: F401 (world: the module fixture)
from train.bert import fp32_state_dict, init_folder, phase1_checkpoint, start_from_checkpoint
from train.config import ConfigError


def _config(lr: float, warmup_min: float) -> dict[str, Any]:
    return {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
            "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
            "optimizer": {"type": "LAMB", "params": {"lr": lr, "weight_decay": 0.01}},
            "scheduler": {"type": "WarmupPolyLR", "params": {"warmup_min_lr": warmup_min, "warmup_max_lr": lr,
                                                             "warmup_num_steps": 2, "total_num_steps": 10,
                                                             "end_lr": 0.0, "power": 1.0}},
            "training": {"epochs": 1}}


def _engine(cfg: dict[str, Any], seed: int) -> Any:
    from train.engine import build_engine

    torch.manual_seed(seed)
    engine, _ = build_engine(_resolve(cfg), _tiny_bert(), timeout=timedelta(minutes=5), trusted_checkpoint=False,
                             say=lambda *_: None)
    return engine


def _train(engine: Any, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(5, 40, (4, 8), generator=gen)
        labels = torch.where(torch.rand(4, 8, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
        logits, target = engine(ids, torch.ones_like(ids), labels)
        engine.backward(torch.nn.functional.cross_entropy(logits.float(), target))
        engine.step()


def _states(engine: Any) -> list[dict[str, Any]]:
    base = engine.basic_optimizer
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in base.state[p].items()}
            for g in base.param_groups for p in g["params"]]


@pytest.fixture(scope="module")
def phase1(world, tmp_path_factory) -> dict[str, Any]:  # noqa: F811
    run = tmp_path_factory.mktemp("phase1")
    engine = _engine(_config(5e-3, 0.0), seed=0)
    _train(engine, 3)
    engine.save_checkpoint(str(run / "checkpoints"), tag="step3", save_latest=False)
    (run / "checkpoints" / "latest").write_text("step3")
    (run / "model").mkdir()
    return {"run": run, "states": _states(engine), "masters": fp32_state_dict(engine)}


@pytest.mark.parametrize("carry", ["optimizer", "weights"])
def test_phase2_from_a_phase1_checkpoint(phase1, carry):
    run = phase1["run"]
    assert phase1_checkpoint(run) == (run / "checkpoints", "step3")  # a run folder: its latest checkpoint
    assert phase1_checkpoint(run / "checkpoints" / "step3") == (run / "checkpoints", "step3")  # a tag
    assert init_folder(run / "checkpoints" / "step3") == init_folder(run) == run / "model"
    engine = _engine(_config(2e-3, 1e-4), seed=7)  # other initial weights, other lr
    start_from_checkpoint(engine, run / "checkpoints", "step3", carry=carry)
    got, want = _states(engine), phase1["states"]
    assert len(got) == len(want) and all("exp_avg" in s for s in got)
    for g, w in zip(got, want, strict=True):
        assert int(g["step"]) == 0 and int(w["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            if carry == "optimizer":
                assert torch.equal(g[key], w[key]), key
            else:
                assert not g[key].any(), key
    assert any(w["exp_avg"].abs().max() > 0 for w in want)  # phase 1's moments were not zero to begin with
    assert engine.global_steps == 0 and engine.global_samples == 0
    group = engine.basic_optimizer.param_groups[0]
    assert group["lr"] == 1e-4  # phase 2's schedule at step 0 (warmup_min_lr), not phase 1's last lr
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-4] * len(engine.optimizer.param_groups)
    masters = fp32_state_dict(engine)
    for name, w in phase1["masters"].items():
        assert torch.equal(masters[name], w), name
    _train(engine, 1)  # and it trains on
    assert engine.global_steps == 1


def test_exported_weights_are_the_fp32_masters_bit_for_bit(phase1):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = phase1["run"]
    ds = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step3")
    exported = phase1["masters"]
    assert len(ds) > 10
    for name, w in ds.items():
        key = name.removeprefix("bert.")
        assert torch.equal(exported[key], w.float()), name
    engine = _engine(_config(2e-3, 1e-4), seed=7)
    start_from_checkpoint(engine, run / "checkpoints", "step3", carry="optimizer")
    upcast = {n: p.detach().float() for n, p in engine.module.bert.named_parameters()}
    assert upcast.keys() <= exported.keys()
    differ = [n for n in upcast if not torch.equal(upcast[n], exported[n])]
    assert differ, "the bf16 copies equal the fp32 masters: this test could not tell an upcast from the masters"


def test_init_from_a_folder_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a run folder"):
        phase1_checkpoint(tmp_path)
