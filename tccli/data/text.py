"""Text input: read documents from files, tokenise them, pack them into rows of tokens.

Sources (``--data``): plain text files (documents separated by blank lines), JSONL files with a
``text`` field, folders written by ``datasets``' ``save_to_disk``, and ``-`` for stdin.

Packing: documents are put in an order fixed by ``--seed``; each document is preceded by the model's
BOS token and all are joined into one stream; the stream is cut into rows of ``context`` tokens, and a
row that would not begin with BOS gets one prepended (so every row starts with BOS, and no row starts
with two). Rows stop once ``tokens`` tokens are reached.

``stream_rows`` gives the rows a batch at a time (``tc score``: memory that does not grow with
``--tokens``); ``load_rows`` gives them all at once (``tc cache``, ``tc eval``). Both give the same rows.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tccli.errors import fail

_BLANK_LINES = re.compile(r"\n\s*\n")
# pack_rows / load_rows build their arrays from batches of this many rows, so the rows never all sit in
# Python lists (an 8-byte pointer per value, plus a 28-byte int object for values beyond 256) at once
PACK_BATCH_ROWS = 1024


@dataclass
class PackedRows:
    """Rows of token ids ready for the model.

    tokens: [n_rows, context] int64 token ids, every row starting with BOS.
    doc_ids: [n_rows, context] int64, the index (in reading order) of the document each token belongs
        to; a BOS token belongs to the document it opens.
    available_tokens: how many tokens the data could have filled (None when more than was asked for).
    """

    tokens: np.ndarray
    doc_ids: np.ndarray
    available_tokens: Optional[int]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def split_documents(text: str) -> list[str]:
    """Documents of a plain text: blocks separated by one or more blank lines."""
    return [doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip()]


def read_documents(paths: list[str], stdin: Any = None) -> list[str]:
    """All documents of all sources, in the order given. Raises TcError for missing or empty data."""
    documents: list[str] = []
    for path in paths:
        docs = list(_read_source(path, stdin))
        if not docs:
            raise fail(f"no text in {'stdin' if path == '-' else path}")
        documents.extend(docs)
    if not documents:
        raise fail("no documents in --data")
    return documents


def _read_source(path: str, stdin: Any) -> Iterator[str]:
    if path == "-":
        yield from split_documents((stdin or sys.stdin).read())
        return
    p = Path(path)
    if not p.exists():
        raise fail(f"data path {path} does not exist")
    if p.is_dir():
        yield from _read_datasets_folder(p)
    elif p.suffix == ".jsonl":
        yield from _read_jsonl(p)
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise fail(f"{path} is not UTF-8 text") from None
        except OSError as exc:
            raise fail(f"cannot read {path}: {exc.strerror}") from None
        yield from split_documents(text)


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise fail(f"{path}:{line_number} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise fail(f"{path}:{line_number} has no string 'text' field")
            if record["text"].strip():
                yield record["text"]


def _read_datasets_folder(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise fail(f"{path} is a folder: reading datasets folders needs `pip install datasets`") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception:
        raise fail(f"{path} is not a folder saved by datasets' save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = "train" if "train" in dataset else next(iter(dataset))
        dataset = dataset[split]
    if "text" not in dataset.column_names:
        raise fail(f"dataset {path} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    for text in dataset["text"]:
        if isinstance(text, str) and text.strip():
            yield text


class RowStream:
    """Packed rows of token ids, a batch at a time: the rows ``pack_rows`` would give, in the same order.

    Iterate it once; each item is (tokens [b, context] int64, doc_ids [b, context] int64), b =
    ``batch_rows`` except for a shorter last batch. Only one batch of rows exists at a time, so memory
    does not grow with ``max_tokens``. Document ids stay int64: corpora may hold more than 2**31 documents.
    After the iteration ends, ``n_tokens`` and ``available_tokens`` say what was packed (as in PackedRows);
    the data holding less than one row raises TcError then, before anything was yielded.

    ``documents`` are tokenised documents in their final order (a lazy iterator, so only as much text as
    needed is tokenised); ``doc_numbers`` optionally maps a document's position in that order to the id
    reported for it (load_rows reports the reading order).
    """

    def __init__(
        self,
        documents: list[list[int]] | Iterator[list[int]],
        bos_token_id: int,
        context: int,
        max_tokens: int,
        batch_rows: int,
        doc_numbers: Optional[np.ndarray] = None,
    ):
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        self.documents = documents
        self.bos_token_id = bos_token_id
        self.context = context
        self.n_rows_wanted = max(1, max_tokens // context)
        self.batch_rows = batch_rows
        self.doc_numbers = doc_numbers
        self.n_rows = 0
        self.available_tokens: Optional[int] = None
        self._started = False

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.context

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._started:
            raise RuntimeError("a RowStream can be iterated only once")
        self._started = True
        rows: list[list[int]] = []
        row_docs: list[list[int]] = []
        row: list[int] = []
        docs_of_row: list[int] = []
        for doc_index, doc in enumerate(self.documents):
            for token, owner in _with_bos(doc, self.bos_token_id, doc_index):
                if not row and token != self.bos_token_id:
                    row, docs_of_row = [self.bos_token_id], [owner]
                row.append(token)
                docs_of_row.append(owner)
                if len(row) < self.context:
                    continue
                rows.append(row)
                row_docs.append(docs_of_row)
                row, docs_of_row = [], []
                self.n_rows += 1
                if self.n_rows == self.n_rows_wanted:
                    yield self._batch(rows, row_docs)
                    return
                if len(rows) == self.batch_rows:
                    yield self._batch(rows, row_docs)
                    rows, row_docs = [], []
        if not self.n_rows:
            raise fail(f"the data holds fewer than one row of {self.context} tokens")
        self.available_tokens = self.n_tokens + len(row)
        if rows:
            yield self._batch(rows, row_docs)

    def collect(self) -> PackedRows:
        """Every row at once, for callers that need all tokens up front."""
        batches = list(self)
        return PackedRows(
            np.concatenate([tokens for tokens, _ in batches]),
            np.concatenate([doc_ids for _, doc_ids in batches]),
            self.available_tokens,
        )

    def _batch(self, rows: list[list[int]], row_docs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        doc_ids = np.array(row_docs, dtype=np.int64)
        if self.doc_numbers is not None:
            doc_ids = self.doc_numbers[doc_ids]
        return np.array(rows, dtype=np.int64), doc_ids


def pack_rows(
    documents: list[list[int]] | Iterator[list[int]],
    bos_token_id: int,
    context: int,
    max_tokens: int,
) -> PackedRows:
    """Pack tokenised documents (already in their final order) into BOS-led rows of ``context``, all at once.

    Stops at ``max_tokens // context`` rows. ``documents`` may be a lazy iterator so that only as much
    text as needed is tokenised.
    """
    return RowStream(documents, bos_token_id, context, max_tokens, PACK_BATCH_ROWS).collect()


def _with_bos(doc: list[int], bos_token_id: int, doc_index: int) -> Iterator[tuple[int, int]]:
    yield bos_token_id, doc_index
    for token in doc:
        yield token, doc_index


def document_order(n_documents: int, seed: int) -> np.ndarray:
    """The order in which documents are packed: a permutation fixed by ``seed``."""
    return np.random.default_rng(seed).permutation(n_documents)


def tokenize_lazily(tokenizer: Any, texts: list[str], order: np.ndarray, batch: int = 256) -> Iterator[list[int]]:
    """Token ids of ``texts`` in ``order``, tokenised a batch at a time (and only as far as consumed)."""
    for start in range(0, len(order), batch):
        chunk = [texts[i] for i in order[start : start + batch]]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            yield list(ids)


def stream_rows(
    paths: list[str],
    tokenizer: Any,
    bos_token_id: int,
    context: int,
    max_tokens: int,
    seed: int,
    batch_rows: int,
    stdin: Any = None,
) -> RowStream:
    """The whole input pipeline, ``batch_rows`` rows at a time: read, order by seed, tokenise as far as
    needed, pack. ``doc_ids`` index documents in reading order (before shuffling).

    The document texts are read up front and stay in memory: the order fixed by ``seed`` is a
    permutation of all documents, so every document must be known before the first row. Only the
    token rows are produced lazily, one batch at a time.
    """
    texts = read_documents(paths, stdin=stdin)
    order = document_order(len(texts), seed)
    # packing numbers documents in packing order; order[...] maps them back to reading order
    return RowStream(
        tokenize_lazily(tokenizer, texts, order), bos_token_id, context, max_tokens, batch_rows, doc_numbers=order
    )


def load_rows(
    paths: list[str], tokenizer: Any, bos_token_id: int, context: int, max_tokens: int, seed: int, stdin: Any = None
) -> PackedRows:
    """``stream_rows`` with every row at once (``tc cache`` needs all tokens up front)."""
    return stream_rows(
        paths, tokenizer, bos_token_id, context, max_tokens, seed, PACK_BATCH_ROWS, stdin=stdin
    ).collect()


# ----------------------------------------------------------------------------- showing one token


def _byte_level_alphabet() -> dict[str, int]:
    """The character byte-level BPE (GPT-2's tokenizer) writes for each byte, inverted: char -> byte.

    Printable Latin-1 bytes stand for themselves; the other bytes (controls, space, 0x7F-0xA0, 0xAD)
    are written as the characters 256, 257, ... in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    alphabet = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + extra)] = b
            extra += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _escape_bad_bytes(raw: bytes) -> str:
    """UTF-8 text, each byte that is not part of a whole character written as ``<0xE2>``."""
    out, index = [], 0
    while index < len(raw):
        for size in (1, 2, 3, 4):
            try:
                out.append(raw[index : index + size].decode("utf-8"))
                index += size
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append(f"<0x{raw[index]:02X}>")
            index += 1
    return "".join(out)


def display_token(tokenizer: Any, token_id: int) -> str:
    """One token as a person should read it: its text, or ``<0xE2>`` for bytes that are not whole
    characters (a lone byte of a multi-byte character decodes to U+FFFD, which hides which byte it is).

    Handles SentencePiece byte-fallback pieces (``<0xE2>``) and byte-level BPE pieces (GPT-2's
    alphabet); other tokenizers keep their decoded text. A SentencePiece word piece keeps its leading
    space (``" girl"``), which decoding it alone drops.
    """
    text = tokenizer.decode([int(token_id)])
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str):
        return text
    if piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text  # SentencePiece drops a word's leading space when decoding it alone
    if "\ufffd" not in text:
        return text
    if _BYTE_TOKEN.fullmatch(piece):
        return piece.upper().replace("0X", "0x")
    if all(char in _BYTE_LEVEL for char in piece):
        return _escape_bad_bytes(bytes(_BYTE_LEVEL[char] for char in piece))
    return text
