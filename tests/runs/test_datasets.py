"""--data records (SPEC.md#data): JSONL and CSV (standard library, streamed), Parquet (pyarrow, by
row group), one document per record under --text-field, split by document; bad rows named."""

import csv
import inspect
import json
import sys
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import WORDS

from nlref import data, training
from nlref.cli import cli

TINY = ["--preset", "transformer-tiny", "--backend", "reference", "--seq-len", "16", "--batch-size", "2",
        "--steps", "2", "--lr", "0.01"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def texts(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=40)) + f" ({i}, \"quoted\", café)" for i in range(n)]


def write_jsonl(path, docs, field="body"):
    with open(path, "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": i, field: t}) + "\n")
            if i == 3:
                f.write("\n")  # a blank line is skipped
    return path


def write_csv(path, docs, field="body", delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["id", field])
        for i, t in enumerate(docs):
            w.writerow([i, t + ("\nsecond line" if i % 3 == 0 else "")])  # quoted fields spanning lines
    return path


def write_parquet(path, docs, field="body", row_group_size=5):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=row_group_size)
    return path


def check_records(corpus, docs, names):
    """The corpus holds exactly ``docs`` as documents ``names``, split by document and recorded."""
    info = corpus.info
    assert info["n_documents"] == len(docs) and info["text_field"] == "body"
    by_name = dict(zip(names, docs, strict=True))
    train, val = data.split_files(names, info["val_fraction"])
    assert list(corpus.train.names) == train and list(corpus.val.names) == val
    assert info["validation"]["files"] == val and info["train"]["n_docs"] == len(train)
    for split in (corpus.train, corpus.val):
        for d, name in enumerate(split.names):
            assert split.doc(d).tobytes() == by_name[name].encode("utf-8")
    json.dumps(info)


def test_jsonl_records_with_a_text_field(tmp_path):
    docs = texts()
    path = write_jsonl(tmp_path / "data.jsonl", docs)
    corpus = data.load_corpus(str(path), 0.25, text_field="body")
    lines = [i + 1 if i <= 3 else i + 2 for i in range(len(docs))]  # the blank line after record 4
    check_records(corpus, docs, [f"data.jsonl:{n}" for n in lines])
    assert corpus.info["kind"] == "file" and corpus.info["record_files"] == {"data.jsonl": len(docs)}
    assert "by document" in corpus.info["split_rule"]
    assert inspect.isgenerator(data.iter_jsonl(path, "body"))


def test_csv_and_tsv_records(tmp_path):
    docs = texts()
    path = write_csv(tmp_path / "data.csv", docs)
    corpus = data.load_corpus(str(path), 0.25, text_field="body")
    starts, line = [], 2  # the line each record starts on (a record of a quoted newline spans two)
    for i in range(len(docs)):
        starts.append(line)
        line += 2 if i % 3 == 0 else 1
    docs_read = [t + ("\nsecond line" if i % 3 == 0 else "") for i, t in enumerate(docs)]
    check_records(corpus, docs_read, [f"data.csv:{n}" for n in starts])
    tsv = data.load_corpus(str(write_csv(tmp_path / "data.tsv", docs, delimiter="\t")), 0.25, text_field="body")
    def all_docs(c):  # in the order of their line numbers
        every = [(int(s.names[d].split(":")[1]), s.doc(d).tobytes()) for s in (c.train, c.val) for d in range(s.n_docs)]
        return [doc for _, doc in sorted(every)]
    assert all_docs(tsv) == all_docs(corpus) == [t.encode() for t in docs_read]
    assert inspect.isgenerator(data.iter_csv(path, "body"))
    long = tmp_path / "long.csv"  # a document longer than the csv module's default field limit
    write_csv(long, ["x" * 200_000, "y" * 10])
    assert data.load_corpus(str(long), 0.5, text_field="body").info["n_bytes"] == 200_000 + 10 + len("\nsecond line")


def test_parquet_records_are_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = texts(13)
    path = write_parquet(tmp_path / "data.parquet", docs, row_group_size=5)  # 3 row groups
    groups = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        groups.append((i, kwargs.get("columns")))
        return real(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file at once"))
    corpus = data.load_corpus(str(path), 0.25, text_field="body")
    assert groups == [(0, ["body"]), (1, ["body"]), (2, ["body"])]  # only the text column, group by group
    check_records(corpus, docs, [f"data.parquet:{n}" for n in range(1, 14)])
    assert inspect.isgenerator(data.iter_parquet(path, "body"))


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(data.DataError, match=r"data.parquet: reading Parquet needs pyarrow, which is not "
                                             r"installed: pip install 'nested-learning-reference\[parquet\]'"):
        data.load_corpus(str(tmp_path / "data.parquet"))
    result = invoke("train", *TINY, "--data", tmp_path / "data.parquet", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "nested-learning-reference[parquet]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_directory_mixes_text_files_and_record_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("plain text file " * 20)
    write_jsonl(tmp_path / "d" / "a.jsonl", texts(5), field="text")  # the default --text-field
    corpus = data.load_corpus(str(tmp_path / "d"), 0.3)
    names = set(corpus.train.names) | set(corpus.val.names)
    assert names == {"notes.txt"} | {f"a.jsonl:{n}" for n in (1, 2, 3, 4, 6)}
    assert corpus.info["n_files"] == 2 and corpus.info["n_documents"] == 6
    # the split depends on the names alone: the same records listed by a glob split the same way
    by_glob = data.load_corpus(str(tmp_path / "d" / "*"), 0.3)
    assert by_glob.info["validation"]["files"] == corpus.info["validation"]["files"]
    assert by_glob.info["sha256"] == corpus.info["sha256"]


BAD_JSONL = {
    "invalid JSON": ('{"body": "ok"}\n{"body": "ok"}\n{"body": oops}\n', "line 3", "not valid JSON"),
    "missing field": ('{"body": "ok"}\n{"text": "wrong field"}\n', "line 2", "no field 'body'"),
    "number": ('{"body": "ok"}\n\n{"body": 12}\n', "line 3", "field 'body' is a number, not a string"),
    "null": ('{"body": null}\n', "line 1", "is null, not a string"),
    "not an object": ('{"body": "ok"}\n["body"]\n', "line 2", "a JSON object is expected"),
    "not UTF-8": (b'{"body": "ok"}\n{"body": "caf\xe9"}\n', "line 2", "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_a_bad_jsonl_row_names_the_file_and_line(tmp_path, case):
    content, line, what = BAD_JSONL[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(data.DataError) as err:
        data.load_corpus(str(path), text_field="body")
    assert f"{path} {line}: " in str(err.value) and what in str(err.value), str(err.value)


def test_bad_rows_through_the_cli_are_one_line_and_write_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"body": "ok"}\n{"body": 3.5}\n')
    result = invoke("train", *TINY, "--data", path, "--text-field", "body", "--out", tmp_path / "run")
    assert result.exit_code == 1 and result.output.count("Error:") == 1 and "Traceback" not in result.output
    assert f"{path} line 2" in result.output and not (tmp_path / "run").exists()
    (tmp_path / "d").mkdir()  # inside a directory the message starts with the --data path
    (tmp_path / "d" / "bad.jsonl").write_text('{"body": "ok"}\n')
    result = invoke("train", *TINY, "--data", tmp_path / "d", "--out", tmp_path / "run")
    assert f"--data {tmp_path / 'd'}: {tmp_path / 'd' / 'bad.jsonl'} line 1: no field 'text'" in result.output
    assert "--text-field" in result.output


def test_bad_csv_and_parquet_rows_name_the_file_and_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,body\n1,ok\n2\n")
    with pytest.raises(data.DataError, match=r"bad.csv line 3: the row has 1 values, none in column 'body'"):
        data.load_corpus(str(path), text_field="body")
    with pytest.raises(data.DataError, match=r"bad.csv line 1 \(the header\): no column 'text' \(it has 'id', 'body'\)"):
        data.load_corpus(str(path))
    path.write_bytes(b"id,body\n1,ok\n2,caf\xe9\n")
    with pytest.raises(data.DataError, match=r"bad.csv line 3: not UTF-8"):
        data.load_corpus(str(path), text_field="body")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["ok", "fine", None]}), tmp_path / "null.parquet", row_group_size=2)
    with pytest.raises(data.DataError, match=r"null.parquet row 3: column 'body' is null"):
        data.load_corpus(str(tmp_path / "null.parquet"), text_field="body")
    pq.write_table(pa.table({"body": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(data.DataError, match=r"ints.parquet row 1: column 'body' is a number \(int64\), not a string"):
        data.load_corpus(str(tmp_path / "ints.parquet"), text_field="body")
    with pytest.raises(data.DataError, match=r"ints.parquet: no column 'text' \(it has 'body'\)"):
        data.load_corpus(str(tmp_path / "ints.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    with pytest.raises(data.DataError, match=r"junk.parquet: not a Parquet file pyarrow can read"):
        data.load_corpus(str(tmp_path / "junk.parquet"))


@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n{"text": ""}\n'])
def test_an_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(data.DataError, match="empty"):
        data.load_corpus(str(path))
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(data.DataError, match="empty"):
        data.load_corpus(str(tmp_path / "empty.csv"))


def test_a_large_jsonl_file_streams(tmp_path):
    # the reader yields the first record before it ever reads the bad last line ...
    path = tmp_path / "big.jsonl"
    record = json.dumps({"text": "x" * 1000}) + "\n"
    with open(path, "w") as f:
        f.write(record * 20_000)  # 20 MB
        f.write("{broken\n")
    reader = data.iter_jsonl(path)
    assert inspect.isgenerator(reader) and next(reader) == (1, "x" * 1000)
    # ... and holds one line at a time: reading all 20 MB peaks at a few KB of Python memory
    tracemalloc.start()
    try:
        n = 0
        with pytest.raises(data.DataError, match="line 20001: not valid JSON"):
            for _ in reader:
                n += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 19_999 and peak < 200_000, peak
    reader.close()


def test_records_train_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", texts(20))
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--data", path, "--text-field", "body", "--tokenizer", "bpe", "--vocab-size",
                    280, "--checkpoint-every", 1, "--out", out)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "data.json").read_text())
    assert info["text_field"] == "body" and info["tokenizer"]["vocab_size"] == 280
    rc = training.run_config_from_dict(json.loads((out / "config.json").read_text()))
    assert rc.train.text_field == "body" and rc.train.data == str(path)
    assert invoke("train", "--resume", out, "--steps", 3).exit_code == 0  # the same documents, the same tokens
    assert invoke("eval", out, "--backend", "reference").exit_code == 0
    other = write_jsonl(tmp_path / "other.jsonl", texts(6, seed=1))
    ev = invoke("eval", out, "--data", other, "--text-field", "body", "--backend", "reference")
    assert ev.exit_code == 0 and "tokens" in ev.output, ev.output
    original = path.read_text()
    path.write_text(original.replace("memory", "MEMORY", 1))  # one record changed: resume refuses the data
    result = invoke("train", "--resume", out, "--steps", 4)
    assert result.exit_code == 1 and "the data changed since the run started" in result.output
    path.write_text(original.replace('"body"', '"text"', 1))  # the first record lost its field
    result = invoke("train", "--resume", out, "--steps", 4)
    assert result.exit_code == 1 and f"{path} line 1: no field 'body'" in result.output
