"""Text for masked-language-model pre-training: a folder of text files -> tokenizer -> packed sequences -> masks.

train/bert.py reads its corpus through train/corpus.py (five formats, a memory-mapped cache built once by rank 0),
which takes the split rule, the tokenizer and the packing from here; the in-memory path below (``read_documents``,
``split_documents``, ``build_corpus``) is its reference in the tests and serves the laptop study.

* Corpus: every regular file below ``--data-dir`` is one document (UTF-8 text). The default is the demo corpus
  the set-up installs: Debian's ``python3.11-doc`` (the reStructuredText sources of the Python 3.11
  documentation, 497 files, about 11 MB of English prose). ``BERT_CORPUS_DIR`` names another default.
* Held-out split by document: a document goes to validation when the CRC-32 of its path (relative to the
  folder) falls in the first ``val_percent`` of 100 buckets; the split does not depend on seed, world size or
  order of reading.
* Tokenizer: a WordPiece vocabulary trained on the training split with the ``tokenizers`` library (BERT's
  normalizer, lowercase, and pre-tokenizer), wrapped as a ``transformers`` BERT tokenizer and saved with the run,
  or one loaded from a folder (``--tokenizer``).
* Packing: each document's tokens followed by [SEP] form one stream; the stream is cut into rows of
  ``seq_len - 1`` tokens, each row starts with [CLS], the last one is padded. No token is dropped (the last row
  is padded rather than discarded, unlike run_mlm.py's ``group_texts``). No next-sentence prediction (RoBERTa,
  Liu et al. 2019, showed MLM alone does as well).
* Masking: ``transformers.DataCollatorForLanguageModeling`` (15%, of those 80% [MASK], 10% a random token, 10%
  unchanged; special tokens never masked) with a generator seeded per micro-batch, so a resumed run masks as the
  uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.data import DataError

DEMO_CORPUS = "/usr/share/doc/python3.11/html/_sources"  # Debian's python3.11-doc (train/setup.sh installs it)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def default_corpus() -> Path:
    return Path(os.environ.get("BERT_CORPUS_DIR", DEMO_CORPUS))


@dataclass
class Document:
    name: str  # path relative to the corpus folder
    text: str


def read_documents(folder: str | Path, max_docs: int | None = None) -> list[Document]:
    """Every regular file below ``folder`` (sorted by path), decoded as UTF-8; clear errors for what is not text."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data-dir {folder} is not a folder (expected a folder of UTF-8 text files; the demo corpus "
                        f"is Debian's python3.11-doc in {DEMO_CORPUS}: apt-get install python3.11-doc)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    if not paths:
        raise DataError(f"--data-dir {folder} holds no files (expected UTF-8 text files, one document each)")
    docs = []
    for p in paths[:max_docs] if max_docs else paths:
        raw = p.read_bytes()
        try:
            if b"\0" in raw:
                raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); the corpus folder must hold "
                            f"only text files: remove it or point --data-dir at a folder of text") from None
        if text.strip():
            docs.append(Document(str(p.relative_to(folder)), text))
    if not docs:
        raise DataError(f"--data-dir {folder}: every file is empty (expected text files with some text)")
    return docs


def split_documents(docs: list[Document], val_percent: int) -> tuple[list[Document], list[Document]]:
    """(train, validation) by a hash of each document's name; at least one document on each side."""
    if len(docs) < 2:
        raise DataError(f"the corpus has {len(docs)} document(s); a held-out split needs at least 2 files")
    val = [d for d in docs if zlib.crc32(d.name.encode()) % 100 < val_percent]
    if not val:  # a tiny corpus: hold out the last document
        val = [docs[-1]]
    if len(val) == len(docs):
        val = val[-1:]
    names = {d.name for d in val}
    return [d for d in docs if d.name not in names], val


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A WordPiece tokenizer trained on ``texts`` (a list, or an iterator that streams them), as a transformers
    BertTokenizerFast."""
    # Local here and below: transformers takes seconds to import; bad input is reported before anything needs it.
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # transformers' lazy module has it

    def empty(vocab: dict[str, int] | None = None) -> Any:
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]") if vocab else models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok

    trained = empty()
    trained.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                                 show_progress=False))
    # The trainer numbers its vocabulary in hash-map order (tokenizers 0.23): number it canonically (special tokens,
    # then the rest sorted), so the same vocabulary always gets the same ids. Within one process it finds the same
    # vocabulary every time; across processes it need not (seen on the demo corpus at 8,192: two processes, two
    # vocabularies; ties broken in hash order, presumably), which is why train/corpus.py trains it once, on rank 0.
    rest = sorted(set(trained.get_vocab()) - set(SPECIAL_TOKENS))
    tok = empty({t: i for i, t in enumerate([*SPECIAL_TOKENS, *rest])})
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True, model_max_length=512)


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # transformers' lazy module has it

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise DataError(f"--tokenizer {folder}: no tokenizer.json or vocab.txt in it (expected a folder written by "
                        f"save_pretrained, e.g. the model/ folder of an earlier run)")
    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer: Any, docs: list[Document]) -> list[list[int]]:
    """Each document's token ids, without special tokens."""
    return tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)["input_ids"]


def pack(doc_ids: list[list[int]], seq_len: int, *, cls: int, sep: int, pad: int) -> torch.Tensor:
    """Rows of ``seq_len`` ids: [CLS] + the next ``seq_len - 1`` ids of the stream (documents each followed by
    [SEP]); the last row padded with [PAD]."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2 ([CLS] and one token), got {seq_len}")
    stream = torch.tensor([t for ids in doc_ids for t in (*ids, sep)], dtype=torch.long)
    body = seq_len - 1
    rows = math.ceil(len(stream) / body)
    body_ids = torch.full((rows * body,), pad, dtype=torch.long)
    body_ids[:len(stream)] = stream
    return torch.cat([torch.full((rows, 1), cls, dtype=torch.long), body_ids.view(rows, body)], dim=1)


def unigram_entropy(ids: torch.Tensor, special_ids: list[int]) -> float:
    """Entropy (nats) of the token distribution of ``ids`` without special tokens: the loss of a model that
    predicts every masked token from corpus frequencies alone."""
    tokens = ids[~torch.isin(ids, torch.tensor(special_ids))]
    p = torch.bincount(tokens).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


class Masker:
    """BERT's masking through transformers' collator, with a generator seeded by the caller for each batch."""

    def __init__(self, tokenizer: Any, mlm_probability: float = 0.15):
        from transformers import DataCollatorForLanguageModeling

        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
        self.special = torch.tensor(sorted(tokenizer.all_special_ids))
        self.pad = tokenizer.pad_token_id

    def __call__(self, rows: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """``rows`` [batch, seq] -> input_ids (masked), attention_mask, labels (-100 where not masked)."""
        self.collator.generator = torch.Generator().manual_seed(seed)
        special = torch.isin(rows, self.special)
        batch = self.collator([{"input_ids": r, "special_tokens_mask": s} for r, s in zip(rows, special.long(),
                                                                                           strict=True)])
        return {"input_ids": batch["input_ids"], "attention_mask": (rows != self.pad).long(),
                "labels": batch["labels"]}


@dataclass
class Corpus:
    """What a run trains and evaluates on."""

    tokenizer: Any
    train: torch.Tensor  # [num_train, seq_len] packed ids
    val: torch.Tensor  # [num_val, seq_len]
    num_docs: tuple[int, int]  # (train, validation) documents
    num_tokens: tuple[int, int]  # (train, validation) tokens of the documents

    @property
    def special_ids(self) -> list[int]:
        return sorted(self.tokenizer.all_special_ids)


def build_corpus(tokenizer: Any, train_docs: list[Document], val_docs: list[Document], seq_len: int) -> Corpus:
    ids = {k: tokenize(tokenizer, d) for k, d in (("train", train_docs), ("val", val_docs))}
    ends = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    return Corpus(tokenizer, pack(ids["train"], seq_len, **ends), pack(ids["val"], seq_len, **ends),
                  (len(train_docs), len(val_docs)), (sum(map(len, ids["train"])), sum(map(len, ids["val"]))))
