"""Ingestion: input files in many formats -> the three canonical datasets (:mod:`rlhf_pipeline.tasks.datasets`).

Canonical datasets (each a pandas frame, stored as Parquet):

- ``demonstrations``: ``id``, ``prompt`` (list of ``{"role", "content"}`` messages), ``response`` (str), ``split``,
  ``source``, ``source_row`` -- supervised fine-tuning data (InstructGPT §3.5 "SFT").
- ``comparisons``: ``id``, ``prompt`` (messages), ``responses`` (list of str ranked best first, K >= 2), ``split``,
  ``source``, ``source_row`` -- reward-model data (InstructGPT §3.5 "RM"; K = 4..9 in the paper, K = 2 in HH-RLHF).
- ``prompts``: ``id``, ``prompt``, ``split``, ``source`` -- the unique prompts of the comparisons (PPO and evaluation).

Accepted inputs: HH-RLHF transcripts (``chosen``/``rejected`` dialogues, Bai et al. 2022), ``prompt``/``chosen``/
``rejected`` as strings or message lists, K-wise rankings (``responses`` best first, or ``completions`` + ``ranks`` with
rank 1 = best), OpenAI-style ``messages``, Alpaca ``instruction``/``input``/``output`` and the Alpaca / Self-Instruct
seed-task format; JSON, JSON lines (optionally gzip), Parquet and CSV files, or a Hugging Face dataset when a hub is
reachable.

Decisions:

- A row that cannot become a canonical row raises :class:`MalformedRow` with a short snake_case ``rule``; ``ingest``
  collects those rows in ``IngestResult.invalid`` (dataset, source, 1-based row number, id, rule, detail) and never
  stores or prints the row's text (the HH-RLHF data is red-teaming text). Whether to drop them or stop is the
  validation gate's policy (``tasks.validate``). A file that cannot be read at all raises :class:`DataError`.
- Each row's ``split`` is a hash of ``(split_seed, canonical prompt text)`` mapped onto the cumulative ``config.splits``
  fractions (in the order they are configured): the same prompt always lands in the same split, in every dataset, and
  a row keeps its split when other rows are added or removed.
- ``id`` is the first 16 hex chars of the sha256 of the row's canonical content (prompt messages + responses), so
  identical rows get identical ids and the gate can find duplicates.
- Transcript turns are kept as written: the few HH-RLHF dialogues with two assistant turns in a row keep both turns.
- The data version is a content hash of the three Parquet files (written deterministically, without pandas metadata).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rlhf_pipeline.tasks.datasets import frame_from_records
from rlhf_pipeline.tasks.formats import (
    COMPARISON_FORMATS,
    DEMONSTRATION_FORMATS,
    PARSERS,
    BadRow,
    MalformedRow,
    detect_format,
    listify,
    render_prompt_text,
)
from rlhf_pipeline.tasks.readers import DataError, source_rows

if TYPE_CHECKING:  # pragma: no cover
    from rlhf_pipeline.tasks.validate import DataConfig, SourceConfig

logger = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What :func:`ingest` produced.

    Attributes:
        frames: ``{"demonstrations", "comparisons", "prompts"} -> DataFrame`` with the canonical columns.
        invalid: one dict per row that could not be parsed: ``{"dataset", "source", "row", "id", "rule", "detail"}``
            (``row`` is the 1-based line / row number in the source file; never the row's text).
        sources: one dict per source read: ``{"dataset", "name", "origin", "format", "rows"}``.
    """

    frames: dict[str, pd.DataFrame]
    invalid: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)



def _canonical_json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def content_id(payload: Any) -> str:
    """16 hex chars of the sha256 of ``payload`` serialised as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()[:16]


def assign_split(prompt_text: str, splits: dict[str, float], seed: str) -> str:
    """The split of a prompt: ``sha256(seed + "\\x1f" + prompt_text)`` as a number in [0, 1) mapped onto the
    cumulative ``splits`` fractions (in their given order). Deterministic; independent of every other row."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt_text}".encode("utf-8")).hexdigest()
    u = int(digest[:15], 16) / float(16**15)
    cumulative = 0.0
    names = list(splits)
    for name in names:
        cumulative += splits[name]
        if u < cumulative:
            return name
    return names[-1]


def _row_id(row: Any) -> str | None:
    if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool):
        return str(row["id"])
    return None


def _read_source(dataset: str, source: "SourceConfig", config: "DataConfig", records: list[dict],
                 invalid: list[dict]) -> dict:
    allowed = COMPARISON_FORMATS if dataset == "comparisons" else DEMONSTRATION_FORMATS
    if source.optional and source.path and not Path(source.path).exists():
        return {"dataset": dataset, "name": source.name, "origin": f"{source.path} (optional, absent)",
                "format": source.format, "rows": 0}
    origin, rows = source_rows(source)
    fmt = None if source.format == "auto" else source.format
    if fmt is not None and fmt not in allowed:
        raise DataError(f"{origin}: row -: rule wrong_format: format {fmt!r} gives no {dataset}; "
                        f"use one of {', '.join(allowed)}")
    count = 0
    for number, row in rows:
        count += 1
        if isinstance(row, BadRow):
            invalid.append({"dataset": dataset, "source": source.name, "row": number, "id": None,
                            "rule": row.rule, "detail": row.detail})
            continue
        if fmt is None:
            try:
                fmt = detect_format(row)
            except MalformedRow as exc:
                raise DataError(f"{origin}: row {number}: rule {exc.rule}: {exc.detail}") from exc
            if fmt not in allowed:
                raise DataError(f"{origin}: row {number}: rule wrong_format: detected format {fmt!r} gives no "
                                f"{dataset}; expected one of {', '.join(allowed)}")
        try:
            if not isinstance(row, dict):
                raise MalformedRow("not_an_object", f"row is {type(row).__name__}, expected an object")
            prompt, answer = PARSERS[fmt](row)
        except MalformedRow as exc:
            invalid.append({"dataset": dataset, "source": source.name, "row": number, "id": _row_id(row),
                            "rule": exc.rule, "detail": exc.detail})
            continue
        prompt_text = render_prompt_text(prompt)
        record: dict[str, Any] = {"prompt": prompt}
        if dataset == "comparisons":
            record["responses"] = answer
            record["id"] = content_id({"prompt": prompt, "responses": answer})
        else:
            record["response"] = answer
            record["id"] = content_id({"prompt": prompt, "response": answer})
        record["split"] = assign_split(prompt_text, config.splits, config.split_seed)
        record["source"] = source.name
        record["source_row"] = int(number)
        records.append(record)
    return {"dataset": dataset, "name": source.name, "origin": origin, "format": fmt, "rows": count}


def prompts_from_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The ``prompts`` dataset: the unique prompts of ``comparisons`` in first-seen order, each with its (shared)
    split and the source where it was first seen; ``id`` = content id of ``{"prompt": messages}``."""
    seen: dict[str, dict] = {}
    for prompt, split, source in zip(comparisons["prompt"], comparisons["split"], comparisons["source"]):
        prompt = listify(prompt)
        pid = content_id({"prompt": prompt})
        if pid not in seen:
            seen[pid] = {"id": pid, "prompt": prompt, "split": split, "source": source}
    return frame_from_records("prompts", seen.values())


def ingest(config: "DataConfig") -> IngestResult:
    """Read every configured source into the canonical datasets.

    Sources are read in configuration order and rows kept in source order. Rows that cannot be parsed go to
    ``IngestResult.invalid`` (rule + detail, never text); nothing is dropped silently.

    Args:
        config: the ``data`` section (``flows.config.DataConfig``).

    Returns:
        :class:`IngestResult` with ``frames["demonstrations" | "comparisons" | "prompts"]``.

    Raises:
        DataError: a source file is missing (and no hub is reachable), unreadable, or holds the wrong format.
    """
    invalid: list[dict] = []
    sources: list[dict] = []
    frames: dict[str, pd.DataFrame] = {}
    for dataset, configured in (("demonstrations", config.demonstrations), ("comparisons", config.comparisons)):
        records: list[dict] = []
        for source in configured:
            sources.append(_read_source(dataset, source, config, records, invalid))
        frames[dataset] = frame_from_records(dataset, records)
    frames["prompts"] = prompts_from_comparisons(frames["comparisons"])
    for item in sources:
        bad = sum(1 for row in invalid if row["dataset"] == item["dataset"] and row["source"] == item["name"])
        logger.info("read %s rows of %s from %s (%s format): %s invalid", item["rows"], item["dataset"],
                    item["origin"], item["format"], bad)
    return IngestResult(frames=frames, invalid=invalid, sources=sources)
