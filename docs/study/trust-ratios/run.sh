#!/usr/bin/env bash
# The runs behind docs/study/trust-ratios/ (README.md there): LARS on the small ResNet at batch 256, 1k and 8k and
# Goyal's SGD at 256 with --trust-ratio-interval 5 (2 CPU ranks, ZeRO-1), one step of ResNet-50, then the panels.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DS=.venv/bin/deepspeed
CFG=docs/study/trust-ratios/configs
OUT=runs/trust-ratios
COMMON=(--dataset fashion-mnist --arch resnet_small --trust-ratio-interval 5 --log-interval 20 --no-wandb --overwrite)
for name in lars-256 lars-1024 lars-8192 sgd-256; do
    $DS --num_gpus 2 train/imagenet.py --deepspeed_config $CFG/$name.json --output-dir $OUT/$name "${COMMON[@]}"
done
# You et al.'s table for ResNet-50 at initialisation: one LARS step (fp32, one process, 28x28 inputs), with Goyal's
# zero-initialised last batch-norm gamma of each residual block (our default) and with torchvision's standard init
for init in "" -standard-init; do
    .venv/bin/python train/imagenet.py --deepspeed_config $CFG/lars-256-resnet50$init.json --dataset fashion-mnist \
        --arch resnet50 --max-steps 1 --val-subset 256 --trust-ratio-interval 1 --precision fp32 --no-wandb \
        --overwrite --output-dir $OUT/resnet50$init
done
.venv/bin/python -m analysis.compare $OUT/lars-256 $OUT/lars-1024 $OUT/lars-8192 $OUT/sgd-256 --out $OUT/compare
.venv/bin/python -m analysis.compare $OUT/resnet50 $OUT/resnet50-standard-init --out $OUT/resnet50-compare
cp $OUT/compare/trust_ratio_heatmap.png $OUT/compare/trust_ratio_layers.png $OUT/compare/w_over_g_table.md \
    docs/study/trust-ratios/
cp $OUT/resnet50-compare/w_over_g_table.md docs/study/trust-ratios/w_over_g_resnet50_init.md
