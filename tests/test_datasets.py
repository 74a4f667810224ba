"""Data files: JSONL and Parquet read and validated; bad rows named by file and line."""

import json

import pytest

from rlfoundry.data.datasets import DataError, DataStats, read_records


def test_jsonl_bad_rows_are_named_or_skipped(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = ['{"text": "a b c"}', '', '{"text": 5}', 'not json', '{"text": "ok"}']
    f.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'text' must be a non-empty string"):
        list(read_records(f, "text"))
    stats = DataStats()
    got = list(read_records(f, "text", skip_bad=True, stats=stats))
    assert [r["text"] for r in got] == ["a b c", "ok"] and stats.skipped == 2 and stats.read == 2


def test_messages_and_slime_prompts(tmp_path):
    f = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: field 'messages' has no assistant message"):
        list(read_records(f, "messages"))
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "What is 1+1?", "label": "2", "metadata": {"level": 1}}) + "\n" +
                 json.dumps({"prompt": [{"role": "user", "content": "x"}], "label": 3}) + "\n" +
                 json.dumps({"label": 3}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:3: field 'prompt'"):
        list(read_records(p, "prompt"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", "", "three"]}), f)
    with pytest.raises(DataError, match=r"d.parquet: row 1: field 'text'"):
        list(read_records(f, "text"))
    assert [r["text"] for r in read_records(f, "text", skip_bad=True)] == ["one", "three"]
    with pytest.raises(DataError, match="no such file"):
        list(read_records(tmp_path / "missing.jsonl", "text"))
