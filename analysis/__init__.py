"""Reading finished runs back: Goyal et al.'s comparison figures, the table of final errors, the noise scale.

``python -m analysis.compare RUN_DIR ... [--wandb ENTITY/PROJECT[/GROUP]] --out DIR`` (see analysis/compare.py).
``analysis.runs`` loads runs from run folders (config.json + metrics.jsonl written by train/imagenet.py) or from
the wandb API; ``analysis.papers`` holds the published numbers the table is compared with.
"""
