"""The LAMB study at laptop scale (docs/study-bert/): `python -m analysis.study_bert` runs it and writes the figures.

You et al. 2019 ("Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962)
claim that LAMB keeps BERT's pre-training quality as the batch grows to 32k-64k sequences where AdamW degrades.
Here, at laptop scale: BERT-tiny (train/bert.py) pre-trained by masked-language modelling on a part of Debian's
python3.11-doc corpus, AdamW against LAMB at batch 64, 128 and 256 sequences, the same number of epochs for all,
the peak lr scaled by the square root of the batch from a base at batch 64 (LAMB's rule, You et al. section 4 and
Table 4) and tuned on a grid of factors around it at every batch (Nado et al. 2021, arXiv:2102.06356: compare
optimizers only after tuning each). Each optimizer has its source's rules: AdamW as Devlin et al.'s BERT (global
gradient-norm clipping at 1.0, no weight decay on LayerNorm and biases), LAMB as NVIDIA's (FusedLAMB: the same
clipping; neither decay nor trust ratio for LayerNorm and biases). The grid is tuned at seed 0; the best factor of
each (optimizer, batch) then runs at seeds 1 and 2 too, and the result is the mean and std over the 3 seeds.

Every run is one train/bert.py process (one rank, OMP_NUM_THREADS=1), ``--jobs`` at a time, with its config
written to ``<runs>/configs/<run>.json``. One tokenizer is trained once and passed by path to every run; the
corpus part (``<runs>/corpus/``, a copy of the chosen documents under their own names, so the held-out split by
name is the full corpus's) is chosen once and tokenised once into one cache (``<runs>/corpus-cache/``, train/
corpus.py) that every run opens. Each (optimizer, batch) goes on by itself as soon as its own runs are done (grid,
then the extensions, then the other seeds), so no group waits for another. Finished runs (a summary record in
metrics.jsonl) are skipped, so the command resumes where it stopped. Then fig1/fig2, table.md and summary.json are
written from the run folders alone.

    python -m analysis.study_bert --jobs 2            # everything (docs/study-bert/README.md gives the time)
    python -m analysis.study_bert --no-run            # only the figures, table and summary from finished runs
    python -m analysis.study_bert --optimizers lamb --batches 64 --factors 1 --dry-run   # list a part
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from analysis.grid import at_edge, best_of_grid, finished, mean_std
from train import REPO

# --- The study's choices (docs/study-bert/README.md says why each) ------------------------------------------------
MODEL, SEQ_LEN, VOCAB_SIZE, EPOCHS = "tiny", 32, 4096, 3
TRAIN_SEQUENCES = 19456  # packed training sequences (just above): 76 steps per epoch at the largest batch
TRAIN_SLACK = 32  # ... at most this many above, so no batch drops more than a few sequences of an epoch
VAL_SEQUENCES = 2048  # held-out sequences (at least), from the full corpus's held-out documents
VAL_PERCENT = 5  # train/bert.py's default held-out share (by a hash of the document's name)
BATCHES = (64, 128, 256)
RUN_ORDER = (256, 64, 128)  # the ends of the range first: a study cut short still spans it
BASE_BATCH = 64
BASE_LR = {"adamw": 1.5e-3, "lamb": 1.5e-2}  # peak lr at BASE_BATCH (from the first study's pilot runs)
GRID = (0.5, 1.0, 2.0)  # factors around the square-root rule at every batch
EXTEND = 2  # where the best is at an edge of the grid, up to 2 more factors beyond it (x4, x8 or x1/4, x1/8)
OPTIMIZERS = {"adamw": "AdamW", "lamb": "LAMB"}
WARMUP_FRACTION = 0.1  # linear warmup over this share of each run's steps (at least 2), then linear decay
MAX_MICRO = 256  # sequences per forward pass (larger batches would accumulate; the result does not depend on it)
WEIGHT_DECAY = 0.01  # Devlin et al. and You et al.
CLIP_NORM = 1.0  # global gradient-norm clipping for both: Devlin et al.'s AdamW, NVIDIA's LAMB (FusedLAMB)
SEEDS = (0, 1, 2)  # every (optimizer, batch) at its best factor; the grid is tuned at the first
TUNE_SEED = SEEDS[0]


class StudyError(ValueError):
    """A study that cannot run as asked; the message says what, which value, and what was expected."""


def lr_for(optimizer: str, batch: int, factor: float) -> float:
    """Peak lr: base x sqrt(batch / 64) x grid factor."""
    return BASE_LR[optimizer] * math.sqrt(batch / BASE_BATCH) * factor


def run_name(optimizer: str, batch: int, factor: float, seed: int = TUNE_SEED) -> str:
    return f"{optimizer}-{batch}-x{factor:g}-seed{seed}"


def plan(optimizers: list[str] | None = None, batches: list[int] | None = None,
         factors: list[float] | None = None, epochs: int = EPOCHS) -> list[dict[str, Any]]:
    """The tuning runs of the study (seed TUNE_SEED; optimizer, batch, grid factor, peak lr, name), whole grids in
    RUN_ORDER. The grid extensions and the other seeds follow from their results (``next_runs``)."""
    for name, given, known in (("optimizer", optimizers, list(OPTIMIZERS)), ("batch", batches, list(BATCHES)),
                               ("grid factor", factors, list(GRID))):
        unknown = [v for v in given or [] if v not in known]
        if unknown:
            raise StudyError(f"unknown {name}(s) {unknown}; the study has {known}")
    return [make_run(opt, b, f, epochs) for b in RUN_ORDER if not batches or b in batches
            for opt in OPTIMIZERS if not optimizers or opt in optimizers
            for f in GRID if not factors or f in factors]


def make_run(optimizer: str, batch: int, factor: float, epochs: int = EPOCHS, seed: int = TUNE_SEED
             ) -> dict[str, Any]:
    return {"optimizer": optimizer, "batch": batch, "factor": factor, "lr": lr_for(optimizer, batch, factor),
            "epochs": epochs, "seed": seed, "name": run_name(optimizer, batch, factor, seed)}


def extra_factors() -> list[float]:
    """The factors an extension may add: halving below the grid, doubling above it, EXTEND times each way."""
    return [GRID[0] / 2 ** k for k in range(1, EXTEND + 1)] + [GRID[-1] * 2 ** k for k in range(1, EXTEND + 1)]


def group_runs(optimizer: str, batch: int, epochs: int) -> list[dict[str, Any]]:
    """Every run one (optimizer, batch) may make: each factor of the grid and its extensions, at every seed."""
    return [make_run(optimizer, batch, f, epochs, s) for f in sorted(GRID + tuple(extra_factors())) for s in SEEDS]


def with_extensions(runs: list[dict[str, Any]], runs_dir: Path) -> list[dict[str, Any]]:
    """The plan's runs and the other runs (extensions, other seeds) of the same optimizers and batches that have a
    folder."""
    names = {r["name"] for r in runs}
    keys = list(dict.fromkeys((r["optimizer"], r["batch"], r["epochs"]) for r in runs))
    return runs + [r for o, b, e in keys for r in group_runs(o, b, e)
                   if r["name"] not in names and (runs_dir / r["name"]).is_dir()]


def extend(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One factor beyond the edge wherever the best of the tuning runs is at an edge (Nado et al.: a best at the
    edge of the search space says the space was too small): twice the largest factor, or half the smallest, while
    that stays within EXTEND doublings of GRID."""
    out = []
    for (opt, b), v in best_points(rows_).items():
        if not v["at_edge"]:
            continue
        f = v["factor"] * 2 if v["factor"] == max(v["grid"]) else v["factor"] / 2
        if f in extra_factors():
            out.append(make_run(opt, b, f, v["epochs"]))
    return out


def next_runs(rows_: list[dict[str, Any]], optimizer: str, batch: int, epochs: int,
              given_up: set[str] = frozenset()) -> list[dict[str, Any]]:
    """What one (optimizer, batch) runs next, from its finished runs (``rows_``; call it when none of its runs is
    running): the grid's extension while the best tuning run is at an edge (``extend``), then the other SEEDS at
    the best factor. A run named in ``given_up`` (it failed in this call) counts as done: an extension that
    failed ends the tuning, a seed that failed is left out. Empty when the group is complete."""
    mine = [r for r in rows_ if (r["optimizer"], r["batch"], r["epochs"]) == (optimizer, batch, epochs)]
    done = {r["name"] for r in mine} | set(given_up)
    wider = [r for r in extend(mine) if r["name"] not in done]
    if wider:
        return wider
    best = best_points(mine).get((optimizer, batch))
    if best is None:
        return []
    return [r for r in (make_run(optimizer, batch, best["factor"], epochs, s) for s in SEEDS if s != TUNE_SEED)
            if r["name"] not in done]


def warmup_steps(total_steps: int) -> int:
    """Warmup steps W: a tenth of the run, at least 2 (DeepSpeed's WarmupLR warms up over at least 2 steps)."""
    return max(2, round(WARMUP_FRACTION * total_steps))


def schedule(peak: float, total_steps: int) -> dict[str, Any]:
    """DeepSpeed's WarmupDecayLR: linear warmup over W steps from peak / (W + 1) to the peak, then linear decay
    towards peak / (W + 1) at the end of the run.

    Under the engine the first two steps both run at the warmup's start (the schedule's state before its first
    step, then its step 0). From DeepSpeed's usual start of 0 those two steps would be lost: nothing at batch 64
    (2 steps of 512), half the training at batch 8192 (2 of 4). From peak / (W + 1) the 4 steps at 8192 run at
    1/3, 1/3, 2/3 and 1 x the peak."""
    w = warmup_steps(total_steps)
    return {"warmup_min_lr": peak / (w + 1), "warmup_max_lr": peak, "warmup_num_steps": w, "warmup_type": "linear",
            "total_num_steps": "auto"}


def ds_config(run: dict[str, Any], num_train: int) -> dict[str, Any]:
    """The DeepSpeed config of one run (train/bert.py's format: DeepSpeed's keys, "training" and "bert" ours)."""
    batch = run["batch"]
    total = run["epochs"] * (num_train // batch)  # train/config.py's count: the remainder of an epoch is dropped
    params = {"lr": run["lr"], "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": WEIGHT_DECAY}
    if run["optimizer"] == "adamw":
        params["torch_adam"] = True  # torch.optim.AdamW (DeepSpeed's fused Adam is CUDA-only)
    return {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": min(batch, MAX_MICRO),
        "zero_optimization": {"stage": 0},
        "gradient_clipping": CLIP_NORM,
        "optimizer": {"type": OPTIMIZERS[run["optimizer"]], "params": params},
        "scheduler": {"type": "WarmupDecayLR", "params": schedule(run["lr"], total)},
        "training": {"epochs": run["epochs"], "exclude_norm_and_bias": True, "recipe": "study-bert"},
        "bert": {"model": MODEL, "seq_len": SEQ_LEN, "vocab_size": VOCAB_SIZE},
    }


# ---------------------------------------------------------------------------------------------------------------
# The corpus part and the one tokenizer


def rows(tokens: int) -> int:
    """Packed sequences of a token stream (train/text.py's pack: [CLS] + SEQ_LEN - 1 tokens a row)."""
    return math.ceil(tokens / (SEQ_LEN - 1))


def choose(lengths: list[tuple[str, int]], at_least: int, slack: int | None) -> list[str]:
    """Documents (name, tokens + 1 for its [SEP]) in a fixed pseudo-random order (CRC-32 of the name), taken
    until the packed rows reach ``at_least``; with ``slack``, a document that would pass ``at_least + slack``
    rows is passed over."""
    chosen, stream = [], 0
    for name, n in sorted(lengths, key=lambda d: (zlib.crc32(d[0].encode()), d[0])):
        if slack is not None and rows(stream + n) > at_least + slack:
            continue
        chosen.append(name)
        stream += n
        if rows(stream) >= at_least:
            return chosen
    raise StudyError(f"the corpus has too little text: {rows(stream)} packed sequences of {SEQ_LEN} tokens, the "
                     f"study needs {at_least}")


def prepare(runs_dir: Path, source: Path) -> dict[str, Any]:
    """Train the tokenizer on the full corpus's training split, copy the chosen documents into <runs>/corpus/ and
    return what was made (also in <runs>/corpus.json, which later calls reuse)."""
    info_path = runs_dir / "corpus.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    # local: train.text imports torch and transformers (seconds); the plan, table and figures need neither
    from train.text import (
        build_corpus,
        read_documents,
        split_documents,
        tokenize,
        train_tokenizer,
        unigram_entropy,
    )

    t0 = time.perf_counter()
    docs = read_documents(source)
    train_docs, val_docs = split_documents(docs, VAL_PERCENT)
    tokenizer = train_tokenizer([d.text for d in train_docs], VOCAB_SIZE)
    tok_dir = runs_dir / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    by_name = {d.name: d for d in docs}
    picked = {}
    for split, pool, at_least, slack in (("train", train_docs, TRAIN_SEQUENCES, TRAIN_SLACK),
                                         ("val", val_docs, VAL_SEQUENCES, None)):
        lengths = [(d.name, len(ids) + 1) for d, ids in zip(pool, tokenize(tokenizer, pool), strict=True)]
        picked[split] = choose(lengths, at_least, slack)
    corpus_dir = runs_dir / "corpus"
    shutil.rmtree(corpus_dir, ignore_errors=True)
    for name in picked["train"] + picked["val"]:
        (corpus_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus_dir / name).write_text(by_name[name].text)
    # What train/bert.py will see in that folder: the same split (by name), the same packing.
    again_train, again_val = split_documents(read_documents(corpus_dir), VAL_PERCENT)
    if sorted(d.name for d in again_val) != sorted(picked["val"]):
        raise StudyError("the corpus part's held-out split differs from the full corpus's (split_documents changed?)")
    corpus = build_corpus(tokenizer, again_train, again_val, SEQ_LEN)
    info = {"source": str(source), "corpus_dir": str(corpus_dir), "tokenizer": str(tok_dir),
            "source_docs": len(docs), "source_train_docs": len(train_docs), "source_val_docs": len(val_docs),
            "train_docs": len(again_train), "val_docs": len(again_val), "num_train": len(corpus.train),
            "num_val": len(corpus.val), "train_tokens": corpus.num_tokens[0], "val_tokens": corpus.num_tokens[1],
            "val_unigram_entropy": unigram_entropy(corpus.val, corpus.special_ids),
            "seq_len": SEQ_LEN, "vocab_size": len(tokenizer), "seconds": time.perf_counter() - t0}
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------------------------------------------------------
# Running


def command(run: dict[str, Any], runs_dir: Path, info: dict[str, Any]) -> list[str]:
    out_dir = runs_dir / run["name"]
    # one corpus cache for all runs: the part is tokenised and packed once (train/corpus.py, under a lock)
    cmd = [sys.executable, "train/bert.py", "--deepspeed_config", str(runs_dir / "configs" / f"{run['name']}.json"),
           "--data-dir", info["corpus_dir"], "--corpus-cache", str(runs_dir / "corpus-cache"),
           "--tokenizer", info["tokenizer"], "--val-percent", str(VAL_PERCENT),
           "--output-dir", str(out_dir), "--run-name", run["name"], "--seed", str(run["seed"]), "--precision", "fp32",
           "--no-wandb", "--wandb-group", "study-bert", "--log-interval", "4", "--keep-checkpoints", "1"]
    return cmd + (["--overwrite"] if out_dir.exists() else [])  # an unfinished run starts again from scratch


def run_one(run: dict[str, Any], runs_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    cfg_path = runs_dir / "configs" / f"{run['name']}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(ds_config(run, info["num_train"]), indent=1) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1",
               WANDB_MODE="offline")
    log = runs_dir / f"{run['name']}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(command(run, runs_dir, info), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        # wait4 gives this child's CPU time (user + system): the run's cost on an idle core, whatever the load
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{run['name']} failed ({proc.returncode}); log in {log}")
    log.unlink()
    shutil.rmtree(runs_dir / run["name"] / "checkpoints", ignore_errors=True)  # finished: the model/ folder stays
    cost = {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime}
    (runs_dir / run["name"] / "study_cost.json").write_text(json.dumps(cost) + "\n")
    return {"seconds": wall, **cost, **(finished(runs_dir / run["name"]) or {})}


def run_all(runs: list[dict[str, Any]], runs_dir: Path, info: dict[str, Any], jobs: int,
            follow: bool = False) -> int:
    """Run what is not finished, ``jobs`` at a time; return the number of failures. With ``follow``, each
    (optimizer, batch) then runs what ``next_runs`` asks for (grid extensions, then the other seeds) as soon as
    its own runs are done, ahead of the rest of the queue: no group waits for another."""
    for r in runs:
        if finished(runs_dir / r["name"]):
            check_made_as_planned(r, runs_dir / r["name"])
    queue = [r for r in runs if not finished(runs_dir / r["name"])]
    print(f"study-bert: {len(runs)} runs, {len(runs) - len(queue)} finished before, {len(queue)} to run ({jobs} at a "
          f"time){'; then the extensions and seeds their results ask for' if follow else ''}", flush=True)
    t0, failures, count = time.perf_counter(), 0, 0
    given_up: set[str] = set()
    running: dict[Any, dict[str, Any]] = {}

    def key(r: dict[str, Any]) -> tuple[str, int, int]:
        return r["optimizer"], r["batch"], r["epochs"]

    def follow_up(k: tuple[str, int, int]) -> None:
        if not follow or any(key(r) == k for r in queue + list(running.values())):
            return
        more = next_runs(results(group_runs(*k), runs_dir), *k, given_up=given_up)
        if more:
            print(f"study-bert: next for {OPTIMIZERS[k[0]]} at batch {k[1]}: {', '.join(r['name'] for r in more)}",
                  flush=True)
            queue[0:0] = more

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for k in dict.fromkeys(key(r) for r in runs):
            follow_up(k)
        while queue or running:
            while queue and len(running) < jobs:
                r = queue.pop(0)
                running[pool.submit(run_one, r, runs_dir, info)] = r
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                r = running.pop(fut)
                count += 1
                at = f"[{count}/{count + len(queue) + len(running)}]"
                try:
                    res = fut.result()
                    print(f"{at} {r['name']}: {res['seconds']:.0f} s ({res['cpu_seconds']:.0f} s CPU), held-out MLM "
                          f"loss {res.get('final_val_loss', float('nan')):.4f} (elapsed "
                          f"{(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
                except RuntimeError as e:
                    failures += 1
                    given_up.add(r["name"])
                    print(f"{at} {e}", flush=True)
                follow_up(key(r))
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Results, from the run folders


def read_run(run_dir: Path) -> dict[str, Any]:
    """Held-out MLM loss after every epoch (with the tokens seen), the final one, and the run's wall time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip().startswith("{")]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    summary = next((r for r in reversed(records) if r.get("kind") == "summary"), {})
    if not epochs:
        raise StudyError(f"{run_dir}/metrics.jsonl has no epoch record (expected train/bert.py's held-out MLM loss "
                         f"after each epoch)")
    return {"tokens": [int(e["tokens"]) for e in epochs], "val_loss": [float(e["val_loss"]) for e in epochs],
            "val_mlm_accuracy": [float(e["val_mlm_accuracy"]) for e in epochs],
            "final_val_loss": float(epochs[-1]["val_loss"]), "steps": int(epochs[-1]["step"]),
            "train_seconds": sum(float(e.get("epoch_time", 0.0)) for e in epochs),
            "tokens_per_sec": float(epochs[-1].get("tokens_per_sec", 0.0)), "summary": summary,
            **(json.loads((run_dir / "study_cost.json").read_text()) if (run_dir / "study_cost.json").is_file()
               else {})}


def results(runs: list[dict[str, Any]], runs_dir: Path) -> list[dict[str, Any]]:
    """The plan's runs that finished, each with what read_run found (a loss that is not finite stays as nan)."""
    out = []
    for r in runs:
        if finished(runs_dir / r["name"]):
            check_made_as_planned(r, runs_dir / r["name"])
            out.append({**r, **read_run(runs_dir / r["name"])})
    return out


def check_made_as_planned(run: dict[str, Any], run_dir: Path) -> None:
    """A finished run folder must hold the run the plan names (a run left from a study with another base lr or
    batch would otherwise be read as this one)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return  # hand-made folders in tests carry only metrics.jsonl
    cfg = json.loads(cfg_path.read_text())
    lr, batch = cfg.get("optimizer", {}).get("params", {}).get("lr"), cfg.get("derived", {}).get("global_batch")
    epochs = cfg.get("training", {}).get("epochs", run["epochs"])
    seed = cfg.get("args", {}).get("seed", run["seed"])
    clip = cfg.get("deepspeed", {}).get("gradient_clipping", CLIP_NORM)
    if lr is None or not math.isclose(lr, run["lr"], rel_tol=1e-9) or batch != run["batch"] or epochs != run["epochs"] \
            or seed != run["seed"] or clip != CLIP_NORM:
        raise StudyError(f"{run_dir} was made with peak lr {lr} at batch {batch} for {epochs} epochs (seed {seed}, "
                         f"clipping {clip}), the plan says lr {run['lr']:.6g} at batch {run['batch']} for "
                         f"{run['epochs']} (seed {run['seed']}, clipping {CLIP_NORM}): remove that folder (or use "
                         f"another --runs-dir) and run again")


def best_points(rows_: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """For each (optimizer, batch): the tuning run (seed TUNE_SEED) of lowest final held-out loss
    (analysis.grid.best_of_grid: a diverged run, nan or inf, never wins; ties go to the smaller factor), with
    ``at_edge`` true when it is the smallest or largest factor that ran (the optimum may lie outside it) and
    ``grid`` the factors that ran."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows_:
        if r["seed"] == TUNE_SEED:
            groups.setdefault((r["optimizer"], r["batch"]), []).append(r)
    for key, group in groups.items():
        factors = sorted(r["factor"] for r in group)
        win = best_of_grid({r["factor"]: r["final_val_loss"] for r in group}, factors)
        if win is None:
            continue
        best[key] = {**next(r for r in group if r["factor"] == win), "at_edge": at_edge(win, factors, factors),
                     "grid": factors}
    return best


def seed_stats(rows_: list[dict[str, Any]], best: dict[tuple[str, int], dict[str, Any]]
               ) -> dict[tuple[str, int], dict[str, Any]]:
    """For each (optimizer, batch) with a best factor: its runs at that factor over the seeds that finished, the
    final held-out loss of each (``seeds``), their mean and sample std, the mean masked-token accuracy and the mean
    held-out loss after each epoch (for the figures)."""
    out = {}
    for key, b in best.items():
        runs = sorted((r for r in rows_ if (r["optimizer"], r["batch"]) == key and r["factor"] == b["factor"]),
                      key=lambda r: r["seed"])
        losses = [r["final_val_loss"] for r in runs]
        mean, std = mean_std(losses)
        out[key] = {"factor": b["factor"], "lr": b["lr"], "steps": b["steps"], "at_edge": b["at_edge"],
                    "seeds": {r["seed"]: r["final_val_loss"] for r in runs}, "n": len(runs), "mean": mean, "std": std,
                    "accuracy": mean_std([r["val_mlm_accuracy"][-1] for r in runs])[0],
                    "tokens": b["tokens"],
                    "curve": [sum(c) / len(c) for c in zip(*(r["val_loss"] for r in runs), strict=True)],
                    "curves": [r["val_loss"] for r in runs]}
    return out


def table(rows_: list[dict[str, Any]], best: dict[tuple[str, int], dict[str, Any]],
          stats: dict[tuple[str, int], dict[str, Any]] | None = None, entropy: float | None = None) -> str:
    stats = stats if stats is not None else seed_stats(rows_, best)
    lines = [f"Best factor of each grid (tuned at seed {TUNE_SEED}), final held-out MLM loss at every seed:", "",
             "| optimizer | batch | steps | best factor | peak lr | loss by seed | mean ± std | below the unigram "
             "entropy by | masked-token acc. (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for (opt, b), v in sorted(stats.items()):
        seeds = ", ".join(f"{s}: {loss:.3f}" for s, loss in v["seeds"].items())
        margin = f"{entropy - v['mean']:.3f}" if entropy is not None else ""
        lines.append(f"| {OPTIMIZERS[opt]} | {b} | {v['steps']} | x{v['factor']:g}"
                     f"{' (edge)' if v['at_edge'] else ''} | {v['lr']:.3g} | {seeds} | {v['mean']:.3f} ± "
                     f"{v['std']:.3f} | {margin} | {v['accuracy']:.1f} |")
    lines += ["", "Every run:", "",
              "| optimizer | batch | steps | grid factor | seed | peak lr | held-out MLM loss after each epoch | "
              "final | masked-token acc. (%) | best of grid |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows_, key=lambda r: (r["optimizer"], r["batch"], r["factor"], r["seed"])):
        b = best.get((r["optimizer"], r["batch"]))
        mark = ""
        if b and b["name"] == r["name"]:
            mark = "**best**" + (" (at the grid's edge)" if b["at_edge"] else "")
        elif b and b["factor"] == r["factor"]:
            mark = "best factor, another seed"
        curve = " / ".join(f"{v:.3f}" for v in r["val_loss"])
        lines.append(f"| {OPTIMIZERS[r['optimizer']]} | {r['batch']} | {r['steps']} | x{r['factor']:g} | {r['seed']} | "
                     f"{r['lr']:.3g} | {curve} | {r['final_val_loss']:.3f} | {r['val_mlm_accuracy'][-1]:.1f} | "
                     f"{mark} |")
    return "\n".join(lines) + "\n"


def figures(rows_: list[dict[str, Any]], stats: dict[tuple[str, int], dict[str, Any]], out: Path,
            entropy: float | None) -> None:
    import matplotlib  # local: only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adamw": "C0", "lamb": "C3"}
    shift = {"adamw": 0.96, "lamb": 1.04}  # the two optimizers side by side at each batch
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for opt in OPTIMIZERS:
        grid = [r for r in rows_ if r["optimizer"] == opt and r["seed"] == TUNE_SEED
                and math.isfinite(r["final_val_loss"])]
        ax.scatter([r["batch"] * shift[opt] for r in grid], [r["final_val_loss"] for r in grid], s=14,
                   color=colors[opt], alpha=0.25, label=f"{OPTIMIZERS[opt]}, every grid point (seed {TUNE_SEED})")
        pts = sorted((k[1], v) for k, v in stats.items() if k[0] == opt)
        if pts:
            ax.errorbar([b * shift[opt] for b, _ in pts], [v["mean"] for _, v in pts],
                        yerr=[0.0 if math.isnan(v["std"]) else v["std"] for _, v in pts], fmt="o-", capsize=3,
                        color=colors[opt], label=f"{OPTIMIZERS[opt]}, best lr: mean ± std over seeds")
            for b, v in pts:
                if v["at_edge"]:
                    ax.scatter([b * shift[opt]], [v["mean"]], s=90, facecolors="none", edgecolors=colors[opt])
    if entropy is not None:
        ax.axhline(entropy, color="0.4", ls="--", lw=1, label=f"unigram entropy ({entropy:.2f} nats)")
    ax.set_xscale("log", base=2)
    steps = {r["batch"]: r["steps"] for r in rows_}
    ax.set_xticks(list(BATCHES), [f"{b}\n{steps[b]} steps" if b in steps else str(b) for b in BATCHES])
    ax.minorticks_off()
    epochs = rows_[0]["epochs"] if rows_ else EPOCHS
    ax.set_xlabel(f"global batch (sequences of {SEQ_LEN} tokens) and optimizer steps in {epochs} epochs")
    ax.set_ylabel("held-out MLM loss (nats per masked token)")
    edge = any(v["at_edge"] for v in stats.values())
    ax.set_title(f"BERT-{MODEL}, {epochs} epochs at every batch" + (" (circled: best at the grid's edge)" if edge
                                                                      else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig1_loss_vs_batch.png", dpi=110)
    plt.close(fig)

    # fig2: one panel per batch, AdamW against LAMB (each at its best factor: the mean over seeds, every seed faint),
    # the smallest batch's better mean as the reference
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(3.1 * len(BATCHES), 3.6), sharey=True)
    ref = min((v for k, v in stats.items() if k[1] == BATCHES[0]), key=lambda v: v["mean"], default=None)
    ref_opt = next((k[0] for k, v in stats.items() if v is ref), None)
    for ax, b in zip(axes, BATCHES, strict=True):
        if ref is not None and b != BATCHES[0]:
            ax.plot([t / 1e6 for t in ref["tokens"]], ref["curve"], "-", color="0.6", lw=3, alpha=0.5,
                    label=f"batch {BATCHES[0]}'s better mean ({OPTIMIZERS[ref_opt]})")
        for opt in OPTIMIZERS:
            v = stats.get((opt, b))
            if v is None:
                continue
            x = [t / 1e6 for t in v["tokens"]]
            for c in v["curves"]:
                ax.plot(x[:len(c)], c, "-", lw=0.8, alpha=0.35, color=colors[opt])
            ax.plot(x[:len(v["curve"])], v["curve"], "o-", ms=4, color=colors[opt],
                    label=f"{OPTIMIZERS[opt]}, best lr, mean over seeds (thin: each seed)")
        if entropy is not None:
            ax.axhline(entropy, color="0.4", ls="--", lw=1, label="unigram entropy of the held-out text")
        steps = next((v["steps"] for k, v in stats.items() if k[1] == b), None)
        lrs = ", ".join(f"{OPTIMIZERS[o]} {stats[(o, b)]['lr']:.2g}" for o in OPTIMIZERS if (o, b) in stats)
        ax.set_title(f"batch {b}" + (f": {steps} steps" if steps else "") + (f"\npeak lr {lrs}" if lrs else ""),
                     fontsize=9)
        ax.set_xlabel("training tokens seen (millions)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out MLM loss (nats per masked token)")
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out / "fig2_loss_vs_tokens.png", dpi=110)
    plt.close(fig)


def write_outputs(runs: list[dict[str, Any]], runs_dir: Path, out: Path, info: dict[str, Any] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows_ = results(runs, runs_dir)
    best = best_points(rows_)
    stats = seed_stats(rows_, best)
    entropy = info.get("val_unigram_entropy") if info else None
    figures(rows_, stats, out, entropy)
    (out / "table.md").write_text(table(rows_, best, stats, entropy))
    summary = {
        "model": MODEL, "seq_len": SEQ_LEN, "vocab_size": VOCAB_SIZE, "epochs": runs[0]["epochs"] if runs else EPOCHS,
        "batches": list(BATCHES), "base_batch": BASE_BATCH, "base_lr": BASE_LR, "grid": list(GRID),
        "gradient_clipping": CLIP_NORM, "weight_decay": WEIGHT_DECAY, "seeds": list(SEEDS), "tune_seed": TUNE_SEED,
        "extended": [r["name"] for r in rows_ if r["factor"] not in GRID and r["seed"] == TUNE_SEED],
        "warmup_fraction": WARMUP_FRACTION, "corpus": {
            k: v for k, v in (info or {}).items() if k not in ("source", "corpus_dir", "tokenizer")},
        "runs_planned": len(runs), "runs_finished": len(rows_),
        "best": {f"{opt}-{b}": {k: v[k] for k in ("factor", "lr", "steps", "at_edge", "n", "mean", "std")}
                 | {"final_val_loss_by_seed": {str(s): loss for s, loss in v["seeds"].items()},
                    "below_unigram_entropy": None if entropy is None else entropy - v["mean"],
                    "final_val_mlm_accuracy_mean": v["accuracy"]}
                 for (opt, b), v in sorted(stats.items())},
        "train_seconds": sum(r["train_seconds"] for r in rows_),
        "run_wall_seconds": sum(r.get("wall_seconds", 0.0) for r in rows_),
        "run_cpu_seconds": sum(r.get("cpu_seconds", 0.0) for r in rows_)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs/study-bert", help="run folders, configs, corpus part, tokenizer")
    p.add_argument("--out", default="docs/study-bert", help="figures, table.md and summary.json")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the corpus to take the part from (default: train/bert.py's, Debian's python3.11-doc)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU core each)")
    p.add_argument("--optimizers", nargs="*", default=None, help=f"only these of {list(OPTIMIZERS)}")
    p.add_argument("--batches", nargs="*", type=int, default=None, help=f"only these of {list(BATCHES)}")
    p.add_argument("--factors", nargs="*", type=float, default=None,
                   help=f"only these grid factors of {list(GRID)}, at seed {TUNE_SEED} (no extension, no other seed)")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help=f"epochs of every run (the study's comparison is at {EPOCHS}; another count belongs in another "
                        f"--runs-dir)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their peak lr, run nothing")
    p.add_argument("--no-run", action="store_true", help="only write the outputs from the finished runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.jobs < 1 or args.epochs < 1:
        raise SystemExit(f"--jobs and --epochs must be at least 1, got {args.jobs} and {args.epochs}")
    os.chdir(REPO)  # paths in configs and outputs stay relative to the repository
    runs_dir, out = Path(args.runs_dir), Path(args.out)
    try:
        runs = plan(args.optimizers, args.batches, args.factors, args.epochs)
    except StudyError as e:
        raise SystemExit(str(e)) from None
    if args.dry_run:  # the extensions and the other seeds are listed once they have a folder
        for r in with_extensions(runs, runs_dir):
            print(f"{r['name']}: {OPTIMIZERS[r['optimizer']]} batch {r['batch']} peak lr {r['lr']:.4g}"
                  f"{'  (finished)' if finished(runs_dir / r['name']) else ''}")
        return 0
    runs_dir.mkdir(parents=True, exist_ok=True)
    info_path = runs_dir / "corpus.json"
    failures = 0
    t0 = time.perf_counter()
    if not args.no_run:
        from train.text import default_corpus  # local: see prepare()

        info = prepare(runs_dir, Path(args.data_dir) if args.data_dir else default_corpus())
        print(f"study-bert: corpus part {info['train_docs']} + {info['val_docs']} held-out documents, "
              f"{info['num_train']} + {info['num_val']} sequences of {SEQ_LEN} tokens; held-out unigram entropy "
              f"{info['val_unigram_entropy']:.4f} nats", flush=True)
        # a whole grid asked for: widen it at its edges, then the other seeds at its best (--factors: only those)
        failures = run_all(runs, runs_dir, info, args.jobs, follow=args.factors is None)
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    summary = write_outputs(with_extensions(runs, runs_dir), runs_dir, out, info)
    print(f"study-bert: {summary['runs_finished']}/{summary['runs_planned']} runs in {out} (this call "
          f"{(time.perf_counter() - t0) / 60:.1f} min); {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
