"""Every BERT recipe under ds_configs/bert/ against its source's numbers, written here from the sources (not read
from ds_configs/generate.py): length in steps, batch, sequence length, lr, warmup, decay, clipping, LAMB's
options, vocabulary and what phase 2 takes from phase 1.

* You et al. 2019 (arXiv:1904.00962): Table 1, 32k for 15,625 steps and 64k/32k for 8,599; 9/10 of the epochs at
  sequence length 128 (9/10 of the samples); Table 4, lr 5e-3 and warmup ratio 1/5 at 32k; section 4, betas
  0.9/0.999, eps 1e-6, weight decay 0.01.
* NVIDIA DeepLearningExamples BERT, scripts/run_pretraining.sh: 65,536 x 128 for 7,038 steps at lr 6e-3 with
  warmup 0.2843, then 32,768 x 512 for 1,563 steps at lr 4e-3 with warmup 0.128; PolyWarmUpScheduler degree 0.5;
  FusedLAMBAMP max_grad_norm 1.0; phase 2 resumes phase 1's optimizer state.
* DeepSpeedExamples bing_bert: deepspeed_bsz64k_lamb_config_seq128.json (lr 11e-3, bias_correction false,
  max_coeff 0.3, min_coeff 0.01, gradient_clipping 1.0), bert_large_lamb.json (warmup_proportion 0.06, decay_rate
  0.90 every 250 steps, total_training_steps 7,500; seq 512: 2e-3, 0.02, every 150), the scripts' --lr_offset
  10e-4 (phase 1) and 0.0 (phase 2); deepspeed_bsz32k_lamb_config_seq512.json (lr 2e-3).
* Devlin et al. 2018 (arXiv:1810.04805) and Google's BERT optimization.py: batch 256, 1M steps, lr 1e-4, 10k
  warmup steps, linear decay, weight decay 0.01 off LayerNorm and biases, clip_by_global_norm 1.0.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from train.config import load_json

BERT = Path(__file__).resolve().parent.parent / "ds_configs" / "bert"

# name: (batch, seq, steps, lr, warmup steps, schedule, power or decay, clip, carry)
SOURCES = {
    "lamb-32k-phase1": (32768, 128, 14063, 5e-3, 14063 / 5, "poly", 1.0, 0.0, None),
    "lamb-32k-phase2": (32768, 512, 1562, 5e-3, 1562 / 5, "poly", 1.0, 0.0, "weights"),
    "lamb-64k-phase1": (65536, 128, 7036, 5e-3 * math.sqrt(2), 7036 / 5, "poly", 1.0, 0.0, None),
    "lamb-64k-phase2": (32768, 512, 1563, 5e-3, 1563 / 5, "poly", 1.0, 0.0, "weights"),
    "nvlamb-64k-phase1": (65536, 128, 7038, 6e-3, 0.2843 * 7038, "nvidia-poly", 0.5, 1.0, None),
    "nvlamb-64k-phase2": (32768, 512, 1563, 4e-3, 0.128 * 1563, "nvidia-poly", 0.5, 1.0, "optimizer"),
    "dslamb-64k-phase1": (65536, 128, 7500, 11e-3, 0.06 * 7500, "exp", (0.9, 250, 1e-3), 1.0, None),
    "dslamb-64k-phase2": (32768, 512, 1563, 2e-3, 0.02 * 7500, "exp", (0.9, 150, 0.0), 1.0, "optimizer"),
    "adamw-256": (256, 128, 1_000_000, 1e-4, 10_000, "poly", 1.0, 1.0, None),
}


def test_you_et_al_step_totals_and_sample_split():
    """15,625 steps in all at 32k, 8,599 at 64k/32k; 9/10 of the samples at sequence length 128."""
    p1, p2 = SOURCES["lamb-32k-phase1"][2], SOURCES["lamb-32k-phase2"][2]
    assert p1 + p2 == 15625 and abs(p1 / (p1 + p2) - 0.9) < 1e-4
    p1, p2 = SOURCES["lamb-64k-phase1"][2], SOURCES["lamb-64k-phase2"][2]
    assert p1 + p2 == 8599 and abs(65536 * p1 / (65536 * p1 + 32768 * p2) - 0.9) < 1e-3


def test_every_bert_recipe_has_a_source_row():
    assert {p.stem for p in BERT.glob("*.json")} - {"demo"} == set(SOURCES)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_recipe_matches_its_source(name):
    batch, seq, steps, lr, warmup, kind, decay, clip, carry = SOURCES[name]
    cfg = load_json(BERT / f"{name}.json")
    bert, opt, sched = cfg["bert"], cfg["optimizer"], cfg["scheduler"]
    assert cfg["train_batch_size"] == batch and bert["seq_len"] == seq and bert["steps"] == steps
    assert bert["model"] == "large" and bert["vocab_size"] == 30522
    assert bert.get("carry") == carry  # phase 1 configs carry nothing in
    assert cfg["gradient_clipping"] == clip
    assert cfg["training"]["exclude_norm_and_bias"] is True
    p, sp = opt["params"], sched["params"]
    assert p["weight_decay"] == 0.01 and p["betas"] == [0.9, 0.999]
    assert sp["warmup_num_steps"] == round(warmup)  # the nearest whole step to the source's share
    if kind == "exp":  # bing_bert: lr + lr_offset at the end of warmup, the offset at step 0 and as the floor
        rate, every, offset = decay
        assert sched["type"] == "WarmupExpDecayLR" and opt["type"] == "LAMB"
        assert math.isclose(sp["warmup_max_lr"], lr + offset) and sp["warmup_min_lr"] == offset
        assert sp["warmup_power"] == 2.0 and sp["decay_rate"] == rate and sp["decay_num_steps"] == every
        assert p["lr"] == lr and p["bias_correction"] is False and p["eps"] == 1e-8
        assert p["max_trust_ratio"] == 0.3 and p["min_trust_ratio"] == 0.01
        return
    assert sched["type"] == "WarmupPolyLR" and sp["total_num_steps"] == steps
    assert math.isclose(sp["warmup_max_lr"], lr) and math.isclose(p["lr"], lr) and sp["warmup_min_lr"] == 0.0
    assert sp["power"] == decay and sp["end_lr"] == 0.0
    assert sp.get("decay_from_start", False) is (kind == "nvidia-poly")
    assert p["eps"] == 1e-6
    if name == "adamw-256":
        assert opt["type"] == "AdamW"
    else:
        assert opt["type"] == "LAMB" and p.get("bias_correction", True) is True and "max_trust_ratio" not in p


def test_bert_recipes_length_is_steps_not_epochs():
    """No recipe but the laptop demo counts its schedule in epochs (whose length depends on the sequence length)."""
    for name in SOURCES:
        sp = load_json(BERT / f"{name}.json")["scheduler"]["params"]
        assert not [k for k in sp if k.endswith("_epochs")], name
