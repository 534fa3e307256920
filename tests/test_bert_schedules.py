"""The BERT recipes' schedules against their sources' formulas, written out here independently.

NVIDIA DeepLearningExamples BERT, schedulers.py ``PolyWarmUpScheduler``: progress = t / T; lr = base x progress /
warmup while progress < warmup, else base x (1 - progress) ** 0.5. DeepSpeedExamples bing_bert,
``warmup_exp_decay_exp`` and ``--lr_offset``: lr = offset + base x (x / warmup) ** 2 while x = t / T < warmup, else
offset + base x decay_rate ** ((t - warmup x T) / decay_step).
"""

from __future__ import annotations

import math

from tests.test_schedules import lrs_seen
from train.schedules import WarmupExpDecayLR, WarmupPolyLR


def test_nvidia_poly_warmup_decays_from_step_zero():
    total, warmup, base = 7038, 0.2843, 6e-3
    w = round(warmup * total)  # 2001: the first step with progress >= 0.2843 is t = 2001 (2000.9 / 7038 = 0.2843)
    seen = lrs_seen(WarmupPolyLR, total, warmup_min_lr=0.0, warmup_max_lr=base, warmup_num_steps=w,
                    total_num_steps=total, end_lr=0.0, power=0.5, decay_from_start=True)
    for t in (w, w + 1, 4000, total - 1):
        assert math.isclose(seen[t], base * (1 - t / total) ** 0.5, rel_tol=1e-12), t
    for t in (1, 1000, w - 1):  # NVIDIA divides by warmup x T = 2000.9, we by 2001: 5e-5 relative
        assert math.isclose(seen[t], base * (t / total) / warmup, rel_tol=1e-4), t
    assert math.isclose(seen[w], base * (1 - 2001 / 7038) ** 0.5) and seen[w] < 0.85 * base  # the drop


def test_bing_bert_warmup_then_exponential_decay():
    total, warmup, base, offset = 7500, 0.06, 11e-3, 1e-3
    w = round(warmup * total)
    seen = lrs_seen(WarmupExpDecayLR, total, warmup_min_lr=offset, warmup_max_lr=offset + base, warmup_num_steps=w,
                    warmup_power=2.0, decay_rate=0.9, decay_num_steps=250)
    for t in (0, 1, 100, w - 1):
        assert math.isclose(seen[t], offset + base * ((t / total) / warmup) ** 2, rel_tol=1e-9), t
    for t in (w, w + 250, 5000, total - 1):
        assert math.isclose(seen[t], offset + base * 0.9 ** ((t - warmup * total) / 250), rel_tol=1e-9), t
