"""tasks/feedback.py: Label Studio exports (full, partial, cancelled, multi-annotator, malformed) → GX validation →
K-wise rows, checked against hand-made expectations; the shuffle undone; idempotent appends."""

from __future__ import annotations

import copy
import json

import pytest

from rlhf_pipeline.tasks.feedback import (
    ImportRefused,
    batches_of_rows,
    borda,
    convert_rankings,
    feedback_jsonl,
    pair_agreement,
    parse_export,
    read_feedback_rows,
    select_batches,
    split_new_rows,
    validate_export,
)
from rlhf_pipeline.tasks.formats import PARSERS

COLOUR = [{"role": "user", "content": "Name a colour."}]
ANIMAL = [{"role": "user", "content": "Name an animal."}]


def make_batch(annotators: int = 1) -> dict:
    """A labeling batch of two tasks, K = 4, with the display orders written out by hand."""
    return {
        "format": "rlhf-labeling-batch/1", "batch_id": "bTEST", "annotators_per_task": annotators,
        "policy": {"kind": "registry", "version": "rlhf-policy/3", "uri": "models:/rlhf-policy/3"},
        "tasks": [
            {"task_id": "bTEST-t1", "prompt": COLOUR,
             "responses": [{"id": "a1", "text": "Red."}, {"id": "b1", "text": "Blue."},
                           {"id": "c1", "text": "Green."}, {"id": "d1", "text": "Seven."}],
             "display_order": ["c1", "a1", "d1", "b1"]},
            {"task_id": "bTEST-t2", "prompt": ANIMAL,
             "responses": [{"id": "a2", "text": "A cat."}, {"id": "b2", "text": "Blue."},
                           {"id": "c2", "text": "A dog."}, {"id": "d2", "text": "Seven."}],
             "display_order": ["b2", "d2", "a2", "c2"]},
        ],
    }


def annotation(aid: int, user: int, ranking: list[str] | None, cancelled: bool = False) -> dict:
    """An annotation as Label Studio exports it (the keys the importer reads and a few it ignores)."""
    result = [] if ranking is None else [{"from_name": "rank", "to_name": "responses", "type": "ranker",
                                          "value": {"ranker": {"rank": ranking}}, "origin": "manual"}]
    return {"id": aid, "completed_by": user, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "lead_time": None if cancelled else 12.5, "created_at": "2026-12-02T15:05:54Z", "task": 1, "project": 1}


def export_task(batch: dict, index: int, annotations: list[dict], ls_id: int | None = None) -> dict:
    task = batch["tasks"][index]
    texts = {r["id"]: r["text"] for r in task["responses"]}
    return {"id": ls_id or index + 1, "annotations": annotations, "drafts": [], "predictions": [],
            "data": {"ext_id": task["task_id"], "batch_id": batch["batch_id"], "prompt": task["prompt"][0]["content"],
                     "responses": [{"id": rid, "title": f"Response {'ABCD'[n]}", "body": texts[rid]}
                                   for n, rid in enumerate(task["display_order"])]},
            "meta": {"ext_id": task["task_id"], "batch_id": batch["batch_id"]}, "total_annotations": len(annotations)}


def run_import(export: list, batch: dict) -> tuple[list[dict], dict]:
    tasks = parse_export(export, "export.json")
    validate_export(tasks, {batch["batch_id"]: batch}, "export.json")
    return convert_rankings(tasks, {batch["batch_id"]: batch}, "export.json", "2026-12-02T16:00:00Z")


def test_a_full_export_becomes_kwise_rows_best_first():
    batch = make_batch()
    export = [export_task(batch, 0, [annotation(11, 1, ["d1", "a1", "c1", "b1"])]),
              export_task(batch, 1, [annotation(12, 2, ["c2", "a2", "d2", "b2"])])]
    rows, report = run_import(export, batch)
    assert rows == [
        {"id": "bTEST-t1", "prompt": COLOUR, "responses": ["Seven.", "Red.", "Green.", "Blue."], "batch_id": "bTEST",
         "task_id": "bTEST-t1", "response_ids": ["d1", "a1", "c1", "b1"], "display_order": ["c1", "a1", "d1", "b1"],
         "policy": "models:/rlhf-policy/3", "policy_version": "rlhf-policy/3", "annotators": ["label-studio:1"],
         "rankings": [["d1", "a1", "c1", "b1"]], "aggregation": "single", "agreement": None,
         "unchanged_display_order": [], "label_studio": {"tasks": [1], "annotations": [11]}, "source": "export.json",
         "imported_at": "2026-12-02T16:00:00Z"},
        {"id": "bTEST-t2", "prompt": ANIMAL, "responses": ["A dog.", "A cat.", "Seven.", "Blue."], "batch_id": "bTEST",
         "task_id": "bTEST-t2", "response_ids": ["c2", "a2", "d2", "b2"], "display_order": ["b2", "d2", "a2", "c2"],
         "policy": "models:/rlhf-policy/3", "policy_version": "rlhf-policy/3", "annotators": ["label-studio:2"],
         "rankings": [["c2", "a2", "d2", "b2"]], "aggregation": "single", "agreement": None,
         "unchanged_display_order": [], "label_studio": {"tasks": [2], "annotations": [12]}, "source": "export.json",
         "imported_at": "2026-12-02T16:00:00Z"},
    ]
    assert report == {"tasks": 2, "rows": 2, "pending": [], "cancelled": 0, "unchanged_display_order": 0}
    # the rows are the pipeline's K-wise input format
    for row in rows:
        assert PARSERS["kwise"](row) == (row["prompt"], row["responses"])


def test_the_shuffle_is_undone_a_ranking_equal_to_the_display_order_is_flagged():
    batch = make_batch()
    shown = batch["tasks"][0]["display_order"]
    rows, report = run_import([export_task(batch, 0, [annotation(11, 1, list(shown))])], batch)
    # the texts in the order the labeler saw them, not in the order they were sampled (Red, Blue, Green, Seven)
    assert rows[0]["responses"] == ["Green.", "Red.", "Seven.", "Blue."]
    assert rows[0]["unchanged_display_order"] == ["label-studio:1"] and report["unchanged_display_order"] == 1


def test_cancelled_annotations_are_set_aside_and_unannotated_tasks_wait():
    batch = make_batch()
    export = [export_task(batch, 0, [annotation(11, 1, None, cancelled=True)]), export_task(batch, 1, [])]
    rows, report = run_import(export, batch)
    assert rows == [] and report == {"tasks": 2, "rows": 0, "pending": [], "cancelled": 1, "unchanged_display_order": 0}
    # a skip by one labeler and a ranking by another: the ranking counts
    export = [export_task(batch, 0, [annotation(11, 1, None, cancelled=True), annotation(13, 2, ["a1", "b1", "c1", "d1"])])]
    rows, report = run_import(export, batch)
    assert [r["annotators"] for r in rows] == [["label-studio:2"]] and report["cancelled"] == 1


def test_several_annotators_are_merged_by_the_borda_count():
    batch = make_batch(annotators=3)
    rankings = [["a1", "b1", "c1", "d1"], ["b1", "a1", "c1", "d1"], ["b1", "c1", "a1", "d1"]]
    export = [export_task(batch, 0, [annotation(20 + n, n + 1, r) for n, r in enumerate(rankings)]),
              export_task(batch, 1, [annotation(30, 1, ["a2", "b2", "c2", "d2"])])]
    rows, report = run_import(export, batch)
    # points (K-1-position): a1 3+2+1=6, b1 2+3+3=8, c1 1+1+2=4, d1 0 -> b1, a1, c1, d1
    (row,) = rows
    assert row["response_ids"] == ["b1", "a1", "c1", "d1"] and row["responses"] == ["Blue.", "Red.", "Green.", "Seven."]
    assert row["aggregation"] == "borda" and row["rankings"] == rankings
    assert row["annotators"] == ["label-studio:1", "label-studio:2", "label-studio:3"]
    # pairs ordered alike, of 6: (1,2) 5, (1,3) 4, (2,3) 5 -> mean 14/18
    assert row["agreement"] == pytest.approx(14 / 18)
    assert report["pending"] == [{"task_id": "bTEST-t2", "rankings": 1, "needed": 3}]
    # a tie (a1 and b1 both 3 points) keeps the first ranking's order
    assert borda([["a1", "b1", "c1"], ["b1", "a1", "c1"]]) == ["a1", "b1", "c1"]
    assert pair_agreement(["a", "b", "c"], ["c", "b", "a"]) == 0.0


def test_the_same_task_imported_twice_into_label_studio_pools_its_annotations():
    batch = make_batch(annotators=2)
    export = [export_task(batch, 0, [annotation(11, 1, ["a1", "b1", "c1", "d1"])], ls_id=1),
              export_task(batch, 0, [annotation(12, 2, ["a1", "b1", "d1", "c1"])], ls_id=7)]
    (row,), _ = run_import(export, batch)
    assert row["label_studio"] == {"tasks": [1, 7], "annotations": [11, 12]} and row["response_ids"][:2] == ["a1", "b1"]


def test_a_partial_ranking_refuses_the_whole_export_naming_the_task_and_rule():
    batch = make_batch()
    export = [export_task(batch, 0, [annotation(11, 1, ["d1", "a1", "c1", "b1"])]),
              export_task(batch, 1, [annotation(12, 1, ["c2", "a2", "d2"])])]
    with pytest.raises(ImportRefused) as caught:
        run_import(export, batch)
    assert caught.value.failures == [{"rule": "incomplete_ranking", "task_ids": ["bTEST-t2"],
                                      "detail": "a ranking does not rank every response of the task"}]
    assert str(caught.value) == ("export.json: refused, nothing was written (1 rules failed):\n"
                                 "  rule incomplete_ranking: 1 tasks: bTEST-t2 (a ranking does not rank every response "
                                 "of the task)")


def test_every_rule_names_its_tasks():
    batch = make_batch()
    other = copy.deepcopy(batch)
    other["batch_id"] = "bOTHER"
    for t in other["tasks"]:
        t["task_id"] = t["task_id"].replace("bTEST", "bOTHER")
    changed = export_task(batch, 1, [])
    changed["data"]["responses"][0]["body"] = "Edited in Label Studio."
    several = annotation(16, 1, ["a1", "b1", "c1", "d1"])
    several["result"].append(copy.deepcopy(several["result"][0]))
    export = [
        export_task(batch, 0, [annotation(11, 1, ["a1", "b1", "c1", "x9"]),   # unknown id
                               annotation(12, 2, ["a1", "a1", "b1", "c1"]),   # a repeat
                               annotation(13, 3, None),                       # submitted empty
                               several]),
        changed,
        export_task(other, 0, []),                                          # a batch nobody knows
        {**export_task(batch, 0, []), "id": 9, "data": {**export_task(batch, 0, [])["data"], "ext_id": "bTEST-t9"}},
        {"id": 10, "annotations": [], "data": {"prompt": "hand-made task", "responses": []}},
    ]
    with pytest.raises(ImportRefused) as caught:
        run_import(export, batch)
    found = {f["rule"]: f["task_ids"] for f in caught.value.failures}
    assert found == {
        "missing_ext_id": ["label-studio task 10"],
        "unknown_batch": ["bOTHER-t1"],
        "unknown_task": ["bTEST-t9"],
        "responses_changed": ["bTEST-t2"],
        "empty_annotation": ["bTEST-t1"],
        "several_rankings": ["bTEST-t1"],
        "unknown_response_id": ["bTEST-t1"],
        "duplicate_response_id": ["bTEST-t1"],
    }


def test_a_file_that_is_no_export_is_refused():
    with pytest.raises(ImportRefused, match="rule not_a_label_studio_export"):
        parse_export({"tasks": []}, "x.json")
    with pytest.raises(ImportRefused, match="element 2"):
        parse_export([{"data": {}}, "text"], "x.json")


def test_select_batches():
    tasks = [{"batch_id": "b1"}, {"batch_id": "b2"}, {"batch_id": None}]
    assert select_batches(tasks, ["b2"]) == [{"batch_id": "b2"}]
    assert select_batches(tasks, None) == tasks


def test_appending_is_idempotent_and_keeps_the_first_import():
    first = [{"id": "t1", "response_ids": ["a", "b"], "batch_id": "b1", "policy_version": "p/1"},
             {"id": "t2", "response_ids": ["b", "a"], "batch_id": "b1", "policy_version": "p/1"}]
    new, same, changed = split_new_rows([], first)
    assert (new, same, changed) == (first, [], [])
    again = [dict(first[0]), {**first[1], "response_ids": ["a", "b"]},
             {"id": "t3", "response_ids": ["a", "b"], "batch_id": "b2", "policy_version": "p/2"}]
    new, same, changed = split_new_rows(first, again)
    assert [r["id"] for r in new] == ["t3"] and same == ["t1"] and changed == ["t2"]
    text = feedback_jsonl(first)
    assert read_feedback_rows(text + "\n", "f.jsonl") == first
    assert text.splitlines()[0] == json.dumps(first[0], sort_keys=True)
    with pytest.raises(ValueError, match=r"f.jsonl: row 2: rule invalid_json"):
        read_feedback_rows(text.splitlines()[0] + "\n{oops\n", "f.jsonl")
    assert batches_of_rows(first + again[2:]) == [{"batch_id": "b1", "rows": 2, "policy_version": "p/1"},
                                                  {"batch_id": "b2", "rows": 1, "policy_version": "p/2"}]
