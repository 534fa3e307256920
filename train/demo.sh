#!/usr/bin/env bash
# The README's first command: set up on a fresh machine, then train the built-in default (ds_configs/demo.json:
# Goyal et al.'s recipe at batch 256, 4 epochs) on Fashion-MNIST with 2 local ranks through the deepspeed
# launcher. Extra arguments go to train/imagenet.py (e.g. --no-wandb, --epochs 5).
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  RANKS="$(python -c 'import torch; print(torch.cuda.device_count())')"
else
  RANKS=2
fi
exec deepspeed --num_gpus "$RANKS" train/imagenet.py --deepspeed_config ds_configs/demo.json \
  --dataset fashion-mnist --data-dir "$FASHION_MNIST_DIR" --arch resnet_small --output-dir runs/demo --overwrite "$@"
