"""Ingestion (tasks/ingest.py) of the real files: the known malformed rows, seed tasks, deterministic splits."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from rlhf_pipeline.tasks.formats import MalformedRow, render_prompt_text, split_hh_comparison
from rlhf_pipeline.tasks.ingest import assign_split, ingest
from rlhf_pipeline.tasks.validate import SourceConfig
from tests.conftest import MALFORMED, small_data_config, write_jsonl


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
    small = write_jsonl(tmp_path / "small.jsonl", hh_rows[:300])
    large = write_jsonl(tmp_path / "large.jsonl", hh_rows[:600])
    before = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="hh", path=str(small))]))
    after = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="hh", path=str(large))]))
    old = before.frames["comparisons"].set_index("id")["split"]
    new = after.frames["comparisons"].set_index("id")["split"]
    assert len(old) == 299 and len(new) == 598  # lines 87 and 517 are malformed
    assert new.loc[old.index].tolist() == old.tolist()


def test_structure_is_reported_not_dropped_silently(tmp_path, hh_rows):
    """Issue 11, item 11: a `messages` demonstration that ends after the reply is refused (its turns were dropped
    without a word); dialogues that start with the assistant or repeat a role are kept with a warning (the real HH data
    has 4 with two assistant turns in a row) and refused under --strict; a second format in a file is named as such."""
    from rlhf_pipeline.tasks.validate import ValidationFailed, run_validate

    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "and then?"}]},
        {"messages": [{"role": "assistant", "content": "Welcome"}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
    ])
    config = small_data_config(tmp_path, demonstrations=[SourceConfig(name="chats", path=str(chats))])
    result = ingest(config)
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(2, "ends_after_reply")]
    assert "1 turn(s) (user) after the last assistant reply" in result.invalid[0]["detail"]
    assert [(r["row"], r["rule"]) for r in result.warnings] == [(3, "starts_with_assistant"), (4, "repeated_role")]
    assert len(result.frames["demonstrations"]) == 3  # kept, and said so
    with pytest.raises(ValidationFailed) as info:
        run_validate(config.model_copy(update={"max_invalid_fraction": 1.0}), strict=True)
    assert "starts_with_assistant" in str(info.value) and "repeated_role" in str(info.value)

    # 30 HH transcripts, then prompt/chosen/rejected rows from row 31: the rule names the second format and its start
    pcr = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(5)]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", hh_rows[:30] + pcr)
    result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="mixed", path=str(mixed))]))
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(n, "mixed_format") for n in range(31, 36)]
    assert all("second format starts at row 31" in r["detail"] and "'prompt_chosen_rejected'" in r["detail"]
               for r in result.invalid)
