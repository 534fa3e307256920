"""BERT training-step speed on this CPU: train/bert.py on 2 CPU ranks (the real deepspeed launcher, gloo) against a
plain PyTorch DistributedDataParallel loop (gloo, 2 processes) over the same model and the same batches.

    python -m benchmarks.bert_step                  # 3 interleaved rounds, BERT-tiny, seq 128, 40 steps
    python -m benchmarks.bert_step --rounds 5 --model mini

Same work on both sides: train/bert.py's MaskedLM (BertForMaskedLM, prediction head at the masked positions) of
``--model`` on the first ``--docs`` documents of the demo corpus, one saved tokenizer (``--vocab-size``), the
same sequences (train/data.py's sampler, seed 0) masked the same way (train/text.py's Masker with train/bert.py's
per-micro-batch seed, which also seeds dropout), cross-entropy over the masked tokens, our LAMB (lr 1e-3, weight
decay 0.01, none on biases and LayerNorms), fp32, one thread per rank, micro batch x accumulation x 2 ranks. bert.py
runs ZeRO-0 (DeepSpeed's all-reduce after the last micro-step); the baseline is DDP with ``no_sync`` on all but the
last micro-step. Timing: tokens/s per logging interval, the first interval (warm-up) dropped, the median of the
others; bert.py's figure is its metrics.jsonl ``tokens_per_sec``. The two sides alternate (which goes first
alternates between rounds); the ratio printed is the median of the rounds' ratios (baseline tokens/s over
bert.py's: step time of bert.py relative to plain torch), with the load average of each round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_step import cpu_description, free_port, load  # noqa: E402
from train import REPO  # noqa: E402

LR = 1e-3


def config(args: argparse.Namespace) -> dict:
    return {"train_batch_size": args.micro_batch * args.accum * 2, "train_micro_batch_size_per_gpu": args.micro_batch,
            "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
            "optimizer": {"type": "LAMB", "params": {"lr": LR, "weight_decay": 0.01}},
            "training": {"epochs": 1, "exclude_norm_and_bias": True}}


def run_bert(tmp: Path, args: argparse.Namespace, tag: str) -> list[float]:
    """train/bert.py through the launcher: tokens/s of its logging intervals, the first dropped."""
    cfg = tmp / "bench.json"
    cfg.write_text(json.dumps(config(args)))
    out = tmp / f"run-{tag}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "train/bert.py", "--deepspeed_config", str(cfg), "--model", args.model, "--seq-len", str(args.seq_len),
           "--max-docs", str(args.docs), "--tokenizer", str(tmp / "tokenizer"), "--precision", "fp32",
           "--max-steps", str(args.steps), "--log-interval", str(args.log_interval), "--no-wandb",
           "--output-dir", str(out), "--seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise SystemExit(f"train/bert.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in recs if r["kind"] == "step"][1:]


def ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace, tmp: Path, queue: object) -> None:
    """The baseline: one DDP rank; puts its rank and the tokens/s of each logging interval on ``queue``."""
    import time

    import torch.distributed as dist
    from transformers import BertForMaskedLM

    import optimizers
    from train.bert import MaskedLM, bert_config, micro_seed
    from train.data import GlobalBatchSampler
    from train.distributed import exit_process
    from train.text import Masker, build_corpus, default_corpus, load_tokenizer, read_documents, split_documents

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as train/distributed.py does on CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    tokenizer = load_tokenizer(tmp / "tokenizer")
    train_docs, val_docs = split_documents(read_documents(default_corpus(), args.docs), 5)
    corpus = build_corpus(tokenizer, train_docs, val_docs, args.seq_len)
    masker = Masker(tokenizer)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        MaskedLM(BertForMaskedLM(bert_config(args.model, len(tokenizer), tokenizer))))
    opt = optimizers.build_optimizer("LAMB", model.module, {"lr": LR, "weight_decay": 0.01},
                                     exclude_norm_and_bias=True)
    sampler = GlobalBatchSampler(len(corpus.train), args.micro_batch * args.accum * world, args.micro_batch, world,
                                 rank, seed=0)
    batches = iter(sampler)
    rates, t_log, step = [], time.perf_counter(), 0
    while step < args.steps:
        for a in range(args.accum):
            indices = next(batches)
            seed = micro_seed(0, 0, indices[0])
            batch = masker(corpus.train[indices], seed)
            torch.manual_seed(seed)
            with model.no_sync() if a < args.accum - 1 else nullcontext():
                logits, target = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss = torch.nn.functional.cross_entropy(logits.float(), target) / args.accum
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0:
            now = time.perf_counter()
            rates.append(args.log_interval * args.micro_batch * args.accum * world * args.seq_len / (now - t_log))
            t_log = now
    queue.put((rank, rates[1:]))
    dist.destroy_process_group()
    exit_process(0)  # no finalisation with gloo threads alive (train/distributed.py)


def run_ddp(tmp: Path, args: argparse.Namespace) -> list[float]:
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(ddp_worker, args=(2, free_port(), args, tmp, queue), nprocs=2, join=True,
                       start_method="spawn")
    got = dict(queue.get() for _ in range(2))
    return got[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--docs", type=int, default=120, help="documents of the demo corpus used")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    for name in ("seq_len", "vocab_size", "docs", "micro_batch", "accum", "steps", "log_interval", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.steps < 2 * args.log_interval or args.steps % args.log_interval:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --log-interval {args.log_interval}, at least 2 "
                         f"intervals (the first is dropped as warm-up)")
    from train.text import default_corpus, read_documents, split_documents, train_tokenizer

    print(cpu_description(), flush=True)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train_docs, _ = split_documents(read_documents(default_corpus(), args.docs), 5)
        train_tokenizer([d.text for d in train_docs], args.vocab_size).save_pretrained(str(tmp / "tokenizer"))
        for r in range(args.rounds):
            sides = {"plain": lambda: run_ddp(tmp, args), "bert": lambda r=r: run_bert(tmp, args, f"r{r}")}
            got = {}
            for side in (("plain", "bert") if r % 2 == 0 else ("bert", "plain")):
                got[side] = statistics.median(sides[side]())
            ratios.append(got["plain"] / got["bert"])
            print(f"round {r + 1}: plain DDP {got['plain']:,.0f} tokens/s, train/bert.py {got['bert']:,.0f} tokens/s, "
                  f"step time ratio {ratios[-1]:.3f}x ({load()})", flush=True)
    print(f"train/bert.py step time / plain DDP: {statistics.median(ratios):.3f}x (median of {args.rounds} rounds; "
          f"min {min(ratios):.3f}x, max {max(ratios):.3f}x); {args.model}, seq {args.seq_len}, "
          f"{args.micro_batch} x {args.accum} x 2 ranks, fp32")


if __name__ == "__main__":
    main()
