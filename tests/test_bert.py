"""BERT pre-training (train/bert.py, train/text.py): masking statistics and packing on the Debian corpus, LAMB under
ZeRO-1/2 equal to ZeRO-0 on BERT through the launcher, bit-exact resume, the saved model loading with
from_pretrained, and bad input answered with one clear line.

The corpus is Debian's python3.11-doc (train/setup.sh installs it); the launcher runs use BERT-tiny at sequence
length 64 on its first 24 documents and a 512-token vocabulary, fp32, 4 optimizer steps: ZeRO-0 on one rank (the
reference), ZeRO-1/2 and the resumed run on 2 ranks, and a phase-2 run (--init-from) of 2 steps on one rank.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, child_env, launch, read_metrics, run_single, write_config
from train.data import DataError
from train.text import (
    Masker,
    build_corpus,
    default_corpus,
    pack,
    read_documents,
    split_documents,
    train_tokenizer,
)

SMALL = ["--model", "tiny", "--seq-len", "64", "--max-docs", "24", "--vocab-size", "512", "--no-wandb",
         "--log-interval", "1"]


@pytest.fixture(scope="module")
def corpus_dir() -> Path:
    folder = default_corpus()
    if not folder.is_dir():
        pytest.fail(f"the demo corpus is not in {folder}: install Debian's python3.11-doc (tests/run.sh does through "
                    f"train/setup.sh) or set BERT_CORPUS_DIR")
    return folder


@pytest.fixture(scope="module")
def small(corpus_dir: Path) -> dict:
    docs = read_documents(corpus_dir, max_docs=60)
    train_docs, val_docs = split_documents(docs, 5)
    tokenizer = train_tokenizer([d.text for d in train_docs], 1000)
    return {"docs": docs, "train": train_docs, "val": val_docs, "tokenizer": tokenizer,
            "corpus": build_corpus(tokenizer, train_docs, val_docs, 64)}


def test_split_is_by_document_and_keeps_every_document(small):
    names_train, names_val = {d.name for d in small["train"]}, {d.name for d in small["val"]}
    assert names_train.isdisjoint(names_val) and names_val
    assert names_train | names_val == {d.name for d in small["docs"]}


def test_tokenizer_training_gives_the_same_ids_every_time(small):
    """tokenizers' WordPiece trainer numbers its vocabulary in hash-map order: two runs on the same text would give
    the same word embeddings different rows (and ZeRO/resume comparisons different weights)."""
    texts = [d.text for d in small["train"]]
    assert train_tokenizer(texts, 1000).get_vocab() == small["tokenizer"].get_vocab()


def test_packing_loses_no_token(small):
    """Every document's tokens (tokenized on its own) come back in order between the [SEP]s of the packed rows."""
    tok = small["tokenizer"]
    rows = small["corpus"].train
    assert (rows[:, 0] == tok.cls_token_id).all()
    padded = rows == tok.pad_token_id
    assert not padded[:-1].any(), "only the last row may be padded"
    stream = rows[:, 1:][~padded[:, 1:]].tolist()
    want = [tok(d.text, add_special_tokens=False)["input_ids"] for d in small["train"]]  # one document at a time
    assert len(stream) == sum(len(w) + 1 for w in want)
    got, cur = [], []
    for t in stream:
        if t == tok.sep_token_id:
            got.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [] and got == want
    assert padded[-1].sum() < rows.shape[1] - 1  # the last row holds at least one token


def test_pack_small_case_by_hand():
    rows = pack([[10, 11, 12], [13]], 4, cls=2, sep=3, pad=0)
    assert rows.tolist() == [[2, 10, 11, 12], [2, 3, 13, 3]]
    rows = pack([[10, 11, 12, 13]], 4, cls=2, sep=3, pad=0)
    assert rows.tolist() == [[2, 10, 11, 12], [2, 13, 3, 0]]


def test_masking_statistics_on_real_batches(small):
    """BERT's rule (Devlin et al. 2018, 3.1): 15% of the tokens, of those 80% [MASK], 10% random, 10% unchanged;
    special tokens never. Each share within 5 binomial standard deviations."""
    tok = small["tokenizer"]
    rows = small["corpus"].train[:400]
    masker = Masker(tok)
    batches = [masker(rows[i:i + 50], seed=i) for i in range(0, len(rows), 50)]
    inputs = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    special = torch.isin(rows, torch.tensor(tok.all_special_ids))
    masked = labels != -100
    assert not (masked & special).any()
    assert (labels[masked] == rows[masked]).all()
    assert (inputs[~masked] == rows[~masked]).all()

    def within(count: int, n: int, p: float) -> None:
        sd = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 5 * sd, f"{count}/{n} = {count / n:.4f}, expected {p} +- {5 * sd / n:.4f}"

    n_masked = int(masked.sum())
    within(n_masked, int((~special).sum()), 0.15)
    to_mask = int((inputs[masked] == tok.mask_token_id).sum())
    unchanged = int((inputs[masked] == rows[masked]).sum())
    within(to_mask, n_masked, 0.8)
    # a random replacement draws the original token with probability 1/vocabulary
    within(unchanged, n_masked, 0.1 + 0.1 / len(tok))
    within(n_masked - to_mask - unchanged, n_masked, 0.1 - 0.1 / len(tok))


def test_masking_repeats_for_the_same_seed(small):
    rows, masker = small["corpus"].train[:8], Masker(small["tokenizer"])
    a, b, c = masker(rows, 7), masker(rows, 7), masker(rows, 8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_empty_folder_and_binary_file_are_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="holds no files"):
        read_documents(tmp_path)
    (tmp_path / "a.txt").write_text("some text here\n")
    (tmp_path / "b.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"b\.bin is not UTF-8 text"):
        read_documents(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        read_documents(tmp_path / "missing")


def _single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train/bert.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=child_env())


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "513"], "--seq-len 513 is above BERT's maximum of 512 positions"),
    (["--model", "huge"], "unknown --model 'huge'; expected one of tiny, mini, small, base, large"),
])
def test_bad_flags_get_one_line(tmp_path, extra, message):
    proc = _single(["--deepspeed_config", "ds_configs/bert/demo.json", "--output-dir", str(tmp_path / "r"), *extra])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_corpus_through_the_entry_point(tmp_path):
    (tmp_path / "corpus").mkdir()
    proc = _single(["--deepspeed_config", "ds_configs/bert/demo.json", "--output-dir", str(tmp_path / "r"),
                    "--data-dir", str(tmp_path / "corpus"), "--no-wandb"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: --data-dir {tmp_path / 'corpus'} holds no files" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Through the launcher: LAMB under ZeRO, resume, the saved model


def lamb_config(path: Path, stage: int, bert: dict | None = None) -> Path:
    return write_config(path, {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
        "optimizer": {"type": "LAMB", "params": {"lr": 5e-3, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupPolyLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 5e-3,
                                                         "warmup_num_steps": 2, "total_num_epochs": "auto",
                                                         "end_lr": 0.0, "power": 1.0}},
        "training": {"epochs": 1}, **({"bert": bert} if bert else {})})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, corpus_dir) -> dict[str, Path]:
    """ZeRO 0 (one process), 1, 2 (two ranks) for 4 steps (ZeRO-1 also saves at step 2); a copy of the ZeRO-1 run
    resumed from step 2; phase 2 from the ZeRO-0 run's checkpoint (2 steps, sequence length 128, optimizer state
    carried)."""
    root = tmp_path_factory.mktemp("bert")
    out = {}
    for stage in (0, 1, 2):
        cfg = lamb_config(root / f"z{stage}.json", stage)
        out[f"z{stage}"] = root / f"z{stage}"
        run = launch if stage else run_single  # ZeRO-0 on one rank: one plain process
        run(["train/bert.py", "--deepspeed_config", str(cfg), *SMALL, "--output-dir", str(out[f"z{stage}"]),
             "--max-steps", "4", "--save-interval", "2"])
    out["resumed"] = root / "resumed"
    shutil.copytree(out["z1"], out["resumed"])
    (out["resumed"] / "checkpoints" / "latest").write_text("step2")
    launch(["train/bert.py", "--deepspeed_config", str(root / "z1.json"), *SMALL, "--output-dir",
            str(out["resumed"]), "--max-steps", "4", "--resume"])
    out["phase2"] = root / "phase2"
    cfg = lamb_config(root / "phase2.json", 0, {"seq_len": 128, "steps": 2, "carry": "optimizer"})
    proc = run_single(["train/bert.py", "--deepspeed_config", str(cfg), *SMALL, "--seq-len", "128", "--output-dir",
                       str(out["phase2"]), "--init-from", str(out["z0"])])
    (out["phase2"] / "launcher.log").write_text(proc.stdout + proc.stderr)
    return out


def test_lamb_zero_stages_give_the_weights_of_zero_0(launched):
    """ZeRO-1/2 flatten BERT's embeddings, LayerNorms and attention into partitions split across the two ranks; the
    bound LAMB must step each real layer as ZeRO-0 does. Each LAMB step moves a layer by about lr x ||w|| (the trust
    ratio), so 4 steps (lr 0, 2.5e-3, 5e-3, 3.3e-3) move it by ~1e-2 ||w||; the tolerance, 1e-5 ||w||, is a
    thousandth of that. Measured: at most 1.6e-7 in both stages (fp32 summation order: ZeRO's
    reduce-scatter against an all-reduce).

    Left out: the attention key biases. Their true gradient is zero (adding q.b_k to every score of a query leaves
    the softmax unchanged), so what they get is rounding noise, which Adam's normalisation m / (sqrt(v) + eps) turns
    into full-size steps (biases take no trust ratio and no weight decay): measured 0.5-0.8 of their norm apart
    between stages, as between any two summation orders."""
    ref = weights(launched["z0"])
    for stage in ("z1", "z2"):
        got = weights(launched[stage])
        assert got.keys() == ref.keys()
        errors = {n: float((got[n] - w).norm() / w.norm()) for n, w in ref.items()
                  if not n.endswith("attention.self.key.bias")}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-5, f"{stage}: {worst}: ||w - w_zero0|| / ||w|| = {errors[worst]:.3e}"


def test_resume_is_bit_exact(launched):
    ref, got = weights(launched["z1"]), weights(launched["resumed"])
    for name, w in ref.items():
        assert torch.equal(got[name], w), f"{name}: resumed run differs by {float((got[name] - w).abs().max()):.3e}"
    steps = {r["step"]: r["loss"] for r in read_metrics(launched["z1"]) if r["kind"] == "step"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(launched["resumed"]) if r["kind"] == "step"}
    assert resumed == steps


def test_saved_model_loads_with_from_pretrained_and_records_are_complete(launched):
    from transformers import BertForMaskedLM, BertTokenizerFast

    run_dir = launched["z0"]
    model = BertForMaskedLM.from_pretrained(run_dir / "model", local_files_only=True)
    tok = BertTokenizerFast.from_pretrained(run_dir / "model", local_files_only=True)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    assert model.config.vocab_size == len(tok) <= 512
    for name, w in weights(run_dir).items():
        assert torch.equal(model.state_dict()[name], w)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["derived"]["seq_len"] == 64 and cfg["derived"]["model"] == "tiny"
    recs = read_metrics(run_dir)
    step = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in step] == [1, 2, 3, 4]
    assert all(math.isclose(r["tokens_per_sec"], r["sequences_per_sec"] * 64) for r in step)
    epoch = [r for r in recs if r["kind"] == "epoch"][-1]
    assert 0 < epoch["val_loss"] and 0 <= epoch["val_mlm_accuracy"] <= 100 and epoch["val_masked_tokens"] > 0


def test_compare_reads_bert_runs_with_mlm_loss(launched):
    from analysis.compare import table_markdown
    from analysis.runs import load_run

    runs = [load_run(launched[k]) for k in ("z0", "z1")]
    last = [r for r in read_metrics(launched["z0"]) if r["kind"] == "epoch"][-1]
    assert runs[0].final_top1 == last["val_loss"] and runs[0].method == "LAMB" and runs[0].batch == 16
    table = table_markdown(runs)
    assert "final MLM loss (nats)" in table and f"{last['val_loss']:.2f}" in table


def test_phase2_through_the_entry_point(launched):
    """--init-from a run folder: its latest checkpoint (the ZeRO-0 run's step 4), its tokenizer, the recipe's
    2 steps (bert.steps), step and schedule from 0 (the first step at warmup_min_lr 0, the second at 5e-3 / 2)."""
    log = (launched["phase2"] / "launcher.log").read_text()
    assert f"phase 2 from {launched['z0'] / 'checkpoints' / 'step4'}: fp32 master weights, optimizer state" in log
    steps = [r for r in read_metrics(launched["phase2"]) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["lr"] for r in steps] == [0.0, 2.5e-3]
    cfg = json.loads((launched["phase2"] / "config.json").read_text())
    assert cfg["derived"]["seq_len"] == 128
    tok = json.loads((launched["phase2"] / "model" / "tokenizer.json").read_text())
    assert tok["model"]["vocab"] == json.loads((launched["z0"] / "model" / "tokenizer.json").read_text())["model"][
        "vocab"]
