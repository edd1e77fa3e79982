"""Step 2 of InstructGPT's loop, the part before the labelers: "the SFT model is prompted and several outputs are
saved, creating a dataset of a prompt x and K outputs y; a labeler ranks the responses from best to worst" (Ouyang et
al. 2022, §3.5 "RM" and App. B; K = 4..9 in the paper). This module samples K responses per prompt from a policy and
builds the **labeling batch** that Label Studio shows; :mod:`rlhf_pipeline.tasks.feedback` turns the rankings that
come back into K-wise comparisons.

A labeling batch (JSON, ``FORMAT``) holds the policy it came from, the sampling settings, and per task: a stable
``task_id``, the prompt (chat messages), the K responses in the order they were sampled, each with a stable ``id``, and
the ``display_order`` shown to labelers. Decisions:

- **Stable ids.** ``batch_id`` is a content hash of what determines the batch (policy version, prompt ids, sampling
  settings, seed), so collecting again with the same inputs names the same batch (``rlhf collect`` then reuses the
  batch file instead of sampling again). ``task_id`` is ``<batch_id>-<8 hex of the prompt id>``; a response ``id`` is
  8 hex of the hash of its task id and text. Ids never reveal the sampling order.
- **Exact duplicates are sampled again.** Responses are compared after stripping whitespace (the K-wise format
  rejects identical and empty responses); a duplicate or empty response is dropped and the prompt is sampled again,
  for at most ``max_resample_rounds`` extra rounds. A prompt that still has fewer than K distinct responses is left
  out of the batch and listed under ``skipped`` with how many it got.
- **Per-task shuffle.** Each task shows its responses in its own random order (seeded by the batch and task ids), never
  the sampling order, so a labeler who submits without moving anything does not hand back the order the model
  produced. The order is recorded (``display_order``) and undone on import: rankings name response ids, and the
  importer maps ids back to texts (:func:`rlhf_pipeline.tasks.feedback.convert_rankings`).
- What Label Studio receives (:func:`label_studio_tasks`) carries the prompt, the responses and the ids, never the
  policy's name or version (labelers rank blind).
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterable

from pydantic import Field

from rlhf_pipeline.tasks.formats import (
    PARSERS,
    BadRow,
    MalformedRow,
    _check_prompt,
    _prompt_from_value,
    detect_format,
    listify,
)
from rlhf_pipeline.tasks.ingest import content_id
from rlhf_pipeline.tasks.readers import DataError
from rlhf_pipeline.tasks.stage import Section

FORMAT = "rlhf-labeling-batch/1"
#: the fields of :class:`CollectConfig` that decide what is sampled (they enter the batch id)
SAMPLING_FIELDS = ("k", "max_prompt_tokens", "max_new_tokens", "temperature", "top_p", "max_resample_rounds")


class CollectConfig(Section):
    """The ``collect`` section: sampling K responses per prompt for labelers (``rlhf collect``) and where their
    rankings go (``rlhf import-rankings``)."""

    k: int = Field(4, ge=4, le=9)  # responses per prompt; InstructGPT used K = 4..9
    num_prompts: int = Field(16, ge=1)  # prompts per batch (drawn with ``seed`` when more are available)
    split: str = "train"  # prepared prompts to draw from when no prompts file is given (see the README)
    policy: str = "champion"  # `champion` of registry.policy_name, a models:/ URI, a run's output folder or a model folder
    max_prompt_tokens: int = Field(256, ge=8)  # prompts are cut from the left (the latest turns are kept)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1)  # sequences per generate call
    max_resample_rounds: int = Field(4, ge=0)  # extra rounds for prompts with duplicate or empty responses
    seed: int = 0  # draws the prompts and the samples; another seed gives another batch
    annotators_per_task: int = Field(1, ge=1)  # rankings a task needs before it is imported (Label Studio's overlap)
    feedback_source: str = "human-feedback"  # the data.comparisons source the rankings are appended to
    batches_dir: str = "data/feedback/batches"  # labeling batch files, relative to the project
    label_studio_project: str = "rlhf-ranking"  # the Label Studio project (created on first use, then reused)


# ------------------------------------------------------------------------------------------------------------ prompts


def prompt_of_row(row: Any) -> list[dict]:
    """The prompt (chat messages ending with a user turn) of a row in any input format the pipeline accepts, or of a
    row holding only ``prompt`` (a string, an HH transcript or a message list).

    Raises:
        MalformedRow: the row's rule (``unknown_format``, ``empty_prompt``, ``last_turn_not_user``, ...).
    """
    if isinstance(row, BadRow):
        raise MalformedRow(row.rule, row.detail)
    if not isinstance(row, dict):
        raise MalformedRow("not_an_object", f"row is {type(row).__name__}, expected an object")
    try:
        fmt = detect_format(row)
    except MalformedRow:
        if row.get("prompt") is None:
            raise
        fmt = None
    if fmt is None:
        prompt = _check_prompt(_prompt_from_value(listify(row["prompt"])))
    else:
        prompt, _ = PARSERS[fmt](row)
    if prompt[-1]["role"] != "user":
        raise MalformedRow("last_turn_not_user", f"the prompt ends with a {prompt[-1]['role']} turn")
    return prompt


def read_prompts(rows: Iterable[tuple[int, Any]], origin: str) -> list[dict]:
    """The distinct prompts of numbered rows (first occurrence kept, in file order).

    Returns:
        ``[{"prompt_id" (content id of the messages), "prompt" (messages), "row" (1-based)}]``.

    Raises:
        DataError: naming ``origin``, the row numbers and rules of the rows that hold no usable prompt (nothing is
            sampled from a file with bad rows), or when there is no row at all.
    """
    out: dict[str, dict] = {}
    bad: list[str] = []
    for number, row in rows:
        try:
            prompt = prompt_of_row(row)
        except MalformedRow as exc:
            bad.append(f"row {number}: rule {exc.rule}" + (f" ({exc.detail})" if exc.detail else ""))
            continue
        pid = content_id({"prompt": prompt})
        out.setdefault(pid, {"prompt_id": pid, "prompt": prompt, "row": int(number)})
    if bad:
        shown = "; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{origin}: {len(bad)} rows hold no usable prompt: {shown}")
    if not out:
        raise DataError(f"{origin}: row -: rule no_rows: no prompts")
    return list(out.values())


def choose_prompts(prompts: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` of ``prompts`` drawn with ``seed`` (all when there are no more), kept in their original order."""
    if len(prompts) <= n:
        return list(prompts)
    picked = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in picked]


# ----------------------------------------------------------------------------------------------------------- sampling


def sample_texts(model, tokenizer, prompts: list[list[dict]], counts: list[int], cfg: CollectConfig) -> list[list[str]]:
    """``counts[i]`` responses to ``prompts[i]`` sampled from ``model`` (its chat template; ``cfg``'s temperature,
    top-p, prompt and response lengths; ``cfg.batch_size`` sequences per ``generate`` call, prompts left-padded).

    Returns:
        one list of decoded texts (special tokens removed, not stripped) per prompt.
    """
    from rlhf_pipeline.models.policy import sample_responses
    from rlhf_pipeline.models.tokens import batched, chat_prompt_ids

    queries = {i: chat_prompt_ids(tokenizer, prompts[i], cfg.max_prompt_tokens) for i, c in enumerate(counts) if c}
    flat = [i for i, c in enumerate(counts) for _ in range(c)]
    out: list[list[str]] = [[] for _ in prompts]
    for chunk in batched(flat, cfg.batch_size):
        rollout = sample_responses(model, tokenizer, [queries[i] for i in chunk], cfg.max_new_tokens,
                                   cfg.temperature, 0, cfg.top_p)
        for i, text in zip(chunk, tokenizer.batch_decode(rollout.responses, skip_special_tokens=True)):
            out[i].append(text)
    return out


def batch_id_of(policy_version: str, prompt_ids: list[str], cfg: CollectConfig, seed: int) -> str:
    """``b`` + 12 hex of the hash of what decides a batch: policy version, prompt ids, sampling settings, seed."""
    sampling = {name: getattr(cfg, name) for name in SAMPLING_FIELDS}
    return "b" + content_id({"policy": policy_version, "prompts": prompt_ids, "sampling": sampling,
                             "seed": seed})[:12]


def response_id(task_id: str, text: str) -> str:
    """8 hex of the hash of a response's task id and text: stable, and silent about the sampling order."""
    return content_id({"task": task_id, "text": text})[:8]


def display_order(batch_id: str, task_id: str, ids: list[str]) -> list[str]:
    """The order a task shows its responses in: a shuffle seeded by the batch and task ids, never equal to ``ids``
    (the sampling order) when there are two or more (a shuffle that happens to equal it is rotated by one)."""
    order = list(ids)
    random.Random(f"{batch_id}/{task_id}").shuffle(order)
    if len(order) > 1 and order == list(ids):
        order = order[1:] + order[:1]
    return order


def build_batch(
    prompts: list[dict],
    generate: Callable[[list[int]], list[list[str]]],
    cfg: CollectConfig,
    policy: dict,
    prompts_origin: dict | None = None,
) -> dict:
    """Sample K distinct responses per prompt and lay out the labeling batch (see the module docstring).

    Args:
        prompts: ``[{"prompt_id", "prompt" (messages), ...}]`` (:func:`read_prompts`, prepared prompts).
        generate: ``counts -> texts``: ``counts[i]`` new samples for prompt ``i`` (0: none), one list per prompt
            (:func:`sample_texts` with a model bound).
        cfg: the ``collect`` section (``k``, ``max_resample_rounds``, ``seed``, ``annotators_per_task`` and the
            sampling settings recorded in the batch).
        policy: where the responses come from; must hold ``version`` (a string: ``rlhf-policy/3``, a run's SFT
            folder...), recorded in the batch and in its id.
        prompts_origin: where the prompts came from (recorded as is).

    Returns:
        the batch: ``{"format", "batch_id", "created_at", "policy", "sampling", "annotators_per_task", "prompts",
        "tasks": [{"task_id", "prompt_id", "prompt", "responses": [{"id", "text"}] (sampling order),
        "display_order": [ids], "drawn", "duplicates", "empty"}], "skipped": [{"prompt_id", "rule", "distinct",
        "drawn"}]}``. Texts are stripped.

    Raises:
        ValueError: when ``prompts`` is empty or a prompt id repeats.
    """
    if not prompts:
        raise ValueError("no prompts to sample from")
    ids = [p["prompt_id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids repeat; give distinct prompts (read_prompts drops repeats)")
    k = cfg.k
    batch_id = batch_id_of(policy["version"], ids, cfg, cfg.seed)
    distinct: list[list[str]] = [[] for _ in prompts]
    drawn = [0] * len(prompts)
    duplicates = [0] * len(prompts)
    empty = [0] * len(prompts)
    counts = [k] * len(prompts)
    for _ in range(1 + cfg.max_resample_rounds):
        if not any(counts):
            break
        new = generate(counts)
        for i, texts in enumerate(new):
            for text in texts[: counts[i]]:
                drawn[i] += 1
                text = text.strip()
                if not text:
                    empty[i] += 1
                elif text in distinct[i]:
                    duplicates[i] += 1
                elif len(distinct[i]) < k:
                    distinct[i].append(text)
        counts = [k - len(d) for d in distinct]
    tasks, skipped = [], []
    for i, prompt in enumerate(prompts):
        if len(distinct[i]) < k:
            skipped.append({"prompt_id": prompt["prompt_id"], "rule": "too_few_distinct_responses",
                            "distinct": len(distinct[i]), "drawn": drawn[i]})
            continue
        task_id = f"{batch_id}-{prompt['prompt_id'][:8]}"
        responses = [{"id": response_id(task_id, text), "text": text} for text in distinct[i]]
        if len({r["id"] for r in responses}) < k:  # a 32-bit clash within one task: fall back to longer ids
            responses = [{"id": content_id({"task": task_id, "text": r["text"]}), "text": r["text"]}
                         for r in responses]
        tasks.append({
            "task_id": task_id,
            "prompt_id": prompt["prompt_id"],
            "prompt": prompt["prompt"],
            "responses": responses,
            "display_order": display_order(batch_id, task_id, [r["id"] for r in responses]),
            "drawn": drawn[i],
            "duplicates": duplicates[i],
            "empty": empty[i],
        })
    return {
        "format": FORMAT,
        "batch_id": batch_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "policy": policy,
        "sampling": {**{name: getattr(cfg, name) for name in SAMPLING_FIELDS}, "seed": cfg.seed,
                     "batch_size": cfg.batch_size},
        "annotators_per_task": cfg.annotators_per_task,
        "prompts": prompts_origin or {},
        "tasks": tasks,
        "skipped": skipped,
    }


def batch_figures(batch: dict) -> dict[str, float]:
    """Counts of a batch for MLflow: ``tasks``, ``skipped_prompts``, ``k``, ``drawn`` (all samples),
    ``duplicates_dropped``, ``empty_dropped``."""
    tasks = batch["tasks"]
    return {"tasks": float(len(tasks)), "skipped_prompts": float(len(batch["skipped"])),
            "k": float(batch["sampling"]["k"]),
            "drawn": float(sum(t["drawn"] for t in tasks) + sum(s["drawn"] for s in batch["skipped"])),
            "duplicates_dropped": float(sum(t["duplicates"] for t in tasks)),
            "empty_dropped": float(sum(t["empty"] for t in tasks))}


# ------------------------------------------------------------------------------------------------------ Label Studio


_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def display_prompt(messages: list[dict]) -> str:
    """The prompt as a labeler reads it: the text of a single user turn, else ``"User: ...\\n\\nAssistant: ..."``."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}" for m in messages)


def label_studio_tasks(batch: dict) -> list[dict]:
    """The batch as Label Studio tasks for the ranking configuration (``<List name="responses" value="$responses"/>``
    + ``<Ranker name="rank" toName="responses"/>``): ``{"data": {"ext_id", "batch_id", "prompt", "responses":
    [{"id", "title", "body"}] in display order}, "meta": {"ext_id", "batch_id"}}``; titles are ``Response A``,
    ``Response B``... by display position. No policy name or version (labelers rank blind)."""
    out = []
    for task in batch["tasks"]:
        texts = {r["id"]: r["text"] for r in task["responses"]}
        responses = [{"id": rid, "title": f"Response {chr(ord('A') + n)}", "body": texts[rid]}
                     for n, rid in enumerate(task["display_order"])]
        out.append({"data": {"ext_id": task["task_id"], "batch_id": batch["batch_id"],
                             "prompt": display_prompt(task["prompt"]), "responses": responses},
                    "meta": {"ext_id": task["task_id"], "batch_id": batch["batch_id"]}})
    return out

