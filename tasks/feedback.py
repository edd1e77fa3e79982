"""The rankings labelers made, back into the data: a Label Studio JSON export of a labeling batch
(:mod:`rlhf_pipeline.tasks.collect`) → validated with Great Expectations → K-wise comparisons (``responses`` best
first, InstructGPT §3.5 "RM") with their metadata, ready to append to the comparisons source that ``params.yaml`` names.

The export is a list of tasks; a task's ``data`` is what ``rlhf collect`` imported (``ext_id`` = our task id,
``batch_id``, ``responses`` = ``[{"id", "title", "body"}]`` in display order) and each of its ``annotations`` holds the
ranking best first under ``result[].value.ranker.rank`` (the key is the Ranker tag's name, :data:`RANKER`).

Rules (:func:`validate_export`; the export is **refused whole** when any fails, naming the rule and the task ids):

- ``missing_ext_id`` / ``unknown_batch`` / ``unknown_task``: every task must carry a task id of a known labeling batch;
- ``responses_changed``: a task's responses (ids and texts) must be the batch's;
- ``empty_annotation``: an annotation that is not cancelled must hold a ranking;
- ``several_rankings``: one ranking per annotation;
- ``incomplete_ranking``, ``unknown_response_id``, ``duplicate_response_id``: each ranking is a complete permutation
  of the task's response ids.

Cancelled annotations (Label Studio's "Skip") never become data: they are set aside and counted. A task enters the
data once it has ``annotators_per_task`` (from the batch) rankings; until then it is *pending*.

**Several annotators of one task** are reduced to one ranking by the Borda count (each annotator gives a response
``K - 1 - position`` points; responses are ordered by their total, ties broken by the earliest annotation's order),
because the data gate treats two rows with the same prompt and the same two best responses as duplicates. Every
annotator's own ranking is kept in the row (``rankings``) with their pairwise ``agreement`` (the fraction of response
pairs that two annotators order alike, averaged over annotator pairs), so nothing is lost.

A row's ``id`` is its task id: importing the same task again adds nothing (:func:`split_new_rows`); a task whose
ranking changed after it was imported keeps the first import (the data is append-only) and is reported.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import pandas as pd

from rlhf_pipeline.tasks.ingest import content_id

#: the Ranker tag's name in the labeling configuration (the key of ``value.ranker``)
RANKER = "rank"
_MAX_LISTED = 20


class ImportRefused(ValueError):
    """A Label Studio export refused whole; nothing was written.

    Attributes:
        failures: ``[{"rule", "task_ids", "detail"}]``, one per failed rule.
    """

    def __init__(self, origin: str, failures: list[dict]) -> None:
        self.origin = origin
        self.failures = failures
        lines = [f"{origin}: refused, nothing was written ({len(failures)} rules failed):"]
        for failure in failures:
            ids = [str(t) for t in failure["task_ids"]]
            shown = ", ".join(ids[:_MAX_LISTED]) + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED
                                                    else "")
            lines.append(f"  rule {failure['rule']}: {len(ids)} tasks: {shown}"
                         + (f" ({failure['detail']})" if failure.get("detail") else ""))
        super().__init__("\n".join(lines))


# -------------------------------------------------------------------------------------------------------------- parse


def _annotator(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("id", value.get("email"))
    return f"label-studio:{value}"


def _rankings(result: Any) -> list[list]:
    """The rankings in an annotation's ``result`` list: one list of ids per ranker region."""
    found = []
    for region in result if isinstance(result, list) else []:
        if not isinstance(region, dict):
            continue
        value = region.get("value")
        if region.get("type") != "ranker" and not (isinstance(value, dict) and "ranker" in value):
            continue
        ranker = value.get("ranker") if isinstance(value, dict) else None
        if isinstance(ranker, dict):
            ids = ranker.get(RANKER, next(iter(ranker.values())) if len(ranker) == 1 else None)
            found.append(list(ids) if isinstance(ids, list) else [])
        else:
            found.append([])
    return found


def parse_export(data: Any, origin: str) -> list[dict]:
    """The tasks of a Label Studio JSON export (``exportType=JSON``; the snapshot export has the same shape).

    Returns:
        ``[{"ls_id", "task_id" (our ext_id or None), "batch_id", "responses" ({id: body} or None), "annotations":
        [{"annotation_id", "annotator" ("label-studio:<user id>"), "cancelled", "rankings" ([[ids]...]),
        "created_at", "lead_time"}]}]`` in export order.

    Raises:
        ImportRefused: rule ``not_a_label_studio_export`` when ``data`` is not a list of task objects with ``data``.
    """
    if not isinstance(data, list):
        raise ImportRefused(origin, [{"rule": "not_a_label_studio_export", "task_ids": [],
                                      "detail": f"the export is a {type(data).__name__}, expected a list of tasks"}])
    bad = [str(i + 1) for i, t in enumerate(data) if not isinstance(t, dict) or not isinstance(t.get("data"), dict)]
    if bad:
        raise ImportRefused(origin, [{"rule": "not_a_label_studio_export", "task_ids": [f"element {b}" for b in bad],
                                      "detail": "not a task object with 'data'"}])
    tasks = []
    for task in data:
        fields = task["data"]
        responses = fields.get("responses")
        if isinstance(responses, list) and all(isinstance(r, dict) for r in responses):
            responses = {str(r.get("id")): r.get("body") for r in responses}
        else:
            responses = None
        annotations = []
        for n, annotation in enumerate(task.get("annotations") or []):
            if not isinstance(annotation, dict):
                annotation = {}
            annotations.append({
                "annotation_id": annotation.get("id", f"{task.get('id')}#{n + 1}"),
                "annotator": _annotator(annotation.get("completed_by")),
                "cancelled": bool(annotation.get("was_cancelled")),
                "rankings": _rankings(annotation.get("result")),
                "created_at": annotation.get("created_at"),
                "lead_time": annotation.get("lead_time"),
            })
        ext = fields.get("ext_id")
        tasks.append({"ls_id": task.get("id"), "task_id": str(ext) if ext is not None else None,
                      "batch_id": fields.get("batch_id"), "responses": responses, "annotations": annotations})
    return tasks


def select_batches(tasks: list[dict], batch_ids: list[str] | None) -> list[dict]:
    """The tasks of ``batch_ids`` (all tasks when ``None``)."""
    if not batch_ids:
        return list(tasks)
    wanted = set(batch_ids)
    return [t for t in tasks if t["batch_id"] in wanted]


# ----------------------------------------------------------------------------------------------------------- validate


def _digest(responses: dict[str, Any] | None) -> str | None:
    if responses is None:
        return None
    return content_id(sorted((str(k), v) for k, v in responses.items()))


def validation_frames(tasks: list[dict], batches: dict[str, dict]) -> dict[str, pd.DataFrame]:
    """The flat frames the import suites run on.

    - ``tasks``: ``task_id`` (``label-studio task <id>`` when the task has no ext_id), ``ls_id``, ``ext_id``,
      ``batch_id``, ``known_task_id`` (the task id when its batch is known, else null), ``responses_digest``,
      ``batch_digest`` (null for tasks outside the known batches);
    - ``annotations`` (not cancelled, of known tasks): ``task_id``, ``annotation_id``, ``n_rankings``, ``n_ranked``
      (null when there is no ranking), ``k`` (the task's K), ``has_ranking``;
    - ``items`` (one row per ranked position of the first ranking of each such annotation): ``task_id``,
      ``annotation_id``, ``position``, ``response_id``, ``key`` (``task_id/response_id``).
    """
    known = {t["task_id"]: t for b in batches.values() for t in b["tasks"]}
    task_rows, ann_rows, item_rows = [], [], []
    for task in tasks:
        name = task["task_id"] or f"label-studio task {task['ls_id']}"
        batch_task = known.get(task["task_id"]) if task["batch_id"] in batches else None
        task_rows.append({
            "task_id": name, "ls_id": task["ls_id"], "ext_id": task["task_id"], "batch_id": task["batch_id"],
            "known_task_id": task["task_id"] if task["batch_id"] in batches else None,
            "responses_digest": _digest(task["responses"]),
            "batch_digest": _digest({r["id"]: r["text"] for r in batch_task["responses"]}) if batch_task else None,
        })
        if batch_task is None:
            continue
        for annotation in task["annotations"]:
            if annotation["cancelled"]:
                continue
            ranking = annotation["rankings"][0] if annotation["rankings"] else []
            aid = str(annotation["annotation_id"])
            ann_rows.append({"task_id": name, "annotation_id": aid, "n_rankings": len(annotation["rankings"]),
                             "n_ranked": len(ranking) or None, "k": len(batch_task["responses"]),
                             "has_ranking": bool(ranking)})
            for position, rid in enumerate(ranking):
                item_rows.append({"task_id": name, "annotation_id": aid, "position": position,
                                  "response_id": str(rid), "key": f"{task['task_id']}/{rid}"})
    return {
        "tasks": pd.DataFrame(task_rows, columns=["task_id", "ls_id", "ext_id", "batch_id", "known_task_id",
                                                  "responses_digest", "batch_digest"]).astype(object),
        "annotations": pd.DataFrame(ann_rows, columns=["task_id", "annotation_id", "n_rankings", "n_ranked", "k",
                                                       "has_ranking"]).astype(object),
        "items": pd.DataFrame(item_rows, columns=["task_id", "annotation_id", "position", "response_id",
                                                  "key"]).astype(object),
    }


def _suites(batches: dict[str, dict]) -> dict[str, list]:
    """``frame -> [expectation]``, each carrying its rule in ``meta["rule"]`` (GX imported here, lazily)."""
    import great_expectations.expectations as gxe

    task_ids = sorted(t["task_id"] for b in batches.values() for t in b["tasks"])
    keys = sorted(f"{t['task_id']}/{r['id']}" for b in batches.values() for t in b["tasks"] for r in t["responses"])
    return {
        "tasks": [
            gxe.ExpectColumnValuesToNotBeNull(column="ext_id", meta={"rule": "missing_ext_id"}),
            gxe.ExpectColumnValuesToBeInSet(column="batch_id", value_set=sorted(batches),
                                            meta={"rule": "unknown_batch"}),
            gxe.ExpectColumnValuesToBeInSet(column="known_task_id", value_set=task_ids, meta={"rule": "unknown_task"}),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="responses_digest", column_B="batch_digest",
                                                ignore_row_if="either_value_is_missing",
                                                meta={"rule": "responses_changed"}),
        ],
        "annotations": [
            gxe.ExpectColumnValuesToBeInSet(column="has_ranking", value_set=[True], meta={"rule": "empty_annotation"}),
            gxe.ExpectColumnValuesToBeBetween(column="n_rankings", max_value=1, meta={"rule": "several_rankings"}),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="n_ranked", column_B="k", ignore_row_if="either_value_is_missing",
                                                meta={"rule": "incomplete_ranking"}),
        ],
        "items": [
            gxe.ExpectColumnValuesToBeInSet(column="key", value_set=keys, meta={"rule": "unknown_response_id"}),
            gxe.ExpectCompoundColumnsToBeUnique(column_list=["annotation_id", "response_id"],
                                                meta={"rule": "duplicate_response_id"}),
        ],
    }


_DETAILS = {
    "missing_ext_id": "the task carries no ext_id: it was not imported by `rlhf collect`",
    "unknown_batch": "its batch_id names no labeling batch here or in MLflow",
    "unknown_task": "its ext_id is not a task of its batch",
    "responses_changed": "its responses (ids or texts) differ from the labeling batch",
    "empty_annotation": "a submitted (not cancelled) annotation holds no ranking",
    "several_rankings": "an annotation holds more than one ranking",
    "incomplete_ranking": "a ranking does not rank every response of the task",
    "unknown_response_id": "a ranking names a response id the task does not have",
    "duplicate_response_id": "a ranking names the same response twice",
}


def validate_export(tasks: list[dict], batches: dict[str, dict], origin: str) -> dict:
    """Run the import suites (GX, one per frame of :func:`validation_frames`) and refuse the export whole on any
    failure.

    Args:
        tasks: :func:`parse_export` output (already narrowed to the batches being imported).
        batches: ``batch_id -> labeling batch`` for every batch that could be found.
        origin: the export's name in messages (file or Label Studio project).

    Returns:
        ``{"frame": {"rows", "expectations"}}`` for the frames that were checked.

    Raises:
        ImportRefused: listing each failed rule with the task ids that broke it.
    """
    import great_expectations as gx

    from rlhf_pipeline.tasks.validate import _context

    frames = validation_frames(tasks, batches)
    suites = _suites(batches)
    context = _context()
    datasource = context.data_sources.add_pandas("label-studio-export")
    failures, summary = [], {}
    for name, frame in frames.items():
        if frame.empty:
            continue
        suite = context.suites.add(gx.ExpectationSuite(name=f"import-{name}", expectations=suites[name]))
        batch = (datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
                 .get_batch(batch_parameters={"dataframe": frame}))
        result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                      "unexpected_index_column_names": ["task_id"],
                                                      "return_unexpected_index_query": False})
        summary[name] = {"rows": int(len(frame)), "expectations": len(result.results)}
        for item in result.results:
            if item.success:
                continue
            rule = item.expectation_config.meta["rule"]
            details = item.result or {}
            ids = [entry.get("task_id") if isinstance(entry, dict) else entry
                   for entry in details.get("unexpected_index_list") or []]
            if not ids:  # the expectation itself raised: name every task of the frame
                ids = list(frame["task_id"])
            failures.append({"rule": rule, "task_ids": sorted(set(map(str, ids))), "detail": _DETAILS[rule]})
    if failures:
        order = list(_DETAILS)
        raise ImportRefused(origin, sorted(failures, key=lambda f: order.index(f["rule"])))
    return summary


# ------------------------------------------------------------------------------------------------------------ convert


def borda(rankings: list[list[str]]) -> list[str]:
    """One order from several complete rankings of the same ids (best first): Borda count, ``K - 1 - position``
    points per ranking, highest total first, ties broken by the first ranking's order.

    >>> borda([["a", "b", "c"], ["b", "a", "c"], ["b", "c", "a"]])
    ['b', 'a', 'c']
    """
    first = rankings[0]
    k = len(first)
    points = {rid: 0 for rid in first}
    for ranking in rankings:
        for position, rid in enumerate(ranking):
            points[rid] += k - 1 - position
    return sorted(first, key=lambda rid: (-points[rid], first.index(rid)))


def pair_agreement(a: list[str], b: list[str]) -> float:
    """The fraction of the C(K, 2) response pairs that rankings ``a`` and ``b`` order alike (1 = same ranking)."""
    pos_a = {rid: i for i, rid in enumerate(a)}
    pos_b = {rid: i for i, rid in enumerate(b)}
    pairs = list(itertools.combinations(a, 2))
    same = sum(1 for x, y in pairs if (pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]))
    return same / len(pairs) if pairs else 1.0


def convert_rankings(tasks: list[dict], batches: dict[str, dict], source: str, imported_at: str) -> tuple[list[dict],
                                                                                                          dict]:
    """Validated export tasks → K-wise comparison rows (one per task that has its rankings), best first.

    The per-task shuffle is undone here: rankings name response ids, which map back to the batch's texts whatever
    order they were shown in.

    Args:
        tasks: :func:`parse_export` output that passed :func:`validate_export` against ``batches``.
        batches: ``batch_id -> labeling batch``.
        source: where the rankings came from (recorded in each row).
        imported_at: UTC time stamp recorded in each row.

    Returns:
        ``(rows, report)``. A row: ``{"id" (= task_id), "prompt" (messages), "responses" (texts, best first),
        "batch_id", "task_id", "response_ids" (best first), "display_order", "policy", "policy_version",
        "annotators", "rankings" (one per annotator, in annotation order), "aggregation" ("single" | "borda"),
        "agreement" (None for one annotator), "unchanged_display_order" (annotators whose ranking equals the order
        shown), "label_studio": {"tasks", "annotations"}, "source", "imported_at"}``. The report: ``{"tasks",
        "rows", "pending": [{"task_id", "rankings", "needed"}], "cancelled" (annotations set aside),
        "unchanged_display_order" (rows with one)}``.
    """
    known = {t["task_id"]: (b, t) for b in batches.values() for t in b["tasks"]}
    grouped: dict[str, list[dict]] = defaultdict(list)
    for task in tasks:  # a task imported twice into Label Studio: its annotations are pooled
        grouped[task["task_id"]].append(task)
    rows, pending, cancelled, unchanged = [], [], 0, 0
    for task_id, copies in grouped.items():
        batch, batch_task = known[task_id]
        annotations = sorted((a for t in copies for a in t["annotations"]), key=lambda a: _order_key(a))
        cancelled += sum(1 for a in annotations if a["cancelled"])
        done = [a for a in annotations if not a["cancelled"]]
        needed = int(batch.get("annotators_per_task", 1))
        if len(done) < needed:
            if done:
                pending.append({"task_id": task_id, "rankings": len(done), "needed": needed})
            continue
        rankings = [[str(rid) for rid in a["rankings"][0]] for a in done]
        order = rankings[0] if len(rankings) == 1 else borda(rankings)
        texts = {r["id"]: r["text"] for r in batch_task["responses"]}
        shown = list(batch_task["display_order"])
        annotators = [a["annotator"] for a in done]
        same_as_shown = [who for who, ranking in zip(annotators, rankings) if ranking == shown]
        unchanged += bool(same_as_shown)
        agreement = None
        if len(rankings) > 1:
            pairs = list(itertools.combinations(rankings, 2))
            agreement = sum(pair_agreement(a, b) for a, b in pairs) / len(pairs)
        rows.append({
            "id": task_id,
            "prompt": batch_task["prompt"],
            "responses": [texts[rid] for rid in order],
            "batch_id": batch["batch_id"],
            "task_id": task_id,
            "response_ids": order,
            "display_order": shown,
            "policy": batch["policy"].get("uri"),
            "policy_version": batch["policy"]["version"],
            "annotators": annotators,
            "rankings": rankings,
            "aggregation": "single" if len(rankings) == 1 else "borda",
            "agreement": agreement,
            "unchanged_display_order": same_as_shown,
            "label_studio": {"tasks": [t["ls_id"] for t in copies], "annotations": [a["annotation_id"] for a in done]},
            "source": source,
            "imported_at": imported_at,
        })
    return rows, {"tasks": len(grouped), "rows": len(rows), "pending": pending, "cancelled": cancelled,
                  "unchanged_display_order": unchanged}


def _order_key(annotation: dict) -> tuple:
    aid = annotation["annotation_id"]
    return (0, aid, "") if isinstance(aid, int) else (1, 0, str(aid))


# ------------------------------------------------------------------------------------------------------------- append


def read_feedback_rows(text: str, origin: str) -> list[dict]:
    """The rows of the feedback file (JSON lines; blank lines skipped).

    Raises:
        ValueError: naming ``origin`` and the line that is not a JSON object (the file is then left alone).
    """
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{origin}: row {number}: rule invalid_json: {exc.msg} at column {exc.colno}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{origin}: row {number}: rule not_an_object: expected a JSON object")
        rows.append(row)
    return rows


def feedback_jsonl(rows: list[dict]) -> str:
    """Rows as JSON lines (sorted keys, UTF-8 text kept), one per line."""
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def split_new_rows(existing: list[dict], rows: list[dict]) -> tuple[list[dict], list[str], list[str]]:
    """Which converted rows are new: ``(new rows, ids already imported alike, ids imported before with another
    ranking)``. The store is append-only: a task's first import stays."""
    before = {row.get("id"): row for row in existing}
    new, same, changed = [], [], []
    for row in rows:
        old = before.get(row["id"])
        if old is None:
            new.append(row)
            before[row["id"]] = row
        elif old.get("response_ids") == row["response_ids"]:
            same.append(row["id"])
        else:
            changed.append(row["id"])
    return new, same, changed


def batches_of_rows(rows: list[dict]) -> list[dict]:
    """The labeling batches that ``rows`` come from, in first-seen order: ``[{"batch_id", "rows",
    "policy_version"}]`` (rows without a batch id are left out)."""
    out: dict[str, dict] = {}
    for row in rows:
        batch = row.get("batch_id")
        if not batch:
            continue
        entry = out.setdefault(batch, {"batch_id": batch, "rows": 0, "policy_version": row.get("policy_version")})
        entry["rows"] += 1
    return list(out.values())
