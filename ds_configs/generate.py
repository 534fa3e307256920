"""Write every ds_configs/*.json from the recipe table below: `python ds_configs/generate.py`.

The table is the one place the recipes live; tests/test_recipe_table.py proves that the checked-in JSON equals what
this script writes and that every config obeys the rule its row claims. Sources:

* Goyal et al. 2017 (arXiv:1706.02677), "goyal": SGD, Nesterov momentum 0.9, weight decay 1e-4, linear scaling
  lr = 0.1 x batch / 256, gradual (linear) warmup from 0.1 over 5 epochs, lr / 10 at epochs 30, 60, 80 of 90,
  32 images per worker, fp16 in our configs (their Caffe2 runs used fp32 on P100s).
* MLCommons ResNet-50 LARS reference, "mlcommons-lars": momentum 0.9, eta (trust_coefficient) 0.001, weight decay
  1e-4, linear warmup from 0 then polynomial decay (power 2) to 1e-4; base lr by batch: < 16k 10.0 with 5 warmup
  epochs, < 32k 25.0 with 5, else 31.2 with 25. 90 epochs as in the torchlars reproduction (256: 73.79%, 8k:
  73.78%, 16k: 73.36%, 32k: 72.26% top-1), which used the same poly(2) schedule and 5 warmup epochs.
* LAMB, "lamb-sqrt": You et al. 2019 (arXiv:1904.00962) with square-root lr scaling from timm's ResNet-50 LAMB
  recipe (Wightman et al. 2021, "ResNet strikes back", arXiv:2110.00476, A1: lr 5e-3 at batch 2048, weight
  decay 0.01): lr = 5e-3 x sqrt(batch / 2048); 5 warmup epochs from 0, poly(2) decay; 90 epochs. The schedule and
  epoch budget are our choice (RSB trains 600 epochs with a cosine schedule); no published run of this exact
  recipe exists, so treat its numbers as ours to measure.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MICRO_BATCH = 32  # Goyal et al.: BN statistics over n = 32 images per worker

FP16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
        "hysteresis": 2, "min_loss_scale": 1}


def goyal_lr(batch: int) -> float:
    """Goyal et al.'s linear scaling rule."""
    return 0.1 * batch / 256


def mlcommons_lars(batch: int) -> tuple[float, int]:
    """MLCommons' default base lr and warmup epochs for LARS by global batch."""
    if batch < 16384:
        return 10.0, 5
    if batch < 32768:
        return 25.0, 5
    return 31.2, 25


def lamb_lr(batch: int) -> float:
    """Square-root scaling from RSB's LAMB recipe (5e-3 at 2048)."""
    return 5e-3 * math.sqrt(batch / 2048)


# The recipe table: (file name, global batch, recipe, epochs). Read it as the list of experiments we ship.
RECIPES: list[tuple[str, int, str, int]] = [
    ("256", 256, "goyal", 90),
    ("1k", 1024, "goyal", 90),
    ("2k", 2048, "goyal", 90),
    ("4k", 4096, "goyal", 90),
    ("8k", 8192, "goyal", 90),
    ("16k", 16384, "goyal", 90),
    ("32k", 32768, "goyal", 90),
    ("lars-8k", 8192, "mlcommons-lars", 90),
    ("lars-16k", 16384, "mlcommons-lars", 90),
    ("lars-32k", 32768, "mlcommons-lars", 90),
    ("lamb-8k", 8192, "lamb-sqrt", 90),
    ("lamb-16k", 16384, "lamb-sqrt", 90),
    ("lamb-32k", 32768, "lamb-sqrt", 90),
    # The laptop demo: Goyal's recipe at batch 256 on Fashion-MNIST, shortened to 4 epochs (lr / 10 for the last),
    # 64 images per rank (2 CPU ranks run faster with fewer, larger micro-batches).
    ("demo", 256, "goyal-demo", 4),
]


def optimizer_and_schedule(batch: int, recipe: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if recipe in ("goyal", "goyal-demo"):
        lr = goyal_lr(batch)
        milestones = [3] if recipe == "goyal-demo" else [30, 60, 80]
        opt = {"type": "SGD", "params": {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}}
        sched = {"type": "WarmupMultiStepLR", "params": {
            "warmup_min_lr": min(0.1, lr), "warmup_max_lr": lr, "warmup_num_epochs": 0 if recipe == "goyal-demo"
            else 5, "warmup_type": "linear", "milestones_epochs": milestones, "gamma": 0.1}}
        return opt, sched
    if recipe == "mlcommons-lars":
        lr, warmup = mlcommons_lars(batch)
        opt = {"type": "LARS", "params": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-4,
                                          "trust_coefficient": 0.001}}
        sched = {"type": "WarmupPolyLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_epochs": warmup, "warmup_type": "linear",
            "total_num_epochs": "auto", "end_lr": 1e-4, "power": 2.0}}
        return opt, sched
    if recipe == "lamb-sqrt":
        lr = lamb_lr(batch)
        opt = {"type": "LAMB", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}}
        sched = {"type": "WarmupPolyLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_epochs": 5, "warmup_type": "linear",
            "total_num_epochs": "auto", "end_lr": 0.0, "power": 2.0}}
        return opt, sched
    raise ValueError(f"unknown recipe {recipe!r}")


def config(name: str, batch: int, recipe: str, epochs: int) -> dict[str, Any]:
    opt, sched = optimizer_and_schedule(batch, recipe)
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": 64 if recipe == "goyal-demo" else MICRO_BATCH,
        "fp16": dict(FP16),
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the papers' recipes do not clip
        "optimizer": opt,
        "scheduler": sched,
        "training": {"epochs": epochs, "label_smoothing": 0.0, "zero_init_residual": True,
                     "exclude_norm_and_bias": True, "recipe": recipe},
    }


# The tuned study (docs/study/, `python -m analysis.study`): the narrow small ResNet (train/models.py,
# resnet_small_narrow: batch norm, 10 weight tensors) on Fashion-MNIST, batch 256 ... 8192, the same 3-epoch budget
# for every run, bf16. Each method's lr is tuned at each batch on a grid around its own scaling rule: the rule's lr
# times each of TUNED_GRID (Shallue et al. 2018 and Nado et al. 2021 tune every method at every batch). Schedules:
# 1 warmup epoch; SGD then divides the lr by 5 at epoch 2 (Smith et al. multiply the batch by 5 there instead, so
# only where the larger batch leaves >= 4 steps an epoch: batch <= 2048); LARS and LAMB decay as poly(2) to ~0.
TUNED_BATCHES = [256, 1024, 2048, 4096, 8192]
TUNED_EPOCHS = 3
TUNED_DECAY = {"milestones_epochs": [2], "factor": 5}
TUNED_GRID = {"x1_3": 1 / 3, "x1": 1.0, "x3": 3.0}  # file-name tag -> factor on the rule's lr
# One step further where the grid's best is at its edge (analysis/study.py runs it only then).
TUNED_EXTENSION = {"x1_9": 1 / 9, "x9": 9.0}
TUNED_METHODS = {
    "goyal": "SGD, Nesterov 0.9, linear scaling 0.1 x B/256, warmup from 0.1 x factor (Goyal et al. 2017)",
    "lars": "LARS, eta 0.001, lr 10 x sqrt(B/8192) (MLCommons' 10.0 at 8k, square-root scaling), warmup from 0, "
            "poly(2)",
    "lamb": "LAMB, wd 0.01, lr 0.1 x sqrt(B/8192) (LARS's rule / 100: the same per-layer step), warmup, poly(2)",
    "smith": "SGD as goyal, but the batch x5 at epoch 2 instead of lr / 5 (Smith et al. 2018)",
    "momentum": "SGD, lr 0.1 x factor at every batch, momentum 1 - 0.1 x 256/B (Smith et al.'s B ~ 1/(1-m)), "
                "warmup, lr / 5 at epoch 2",
}
TUNED_MOMENTUM_BATCHES = [1024, 8192]  # the momentum-scaling method: only where it differs most from goyal
TUNED_MICRO = 64  # one process per run: BN statistics over 64 images (Goyal's n = 32 per worker); memory and speed
TUNED_NUM_TRAIN = 60000  # Fashion-MNIST's training set: Smith's batch must leave >= 4 steps an epoch


def tuned_rule_lr(method: str, batch: int) -> float:
    """The lr a method's scaling rule gives at ``batch`` (the centre of its tuning grid)."""
    if method in ("goyal", "smith"):
        return goyal_lr(batch)
    if method == "lars":
        # Square root, not linear, below 8k: a probe at 256 (3 epochs) gave 19.4% error at the linear rule's 0.31,
        # 14.8% at 3x and 12.5% at 9x; the square-root rule's 1.77 puts that optimum inside the grid.
        return 10.0 * math.sqrt(batch / 8192)
    if method == "lamb":
        # LAMB's step of a layer is about lr x ||w|| (an Adam direction rescaled to the weight's norm), LARS's with
        # momentum 0.9 about lr x eta / (1 - 0.9) x ||w|| = lr / 100 x ||w||: LARS's rule / 100 gives the same
        # step. RSB's 5e-3 at 2k (for 600 epochs) was too small here: a probe at 256 had 25.4% error after 2 of 3
        # epochs at its 1.77e-3, 14.1% at 3x and 12.5% at 9x.
        return 0.1 * math.sqrt(batch / 8192)
    if method == "momentum":
        return 0.1
    raise ValueError(f"unknown tuned-study method {method!r}; known: {', '.join(TUNED_METHODS)}")


def tuned_study_config(method: str, batch: int, factor: float) -> dict[str, Any] | None:
    """One run of the tuned study: ``method`` at ``batch`` with lr = rule x ``factor``; None where it cannot run."""
    lr = tuned_rule_lr(method, batch) * factor
    training: dict[str, Any] = {"epochs": TUNED_EPOCHS, "recipe": f"study-{method}"}
    warmup = {"warmup_num_epochs": 1, "warmup_type": "linear"}
    if method in ("goyal", "smith", "momentum"):
        opt = {"type": "SGD", "params": {"lr": lr, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}}
        params: dict[str, Any] = {"warmup_min_lr": min(0.1 * factor, lr), "warmup_max_lr": lr, **warmup}
        if method == "smith":
            if batch * TUNED_DECAY["factor"] > TUNED_NUM_TRAIN // 4:
                return None
            training["batch_increase"] = dict(TUNED_DECAY)
            params |= {"milestones_epochs": [], "gamma": 1.0}
        else:
            params |= {"milestones_epochs": TUNED_DECAY["milestones_epochs"], "gamma": 1 / TUNED_DECAY["factor"]}
        if method == "momentum":
            training["momentum_scaling"] = {"base_batch": 256, "base_momentum": 0.9}
        sched = {"type": "WarmupMultiStepLR", "params": params}
    elif method == "lars":
        opt = {"type": "LARS", "params": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-4,
                                          "trust_coefficient": 0.001}}
        sched = {"type": "WarmupPolyLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, **warmup,
                                                    "total_num_epochs": "auto", "end_lr": lr * 1e-5, "power": 2.0}}
    else:  # lamb
        opt = {"type": "LAMB", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}}
        sched = {"type": "WarmupPolyLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, **warmup,
                                                    "total_num_epochs": "auto", "end_lr": 0.0, "power": 2.0}}
    return {"train_batch_size": batch, "train_micro_batch_size_per_gpu": min(TUNED_MICRO, batch),
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
            "optimizer": opt, "scheduler": sched, "training": training}


def tuned_study_points() -> list[tuple[str, int, str, float]]:
    """(method, batch, grid tag, factor) of every tuned-study config."""
    out = []
    for method in TUNED_METHODS:
        for batch in TUNED_MOMENTUM_BATCHES if method == "momentum" else TUNED_BATCHES:
            for tag, factor in (TUNED_GRID | TUNED_EXTENSION).items():
                if tuned_study_config(method, batch, factor) is not None:
                    out.append((method, batch, tag, factor))
    return out


# The first laptop-scale study (ds_configs/study-mlp/, `python -m analysis.study --workload mlp`; its results are a
# section of docs/study/README.md): the MLP on Fashion-MNIST, batch 64 ... 8192 (a factor of 128; at 8192 an epoch
# has 7 steps, about as few as 32k has on ImageNet's 39), the same 6-epoch budget for all, and six methods. Where a
# method divides the lr by 5 (epochs 4 and 5), Smith et al. multiply the batch by 5.
STUDY_BATCHES = [64, 128, 256, 512, 1024, 2048, 4096, 8192]
STUDY_EPOCHS = 6
STUDY_DECAY = {"milestones_epochs": [4, 5], "factor": 5}
STUDY_METHODS = {
    "noscale": "(a) SGD, lr 0.1 at every batch, no warmup",
    "linear": "(b) SGD, linear scaling 0.1 x B/256, no warmup",
    "goyal": "(c) SGD, linear scaling with gradual warmup over 1 epoch from 0.1 (Goyal et al.)",
    "lars": "(d) LARS, lr 10 x B/8192 (MLCommons' 10.0 at 8k, scaled linearly), 1 warmup epoch from 0, poly(2)",
    "lamb": "(e) LAMB, lr 5e-3 x sqrt(B/2048), wd 0.01, 1 warmup epoch from 0, poly(2)",
    "smith": "(f) SGD as (c), but the batch x5 at epochs 4 and 5 instead of lr / 5 (Smith et al.)",
}
STUDY_MICRO = 64  # images per micro-step: the study runs one process per run, so this only sets memory and speed


def mlp_study_config(method: str, batch: int) -> dict[str, Any] | None:
    """The config of one study run; None where the method cannot run (Smith's batch would exceed the data)."""
    base = 0.1 * batch / 256
    training: dict[str, Any] = {"epochs": STUDY_EPOCHS, "recipe": f"study-{method}"}
    warmup = {"warmup_num_epochs": 1, "warmup_type": "linear"}
    decay = {"milestones_epochs": STUDY_DECAY["milestones_epochs"], "gamma": 1 / STUDY_DECAY["factor"]}
    sgd = {"type": "SGD", "params": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}}
    if method in ("noscale", "linear", "goyal", "smith"):
        lr = 0.1 if method == "noscale" else base
        opt = {"type": "SGD", "params": {"lr": lr, **sgd["params"]}}
        lo = lr if method in ("noscale", "linear") else min(0.1, lr)
        params: dict[str, Any] = {"warmup_min_lr": lo, "warmup_max_lr": lr, **warmup}
        if method == "smith":
            if batch * STUDY_DECAY["factor"] ** len(STUDY_DECAY["milestones_epochs"]) > 60000:
                return None
            training["batch_increase"] = dict(STUDY_DECAY)
            params |= {"milestones_epochs": [], "gamma": 1.0}
        else:
            params |= decay
        sched = {"type": "WarmupMultiStepLR", "params": params}
    elif method == "lars":
        lr = 10.0 * batch / 8192
        opt = {"type": "LARS", "params": {"lr": lr, "momentum": 0.9, "weight_decay": 1e-4,
                                          "trust_coefficient": 0.001}}
        sched = {"type": "WarmupPolyLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, **warmup,
                                                    "total_num_epochs": "auto", "end_lr": 1e-4 * lr / 10,
                                                    "power": 2.0}}
    elif method == "lamb":
        lr = 5e-3 * math.sqrt(batch / 2048)
        opt = {"type": "LAMB", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01}}
        sched = {"type": "WarmupPolyLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, **warmup,
                                                    "total_num_epochs": "auto", "end_lr": 0.0, "power": 2.0}}
    else:
        raise ValueError(f"unknown study method {method!r}")
    return {"train_batch_size": batch, "train_micro_batch_size_per_gpu": min(STUDY_MICRO, batch),
            "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, "optimizer": opt, "scheduler": sched,
            "training": training}


# Downpour SGD (Dean et al. 2012, sec. 4.1; train/downpour.py): the asynchronous baseline, on Fashion-MNIST with the
# MLP of train/models.py. (file name, replicas W, shards S, shard optimizer, epochs). Adagrad's lr 0.05 from an
# accumulator of 0.1 (torch's Adagrad with initial_accumulator_value) is our choice, tried on this data; Dean et al.
# do not state theirs. The plain-SGD rows use the same lr at the shards, to show why Dean et al. chose Adagrad.
DOWNPOUR: list[tuple[str, int, int, str, int]] = [
    ("fmnist-w2-s2", 2, 2, "adagrad", 2),  # the README's command: >= 85% test accuracy in under 5 minutes on 2 cores
    ("fmnist-w1-s2", 1, 2, "adagrad", 2),
    ("fmnist-w4-s2", 4, 2, "adagrad", 2),
    ("fmnist-w8-s2", 8, 2, "adagrad", 2),
    ("fmnist-w2-s2-sgd", 2, 2, "sgd", 2),
]


def downpour_config(replicas: int, shards: int, optimizer: str, epochs: int) -> dict[str, Any]:
    return {"downpour": {"model": "mlp", "dataset": "fashion-mnist", "replicas": replicas, "shards": shards,
                         "batch_per_replica": 32, "n_fetch": 1, "n_push": 1, "optimizer": optimizer, "lr": 0.05,
                         "initial_accumulator_value": 0.1, "warmstart_steps": 0, "epochs": epochs}}


# BERT pre-training (ds_configs/bert/, train/bert.py). A two-phase recipe is two configs: sequence length 128, then
# 512 started from phase 1's checkpoint (--init-from); the "bert" block says how long each phase runs in optimizer
# steps (as the sources do; never epochs, whose length would depend on the sequence length) and what phase 2 takes
# from phase 1 ("carry": "optimizer" keeps LAMB's moments and resets its step and the schedule; "weights" starts
# a fresh optimizer). Every BERT-large recipe uses BERT's 30,522-token uncased WordPiece vocabulary size.
# * You et al. 2019 (arXiv:1904.00962), Table 1 and Table 4 (untuned LAMB, square-root lr scaling): 32k for 15,625
#   steps, 9/10 of the epochs at sequence length 128 and 1/10 at 512 (so 9/10 of the samples: 14,063 + 1,562
#   steps at one batch); lr 5 / (2^0 x 10^3) = 5e-3 with warmup ratio 1/5; beta1 0.9, beta2 0.999, eps 1e-6,
#   weight decay 0.01 (their section 4); linear decay. Their 64k/32k run takes 8,599 steps; 9 : 1 in samples at
#   64k : 32k is 7,036 + 1,563 steps. That row gives no lr: ours is the square-root rule from the 32k row
#   (5e-3 x sqrt(2) at 64k). Each phase warms up again (their section 4); phase 2 starts a fresh optimizer (the
#   paper does not say it keeps the moments). No gradient clipping (the paper states none).
# * NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BERT (scripts/run_pretraining.sh, schedulers.py,
#   lamb_amp_opt.py): phase 1 65,536 x 128 for 7,038 steps, lr 6e-3, warmup 0.2843; phase 2 32,768 x 512 for
#   1,563 steps, lr 4e-3, warmup 0.128; PolyWarmUpScheduler, degree 0.5 on step / total (decay_from_start);
#   FusedLAMBAMP (betas 0.9/0.999, eps 1e-6, weight decay 0.01, bias correction) divides all gradients by
#   max(1, global_norm / 1.0) before its update. DeepSpeed's "gradient_clipping": 1.0 does the same over the same
#   global norm (ZeRO divides by max(1, (norm + 1e-6) / 1.0)): the two differ by the 1e-6 only, a relative 1e-6
#   at most where clipping acts. Phase 2 loads phase 1's optimizer state and resets its step and the lr schedule.
# * DeepSpeedExamples training/bing_bert (deepspeed_bsz64k_lamb_config_seq128.json,
#   deepspeed_bsz32k_lamb_config_seq512.json, bert_large_lamb.json, the ds_train_bert_*.sh scripts): DeepSpeed's
#   Lamb with bias_correction false, max_coeff 0.3, min_coeff 0.01 (our max/min_trust_ratio), weight decay 0.01,
#   its default betas 0.9/0.999 and eps 1e-8; gradient_clipping 1.0; fp16. Phase 1 65,536 x 128, lr 11e-3 with
#   --lr_offset 1e-3 (so 1e-3 .. 12e-3), warmup 0.06 of 7,500 steps (power 2), then x 0.9 every 250 steps, 7,500
#   steps. Phase 2 32,768 x 512, lr 2e-3, offset 0, warmup 0.02 of 7,500 (--rewarmup), x 0.9 every 150 steps; it
#   loads the phase-1 checkpoint with its optimizer state. Its length is ten of bing_bert's data epochs, which no
#   file states in steps: we run NVIDIA's 1,563.
# * Devlin et al. 2018 (arXiv:1810.04805), the AdamW baseline (BERT's AdamWeightDecayOptimizer, as in Google's
#   BERT code): batch 256, lr 1e-4, beta 0.9/0.999, eps 1e-6, weight decay 0.01 but not on LayerNorm or biases,
#   gradients clipped at global norm 1.0, 10,000 warmup steps, linear decay to 0 at 1,000,000 steps; one config
#   at sequence length 128 (their last 10% of the steps at 512 is left out).
# * demo: BERT-tiny on the Debian corpus, 2 CPU ranks, batch 64, 2 epochs: LAMB at lr 1e-2 (our choice, for a run
#   of about 4 minutes on 2 cores), vocabulary 4,096.
BERT_VOCAB = 30522  # bert-base/large-uncased
YOU_32K_STEPS, YOU_64K_STEPS = (14063, 1562), (7036, 1563)  # You et al.: 15,625 and 8,599 steps in all
NVIDIA_STEPS = (7038, 1563)
BING_TOTAL = 7500  # bing_bert's total_training_steps, the horizon of both phases' warmup


def _lamb(lr: float, **extra: Any) -> dict[str, Any]:
    return {"type": "LAMB", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01, **extra}}


def _poly(lr: float, warmup_steps: int, total: int, power: float, *, from_start: bool = False) -> dict[str, Any]:
    return {"type": "WarmupPolyLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps, "warmup_type": "linear",
        "total_num_steps": total, "end_lr": 0.0, "power": power, **({"decay_from_start": True} if from_start else {})}}


def _bing_bert(lr: float, offset: float, warmup: float, decay_steps: int) -> dict[str, Any]:
    return {"type": "WarmupExpDecayLR", "params": {
        "warmup_min_lr": offset, "warmup_max_lr": offset + lr, "warmup_num_steps": round(warmup * BING_TOTAL),
        "warmup_type": "linear", "warmup_power": 2.0, "decay_rate": 0.9, "decay_num_steps": decay_steps}}


def bert_recipes() -> dict[str, dict[str, Any]]:
    """name -> {batch, seq_len, steps, optimizer, scheduler, clip, carry, recipe}: the table of ds_configs/bert/."""
    you = {}
    for tag, (batch1, lr1), steps in (("32k", (32768, 5e-3), YOU_32K_STEPS),
                                      ("64k", (65536, 5e-3 * math.sqrt(2)), YOU_64K_STEPS)):
        for phase, (batch, lr, seq) in enumerate(((batch1, lr1, 128), (32768, 5e-3, 512))):
            n = steps[phase]
            you[f"lamb-{tag}-phase{phase + 1}"] = dict(
                batch=batch, seq_len=seq, steps=n, optimizer=_lamb(lr), scheduler=_poly(lr, round(n / 5), n, 1.0),
                clip=0.0, carry="weights", recipe=f"you2019-{tag if tag == '32k' else '64k/32k'}")
    nvidia = {f"nvlamb-64k-phase{i + 1}": dict(
        batch=batch, seq_len=seq, steps=n, optimizer=_lamb(lr),
        scheduler=_poly(lr, round(warmup * n), n, 0.5, from_start=True), clip=1.0, carry="optimizer",
        recipe="nvidia-64k/32k")
        for i, (batch, seq, n, lr, warmup) in enumerate(((65536, 128, NVIDIA_STEPS[0], 6e-3, 0.2843),
                                                          (32768, 512, NVIDIA_STEPS[1], 4e-3, 0.128)))}
    bing_lamb = {"bias_correction": False, "max_trust_ratio": 0.3, "min_trust_ratio": 0.01}
    bing = {
        "dslamb-64k-phase1": dict(batch=65536, seq_len=128, steps=BING_TOTAL,
                                  optimizer={"type": "LAMB", "params": {
                                      "lr": 11e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                      **bing_lamb}},
                                  scheduler=_bing_bert(11e-3, 1e-3, 0.06, 250), clip=1.0, carry="optimizer",
                                  recipe="deepspeed-bing-bert-64k/32k"),
        "dslamb-64k-phase2": dict(batch=32768, seq_len=512, steps=NVIDIA_STEPS[1],
                                  optimizer={"type": "LAMB", "params": {
                                      "lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                      **bing_lamb}},
                                  scheduler=_bing_bert(2e-3, 0.0, 0.02, 150), clip=1.0, carry="optimizer",
                                  recipe="deepspeed-bing-bert-64k/32k"),
    }
    devlin = {"adamw-256": dict(
        batch=256, seq_len=128, steps=1_000_000,
        optimizer={"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01,
                                               "torch_adam": True}},
        scheduler=_poly(1e-4, 10_000, 1_000_000, 1.0), clip=1.0, carry="weights", recipe="devlin2018")}
    return you | nvidia | bing | devlin


def bert_config(row: dict[str, Any]) -> dict[str, Any]:
    """One BERT-large config from a row of :func:`bert_recipes`."""
    return {"train_batch_size": row["batch"], "train_micro_batch_size_per_gpu": 64 if row["seq_len"] == 128 else 16,
            "fp16": dict(FP16), "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": row["clip"], "optimizer": row["optimizer"], "scheduler": row["scheduler"],
            "training": {"epochs": 1, "exclude_norm_and_bias": True, "recipe": row["recipe"]},
            "bert": {"model": "large", "seq_len": row["seq_len"], "vocab_size": BERT_VOCAB, "steps": row["steps"],
                     **({"carry": row["carry"]} if row["seq_len"] == 512 else {})}}


def bert_demo_config() -> dict[str, Any]:
    """The laptop demo: epochs of the Debian corpus, linear warmup over a tenth, linear decay."""
    lr = 1e-2
    return {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 1},
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "optimizer": _lamb(lr),
            "scheduler": {"type": "WarmupPolyLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_epochs": 0.2, "warmup_type": "linear",
                "total_num_epochs": "auto", "end_lr": 0.0, "power": 1.0}},
            "training": {"epochs": 2, "exclude_norm_and_bias": True, "recipe": "bert-demo"},
            "bert": {"model": "tiny", "seq_len": 128, "vocab_size": 4096}}


def all_configs() -> dict[Path, dict[str, Any]]:
    out = {HERE / f"{name}.json": config(name, batch, recipe, epochs) for name, batch, recipe, epochs in RECIPES}
    for name, row in bert_recipes().items():
        out[HERE / "bert" / f"{name}.json"] = bert_config(row)
    out[HERE / "bert" / "demo.json"] = bert_demo_config()
    for method, batch, tag, factor in tuned_study_points():
        out[HERE / "study" / f"{method}-{batch}-{tag}.json"] = tuned_study_config(method, batch, factor)
    for method in STUDY_METHODS:
        for batch in STUDY_BATCHES:
            cfg = mlp_study_config(method, batch)
            if cfg is not None:
                out[HERE / "study-mlp" / f"{method}-{batch}.json"] = cfg
    for name, replicas, shards, optimizer, epochs in DOWNPOUR:
        out[HERE / "downpour" / f"{name}.json"] = downpour_config(replicas, shards, optimizer, epochs)
    return out


def render(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, indent=2) + "\n"


def main(argv: list[str]) -> int:
    """Write the configs; with --check, only report files that differ from the table (exit 1 if any)."""
    check = "--check" in argv
    stale = []
    configs = all_configs()
    for path, cfg in configs.items():
        text = render(cfg)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(HERE)))
        else:
            path.parent.mkdir(exist_ok=True)  # study/, study-mlp/, bert/
            path.write_text(text)
    extra = sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*.json") if p not in configs)
    if extra:
        print(f"not in the recipe table (remove them or add a row): {', '.join(extra)}")
        return 1
    if stale:
        print(f"out of date with the recipe table: {', '.join(stale)}; run python ds_configs/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
