import json

import numpy as np
import pytest

from tccli.data.text import (
    RowStream,
    document_order,
    load_rows,
    pack_rows,
    read_documents,
    split_documents,
    stream_rows,
)
from tccli.errors import TcError


class CharTokenizer:
    """One token per character (ids = ord), enough to check packing by hand."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_split_documents_on_blank_lines():
    assert split_documents("a b\nc\n\n\n  \nd\n\ne") == ["a b\nc", "d", "e"]


def test_pack_rows_by_hand():
    # stream: B 1 2 3 B 4 5, rows of 3; a row not starting with BOS (0) gets one prepended
    packed = pack_rows([[1, 2, 3], [4, 5]], bos_token_id=0, context=3, max_tokens=100)
    assert packed.tokens.tolist() == [[0, 1, 2], [0, 3, 0], [0, 4, 5]]
    assert packed.doc_ids.tolist() == [[0, 0, 0], [0, 0, 1], [1, 1, 1]]
    assert packed.available_tokens == 9  # fewer than asked for: says how many there were
    short = pack_rows([[1, 2, 3], [4]], bos_token_id=0, context=3, max_tokens=100)
    assert short.tokens.tolist() == [[0, 1, 2], [0, 3, 0]] and short.available_tokens == 8


def test_pack_rows_stops_at_max_tokens_and_never_doubles_bos():
    docs = [[1] * 5 for _ in range(10)]
    packed = pack_rows(docs, bos_token_id=0, context=3, max_tokens=7)
    assert packed.tokens.shape == (2, 3) and packed.available_tokens is None
    assert all(row[0] == 0 for row in packed.tokens.tolist())
    assert not any(row[0] == row[1] == 0 for row in packed.tokens.tolist())


def test_sources_txt_jsonl_stdin(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    import io

    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "-"], stdin=io.StringIO("five\n\nsix"))
    assert docs == ["one", "two", "three", "four", "five", "six"]


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_documents([str(tmp_path / "ds")]) == ["alpha", "beta"]


@pytest.mark.parametrize("content,message", [("", "no text"), ('{"txt": 1}\n', "no string 'text'")])
def test_bad_sources(tmp_path, content, message):
    path = tmp_path / ("x.jsonl" if "txt" in content else "x.txt")
    path.write_text(content)
    with pytest.raises(TcError, match=message):
        read_documents([str(path)])


def test_missing_path():
    with pytest.raises(TcError, match="does not exist"):
        read_documents(["/no/such/file.txt"])


def test_load_rows_is_deterministic_and_seed_dependent(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(f"doc{i} " * 3 for i in range(30)))
    args = dict(tokenizer=CharTokenizer(), bos_token_id=0, context=16, max_tokens=160)
    a = load_rows([str(tmp_path / "c.txt")], seed=1, **args)
    b = load_rows([str(tmp_path / "c.txt")], seed=1, **args)
    c = load_rows([str(tmp_path / "c.txt")], seed=2, **args)
    assert np.array_equal(a.tokens, b.tokens) and not np.array_equal(a.tokens, c.tokens)
    # doc ids point into reading order: the text of doc k starts with "dock"
    first_doc = int(a.doc_ids[0, 1])
    assert "".join(chr(t) for t in a.tokens[0, 1:6]) == f"doc{first_doc} "[:5]


def reference_rows(docs: list[list[int]], bos: int, context: int, max_tokens: int):
    """Packing written out directly: the whole BOS-joined stream of (token, document), cut into rows."""
    rows, row = [], []
    for doc_index, doc in enumerate(docs):
        for token in [bos] + doc:
            if not row and token != bos:
                row.append((bos, doc_index))
            row.append((token, doc_index))
            if len(row) == context:
                rows.append(row)
                row = []
    wanted = max(1, max_tokens // context)
    available = None if len(rows) >= wanted else len(rows) * context + len(row)
    rows = np.array(rows[:wanted], dtype=np.int64).reshape(-1, context, 2)
    return rows[..., 0], rows[..., 1], available


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize(
    "context,max_tokens,batch_rows",
    [
        (16, 160, 3),  # 10 rows in batches of 3, 3, 3, 1
        (7, 70, 10),  # exactly one batch
        (5, 10**6, 4),  # fewer tokens than asked for: the stream ends with the data
        (64, 10**6, 1),
    ],
)
def test_stream_rows_equal_load_rows_and_a_direct_packing(tmp_path, seed, context, max_tokens, batch_rows):
    (tmp_path / "c.txt").write_text("\n\n".join(f"doc{i} " * (1 + i % 5) for i in range(40)))
    args = dict(
        paths=[str(tmp_path / "c.txt")],
        tokenizer=CharTokenizer(),
        bos_token_id=0,
        context=context,
        max_tokens=max_tokens,
        seed=seed,
    )
    stream = stream_rows(batch_rows=batch_rows, **args)
    batches = list(stream)
    assert all(tokens.shape[0] <= batch_rows and tokens.dtype == ids.dtype == np.int64 for tokens, ids in batches)
    assert all(tokens.shape[0] == batch_rows for tokens, _ in batches[:-1])
    streamed_tokens = np.concatenate([tokens for tokens, _ in batches])
    streamed_docs = np.concatenate([ids for _, ids in batches])
    packed = load_rows(**args)
    assert np.array_equal(streamed_tokens, packed.tokens) and np.array_equal(streamed_docs, packed.doc_ids)
    assert stream.available_tokens == packed.available_tokens and stream.n_tokens == packed.n_tokens
    # an independent packing of the same documents in the seed's order; ids back in reading order
    texts = read_documents(args["paths"])
    order = document_order(len(texts), seed)
    tokens, docs, available = reference_rows([[ord(c) for c in texts[i]] for i in order], 0, context, max_tokens)
    assert np.array_equal(streamed_tokens, tokens) and np.array_equal(streamed_docs, order[docs])
    assert stream.available_tokens == available
    if max_tokens == 10**6:
        assert available is not None and available < max_tokens


def test_row_stream_reports_availability_only_at_the_end_and_keeps_int64_ids():
    # document numbers beyond 2**31 (a huge corpus) must survive: ids stay int64
    big = np.array([2**40, 2**40 + 1])
    stream = RowStream([[1, 2, 3], [4, 5]], bos_token_id=0, context=3, max_tokens=100, batch_rows=1, doc_numbers=big)
    batches = iter(stream)
    first_tokens, first_docs = next(batches)
    assert first_tokens.tolist() == [[0, 1, 2]] and first_docs.tolist() == [[2**40] * 3]
    assert stream.available_tokens is None  # not known until the data runs out
    rest = list(batches)
    assert [t.tolist() for t, _ in rest] == [[[0, 3, 0]], [[0, 4, 5]]]
    assert rest[0][1].tolist() == [[2**40, 2**40, 2**40 + 1]]
    assert stream.available_tokens == 9 and stream.n_tokens == 9


def test_row_stream_with_too_little_text_fails_before_any_row():
    stream = RowStream([[1, 2]], bos_token_id=0, context=8, max_tokens=100, batch_rows=2)
    with pytest.raises(TcError, match="fewer than one row of 8 tokens"):
        next(iter(stream))


def test_display_token_writes_lone_bytes_as_escapes():
    from transformers import AutoTokenizer

    from tccli.data.text import display_token
    from tccli.model.loading import BUILTIN_MODEL_DIR

    # byte-level BPE (the built-in model, as GPT-2): "é" is two bytes, "€" three, each its own token here
    builtin = AutoTokenizer.from_pretrained(str(BUILTIN_MODEL_DIR))
    ids = builtin.encode(" é€ ok", add_special_tokens=False)
    assert [builtin.decode([i]) for i in ids].count("\ufffd") >= 2  # what decoding alone shows
    assert "".join(display_token(builtin, i) for i in ids) == " <0xC3><0xA9><0xE2><0x82><0xAC> ok"
    assert display_token(builtin, builtin.encode(" 17", add_special_tokens=False)[0]) == " 17"


def test_display_token_sentencepiece(stories_dir):
    from transformers import AutoTokenizer

    from tccli.data.text import display_token

    # SentencePiece with byte fallback (stories260K): <0x..> pieces, and a word keeps its leading space
    sentencepiece = AutoTokenizer.from_pretrained(str(stories_dir))
    ids = sentencepiece.encode("a girl 🙂", add_special_tokens=False)
    shown = [display_token(sentencepiece, i) for i in ids]
    assert " girl" in shown or " g" in shown
    assert shown[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
