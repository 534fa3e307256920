"""The corpus path that scales (train/corpus.py): five input formats read into the same documents, their tokens
equal to the text tokenised directly with document boundaries kept, only rank 0 reads or tokenises, phase 2 re-packs
the same tokens, a changed input is not reused, and bad input is refused with what was expected.

Small hand-made corpora in tmp_path and a 200-entry tokenizer trained once; one entry-point run (exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, child_env
from train.corpus import prepare
from train.data import DataError
from train.text import build_corpus, default_corpus, load_tokenizer, read_documents, split_documents, train_tokenizer

# Eight documents of one to three sentences; each format writes them its own way.
DOCS = [
    ["The quick brown fox jumps over the lazy dog.", "It was not amused."],
    ["Large batches need a warmup of the learning rate.", "Goyal et al. scale it linearly."],
    ["LAMB adapts the step to each layer.", "The trust ratio is the weight norm over the update norm.",
     "It was made for BERT."],
    ["One sentence only, with punctuation: commas, colons; and semicolons!"],
    ["Memory-mapped Arrow files are read in pages.", "Nothing is loaded until it is used."],
    ["Numbers like 3.14159 and 2,718 are split by the tokenizer."],
    ["Wikipedia and BookCorpus are large.", "A laptop corpus is small.", "Both are text."],
    ["The held-out split is by document.", "No document is cut in two between the splits."],
]
TEXTS = [" ".join(d) for d in DOCS]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 3, 200).save_pretrained(str(folder))
    return folder


def write(fmt: str, root: Path) -> Path:
    """The eight documents in ``fmt`` below ``root``; the path to give --data-dir."""
    root.mkdir()
    if fmt == "files":
        for i, text in enumerate(TEXTS):
            (root / f"doc{i}.txt").write_text(text + "\n")
        (root / "empty.txt").write_text("\n")  # an empty file is no document
        return root
    if fmt == "lines":  # two files, one sentence a line, blank lines between documents (and extra ones)
        for part, docs in (("a.txt", DOCS[:5]), ("b.txt", DOCS[5:])):
            (root / part).write_text("\n\n".join("\n".join(d) for d in docs) + "\n\n\n")
        return root
    if fmt == "jsonl":
        lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(TEXTS)]
        (root / "part0.jsonl").write_text("\n".join(lines[:3]) + "\n")
        (root / "part1.jsonl").write_text("\n".join(lines[3:]) + "\n\n")
        return root
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(8)), "text": TEXTS}), root / "corpus.parquet", row_group_size=3)
        return root / "corpus.parquet"
    from datasets import Dataset

    Dataset.from_dict({"text": TEXTS, "source": ["hand"] * 8}).save_to_disk(str(root / "saved"))
    return root / "saved"


def documents(rows: torch.Tensor, tok) -> list[list[int]]:
    """The documents packed into ``rows``: each row's [CLS] dropped, the stream split at [SEP], padding dropped."""
    assert (rows[:, 0] == tok.cls_token_id).all()
    stream = rows[:, 1:].reshape(-1).tolist()
    while stream and stream[-1] == tok.pad_token_id:
        stream.pop()
    assert tok.pad_token_id not in stream, "padding only at the end"
    assert stream[-1] == tok.sep_token_id
    out, cur = [], []
    for t in stream:
        if t == tok.sep_token_id:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


@pytest.mark.parametrize("fmt", ["files", "lines", "jsonl", "parquet", "arrow"])
def test_every_format_gives_the_documents_tokenised_directly(tmp_path, tokenizer_dir, fmt):
    """Each format's corpus: every document once, its tokens equal to its text tokenised on its own (sentences
    joined by whitespace), boundaries kept; the counts are those of the direct tokenisation."""
    tok = load_tokenizer(tokenizer_dir)
    want = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    data = write(fmt, tmp_path / "in")
    c = prepare(data, fmt="lines" if fmt == "lines" else "auto", cache=tmp_path / "cache", seq_len=16,
                vocab_size=200, val_percent=30, tokenizer_from=tokenizer_dir)
    assert c.train.shape[1] == c.val.shape[1] == 16
    train, val = documents(c.train[:], tok), documents(c.val[:], tok)
    assert sorted(train + val) == sorted(want)
    assert train == [w for w in want if w in train]  # file order kept within each side
    assert c.num_docs == (len(train), len(val)) and len(val) >= 1 and len(train) >= 1
    assert sum(c.num_tokens) == sum(map(len, want))
    # rows: ceil((tokens + one [SEP] per document) / 15) per side, the last row padded
    for rows, docs in ((c.train, train), (c.val, val)):
        assert len(rows) == -(-sum(len(d) + 1 for d in docs) // 15)


def test_files_format_splits_and_packs_as_the_in_memory_path(tmp_path):
    """On the first 24 documents of the demo corpus: the held-out documents are those whose path's CRC-32 falls in
    the first 5 buckets (or the last document), and the packed rows equal train/text.py's ``pack`` of the same
    tokenizer's ids (tested by hand in tests/test_bert.py); the unigram entropy equals ``unigram_entropy``."""
    from train.text import unigram_entropy

    docs = read_documents(default_corpus(), max_docs=24)
    train_docs, val_docs = split_documents(docs, 5)
    hashed = [d.name for d in docs if zlib.crc32(d.name.encode()) % 100 < 5]
    assert [d.name for d in val_docs] == (hashed if 0 < len(hashed) < len(docs) else [docs[-1].name])
    train_tokenizer([d.text for d in train_docs], 300).save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(tmp_path / "tok")
    ref = build_corpus(tok, train_docs, val_docs, 64)
    c = prepare(default_corpus(), cache=tmp_path / "cache", seq_len=64, vocab_size=300, val_percent=5, max_docs=24,
                tokenizer_from=tmp_path / "tok")
    assert torch.equal(c.train[:], ref.train) and torch.equal(c.val[:], ref.val)
    assert c.num_docs == ref.num_docs and c.num_tokens == ref.num_tokens
    assert c.val_unigram_entropy == pytest.approx(unigram_entropy(ref.val, ref.special_ids), rel=1e-12)


def test_rank_1_never_reads_or_tokenises(tmp_path, tokenizer_dir, capsys):
    """A rank other than 0 only waits for rank 0's files, saying for what, and gives up after --corpus-wait with a
    message; it writes nothing into the cache. Once rank 0 has built the cache it opens the same rows."""
    data = write("jsonl", tmp_path / "in")
    cache = tmp_path / "cache"
    with pytest.raises(TimeoutError, match="waited --corpus-wait for rank 0 to train the tokenizer"):
        prepare(data, cache=cache, seq_len=16, vocab_size=200, val_percent=30, rank=1, wait=1.5)
    assert "rank 1: waiting for rank 0 to train the tokenizer" in capsys.readouterr().out
    with pytest.raises(TimeoutError, match="waited --corpus-wait for rank 0 to tokenise and pack the corpus"):
        prepare(data, cache=cache, seq_len=16, vocab_size=200, val_percent=30, rank=1, wait=1.5,
                tokenizer_from=tokenizer_dir)
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
    first = prepare(data, cache=cache, seq_len=16, vocab_size=200, val_percent=30, rank=0)
    other = prepare(data, cache=cache, seq_len=16, vocab_size=200, val_percent=30, rank=1, wait=5)
    assert first.built_here and not other.built_here
    assert torch.equal(first.train[:], other.train[:])
    assert other.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_phase_2_repacks_the_same_tokens_and_a_changed_input_is_not_reused(tmp_path, tokenizer_dir):
    data = write("files", tmp_path / "in")
    cache = tmp_path / "cache"
    kw = {"cache": cache, "vocab_size": 200, "val_percent": 30, "tokenizer_from": tokenizer_dir}
    short = prepare(data, seq_len=16, **kw)
    (tokens,) = cache.glob("*/tokens-*/tokens.arrow")
    made = tokens.stat().st_mtime_ns
    long = prepare(data, seq_len=32, **kw)
    assert long.built_here and tokens.stat().st_mtime_ns == made  # packed again, not tokenised again
    assert long.folder.parent == short.folder.parent and long.train.shape[1] == 32
    tok = load_tokenizer(tokenizer_dir)
    assert documents(long.train[:], tok) == documents(short.train[:], tok)
    assert not prepare(data, seq_len=32, **kw).built_here  # the same input: opened, not built
    (data / "doc0.txt").write_text("A different first document entirely.\n")
    changed = prepare(data, seq_len=16, **kw)
    assert changed.built_here and changed.folder.parent.parent != short.folder.parent.parent
    want = tok("A different first document entirely.", add_special_tokens=False)["input_ids"]
    assert want in documents(changed.train[:], tok) + documents(changed.val[:], tok)


def test_bad_input_says_what_was_expected(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r'a\.jsonl line 1 has no "text" string field \(got \[\'body\'\]\)'):
        prepare(tmp_path / "a.jsonl", cache=tmp_path / "c", seq_len=16, vocab_size=200, val_percent=5)
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"b\.jsonl line 2 is not JSON"):
        prepare(tmp_path / "b.jsonl", cache=tmp_path / "c", seq_len=16, vocab_size=200, val_percent=5)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r'c\.parquet has no "text" column \(columns: body\)'):
        prepare(tmp_path / "c.parquet", cache=tmp_path / "c", seq_len=16, vocab_size=200, val_percent=5)
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"cannot tell the format of a \.csv file"):
        prepare(tmp_path / "d.csv", cache=tmp_path / "c", seq_len=16, vocab_size=200, val_percent=5)
    with pytest.raises(DataError, match="--data-format 'xml' is not a corpus format; expected one of auto, files"):
        prepare(tmp_path, fmt="xml", cache=tmp_path / "c", seq_len=16, vocab_size=200, val_percent=5)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    with pytest.raises(DataError, match="every document is empty"):
        prepare(tmp_path / "empty", cache=tmp_path / "c", seq_len=16, vocab_size=200, val_percent=5)


def test_a_jsonl_without_text_through_the_entry_point(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"title": "x"}\n')
    proc = subprocess.run([sys.executable, "train/bert.py", "--deepspeed_config", "ds_configs/bert/demo.json",
                           "--output-dir", str(tmp_path / "r"), "--data-dir", str(tmp_path / "corpus.jsonl"),
                           "--no-wandb"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f'error: {tmp_path / "corpus.jsonl"} line 1 has no "text" string field' in proc.stderr
    assert "Traceback" not in proc.stderr
