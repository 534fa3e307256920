"""Worker for tests/test_optimizers_hf.py: the Hugging Face Trainer with DeepSpeed through optimizers.hf.

Launched as ``deepspeed --num_gpus 2 tests/workers/hf_trainer_worker.py --out results.pt --work DIR`` (gloo on
DeepSpeed's CPU accelerator). One process per rank runs, one after the other, the same tiny BERT classifier from the
same seed on the same data for ``STEPS`` optimizer steps of LAMB through ``optimizers.hf.LayerwiseTrainer``:

* ``z0``: ZeRO off, micro batch 4 on each of the 2 ranks (the reference);
* ``z0_ulp``: ZeRO off from initial weights moved by one ulp each (``torch.nextafter``): how far a rounding-sized
  difference carries in these steps, the control for ZeRO-2's other summation order (DeepSpeed reduces no
  float64 gradients, so a float64 run cannot be the control);
* ``z2``: ZeRO-2, micro batch 4.

Rank 0 writes the final weights of each run, the type of the engine's inner optimizer, what the binding did, and
the message of ``LayerwiseTrainer(optimizers=(LAMB, None))`` under DeepSpeed, to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

STEPS = 4
SAMPLES = STEPS * 8  # 2 ranks x micro batch 4 per step, one epoch
LAMB_PARAMS: dict[str, Any] = {"lr": 0.02, "weight_decay": 0.01}


def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (SAMPLES, 12), generator=g)
    types = torch.randint(0, 2, (SAMPLES, 12), generator=g)
    labels = torch.randint(0, 3, (SAMPLES,), generator=g)
    return [{"input_ids": ids[i], "token_type_ids": types[i], "labels": labels[i]} for i in range(SAMPLES)]


def ds_config(stage: int) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def training_args(out_dir: str, stage: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=STEPS,
        learning_rate=LAMB_PARAMS["lr"], lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=True, deepspeed=ds_config(stage), seed=0, data_seed=0,
        dataloader_drop_last=True, disable_tqdm=True)


def reset_accelerate() -> None:
    """A fresh accelerate state for the next run's DeepSpeed plugin (the process group stays up)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def run(name: str, work: str, stage: int, nudge: bool = False) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param

    from optimizers.hf import LayerwiseTrainer

    reset_accelerate()
    model = tiny_bert()
    if nudge:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, torch.inf)))
    trainer = LayerwiseTrainer(model=model, args=training_args(os.path.join(work, name), stage),
                               train_dataset=dataset(), optimizer="lamb", optimizer_params=LAMB_PARAMS)
    trainer.train()
    engine = trainer.model_wrapped
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    weights = {n: safe_get_full_fp32_param(p).detach().clone() if stage else p.detach().clone()
               for n, p in engine.module.named_parameters()}
    return {"weights": weights, "inner": type(inner).__module__ + "." + type(inner).__name__,
            "wrapper": type(engine.optimizer).__name__, "binding": str(trainer.deepspeed_binding),
            "steps": trainer.state.global_step, "engine_steps": engine.global_steps}


def refused_optimizer(work: str) -> str:
    import optimizers
    from optimizers.hf import LayerwiseTrainer

    reset_accelerate()
    model = tiny_bert()
    ours = optimizers.build_optimizer("lamb", model, LAMB_PARAMS)
    try:
        LayerwiseTrainer(model=model, args=training_args(os.path.join(work, "refused"), 2),
                         train_dataset=dataset(), optimizers=(ours, None))
    except ValueError as exc:
        return str(exc)
    return "no refusal"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()
    results = {"z0": run("z0", args.work, 0), "z0_ulp": run("z0_ulp", args.work, 0, nudge=True),
               "z2": run("z2", args.work, 2), "refused": refused_optimizer(args.work),
               "initial": {n: p.detach().clone() for n, p in tiny_bert().named_parameters()}}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, args.out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
