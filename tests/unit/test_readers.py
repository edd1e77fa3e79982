"""Readers (tasks/readers.py): every file format gives the same rows; unreadable files and a missing hub are clear errors."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from rlhf_pipeline.tasks.ingest import ingest
from rlhf_pipeline.tasks.readers import DataError, read_rows
from rlhf_pipeline.tasks.validate import SourceConfig
from tests.conftest import small_data_config, write_jsonl


def test_the_same_rows_in_every_file_format_give_the_same_data(tmp_path, hh_rows):
    rows = hh_rows[:30]
    jsonl_gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(jsonl_gz, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows))
    as_csv = tmp_path / "rows.csv"
    pd.DataFrame(rows).to_csv(as_csv, index=False)
    as_parquet = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(as_parquet)
    frames = {}
    for path in (jsonl_gz, as_json, as_csv, as_parquet):
        assert [n for n, _ in read_rows(path)] == list(range(1, 31))
        result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="hh", path=str(path))]))
        frames[path.name] = result.frames["comparisons"]
        assert result.sources[-1]["format"] == "hh_rlhf"  # auto-detected
    reference = frames["rows.jsonl.gz"]
    assert len(reference) == 30
    for frame in frames.values():
        assert frame["id"].tolist() == reference["id"].tolist()
        assert frame["responses"].tolist() == reference["responses"].tolist()


def test_unreadable_inputs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="file_missing"):
        list(read_rows(tmp_path / "nope.jsonl"))
    odd = tmp_path / "rows.txt"
    odd.write_text("{}\n")
    with pytest.raises(DataError, match="unknown_extension"):
        list(read_rows(odd))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"unknown\.jsonl: row 1: rule unknown_format"):
        ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="u", path=str(unknown))]))
    demos = write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match="wrong_format"):
        ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="a", path=str(demos))]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n'
                      "{not json\n")
    result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="b", path=str(broken))]))
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(2, "invalid_json")]


def test_hub_fallback_offline_says_the_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = SourceConfig(name="hh", path=str(tmp_path / "absent.jsonl.gz"), hf_dataset="Anthropic/hh-rlhf",
                          hf_config="harmless-base", hf_split="test")
    with pytest.raises(DataError) as info:
        ingest(small_data_config(tmp_path, comparisons=[source]))
    message = str(info.value)
    assert "absent.jsonl.gz is missing" in message and "hub" in message


def test_one_row_numbering_for_encoding_errors_and_truncated_files(tmp_path, hh_rows):
    """Issue 11, item 10: a line that is not UTF-8 is an invalid row under its own line number (the rest of the file is
    read, as for a line that is not JSON); a truncated gzip fails the source naming the file once and the first row
    that could not be read, never `row ?`."""
    lines = [json.dumps(r).encode() + b"\n" for r in hh_rows[:6]]
    lines[2] = lines[2].replace(b"Human", b"Hu\xffman", 1)  # line 3: a byte that is not UTF-8
    mixed = tmp_path / "latin.jsonl"
    mixed.write_bytes(b"".join(lines))
    rows = list(read_rows(mixed))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2][1].rule == "invalid_encoding" and "0xff" in rows[2][1].detail
    result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="latin", path=str(mixed))]))
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(3, "invalid_encoding")]
    assert len(result.frames["comparisons"]) == 5

    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in hh_rows[:400]))
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as info:
        ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="cut", path=str(truncated))]))
    message = str(info.value)
    assert message.count(str(truncated)) == 1 and "row ?" not in message
    assert "rule unreadable" in message and "truncated" in message
    row = int(message.split(": row ")[1].split(":")[0])
    assert 1 < row < 400 and f"{row - 1} rows were read before it" in message


def test_a_bad_first_row_is_one_invalid_row_everywhere(tmp_path, hh_rows):
    """Issue 11, item 10: the file's format comes from its first row that decodes and matches a format, so a bad first
    row is dropped like any other (ingestion and `rlhf validate --data` decide the same way)."""
    from rlhf_pipeline.tasks.ingest import detect_file_format

    path = tmp_path / "first.jsonl"
    path.write_text("{not json\n" + "".join(json.dumps(r) + "\n" for r in hh_rows[:5]))
    assert detect_file_format(read_rows(path), str(path)) == ("hh_rlhf", 2)
    result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="first", path=str(path))]))
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(1, "invalid_json")]
    assert result.frames["comparisons"]["source_row"].tolist() == [2, 3, 4, 5, 6]
