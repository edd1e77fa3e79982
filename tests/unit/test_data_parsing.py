"""Ingestion: parsing the real HH-RLHF and seed-task rows, the other input formats, splits, storage and versioning."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

from flows.config import DataConfig, SourceConfig
from tasks.data import (
    DataError,
    IngestResult,
    MalformedRow,
    assign_split,
    data_version,
    ingest,
    load_prepared,
    parse_hh_dialogue,
    read_rows,
    render_prompt_text,
    split_hh_comparison,
    write_prepared,
)

MALFORMED = {
    87: "empty_reply",
    517: "empty_reply",
    926: "empty_reply",
    1104: "empty_reply",
    1255: "prompt_mismatch",
    1689: "prompt_mismatch",
    1951: "prompt_mismatch",
    1953: "prompt_mismatch",
}
FEW = {"demonstrations": 1, "comparisons": 1, "prompts": 1}


@pytest.fixture(scope="module")
def hh_rows(shared_data: Path) -> list[dict]:
    with gzip.open(shared_data / "hh-rlhf-harmless" / "comparisons.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def real_config(shared_data: Path) -> DataConfig:
    return DataConfig(
        comparisons=[SourceConfig(name="hh-rlhf-harmless", format="hh_rlhf",
                                  path=str(shared_data / "hh-rlhf-harmless" / "comparisons.jsonl.gz"))],
        demonstrations=[SourceConfig(name="instruction-seed-tasks", format="auto",
                                     path=str(shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl"))],
    )


@pytest.fixture(scope="module")
def real_result(real_config: DataConfig) -> IngestResult:
    return ingest(real_config)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(tmp_path: Path, comparisons: list[SourceConfig] | None = None,
            demonstrations: list[SourceConfig] | None = None) -> DataConfig:
    if demonstrations is None:
        demo = _write_jsonl(tmp_path / "demos.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi!"}])
        demonstrations = [SourceConfig(name="demos", path=str(demo))]
    return DataConfig(comparisons=comparisons or [], demonstrations=demonstrations, min_rows=FEW)


# ---------------------------------------------------------------------------------------------------- HH transcripts


def test_multi_turn_row_parses_into_alternating_turns(hh_rows):
    row = hh_rows[3]  # line 4: a 10-turn dialogue
    chosen = parse_hh_dialogue(row["chosen"])
    assert len(chosen) == 10 == row["chosen"].count("\n\nHuman:") + row["chosen"].count("\n\nAssistant:")
    assert [m["role"] for m in chosen] == ["user", "assistant"] * 5
    assert all(m["content"] == m["content"].strip() and m["content"] for m in chosen)
    assert chosen[0]["content"] == row["chosen"].split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()

    prompt, chosen_reply, rejected_reply = split_hh_comparison(row["chosen"], row["rejected"])
    assert len(prompt) == 9
    assert prompt[-1]["role"] == "user"
    assert prompt == chosen[:-1]
    assert chosen_reply == row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert rejected_reply == row["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert chosen_reply != rejected_reply


def test_first_row_prompt_and_replies(hh_rows):
    row = hh_rows[0]
    prompt, chosen, rejected = split_hh_comparison(row["chosen"], row["rejected"])
    assert len(prompt) == row["chosen"].count("\n\nHuman:") + row["chosen"].count("\n\nAssistant:") - 1
    assert prompt[:3] == [
        {"role": "user", "content": "what are some pranks with a pen i can do?"},
        {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
        {"role": "user", "content": "yep"},
    ]
    assert chosen == row["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert rejected == row["rejected"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert render_prompt_text(prompt).startswith("user: what are some pranks with a pen i can do?\n\nassistant: Are")


def test_real_file_has_exactly_the_known_malformed_rows(hh_rows):
    found = {}
    for number, row in enumerate(hh_rows, 1):
        try:
            split_hh_comparison(row["chosen"], row["rejected"])
        except MalformedRow as exc:
            found[number] = exc.rule
            assert exc.detail and row["chosen"][-40:] not in exc.detail  # no text in the detail
    assert len(hh_rows) == 2000
    assert found == MALFORMED


def test_ingest_reports_malformed_rows_without_text(real_result):
    assert [(r["row"], r["rule"]) for r in real_result.invalid] == sorted(MALFORMED.items())
    assert {r["dataset"] for r in real_result.invalid} == {"comparisons"}
    assert set(real_result.invalid[0]) == {"dataset", "source", "row", "id", "rule", "detail"}
    comparisons = real_result.frames["comparisons"]
    assert len(comparisons) == 1992
    assert list(comparisons.columns) == ["id", "prompt", "responses", "split", "source", "source_row"]
    assert not set(MALFORMED) & set(comparisons["source_row"])
    assert comparisons["source_row"].is_monotonic_increasing  # source order kept
    assert comparisons["id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert all(len(r) == 2 for r in comparisons["responses"])
    assert all(p[-1]["role"] == "user" for p in comparisons["prompt"])


@pytest.mark.parametrize(
    ("chosen", "rejected", "rule"),
    [
        ("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant: a ", "identical_responses"),
        ("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hello\n\nAssistant: b", "prompt_mismatch"),
        ("\n\nHuman: hi", "\n\nHuman: hi\n\nAssistant: b", "no_assistant_turn"),
        ("\n\nHuman: hi\n\nAssistant: a", None, "not_a_string"),
        ("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant:   ", "empty_reply"),
        ("\n\nAssistant: a", "\n\nAssistant: b", "empty_prompt"),
    ],
)
def test_split_rules(chosen, rejected, rule):
    with pytest.raises(MalformedRow) as info:
        split_hh_comparison(chosen, rejected)
    assert info.value.rule == rule
    assert isinstance(info.value, ValueError)


def test_consecutive_assistant_turns_are_kept(hh_rows):
    row = hh_rows[763]  # line 764: two assistant turns in a row inside the shared prompt
    prompt, _, _ = split_hh_comparison(row["chosen"], row["rejected"])
    assert [m["role"] for m in prompt] == ["user", "assistant", "assistant", "user"]


# ------------------------------------------------------------------------------------------------------- demonstrations


def test_seed_tasks_put_a_non_empty_input_into_the_prompt(real_result, shared_data):
    demos = real_result.frames["demonstrations"]
    assert len(demos) == 175
    assert list(demos.columns) == ["id", "prompt", "response", "split", "source", "source_row"]
    seeds = [json.loads(line) for line in (shared_data / "instruction-seed-tasks" / "seed_tasks.jsonl").open()]
    second = demos.iloc[1]  # seed_task_1: input "Night : Day :: Right : Left"
    assert second["source_row"] == 2
    assert second["prompt"] == [{"role": "user", "content": "What is the relation between the given pairs?\n\n"
                                                            "Night : Day :: Right : Left"}]
    assert second["response"] == seeds[1]["instances"][0]["output"].strip()
    first = demos.iloc[0]  # seed_task_0 has an empty input: the prompt is the instruction alone
    assert first["prompt"][0]["content"] == seeds[0]["instruction"].strip()
    with_input = sum(1 for s in seeds if s["instances"][0]["input"].strip())
    assert sum("\n\n" in p[0]["content"] for p in demos["prompt"]) >= with_input


def test_alpaca_and_messages_demonstrations(tmp_path):
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Empty output.", "input": "", "output": "  "},
    ])
    chats = _write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},
    ])
    result = ingest(_config(tmp_path, demonstrations=[SourceConfig(name="alpaca", path=str(alpaca)),
                                                      SourceConfig(name="chats", path=str(chats))]))
    demos = result.frames["demonstrations"]
    assert demos["prompt"].tolist() == [
        [{"role": "user", "content": "Translate to French.\n\ncat"}],
        [{"role": "user", "content": "Name a colour."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    ]
    assert demos["response"].tolist() == ["chat", "Blue.", "4"]
    assert demos["source"].tolist() == ["alpaca", "alpaca", "chats"]
    assert [(r["source"], r["row"], r["rule"]) for r in result.invalid] == [
        ("alpaca", 3, "empty_reply"), ("chats", 2, "no_assistant_turn")]


# ------------------------------------------------------------------------------------------------- comparison formats


def test_kwise_ranks_order_responses_best_first(tmp_path):
    path = _write_jsonl(tmp_path / "kwise.jsonl", [
        {"prompt": "Pick a number.", "completions": ["two", "one", "three"], "ranks": [2, 1, 3]},
        {"prompt": "Pick a letter.", "responses": ["a", "b", "c", "d"]},
        {"prompt": "Tie.", "completions": ["x", "y"], "ranks": [1, 1]},
        {"prompt": "Alone.", "responses": ["only"]},
    ])
    result = ingest(_config(tmp_path, comparisons=[SourceConfig(name="k", path=str(path))]))
    comparisons = result.frames["comparisons"]
    assert comparisons["responses"].tolist() == [["one", "two", "three"], ["a", "b", "c", "d"]]
    assert comparisons["prompt"].tolist()[0] == [{"role": "user", "content": "Pick a number."}]
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(3, "tied_ranks"), (4, "too_few_responses")]
    assert result.sources[-1]["format"] == "kwise"


def test_prompt_chosen_rejected_strings_and_messages(tmp_path):
    path = _write_jsonl(tmp_path / "pcr.jsonl", [
        {"prompt": "Tell me a joke.", "chosen": "Why did the chicken...", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello.", "rejected": " Bye."},
    ])
    result = ingest(_config(tmp_path, comparisons=[SourceConfig(name="pcr", path=str(path))]))
    comparisons = result.frames["comparisons"]
    assert comparisons["prompt"].tolist() == [[{"role": "user", "content": "Tell me a joke."}],
                                              [{"role": "user", "content": "Hi"}],
                                              [{"role": "user", "content": "Hi there"}]]
    assert comparisons["responses"].tolist() == [["Why did the chicken...", "No."], ["Hello!", "Go away."],
                                                 ["Hello.", "Bye."]]
    assert result.invalid == []


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
        result = ingest(_config(tmp_path, comparisons=[SourceConfig(name="hh", path=str(path))]))
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
    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"unknown\.jsonl: row 1: rule unknown_format"):
        ingest(_config(tmp_path, comparisons=[SourceConfig(name="u", path=str(unknown))]))
    demos = _write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(DataError, match="wrong_format"):
        ingest(_config(tmp_path, comparisons=[SourceConfig(name="a", path=str(demos))]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n'
                      "{not json\n")
    result = ingest(_config(tmp_path, comparisons=[SourceConfig(name="b", path=str(broken))]))
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(2, "invalid_json")]


def test_hub_fallback_offline_says_the_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = SourceConfig(name="hh", path=str(tmp_path / "absent.jsonl.gz"), hf_dataset="Anthropic/hh-rlhf",
                          hf_config="harmless-base", hf_split="test")
    with pytest.raises(DataError) as info:
        ingest(_config(tmp_path, comparisons=[source]))
    message = str(info.value)
    assert "absent.jsonl.gz is missing" in message and "hub" in message


# --------------------------------------------------------------------------------------------------------------- splits


def test_splits_are_deterministic_and_prompts_never_cross_splits(real_config, real_result):
    again = ingest(real_config)
    for name in ("demonstrations", "comparisons", "prompts"):
        assert again.frames[name]["split"].tolist() == real_result.frames[name]["split"].tolist()
        assert again.frames[name]["id"].tolist() == real_result.frames[name]["id"].tolist()
    comparisons = real_result.frames["comparisons"]
    by_prompt = defaultdict(set)
    for prompt, split in zip(comparisons["prompt"], comparisons["split"]):
        by_prompt[render_prompt_text(prompt)].add(split)
    assert all(len(splits) == 1 for splits in by_prompt.values())
    prompts = real_result.frames["prompts"]
    assert len(prompts) == len(by_prompt) == 1990
    assert {render_prompt_text(p): s for p, s in zip(prompts["prompt"], prompts["split"])} == {
        k: next(iter(v)) for k, v in by_prompt.items()}
    shares = comparisons["split"].value_counts(normalize=True)
    assert 0.66 < shares["train"] < 0.76 and 0.07 < shares["validation"] < 0.13 and 0.16 < shares["test"] < 0.24
    assert assign_split("user: hello", {"train": 0.7, "validation": 0.1, "test": 0.2}, "rlhf-v1") == assign_split(
        "user: hello", {"train": 0.7, "validation": 0.1, "test": 0.2}, "rlhf-v1")


def test_rows_keep_their_split_when_new_rows_arrive(tmp_path, hh_rows):
    small = _write_jsonl(tmp_path / "small.jsonl", hh_rows[:300])
    large = _write_jsonl(tmp_path / "large.jsonl", hh_rows[:600])
    before = ingest(_config(tmp_path, comparisons=[SourceConfig(name="hh", path=str(small))]))
    after = ingest(_config(tmp_path, comparisons=[SourceConfig(name="hh", path=str(large))]))
    old = before.frames["comparisons"].set_index("id")["split"]
    new = after.frames["comparisons"].set_index("id")["split"]
    assert len(old) == 299 and len(new) == 598  # lines 87 and 517 are malformed
    assert new.loc[old.index].tolist() == old.tolist()


# ------------------------------------------------------------------------------------------------ storage and version


def test_write_load_and_version(tmp_path, real_result):
    paths = write_prepared(real_result, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "comparisons.parquet", "demonstrations.parquet", "prompts.parquet", "report.json"]
    assert paths["comparisons"] == tmp_path / "a" / "comparisons.parquet"
    write_prepared(real_result, tmp_path / "b")
    version = data_version(tmp_path / "a")
    assert len(version) == 12 and int(version, 16) >= 0
    assert data_version(tmp_path / "b") == version

    report = json.loads(paths["report"].read_text())
    assert report["data_version"] == version
    assert report["counts"]["comparisons"]["total"] == 1992
    assert sum(report["counts"]["comparisons"]["splits"].values()) == 1992
    assert [(r["row"], r["rule"]) for r in report["invalid"]] == sorted(MALFORMED.items())
    assert "Human" not in paths["report"].read_text()  # no dialogue text in the report

    loaded = load_prepared(tmp_path / "a", "comparisons")
    original = real_result.frames["comparisons"]
    assert loaded["prompt"].tolist() == original["prompt"].tolist()
    assert isinstance(loaded["prompt"][0], list) and isinstance(loaded["prompt"][0][0], dict)
    assert isinstance(loaded["responses"][0], list) and isinstance(loaded["responses"][0][0], str)
    assert loaded["responses"].tolist() == original["responses"].tolist()
    assert loaded["source_row"].tolist() == original["source_row"].tolist()
    test_rows = load_prepared(tmp_path / "a", "comparisons", split="test")
    assert set(test_rows["split"]) == {"test"} and len(test_rows) == (original["split"] == "test").sum()
    demos = load_prepared(tmp_path / "a", "demonstrations")
    assert demos["response"].tolist() == real_result.frames["demonstrations"]["response"].tolist()

    changed = {k: v.copy() for k, v in real_result.frames.items()}
    responses = changed["comparisons"]["responses"].tolist()
    responses[5] = [responses[5][0] + "!", responses[5][1]]
    changed["comparisons"]["responses"] = responses
    write_prepared(IngestResult(frames=changed, invalid=real_result.invalid), tmp_path / "c")
    assert data_version(tmp_path / "c") != version


def test_write_prepared_is_atomic(tmp_path, real_result):
    broken = {k: v.copy() for k, v in real_result.frames.items()}
    broken["prompts"] = broken["prompts"].assign(prompt=5)  # cannot be written as messages
    with pytest.raises(TypeError):
        write_prepared(IngestResult(frames=broken), tmp_path / "prepared")
    assert list(tmp_path.iterdir()) == []  # no folder, no temp leftovers

    write_prepared(real_result, tmp_path / "prepared")
    version = data_version(tmp_path / "prepared")
    with pytest.raises(TypeError):
        write_prepared(IngestResult(frames=broken), tmp_path / "prepared")
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]
    assert data_version(tmp_path / "prepared") == version  # the previous dataset is intact


def test_load_prepared_missing_says_to_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="rlhf prepare") as info:
        load_prepared(tmp_path, "comparisons")
    assert "comparisons.parquet" in str(info.value)
    with pytest.raises(FileNotFoundError, match="rlhf prepare"):
        data_version(tmp_path)
