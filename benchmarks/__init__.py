"""Benchmarks: each module is one command that prints ratios against a named baseline measured in the same run.

    python -m benchmarks.pipeline      # JPEG input pipeline, images/s per core, vs torchvision ImageFolder + PIL
    python -m benchmarks.train_step    # train/imagenet.py step on 2 CPU ranks vs a plain-torch loop, fp32 and bf16
    python -m benchmarks.optimizer     # LARS/LAMB step vs torch.optim SGD/AdamW, our groups and all parameters
    python -m benchmarks.noise_scale   # the gradient-noise-scale monitor's cost vs the loop without it
    python -m benchmarks.gpu           # ResNet-50 fp16 images/s and memory on one GPU (needs CUDA)
    bash benchmarks/gpu_check.sh --out DIR  # one GPU, one command: wheels, probes, ResNet-50, gpu tier, JPEG, report
    python -m benchmarks.gpu_report DIR     # gpu_check.sh's report from the files in DIR (no torch import)

Results, with the machine and date, are in docs/benchmarks.md.
"""
