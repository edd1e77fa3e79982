"""tasks/collect.py: prompts from any input format, K distinct responses per prompt (duplicates and empty responses
sampled again), the per-task shuffle, stable ids, the Label Studio task payload; flows/collect.py's policy folders."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rlhf_pipeline.tasks.collect import (
    CollectConfig,
    batch_id_of,
    build_batch,
    choose_prompts,
    display_order,
    label_studio_tasks,
    prompt_of_row,
    read_prompts,
    response_id,
    sample_texts,
)
from rlhf_pipeline.tasks.formats import MalformedRow
from rlhf_pipeline.tasks.ingest import content_id
from rlhf_pipeline.tasks.readers import DataError

USER = [{"role": "user", "content": "Name a colour."}]
POLICY = {"version": "rlhf-policy/3", "uri": "models:/rlhf-policy/3", "kind": "registry"}


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Name a colour."}, USER),
    ({"prompt": "  Name a colour.\n"}, USER),
    ({"prompt": USER}, USER),
    ({"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Seven."}, USER),
    ({"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Red.", "rejected": "\n\nHuman: Name a colour.\n\nAssistant: 7"},
     USER),
    ({"prompt": "Name a colour.", "responses": ["Red.", "Seven."]}, USER),
    ({"messages": [*USER, {"role": "assistant", "content": "Red."}]}, USER),
    ({"instruction": "Name a colour.", "input": "", "output": "Red."}, USER),
    ({"instruction": "Name a colour.", "instances": [{"input": "", "output": "Red."}]}, USER),
    ({"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"},
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *USER]),
])
def test_prompt_of_row_reads_every_input_format(row, expected):
    assert prompt_of_row(row) == expected


@pytest.mark.parametrize("row, rule", [
    ({"text": "no prompt"}, "unknown_format"),
    ({"prompt": ""}, "empty_turn"),
    ({"prompt": [*USER, {"role": "assistant", "content": "Red."}]}, "last_turn_not_user"),
    (["not", "an", "object"], "not_an_object"),
])
def test_prompt_of_row_names_the_rule(row, rule):
    with pytest.raises(MalformedRow) as caught:
        prompt_of_row(row)
    assert caught.value.rule == rule


def test_read_prompts_keeps_the_first_of_repeats_and_refuses_a_file_with_bad_rows():
    rows = [(1, {"prompt": "A?"}), (2, {"prompt": "B?"}), (3, {"prompt": " A? "})]
    prompts = read_prompts(rows, "prompts.jsonl")
    assert [(p["row"], p["prompt"][0]["content"]) for p in prompts] == [(1, "A?"), (2, "B?")]
    assert prompts[0]["prompt_id"] == content_id({"prompt": [{"role": "user", "content": "A?"}]})
    with pytest.raises(DataError) as caught:
        read_prompts([(1, {"prompt": "A?"}), (2, {"x": 1}), (5, {"prompt": ""})], "prompts.jsonl")
    assert str(caught.value) == ("prompts.jsonl: 2 rows hold no usable prompt: row 2: rule unknown_format (keys ['x'] "
                                 "match no supported format); row 5: rule empty_turn (prompt turn 1 of 1 (user) is "
                                 "empty)")
    with pytest.raises(DataError, match="rule no_rows"):
        read_prompts([], "empty.jsonl")


def test_choose_prompts_draws_with_the_seed_and_keeps_file_order():
    prompts = [{"prompt_id": str(i)} for i in range(10)]
    chosen = choose_prompts(prompts, 4, seed=3)
    assert [p["prompt_id"] for p in chosen] == sorted((p["prompt_id"] for p in chosen), key=int)
    assert chosen == choose_prompts(prompts, 4, seed=3) and chosen != choose_prompts(prompts, 4, seed=4)
    assert choose_prompts(prompts[:3], 4, seed=3) == prompts[:3]


def test_collect_config_k_is_the_papers_range():
    assert CollectConfig().k == 4
    for bad in (3, 10):
        with pytest.raises(ValidationError):
            CollectConfig(k=bad)
    assert CollectConfig(k=9).k == 9


class Scripted:
    """A generator that answers from a script: ``script[prompt][round]`` texts per call (asks are recorded)."""

    def __init__(self, script: dict[int, list[list[str]]]):
        self.script = script
        self.calls: list[list[int]] = []

    def __call__(self, counts: list[int]) -> list[list[str]]:
        self.calls.append(list(counts))
        out = []
        for i, count in enumerate(counts):
            rounds = self.script[i]
            texts = rounds.pop(0) if count and rounds else []
            assert len(texts) == count or not count
            out.append(texts)
        return out


def _prompts(n: int) -> list[dict]:
    return [{"prompt_id": content_id({"prompt": [{"role": "user", "content": f"Q{i}?"}]}),
             "prompt": [{"role": "user", "content": f"Q{i}?"}]} for i in range(n)]


def test_build_batch_samples_again_for_duplicates_and_empty_responses():
    cfg = CollectConfig(k=4, max_resample_rounds=2)
    script = Scripted({
        # prompt 0: a duplicate (after stripping) and an empty response, then two new ones
        0: [["Red.", " Red. ", "", "Blue."], ["Green.", "Yellow."]],
        # prompt 1: four distinct at once
        1: [["a", "b", "c", "d"]],
        # prompt 2: never more than two distinct: left out after 1 + 2 rounds
        2: [["x", "x", "y", "y"], ["x", "y"], ["y", "x"]],
    })
    batch = build_batch(_prompts(3), script, cfg, POLICY, {"file": "p.jsonl"})
    assert script.calls == [[4, 4, 4], [2, 0, 2], [0, 0, 2]]
    first, second = batch["tasks"]
    assert [r["text"] for r in first["responses"]] == ["Red.", "Blue.", "Green.", "Yellow."]  # sampling order, stripped
    assert (first["drawn"], first["duplicates"], first["empty"]) == (6, 1, 1)
    assert [r["text"] for r in second["responses"]] == ["a", "b", "c", "d"]
    assert (second["drawn"], second["duplicates"], second["empty"]) == (4, 0, 0)
    assert batch["skipped"] == [{"prompt_id": _prompts(3)[2]["prompt_id"], "rule": "too_few_distinct_responses",
                                 "distinct": 2, "drawn": 8}]
    assert batch["policy"] == POLICY and batch["prompts"] == {"file": "p.jsonl"}
    assert batch["sampling"] == {"k": 4, "max_prompt_tokens": 256, "max_new_tokens": 64, "temperature": 1.0,
                                 "top_p": 1.0, "max_resample_rounds": 2, "seed": 0, "batch_size": 16}
    json.dumps(batch)  # a plain JSON document


def test_ids_are_stable_and_the_shuffle_is_recorded():
    cfg = CollectConfig(k=4)

    def fresh():
        return Scripted({i: [[f"{i}-{j}" for j in range(4)]] for i in range(5)})

    batch = build_batch(_prompts(5), fresh(), cfg, POLICY)
    again = build_batch(_prompts(5), fresh(), cfg, POLICY)
    assert [t["display_order"] for t in batch["tasks"]] == [t["display_order"] for t in again["tasks"]]
    assert batch["batch_id"] == again["batch_id"] == batch_id_of("rlhf-policy/3", [p["prompt_id"] for p in _prompts(5)],
                                                                  cfg, 0)
    assert batch["batch_id"].startswith("b") and len(batch["batch_id"]) == 13
    assert build_batch(_prompts(5), fresh(), CollectConfig(k=4, seed=1), POLICY)["batch_id"] != batch["batch_id"]
    assert build_batch(_prompts(5), fresh(), cfg, {**POLICY, "version": "rlhf-policy/4"})["batch_id"] != batch["batch_id"]
    orders = set()
    for task, prompt in zip(batch["tasks"], _prompts(5)):
        assert task["task_id"] == f"{batch['batch_id']}-{prompt['prompt_id'][:8]}"
        ids = [r["id"] for r in task["responses"]]
        assert ids == [response_id(task["task_id"], r["text"]) for r in task["responses"]]
        assert ids == [content_id({"task": task["task_id"], "text": r["text"]})[:8] for r in task["responses"]]
        assert sorted(task["display_order"]) == sorted(ids)  # a permutation of the task's ids
        assert task["display_order"] != ids  # never the sampling order
        orders.add(tuple(ids.index(x) for x in task["display_order"]))
    assert len(orders) > 1  # each task has its own order


def test_display_order_never_equals_the_sampling_order():
    for n in range(200):
        ids = ["a", "b", "c", "d"]
        order = display_order("b1", f"t{n}", ids)
        assert sorted(order) == ids and order != ids
    assert display_order("b1", "t1", ["a", "b"]) == ["b", "a"]


def test_label_studio_tasks_show_the_display_order_and_nothing_about_the_policy():
    cfg = CollectConfig(k=4)
    batch = build_batch(_prompts(1), Scripted({0: [["Red.", "Blue.", "Green.", "Seven."]]}), cfg, POLICY)
    task = batch["tasks"][0]
    (payload,) = label_studio_tasks(batch)
    texts = {r["id"]: r["text"] for r in task["responses"]}
    assert payload == {
        "data": {"ext_id": task["task_id"], "batch_id": batch["batch_id"], "prompt": "Q0?",
                 "responses": [{"id": rid, "title": f"Response {'ABCD'[n]}", "body": texts[rid]}
                               for n, rid in enumerate(task["display_order"])]},
        "meta": {"ext_id": task["task_id"], "batch_id": batch["batch_id"]},
    }
    assert "rlhf-policy" not in json.dumps(payload)
    multi = {**batch, "tasks": [{**task, "prompt": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello!"},
                                                    {"role": "user", "content": "Name a colour."}]}]}
    assert label_studio_tasks(multi)[0]["data"]["prompt"] == ("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\n"
                                                              "User: Name a colour.")


def test_sample_texts_with_the_tiny_model(tiny_model_path):
    import torch

    from rlhf_pipeline.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    model = load_causal_lm(tiny_model_path, torch.device("cpu")).eval()
    cfg = CollectConfig(max_new_tokens=4, batch_size=3)
    prompts = [p["prompt"] for p in _prompts(3)]
    torch.manual_seed(0)
    texts = sample_texts(model, tokenizer, prompts, [2, 0, 3], cfg)
    assert [len(t) for t in texts] == [2, 0, 3]
    assert all(isinstance(t, str) for row in texts for t in row) and any(t.strip() for row in texts for t in row)
    torch.manual_seed(0)
    assert sample_texts(model, tokenizer, prompts, [2, 0, 3], cfg) == texts  # same seed, same samples


def test_policy_reference_of_folders(tmp_path, tiny_model_path):
    from rlhf_pipeline.flows.collect import policy_reference
    from rlhf_pipeline.flows.config import load_config
    from tests.conftest import PROJECT_ROOT

    config = load_config(PROJECT_ROOT / "params.yaml", "smoke")
    assert policy_reference(config, str(tiny_model_path), tmp_path) == {
        "kind": "folder", "uri": str(tiny_model_path.resolve()), "path": str(tiny_model_path.resolve()),
        "version": f"folder:{tiny_model_path.resolve()}"}
    run = tmp_path / "runs" / "smoke-1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"stages": {"sft": {"status": "completed", "mlflow_run_id": "abc",
                                                                      "paths": {"model": str(tiny_model_path)}}}}))
    assert policy_reference(config, "runs/smoke-1", tmp_path) == {
        "kind": "run", "uri": str(tiny_model_path.resolve()), "path": str(tiny_model_path.resolve()),
        "run_dir": str(run.resolve()), "mlflow_run_id": "abc", "version": "run:smoke-1/sft"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither a model"):
        policy_reference(config, "empty", tmp_path)
    with pytest.raises(ValueError, match="neither a registered model"):
        policy_reference(config, "no/such/folder", tmp_path)
