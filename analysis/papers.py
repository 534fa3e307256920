"""Published ResNet-50 ImageNet top-1 validation errors (%) by global batch, for the table's paper column.

Sources:

* [Goyal] Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" (arXiv:1706.02677),
  Table 1 / Fig. 3: SGD with the linear scaling rule (lr = 0.1 x B / 256) and gradual warmup over 5 epochs,
  90 epochs, median top-1 error of the last 5 epochs, mean +- std over 5 runs where given. At 8k without warmup:
  24.84 +- 0.37.
* [torchlars] a public PyTorch LARS reproduction: 90 epochs, poly(2) decay, 5 warmup epochs; reported as top-1
  accuracy (73.79% at 256, ...), stored here as error = 100 - accuracy.

No published LAMB ResNet-50 run matches our LAMB recipe (see ds_configs/generate.py), so LAMB has no column.
"""

from __future__ import annotations

from typing import NamedTuple


class PaperError(NamedTuple):
    top1_error: float
    std: float | None
    source: str  # a key of SOURCES


SOURCES = {
    "Goyal": "Goyal et al. 2017, Accurate, Large Minibatch SGD (arXiv:1706.02677), Table 1 / Fig. 3: SGD, linear "
             "scaling lr = 0.1 x B/256, 5-epoch gradual warmup, 90 epochs; median top-1 error of the last 5 epochs, "
             "mean +- std over 5 runs where given",
    "Goyal-nowarmup": "Goyal et al. 2017 (arXiv:1706.02677): the same recipe at 8k without warmup",
    "torchlars": "torchlars, a public PyTorch LARS reproduction of You et al. 2017 (arXiv:1708.03888): 90 epochs, "
                 "poly(2) decay, 5 warmup epochs; top-1 accuracy reported, shown as 100 - accuracy",
}

# SGD, linear scaling rule, gradual warmup (Goyal et al. Table 1 / Fig. 3).
GOYAL = {256: (23.60, 0.12), 512: (23.48, None), 1024: (23.53, None), 2048: (23.49, None), 4096: (23.56, None),
         8192: (23.74, 0.09), 16384: (24.79, 0.27), 32768: (27.55, 0.28), 65536: (33.96, 0.80)}
GOYAL_NO_WARMUP = {8192: (24.84, 0.37)}
TORCHLARS_ACCURACY = {256: 73.79, 8192: 73.78, 16384: 73.36, 32768: 72.26}


def paper_error(optimizer: str, scaling: str, warmup: bool, batch: int) -> PaperError | None:
    """The published ImageNet top-1 error for a run of this kind and global batch, or None where there is none.

    ``scaling`` is "linear", "sqrt", "none" or "other" (see analysis.runs.lr_scaling); only SGD with linear
    scaling has Goyal's numbers (with warmup at every batch, without warmup at 8k).
    """
    opt = optimizer.lower()
    if opt == "sgd" and scaling == "linear":
        # At 256 the recipe's warmup starts at its target (0.1): with or without it, the run is Goyal's baseline.
        with_warmup = warmup or batch <= 256
        table, source = (GOYAL, "Goyal") if with_warmup else (GOYAL_NO_WARMUP, "Goyal-nowarmup")
        if batch in table:
            err, std = table[batch]
            return PaperError(err, std, source)
    if opt == "lars" and batch in TORCHLARS_ACCURACY:
        return PaperError(round(100.0 - TORCHLARS_ACCURACY[batch], 2), None, "torchlars")
    return None
