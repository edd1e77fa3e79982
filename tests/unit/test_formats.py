"""Input formats (tasks/formats.py): HH-RLHF transcripts of the real file, the other row formats, the rules a malformed
row breaks."""

from __future__ import annotations

import pytest

from rlhf_pipeline.tasks.formats import MalformedRow, parse_hh_dialogue, render_prompt_text, split_hh_comparison
from rlhf_pipeline.tasks.ingest import ingest
from rlhf_pipeline.tasks.validate import SourceConfig
from tests.conftest import small_data_config, write_jsonl


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


def test_alpaca_and_messages_demonstrations(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Empty output.", "input": "", "output": "  "},
    ])
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},
    ])
    result = ingest(small_data_config(tmp_path, demonstrations=[SourceConfig(name="alpaca", path=str(alpaca)),
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


def test_kwise_ranks_order_responses_best_first(tmp_path):
    path = write_jsonl(tmp_path / "kwise.jsonl", [
        {"prompt": "Pick a number.", "completions": ["two", "one", "three"], "ranks": [2, 1, 3]},
        {"prompt": "Pick a letter.", "responses": ["a", "b", "c", "d"]},
        {"prompt": "Tie.", "completions": ["x", "y"], "ranks": [1, 1]},
        {"prompt": "Alone.", "responses": ["only"]},
    ])
    result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="k", path=str(path))]))
    comparisons = result.frames["comparisons"]
    assert comparisons["responses"].tolist() == [["one", "two", "three"], ["a", "b", "c", "d"]]
    assert comparisons["prompt"].tolist()[0] == [{"role": "user", "content": "Pick a number."}]
    assert [(r["row"], r["rule"]) for r in result.invalid] == [(3, "tied_ranks"), (4, "too_few_responses")]
    assert result.sources[-1]["format"] == "kwise"


def test_prompt_chosen_rejected_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "pcr.jsonl", [
        {"prompt": "Tell me a joke.", "chosen": "Why did the chicken...", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": "\n\nHuman: Hi there\n\nAssistant:", "chosen": " Hello.", "rejected": " Bye."},
    ])
    result = ingest(small_data_config(tmp_path, comparisons=[SourceConfig(name="pcr", path=str(path))]))
    comparisons = result.frames["comparisons"]
    assert comparisons["prompt"].tolist() == [[{"role": "user", "content": "Tell me a joke."}],
                                              [{"role": "user", "content": "Hi"}],
                                              [{"role": "user", "content": "Hi there"}]]
    assert comparisons["responses"].tolist() == [["Why did the chicken...", "No."], ["Hello!", "Go away."],
                                                 ["Hello.", "Bye."]]
    assert result.invalid == []
