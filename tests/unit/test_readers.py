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
