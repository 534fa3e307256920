"""Pre-train a BERT (masked language model) with DeepSpeed from one JSON config: You et al.'s LAMB recipes.

    deepspeed --num_gpus 2 train/bert.py --deepspeed_config ds_configs/bert/demo.json
    deepspeed --hostfile hosts train/bert.py --deepspeed_config ds_configs/bert/lamb-64k-phase1.json --data-dir TEXT

A BertForMaskedLM from ``transformers`` (randomly initialised; nothing is downloaded) of a published shape
(``--model``), trained on a text corpus in one of five formats, tokenised once by rank 0 into a memory-mapped cache
that every rank opens (train/corpus.py), with train/text.py's WordPiece tokenizer, packing, 15% masking with
transformers' collator and held-out split by document. The run machinery is train/imagenet.py's: config resolution,
engine, step guard, checkpoints, records (train/loop.py and the parts it names). Read top to bottom: the
arguments, ``main`` (corpus, then train/loop.py's set-up and epoch loop), ``train_one_epoch`` (forward, loss,
backward, step) and ``evaluate`` (held-out MLM loss and masked-token accuracy). The trained model is saved as
``<output-dir>/model/``, which ``BertForMaskedLM.from_pretrained`` and ``BertTokenizerFast.from_pretrained`` load.

A config may hold a ``"bert"`` block, which DeepSpeed never sees: ``model``, ``seq_len`` and ``vocab_size`` (the
defaults of ``--model``/``--seq-len``/``--vocab-size``), ``steps`` (the run's length in optimizer steps, as the
sources give it; the epochs follow from the corpus) and ``carry``. A two-phase recipe (seq 128, then 512) is two
configs: the second run starts from a checkpoint of the first with ``--init-from <first run>`` (its latest
checkpoint) or ``--init-from <first run>/checkpoints/<tag>``. It always takes the fp32 master weights; with
``"carry": "optimizer"`` also the optimizer's state (LAMB's moments, as NVIDIA's and DeepSpeed's BERT scripts do),
with ``"weights"`` a fresh optimizer (You et al. 2019). Either way its step count and lr schedule start at 0, with
the second config's hyperparameters. ``--init-from <run>/model`` (the exported folder) takes the weights only.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does this): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the ranks share the cores

import torch  # noqa: E402

if TYPE_CHECKING:  # transformers takes seconds to import: at run time only where a model is built
    from transformers import BertForMaskedLM

from train import cli, diagnostics, distributed, loop  # noqa: E402
from train.checkpoints import Position, checkpoint_tags, resume_tag  # noqa: E402
from train.config import ConfigError, check_world_size, load_json  # noqa: E402
from train.corpus import FORMATS, Prepared, prepare  # noqa: E402
from train.data import GlobalBatchSampler, eval_shard  # noqa: E402
from train.precision import bf16_speedup  # noqa: E402
from train.text import SPECIAL_TOKENS, Masker, default_corpus  # noqa: E402

# The published BERT shapes (layers, hidden size, attention heads): Devlin et al. 2018 (base, large) and Turc et al.
# 2019, "Well-Read Students Learn Better" (tiny, mini, small). The feed-forward layer is 4 x hidden.
MODELS = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "base": (12, 768, 12),
          "large": (24, 1024, 16)}
MAX_POSITIONS = 512  # BERT's position embeddings


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_run_arguments(p)
    cli.add_engine_arguments(p)
    p.add_argument("--data-dir", default=None, metavar="PATH",
                   help="the corpus: a folder or file in one of the --data-format formats (default: $BERT_CORPUS_DIR, "
                        "else Debian's python3.11-doc sources, which train/setup.sh installs)")
    p.add_argument("--data-format", default="auto", choices=FORMATS,
                   help="files: a folder of UTF-8 text files, one document each; lines: one sentence per line, a "
                        "blank line between documents (Google's and NVIDIA's BERT text); jsonl: a 'text' field per "
                        "line; parquet: a 'text' column; arrow: a Dataset.save_to_disk folder with 'text'; auto: "
                        "jsonl, parquet or arrow by the path, else files")
    p.add_argument("--corpus-cache", default=None, metavar="DIR",
                   help="where rank 0 keeps the tokenised corpus (keyed by the input files, tokenizer and sequence "
                        "length; share it between runs and phases); default: the --init-from run's corpus/ folder "
                        "if it has one, else <run folder>/corpus")
    p.add_argument("--corpus-wait", type=float, default=None, metavar="SECONDS",
                   help="how long the other ranks wait for rank 0 to tokenise the corpus; default: 600 s plus 2 s "
                        "per MB of input")
    p.add_argument("--model", default=None, metavar="NAME",
                   help=f"BERT shape: {', '.join(f'{k} (L/H/A {n}/{h}/{a})' for k, (n, h, a) in MODELS.items())}; "
                        f"default: the config's bert.model, else tiny")
    p.add_argument("--seq-len", type=cli.int_at_least(2), default=None,
                   help=f"tokens per sequence, at most {MAX_POSITIONS}; default: the config's bert.seq_len, else 128")
    p.add_argument("--vocab-size", type=cli.int_at_least(len(SPECIAL_TOKENS) + 1), default=None,
                   help="WordPiece vocabulary trained on the training split; default: the config's bert.vocab_size, "
                        "else 8192")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="use this saved tokenizer (a save_pretrained folder) instead of training one")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="phase 2 of a two-phase recipe: start from an earlier run (its latest checkpoint), one of "
                        "its checkpoints (<run>/checkpoints/<tag>) or its exported model/ folder (weights only); "
                        "the config's bert.carry says whether the optimizer state comes along; so does the "
                        "tokenizer")
    p.add_argument("--val-percent", type=cli.int_at_least(1), default=5,
                   help="share of documents held out for validation (by a hash of their path)")
    p.add_argument("--max-docs", type=cli.int_at_least(2), default=None,
                   help="use only the first N documents (sorted by path) of the corpus")
    p.add_argument("--eval-batch", type=cli.int_at_least(1), default=64, help="validation sequences per batch")
    diagnostics.add_arguments(p)  # --trust-ratio-interval
    return p


@dataclass(kw_only=True)
class BertRun(loop.RunParts):
    """One training run: the parts every run holds (train/loop.py), the text and its masking."""

    rate_name = "sequences_per_sec"
    corpus: Prepared
    masker: Masker
    val_rows: list[int]  # this rank's validation sequences (rows of corpus.val), masked the same at every evaluation
    seq_len: int


def micro_seed(seed: int, epoch: int, first_index: int) -> int:
    """One seed per micro-batch (its first sequence is unique within an epoch): masking and dropout repeat exactly
    after --resume and do not depend on the rank count."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + first_index


def bert_config(name: str, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import BertConfig

    if name not in MODELS:
        raise ConfigError(f"unknown --model {name!r}; expected one of {', '.join(MODELS)}")
    layers, hidden, heads = MODELS[name]
    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=4 * hidden, max_position_embeddings=MAX_POSITIONS,
                      pad_token_id=tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Set-up and the loop over epochs


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("DeepSpeed").setLevel(args.ds_log_level.upper())
    cfg = load_json(args.deepspeed_config)  # bad JSON fails here, before anything heavy
    diagnostics.check_optimizer(cfg, args.trust_ratio_interval)  # an optimizer that cannot record: refused now
    recipe = cfg.pop("bert", {})  # ours: the recipe's model, sequence length, vocabulary, length, carry-over
    if not isinstance(recipe, dict) or set(recipe) - RECIPE_KEYS:
        raise ConfigError(f'{args.deepspeed_config}: the "bert" block may hold {", ".join(sorted(RECIPE_KEYS))}; '
                          f"got {recipe!r}")
    steps, carry = recipe.get("steps"), recipe.get("carry", "weights")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"{args.deepspeed_config}: bert.steps must be a positive number of optimizer steps, got "
                          f"{steps!r}")
    if carry not in CARRY:
        raise ConfigError(f"{args.deepspeed_config}: bert.carry must be one of {', '.join(CARRY)}, got {carry!r}")
    init = phase1_checkpoint(args.init_from) if args.init_from else None
    model_name, seq_len = args.model or recipe.get("model", "tiny"), args.seq_len or recipe.get("seq_len", 128)
    args.vocab_size = args.vocab_size or recipe.get("vocab_size", 8192)
    if model_name not in MODELS:
        raise ConfigError(f"unknown --model {model_name!r}; expected one of {', '.join(MODELS)}")
    if args.inject_nan:
        raise ConfigError("--inject-nan is not supported by train/bert.py (its inputs are token ids)")
    if seq_len > MAX_POSITIONS:
        raise ConfigError(f"--seq-len {seq_len} is above BERT's maximum of {MAX_POSITIONS} positions; expected "
                          f"2 .. {MAX_POSITIONS}")
    check_world_size(cfg, args.micro_batch, distributed.launched_world_size())  # e.g. a resume on fewer ranks
    world = distributed.init(args.dist_timeout)
    run_name, out_dir = loop.run_folder(args, world)
    corpus = prepare_corpus(args, world, out_dir, seq_len)
    release_free_memory()  # rank 0's tokenising left free pages in the heap
    from transformers import BertForMaskedLM

    def probe(micro: int) -> float:  # bf16's speed-up on this model at the run's micro batch (CPU, auto precision)
        model = BertForMaskedLM(bert_config(model_name, len(corpus.tokenizer), corpus.tokenizer))
        embeds = torch.randn(micro, seq_len, model.config.hidden_size)  # float input, so bf16 can cast it
        return bf16_speedup(_FromEmbeddings(model), embeds, lambda logits, y: torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.flatten()), torch.randint(0, model.config.vocab_size, (micro, seq_len)))

    def model(_: Any) -> MaskedLM:
        if args.init_from and init is None:  # an exported model/ folder: its weights
            return MaskedLM(BertForMaskedLM.from_pretrained(args.init_from, local_files_only=True))
        return MaskedLM(BertForMaskedLM(bert_config(model_name, len(corpus.tokenizer), corpus.tokenizer)))

    if steps is not None and args.epochs is None:  # enough epochs for the recipe's steps on this corpus
        per_epoch = len(corpus.train) // int(cfg.get("train_batch_size") or 1)
        args.epochs = max(1, math.ceil(steps / per_epoch)) if per_epoch else 1
    masker = Masker(corpus.tokenizer)
    run = loop.build_run(BertRun, args, cfg, world, num_train=len(corpus.train), probe=probe, model=model,
                         folder=(run_name, out_dir), steps=steps, corpus=corpus, masker=masker,
                         val_rows=eval_shard(len(corpus.val), world.size, world.rank), seq_len=seq_len)
    if init is not None and not args.resume:
        world.say(start_from_checkpoint(run.engine, *init, carry=carry))
    entropy = corpus.val_unigram_entropy
    derived = run.resolved.derived() | {
        "dataset": "text", "data_dir": str(args.data_dir or default_corpus()), "model": model_name,
        "corpus_cache": str(corpus.folder),
        "seq_len": seq_len, "vocab_size": len(corpus.tokenizer), "num_train": len(corpus.train),
        "num_val": len(corpus.val), "train_docs": corpus.num_docs[0], "val_docs": corpus.num_docs[1],
        "train_tokens": corpus.num_tokens[0], "val_tokens": corpus.num_tokens[1], "val_unigram_entropy": entropy,
        "parameters": sum(p.numel() for p in run.engine.module.parameters())}
    pos = loop.begin(run, derived, "bert", lambda: describe(derived))
    loop.train_epochs(run, pos, len(corpus.train), train_one_epoch, epoch_record)
    return finish(run, pos)


class MaskedLM(torch.nn.Module):
    """BertForMaskedLM scored where it matters: the prediction head (vocabulary-sized logits) runs only at the
    masked positions, as NVIDIA's BERT pre-training does; the loss equals BertForMaskedLM's (cross-entropy over the
    masked tokens). ``self.bert`` is the transformers model that is saved and loaded."""

    def __init__(self, bert: BertForMaskedLM):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [masked tokens, vocabulary] and their targets."""
        hidden = self.bert.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        masked = labels != -100
        return self.bert.cls(hidden[masked]), labels[masked]


class _FromEmbeddings(torch.nn.Module):
    """The model from input embeddings to logits (the precision probe times it with a float input)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=x).logits


def prepare_corpus(args: argparse.Namespace, world: distributed.World, out_dir: Path, seq_len: int) -> Prepared:
    """The packed corpus from the cache (train/corpus.py: rank 0 builds what is missing, the others wait for it and
    open it). The tokenizer: a resumed run's own (<out_dir>/model/), else --tokenizer or phase 1's, else the one
    trained on this corpus; rank 0 saves it into <out_dir>/model/ beside the weights."""
    saved = out_dir / "model"
    if args.resume and (saved / "tokenizer.json").is_file():
        given: Path | None = saved
    else:
        named = args.tokenizer or (args.init_from and init_folder(Path(args.init_from)))
        given = Path(named) if named else None
    corpus = prepare(Path(args.data_dir or default_corpus()), fmt=args.data_format, cache=corpus_cache(args, out_dir),
                     seq_len=seq_len, vocab_size=args.vocab_size, val_percent=args.val_percent,
                     max_docs=args.max_docs, tokenizer_from=given, rank=world.rank, wait=args.corpus_wait,
                     say=world.say)
    if world.is_main and given != saved:
        corpus.tokenizer.save_pretrained(str(saved))
    return corpus


def corpus_cache(args: argparse.Namespace, out_dir: Path) -> Path:
    """--corpus-cache; else phase 1's cache (phase 2 packs the same tokens at its length); else <run>/corpus."""
    if args.corpus_cache:
        return Path(args.corpus_cache)
    if args.init_from:
        first = init_folder(Path(args.init_from)).parent
        if (first / "corpus").is_dir():
            return first / "corpus"
    return out_dir / "corpus"


def describe(d: dict[str, Any]) -> str:
    """What was derived, in one block (printed once on rank 0)."""
    tokens = d["global_batch"] * d["seq_len"]
    return "\n".join([
        f"batch: {d['micro_batch']} micro x {d['grad_accum']} accumulation x {d['world_size']} ranks = "
        f"{d['global_batch']:,} sequences x {d['seq_len']} tokens = {tokens:,} tokens per step",
        f"data: {d['data_dir']}: {d['train_docs']} documents, {d['train_tokens']:,} tokens -> {d['num_train']:,} "
        f"sequences -> {d['steps_per_epoch']:,} steps/epoch x {d['epochs']} epochs = {d['total_steps']:,} steps; "
        f"held out {d['val_docs']} documents ({d['num_val']:,} sequences)",
        f"model: BERT-{d['model']} ({d['parameters']:,} parameters, vocabulary {d['vocab_size']:,})",
        f"optimizer: {d['optimizer']} peak lr {d['lr']}; warmup {d['warmup_steps']} steps, decay {d['decay_steps']}",
        f"precision: {d['precision']}; ZeRO stage {d['zero_stage']}",
        f"held-out unigram entropy: {d['val_unigram_entropy']:.4f} nats (the MLM loss of predicting from token "
        f"frequencies alone)",
    ])


# ---------------------------------------------------------------------------------------------------------------
# One epoch: forward, loss, backward, step


def train_one_epoch(run: BertRun, sampler: GlobalBatchSampler, pos: Position) -> float:
    """Train from ``pos`` to the epoch's end (or --max-steps); return the lr of the last step."""
    engine = run.engine
    lr = loop.start_epoch(run, sampler, pos)
    for indices in sampler:
        seed = micro_seed(run.args.seed, pos.epoch, indices[0])
        batch = run.masker(run.corpus.train[indices], seed)
        torch.manual_seed(seed)  # dropout
        ids = run.guard.before_micro(batch["input_ids"].to(engine.device), pos.global_step)
        logits, target = engine(ids, batch["attention_mask"].to(engine.device), batch["labels"].to(engine.device))
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        lr = engine.get_lr()[0] if boundary else lr  # the lr this step runs at (the schedule moves on in step())
        engine.step()
        run.meter.add(loss, (logits.argmax(-1) == target).sum(), len(target), len(indices))
        if loop.end_micro_step(run, pos, sampler, loss, boundary, lr, tokens_per_sample=run.seq_len):
            break
    loop.end_epoch(run)
    return lr


def epoch_record(run: BertRun, pos: Position, sampler: GlobalBatchSampler, lr: float) -> dict[str, Any]:
    """The epoch's record (training totals over all ranks, then the held-out MLM loss), logged and printed."""
    totals = run.meter.epoch_totals()  # before evaluation: its time is not training's
    val = evaluate(run)
    record = {"kind": "epoch", "epoch": pos.epoch + pos.step_in_epoch / sampler.steps_per_epoch,
              "step": pos.global_step, "samples": pos.samples, "tokens": pos.samples * run.seq_len,
              "train_loss": totals["train_loss"], "train_error": totals["train_error"],  # % of masked tokens missed
              "train_mlm_accuracy": 100 - totals["train_error"], **val,
              "skipped_steps": run.engine.skipped_steps, "epoch_time": totals["epoch_time"],
              "sequences_per_sec": totals["sequences_per_sec"],
              "tokens_per_sec": totals["sequences_per_sec"] * run.seq_len, "lr": lr}
    run.history.append(record)
    if run.log:
        run.log.log(record)
    run.world.say(f"epoch {record['epoch']:.3g}/{run.resolved.epochs} | train MLM loss {record['train_loss']:.4f} | "
                  f"held-out MLM loss {val['val_loss']:.4f}, masked-token accuracy {val['val_mlm_accuracy']:.2f}% | "
                  f"{record['epoch_time']:.1f} s, {record['tokens_per_sec']:.0f} tokens/s")
    return record


@torch.no_grad()
def evaluate(run: BertRun) -> dict[str, float]:
    """MLM loss (nats per masked token) and masked-token accuracy (%) over the held-out sequences, each masked the
    same way at every evaluation, each counted once across ranks."""
    engine, size = run.engine, run.args.eval_batch
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)  # loss sum, correct, masked tokens
    for i in range(0, len(run.val_rows), size):
        rows = run.val_rows[i:i + size]  # read from the memory-mapped cache and masked batch by batch
        batch = run.masker(run.corpus.val[rows], seed=2**31 + rows[0])
        logits, target = engine(*(batch[k].to(engine.device) for k in ("input_ids", "attention_mask", "labels")))
        count = torch.tensor(len(target), device=logits.device)
        sums += torch.stack([torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"),
                             (logits.argmax(-1) == target).sum(), count]).double()
        del logits, target, batch
        release_free_memory()
    torch.distributed.all_reduce(sums)
    loss, correct, n = sums.tolist()
    engine.train()
    return {"val_loss": loss / max(n, 1.0), "val_mlm_accuracy": 100 * correct / max(n, 1.0),
            "val_masked_tokens": int(n)}


def finish(run: BertRun, pos: Position) -> dict[str, Any]:
    """The final held-out loss, the model folder (from_pretrained loads it, tokenizer beside it), the summary."""
    result: dict[str, Any] = {"steps": pos.global_step, "samples": pos.samples, "tokens": pos.samples * run.seq_len}
    if run.history:
        result |= {"final_val_loss": run.history[-1]["val_loss"],
                   "final_val_mlm_accuracy": run.history[-1]["val_mlm_accuracy"]}
    result["peak_rss_mib"] = peak_rss_mib(run.engine.device)
    state = fp32_state_dict(run.engine)  # every rank: ZeRO's partitions are gathered
    if run.world.is_main:
        run.engine.module.bert.save_pretrained(str(run.out_dir / "model"), state_dict=state)
    return loop.end_run(run, pos, result)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing). Tensors of varying
    size (the logits at a batch's masked positions, [masked tokens, vocabulary]) fragment glibc's heap: measured on
    BERT-tiny, 90 held-out batches of 64 x 128 took a process from 506 to 756 MB of anonymous memory, so a held-out
    set 10x larger meant a larger rank; trimmed after each batch, 453 to 456 MB. Called after each evaluation batch
    and once the corpus is open, not in training: trimming after every step cost 35% more CPU time per step (30
    steps of BERT-tiny at 32 x 128, where the heap grew from about 465 to 780 MB without it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mib(device: torch.device) -> list[float]:
    """Each rank's peak resident memory so far (VmHWM, MiB; ru_maxrss where /proc is missing), gathered: a
    collective, call on every rank."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mine = torch.tensor([peak], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine)
    return [round(float(t), 1) for t in every]


def fp32_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The BertForMaskedLM state dict with the optimizer's fp32 master weights (not an upcast of the fp16/bf16
    copies the module computes with); buffers and fp32 runs as they are. A collective under ZeRO: call on every
    rank."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    wrapper = engine.optimizer
    low, high = getattr(wrapper, "fp16_groups", None), getattr(wrapper, "fp32_groups", None)
    if isinstance(low, list) and isinstance(high, list) and all(isinstance(g, list) for g in high):
        for lo_group, hi_group in zip(low, high, strict=True):  # ZeRO-0 fp16: FP16_UnfusedOptimizer's copies
            masters.update({id(lo): hi for lo, hi in zip(lo_group, hi_group, strict=True)})
    module = engine.module.bert
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else masters.get(id(p), p)).detach().float().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = b.detach().float().cpu() if b.is_floating_point() else b.detach().cpu()
    return {k: out[k] for k in module.state_dict()}


# ---------------------------------------------------------------------------------------------------------------
# Phase 2 from a phase-1 checkpoint

RECIPE_KEYS = {"model", "seq_len", "vocab_size", "steps", "carry"}
CARRY = ("weights", "optimizer")


def phase1_checkpoint(path: str | Path) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) that ``--init-from`` names: a run folder (its latest checkpoint) or a tag folder;
    None for an exported model/ folder; a clear error for anything else."""
    path = Path(path)
    if (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors",
                                                                               "pytorch_model.bin")):
        return None
    if (path / "mp_rank_00_model_states.pt").is_file():
        return path.parent, path.name
    if (path / "checkpoints").is_dir():
        tags = checkpoint_tags(path / "checkpoints")
        tag = resume_tag(path / "checkpoints") or (tags[-1] if tags else None)
        if tag:
            return path / "checkpoints", tag
    raise ConfigError(f"--init-from {path}: neither a run folder with a checkpoint (checkpoints/latest), a checkpoint "
                      f"(checkpoints/<tag>) nor an exported model/ folder")


def init_folder(path: Path) -> Path:
    """The folder whose tokenizer phase 2 takes: the run's model/ folder (written when the run starts)."""
    if (path / "mp_rank_00_model_states.pt").is_file():
        return path.parent.parent / "model"
    return path / "model" if (path / "checkpoints").is_dir() else path


def start_from_checkpoint(engine: Any, ckpt_dir: Path, tag: str, *, carry: str) -> str:
    """Load phase 1's checkpoint into the phase-2 engine: the fp32 master weights always (DeepSpeed restores them
    with the optimizer state); with ``carry="optimizer"`` the moments stay, else they are zeroed (a fresh
    optimizer: LAMB's state starts at zeros); the step counts and the schedule start at 0, and every optimizer
    hyperparameter (lr, betas, clamps ...) is this config's."""
    base = engine.basic_optimizer
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"--init-from: DeepSpeed found no checkpoint {tag} in {ckpt_dir}")
    for group, saved in zip(base.param_groups, hyper, strict=True):
        group.update(saved)
    for state in base.state.values():
        for key, value in state.items():
            if key == "step":
                state[key] = value.zero_() if torch.is_tensor(value) else 0
            elif carry == "weights" and torch.is_tensor(value):
                value.zero_()
    engine.global_steps, engine.global_samples, engine.skipped_steps = 0, 0, 0
    scheduler = engine.lr_scheduler
    if hasattr(scheduler, "last_batch_iteration"):
        scheduler.step(-1)  # step 0's lr of this config's schedule
    return (f"phase 2 from {ckpt_dir / tag}: fp32 master weights" +
            (", optimizer state (moments) carried" if carry == "optimizer" else ", a fresh optimizer") +
            "; step and lr schedule reset")


if __name__ == "__main__":
    cli.entry(main, get_args_parser())
