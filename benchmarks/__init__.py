"""Benchmarks: each module is one command that prints ratios against a named baseline measured in the same run.

    python -m benchmarks.pipeline      # JPEG input pipeline, images/s per core, vs torchvision ImageFolder + PIL
    python -m benchmarks.train_step    # train/imagenet.py step on 2 CPU ranks vs a plain DDP loop
    python -m benchmarks.gpu           # ResNet-50 fp16 images/s and memory on one GPU (needs CUDA)
    python -m optimizers.benchmark     # optimizer step (owned by optimizers/)

Results, with the machine and date, are in docs/benchmarks.md.
"""
