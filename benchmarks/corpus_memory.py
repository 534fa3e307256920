"""Peak resident memory per rank of train/bert.py on the demo corpus and on one ``--copies`` times larger.

    python -m benchmarks.corpus_memory                 # 1x and 10x, 2 CPU ranks, BERT-tiny demo recipe, 4 steps

The larger corpus is the demo corpus (Debian's python3.11-doc, or $BERT_CORPUS_DIR) ``--copies`` times over:
folders copy0/ .. copy9/ of symbolic links to its files, so every document is a file of the ``files`` format with
its own name (the held-out split hashes the names). Each corpus is run twice through the real deepspeed launcher
with ds_configs/bert/demo.json, ``--max-steps`` and ``--precision fp32`` (auto would time a bf16 probe, whose
verdict can change with the machine's load and with it the memory): cold (rank 0 reads, trains the tokenizer,
tokenises and packs into a fresh --corpus-cache; the other rank waits) and warm (a new run opening that cache). The
figure is each rank's VmHWM (the peak resident set, file-backed pages of the memory-mapped cache included) from the
run's summary record (train/bert.py's ``peak_rss_mib``), and the ratio larger / demo per rank and run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import REPO  # noqa: E402
from train.distributed import free_port  # noqa: E402
from train.text import default_corpus  # noqa: E402


def repeated(corpus: Path, copies: int, into: Path) -> Path:
    for k in range(copies):
        for p in sorted(q for q in corpus.rglob("*") if q.is_file()):
            link = into / f"copy{k}" / p.relative_to(corpus)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(p.resolve())
    return into


def run(data: Path, cache: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
           str(free_port()), "train/bert.py", "--deepspeed_config", "ds_configs/bert/demo.json", "--data-dir",
           str(data), "--corpus-cache", str(cache), "--output-dir", str(out), "--max-steps", str(args.steps),
           "--no-wandb", "--precision", "fp32"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ | {"WANDB_MODE": "offline"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    cfg = json.loads((out / "config.json").read_text())["derived"]
    return {"peak": summary["peak_rss_mib"], "wall": time.monotonic() - start, "rows": cfg["num_train"],
            "tokens": cfg["train_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=10, help="how many times larger the second corpus is")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (--max-steps)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpora = {"1x": default_corpus(), f"{args.copies}x": repeated(default_corpus(), args.copies, root / "big")}
        results = {}
        for name, data in corpora.items():
            for mode in ("cold", "warm"):
                results[name, mode] = r = run(data, root / f"cache-{name}", root / f"run-{name}-{mode}", args)
                print(f"{name:>4} {mode}: {r['tokens']:>11,} training tokens, {r['rows']:>9,} rows; peak RSS per "
                      f"rank {', '.join(f'{m:.0f}' for m in r['peak'])} MiB; {r['wall']:.0f} s", flush=True)
        big = f"{args.copies}x"
        for mode in ("cold", "warm"):
            ratios = [b / a for a, b in zip(results["1x", mode]["peak"], results[big, mode]["peak"], strict=True)]
            print(f"{mode}: peak RSS {big} / 1x per rank: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
