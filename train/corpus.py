"""The corpus path that scales: five input formats -> Hugging Face ``datasets`` (memory-mapped Arrow) -> tokenised
once by rank 0 -> packed rows per sequence length, in a cache folder every rank then opens.

Formats (``--data-format``; ``auto`` tells them apart by the path, except ``lines``, which must be named):

* ``files``: a folder of UTF-8 text files, one document each (the demo corpus; a document is named by its path
  relative to the folder, so the held-out split is train/text.py's);
* ``lines``: Google's and NVIDIA's pre-training text: one sentence per line, a blank line between documents; a file
  or a folder of such files (document ``k`` of file ``f`` is named ``f#k``);
* ``jsonl``: one JSON object per line with a ``text`` field; a ``.jsonl``/``.json`` file or a folder of them
  (named ``f:line``);
* ``parquet``: a ``text`` column; a ``.parquet`` file or a folder of them (named ``f:row``);
* ``arrow``: a folder written by ``datasets.Dataset.save_to_disk`` with a ``text`` column (named by row).

The cache (``--corpus-cache``, default ``<run>/corpus``), one folder per corpus (a hash of the format, every input
file's relative path, size and modification time, ``--val-percent`` and ``--max-docs``, so a changed input is not
silently reused)::

    <corpus key>/docs.arrow          name, text, hash bucket of the name (the held-out split) per document
    <corpus key>/vocab-<V>/          the WordPiece tokenizer trained on the training documents (save_pretrained)
    <corpus key>/tokens-<T>/         T: a hash of the tokenizer (trained, --tokenizer or phase 1's); tokens.arrow:
                                     each document's ids, tokenised once with ``Dataset.map(batched=True)``
    <corpus key>/tokens-<T>/seq<N>/  train.npy, val.npy (rows of N ids, packed as train/text.py's ``pack``) and
                                     meta.json (counts, the held-out unigram entropy), written last

Documents are stored once; phase 2 packs the same tokens at 512 into ``seq512/``. Only rank 0 reads, trains,
tokenises and packs (under a lock, so two jobs sharing a cache do not build it twice); the other ranks poll for
the files they need (``--corpus-wait`` seconds, saying what they wait for) and then memory-map the packed rows:
nothing per rank grows with the corpus but the sampler's permutation (8 bytes a sequence).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data import DataError
from train.text import DEMO_CORPUS, load_tokenizer, train_tokenizer

FORMATS = ("auto", "files", "lines", "jsonl", "parquet", "arrow")
JSONL_SUFFIXES = (".jsonl", ".json")
BATCH = 32  # documents per map() batch and per Arrow record batch: what rank 0 holds at once (a fast tokenizer's
# encodings of 32 long documents, tens of MB; the peak is this, not the corpus)
POLL_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------------------------
# Reading: any format -> (name, text) documents, in a fixed order


def detect_format(path: Path, fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"--data-format {fmt!r} is not a corpus format; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    if path.is_file():
        if path.suffix in JSONL_SUFFIXES:
            return "jsonl"
        if path.suffix == ".parquet":
            return "parquet"
        raise DataError(f"--data-dir {path}: cannot tell the format of a {path.suffix or 'suffix-less'} file "
                        f"(expected .jsonl, .json or .parquet, a folder, or --data-format lines for one-sentence-"
                        f"per-line text)")
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return "arrow"
    suffixes = {p.suffix for p in _files(path)}
    if suffixes and suffixes <= set(JSONL_SUFFIXES):
        return "jsonl"
    if suffixes == {".parquet"}:
        return "parquet"
    return "files"


def _files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise DataError(f"--data-dir {path} is not a folder or file (expected a corpus: a folder of UTF-8 text "
                        f"files, .jsonl, .parquet, a saved datasets folder; the demo corpus is Debian's "
                        f"python3.11-doc in {DEMO_CORPUS}: apt-get install python3.11-doc)")
    return sorted(p for p in path.rglob("*") if p.is_file())


def input_files(path: Path, fmt: str) -> list[Path]:
    """The files a corpus is read from, sorted; a clear error when there are none."""
    files = [path] if path.is_file() else _files(path)
    if fmt == "jsonl" and path.is_dir():
        files = [p for p in files if p.suffix in JSONL_SUFFIXES]
    elif fmt == "parquet" and path.is_dir():
        files = [p for p in files if p.suffix == ".parquet"]
    if not files:
        raise DataError(f"--data-dir {path} holds no files (expected {fmt} input: "
                        f"{'UTF-8 text files, one document each' if fmt == 'files' else fmt + ' files'})")
    return files


def _decode(p: Path, raw: bytes) -> str:
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); the corpus folder must hold only "
                        f"text files: remove it or point --data-dir at a folder of text") from None


def _rel(p: Path, root: Path) -> str:
    return p.name if root.is_file() else str(p.relative_to(root))


def read(path: Path, fmt: str, max_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every non-empty document, in file order; ``max_docs`` counts what was read (files for
    ``files``, documents otherwise), as train/text.py's ``read_documents`` does."""
    files = input_files(path, fmt)
    count = 0
    if fmt == "files":
        for p in files[:max_docs] if max_docs else files:
            text = _decode(p, p.read_bytes())
            if text.strip():
                yield _rel(p, path), text
        return
    for p in files if fmt != "arrow" else [path]:  # a saved dataset is one input, whatever its files
        for name, text in _documents_of(p, _rel(p, path), fmt):
            if max_docs and count >= max_docs:
                return
            count += 1
            if text.strip():
                yield name, text


def _documents_of(p: Path, rel: str, fmt: str) -> Iterator[tuple[str, str]]:
    if fmt == "lines":
        lines: list[str] = []
        k = 0
        with p.open("rb") as f:
            for raw in f:
                line = _decode(p, raw).strip()
                if line:
                    lines.append(line)
                elif lines:
                    yield f"{rel}#{k}", "\n".join(lines)
                    lines, k = [], k + 1
        if lines:
            yield f"{rel}#{k}", "\n".join(lines)
    elif fmt == "jsonl":
        with p.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as e:
                    raise DataError(f"{p} line {n} is not JSON ({e}); expected one JSON object per line with a "
                                    f'"text" field') from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    got = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f'{p} line {n} has no "text" string field (got {got}); expected one JSON object '
                                    f'per line with a "text" field holding the document')
                yield f"{rel}:{n}", record["text"]
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        source = pq.ParquetFile(p)
        if "text" not in source.schema_arrow.names:
            raise DataError(f'{p} has no "text" column (columns: {", ".join(source.schema_arrow.names)}); expected '
                            f'the documents in a "text" column')
        row = 0
        for batch in source.iter_batches(batch_size=BATCH, columns=["text"]):
            for text in batch.column(0).to_pylist():
                yield f"{rel}:{row}", text or ""
                row += 1
    elif fmt == "arrow":
        from datasets import load_from_disk

        saved = load_from_disk(str(p))
        if not hasattr(saved, "column_names") or "text" not in saved.column_names:
            got = getattr(saved, "column_names", "a DatasetDict (save one split)")
            raise DataError(f'--data-dir {p}: the saved dataset has no "text" column (got {got}); expected '
                            f'a Dataset.save_to_disk folder with the documents in "text"')
        row = 0
        for batch in saved.select_columns(["text"]).iter(batch_size=BATCH):
            for text in batch["text"]:
                yield str(row), text or ""
                row += 1


# ---------------------------------------------------------------------------------------------------------------
# The cache


# Part of every cache key: raise it when what the cache holds changes (tokenising, packing, the files' layout), so a
# cache written by another version of this code is built again, not reused.
CACHE_VERSION = 1


def corpus_key(path: Path, fmt: str, val_percent: int, max_docs: int | None) -> str:
    """A hash of what the documents are read from: the cache version, the format, the corpus's absolute path, each
    file's relative path, size and mtime, the split. Two copies of a corpus in other folders get their own caches."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, fmt, str(path.resolve()), val_percent, max_docs]).encode())
    for p in input_files(path, fmt) if fmt != "arrow" else sorted(q for q in path.iterdir() if q.is_file()):
        st = p.stat()
        h.update(f"{_rel(p, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{fmt}-{h.hexdigest()[:16]}"


def tokenizer_key(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def _val_mask(buckets: np.ndarray, index: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Held out: the documents whose name hashes into the first val_percent buckets; if that is none or all of them,
    the last document only (train/text.py's ``split_documents``)."""
    if meta["split"] == "last":
        return index == meta["docs"] - 1
    return buckets < meta["val_percent"]


def write_docs(folder: Path, path: Path, fmt: str, val_percent: int, max_docs: int | None) -> dict[str, Any]:
    """Rank 0: the documents into ``docs.arrow`` (name, text, bucket), one record batch at a time."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"name": Value("string"), "text": Value("string"), "bucket": Value("int8")})
    docs = held_out = 0
    tmp = folder / "docs.arrow.tmp"
    with ArrowWriter(features=features, path=str(tmp), writer_batch_size=BATCH) as writer:
        for name, text in read(path, fmt, max_docs):
            bucket = zlib.crc32(name.encode()) % 100
            writer.write({"name": name, "text": text, "bucket": bucket})
            docs += 1
            held_out += bucket < val_percent
        writer.finalize()
    if docs == 0:
        tmp.unlink()
        raise DataError(f"--data-dir {path}: every document is empty (expected {fmt} input with some text)")
    if docs < 2:
        tmp.unlink()
        raise DataError(f"--data-dir {path}: the corpus has {docs} document; a held-out split needs at least 2")
    meta = {"docs": docs, "val_percent": val_percent, "split": "hash" if 0 < held_out < docs else "last"}
    _replace(tmp, folder / "docs.arrow")
    (folder / "docs.json.tmp").write_text(json.dumps(meta))  # the folder's completion mark: written whole or not
    _replace(folder / "docs.json.tmp", folder / "docs.json")
    return meta


def _open(arrow: Path) -> Any:
    from datasets import Dataset

    return Dataset.from_file(str(arrow))


def _train_texts(docs: Any, meta: dict[str, Any]) -> Iterator[str]:
    for start in range(0, len(docs), BATCH):
        batch = docs[start:start + BATCH]
        index = np.arange(start, start + len(batch["text"]))
        held = _val_mask(np.asarray(batch["bucket"]), index, meta)
        yield from (t for t, v in zip(batch["text"], held, strict=True) if not v)


def tokenise(folder: Path, docs: Any, meta: dict[str, Any], tokenizer: Any, key: str) -> Any:
    """Rank 0: every document's ids (no special tokens) with ``map(batched=True)`` into ``tokens.arrow``."""
    def ids(batch: dict[str, list], index: list[int]) -> dict[str, Any]:
        out = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        held = _val_mask(np.asarray(batch["bucket"]), np.asarray(index), meta)
        return {"ids": out, "val": held.tolist(), "length": [len(x) for x in out]}

    from datasets import Features, List, Value

    features = Features({"ids": List(Value("int32")), "val": Value("bool"), "length": Value("int64")})
    tmp = folder / "tokens.arrow.tmp"
    tokens = docs.map(ids, batched=True, batch_size=BATCH, writer_batch_size=BATCH, with_indices=True,
                      remove_columns=docs.column_names, features=features, cache_file_name=str(tmp),
                      new_fingerprint=key, load_from_cache_file=False)
    del tokens
    _replace(tmp, folder / "tokens.arrow")
    return _open(folder / "tokens.arrow")


def _write_rows(path: Path, tokens: Any, held_out: bool, seq_len: int, ends: dict[str, int], dtype: np.dtype,
                counts: np.ndarray | None) -> dict[str, int]:
    """Pack one side of the split (train/text.py's ``pack``: each document's ids then [SEP], cut into rows of
    seq_len - 1 after a [CLS], the last row padded) into an .npy file, streamed: one batch of documents in memory."""
    import pyarrow.compute as pc

    body = seq_len - 1
    table = tokens.data.table
    num_docs = num_tokens = 0
    for batch in table.select(["length", "val"]).to_batches(max_chunksize=64 * BATCH):  # mmapped: no copy
        lengths = pc.filter(batch.column(0), pc.equal(batch.column(1), held_out))
        num_docs, num_tokens = num_docs + len(lengths), num_tokens + int(pc.sum(lengths).as_py() or 0)
    rows = math.ceil((num_tokens + num_docs) / body)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, seq_len)}
    pending = np.empty(0, dtype=dtype)
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:  # written, not memory-mapped: pages written stay out of this process's memory
        np.lib.format.write_array_header_2_0(f, header)

        def emit(stream: np.ndarray) -> None:
            nonlocal written
            n = len(stream) // body
            block = np.empty((n, seq_len), dtype=dtype)
            block[:, 0] = ends["cls"]
            block[:, 1:] = stream[:n * body].reshape(n, body)
            f.write(block.tobytes())
            written += n

        for whole in table.select(["ids", "val"]).to_batches(max_chunksize=BATCH):
            ids = whole.column(0).filter(pc.equal(whole.column(1), held_out))
            flat = ids.flatten().to_numpy(zero_copy_only=False).astype(dtype)
            offsets = ids.offsets.to_numpy() - ids.offsets[0].as_py()
            # each document followed by [SEP]: document i's ids move right by i
            stream = np.empty(len(flat) + len(offsets) - 1, dtype=dtype)
            sep_at = offsets[1:] + np.arange(len(offsets) - 1)
            keep = np.ones(len(stream), dtype=bool)
            keep[sep_at] = False
            stream[keep] = flat
            stream[sep_at] = ends["sep"]
            if counts is not None:
                counts += np.bincount(flat, minlength=len(counts))[:len(counts)]
            stream = np.concatenate([pending, stream])
            emit(stream)
            pending = stream[(len(stream) // body) * body:]
        if len(pending):
            emit(np.concatenate([pending, np.full(body - len(pending), ends["pad"], dtype=dtype)]))
    if written != rows:
        raise AssertionError(f"packed {written} rows of {path.name}, expected {rows}")
    _replace(tmp, path)
    return {"docs": num_docs, "tokens": num_tokens, "rows": rows}


def pack_rows(folder: Path, tokens: Any, seq_len: int, tokenizer: Any) -> dict[str, Any]:
    """Rank 0: ``seq<N>/train.npy``, ``val.npy`` and, last, ``meta.json``."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 ([CLS] and one token), got {seq_len}")
    folder.mkdir(exist_ok=True)
    ends = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.int32)
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    train = _write_rows(folder / "train.npy", tokens, False, seq_len, ends, dtype, None)
    val = _write_rows(folder / "val.npy", tokens, True, seq_len, ends, dtype, counts)
    counts[sorted(tokenizer.all_special_ids)] = 0
    p = counts[counts > 0] / counts.sum()
    meta = {"seq_len": seq_len, "train": train, "val": val, "val_unigram_entropy": float(-(p * np.log(p)).sum())}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    _replace(tmp, folder / "meta.json")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# What every rank opens


class Rows:
    """Packed rows [n, seq_len] in an .npy file, memory-mapped: indexing reads only the rows asked for."""

    def __init__(self, path: Path):
        self.array = np.load(path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[index], dtype=np.int64))


@dataclass
class Prepared:
    """The packed corpus as the run sees it (the fields train/text.py's ``Corpus`` has, rows memory-mapped)."""

    tokenizer: Any
    train: Rows
    val: Rows
    num_docs: tuple[int, int]
    num_tokens: tuple[int, int]
    val_unigram_entropy: float
    folder: Path  # seq<N>/
    built_here: bool  # this process read, tokenised or packed something (rank 0 only, and only once per cache)

    @property
    def special_ids(self) -> list[int]:
        return sorted(self.tokenizer.all_special_ids)


def _wait(path: Path, deadline: float, what: str) -> None:
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited --corpus-wait for rank 0 to {what} ({path} is still missing): rank 0 is "
                               f"slow (raise --corpus-wait) or failed (its log says why)")
        time.sleep(POLL_SECONDS)


def wait_seconds(path: Path, fmt: str) -> float:
    """The default --corpus-wait: 10 minutes, plus 2 s per MB of input (rank 0 trains the tokenizer and tokenises
    at a few MB/s on one core)."""
    files = input_files(path, fmt) if fmt != "arrow" else [q for q in path.rglob("*") if q.is_file()]
    return 600.0 + 2.0 * sum(p.stat().st_size for p in files) / 1e6


def prepare(data: Path, *, fmt: str = "auto", cache: Path, seq_len: int, vocab_size: int, val_percent: int,
            max_docs: int | None = None, tokenizer_from: Path | None = None, rank: int = 0,
            wait: float | None = None, say: Any = print) -> Prepared:
    """The packed corpus at ``seq_len``: built by rank 0 where the cache lacks it, opened by every rank.

    ``tokenizer_from``: a saved tokenizer to use (``--tokenizer``, phase 1's, a resumed run's); else the one trained
    on this corpus's training documents with ``vocab_size`` entries (itself cached)."""
    fmt = detect_format(data, fmt)
    root = cache / corpus_key(data, fmt, val_percent, max_docs)
    deadline = time.monotonic() + (wait if wait is not None else wait_seconds(data, fmt))
    built = False
    if rank == 0:
        from datasets import disable_progress_bars

        disable_progress_bars()
        with _lock(root):
            tokenizer = tokenizer_from and load_tokenizer(tokenizer_from)
            vocab = root / f"vocab-{vocab_size}"
            if not tokenizer and (vocab / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(vocab)
            key = tokenizer_key(tokenizer) if tokenizer else None
            rows = root / f"tokens-{key}" / f"seq{seq_len}" if key else None
            if rows is None or not (rows / "meta.json").is_file():
                built = True
                if not (root / "docs.json").is_file():
                    say(f"corpus: reading {data} ({fmt}) into {root}")
                    write_docs(root, data, fmt, val_percent, max_docs)
                meta = json.loads((root / "docs.json").read_text())
                docs = _open(root / "docs.arrow")
                if not tokenizer:
                    say(f"corpus: training a {vocab_size}-entry WordPiece tokenizer on the training documents")
                    tokenizer = train_tokenizer(_train_texts(docs, meta), vocab_size)
                    tmp = root / f".vocab-{vocab_size}.tmp"
                    tokenizer.save_pretrained(str(tmp))
                    _replace(tmp, vocab)
                    tokenizer = load_tokenizer(vocab)
                key = tokenizer_key(tokenizer)
                tok_dir = root / f"tokens-{key}"
                tok_dir.mkdir(exist_ok=True)
                if not (tok_dir / "tokens.arrow").is_file():
                    say(f"corpus: tokenising {meta['docs']:,} documents into {tok_dir}")
                    tokenise(tok_dir, docs, meta, tokenizer, key)
                if not (tok_dir / "tokenizer" / "tokenizer.json").is_file():
                    tokenizer.save_pretrained(str(tok_dir / "tokenizer"))
                say(f"corpus: packing rows of {seq_len} tokens into {tok_dir / f'seq{seq_len}'}")
                pack_rows(tok_dir / f"seq{seq_len}", _open(tok_dir / "tokens.arrow"), seq_len, tokenizer)
                del docs
            rows = root / f"tokens-{key}" / f"seq{seq_len}"
    else:
        source = tokenizer_from
        if source is None:
            print(f"rank {rank}: waiting for rank 0 to train the tokenizer into {root} (up to "
                  f"{deadline - time.monotonic():.0f} s, --corpus-wait)", flush=True)
            source = root / f"vocab-{vocab_size}"
            _wait(source / "tokenizer.json", deadline, "train the tokenizer")
        tokenizer = load_tokenizer(source)
        rows = root / f"tokens-{tokenizer_key(tokenizer)}" / f"seq{seq_len}"
        if not (rows / "meta.json").exists():
            print(f"rank {rank}: waiting for rank 0 to tokenise and pack the corpus into {rows} (up to "
                  f"{deadline - time.monotonic():.0f} s, --corpus-wait)", flush=True)
        _wait(rows / "meta.json", deadline, "tokenise and pack the corpus")
    meta = json.loads((rows / "meta.json").read_text())
    return Prepared(tokenizer, Rows(rows / "train.npy"), Rows(rows / "val.npy"),
                    (meta["train"]["docs"], meta["val"]["docs"]), (meta["train"]["tokens"], meta["val"]["tokens"]),
                    meta["val_unigram_entropy"], rows, built)
