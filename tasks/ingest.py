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
- Transcript turns are kept as written: the few HH-RLHF dialogues with two assistant turns in a row keep both turns,
  and are listed in ``IngestResult.warnings`` (``repeated_role``; also ``starts_with_assistant``), never silently.
- A file's format (``format: auto``) is that of its first row that decodes and matches a format
  (:func:`detect_file_format`); a later row of another format that does not parse as the file's is an invalid row with
  the rule ``mixed_format`` naming the row where the second format starts.
- The data version is a content hash of the three Parquet files (written deterministically, without pandas metadata).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd

from rlhf_pipeline.tasks.datasets import COLUMNS, frame_from_columns
from rlhf_pipeline.tasks.formats import (
    COMPARISON_FORMATS,
    DEMONSTRATION_FORMATS,
    PARSERS,
    BadRow,
    MalformedRow,
    detect_format,
    listify,
    render_prompt_text,
    structure_warnings,
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
        sources: one dict per source read: ``{"dataset", "name", "format", "rows"}`` plus ``{"file", "sha256",
            "bytes"}`` for a local file (its name and content hash, never its absolute path: the same data gives the same
            report on every machine) or ``{"origin"}`` for a hub dataset.
        warnings: rows kept whose dialogue structure is unusual (:func:`rlhf_pipeline.tasks.formats.structure_warnings`:
            ``starts_with_assistant``, ``repeated_role``), in the shape of ``invalid``; the gate refuses them under
            ``--strict`` / ``data.invalid_rows: fail``.
    """

    frames: dict[str, pd.DataFrame]
    invalid: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)



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


def _format_of(row: Any) -> str | None:
    """The format a row's keys match, or ``None`` (not an object, or no known format)."""
    try:
        return detect_format(row)
    except MalformedRow:
        return None


def detect_file_format(rows: Iterable[tuple[int, Any]], origin: str) -> tuple[str, int]:
    """The format of a file: that of its first row that decodes and whose keys match a format (rows before it are
    invalid rows, reported as such by :func:`ingest`). ``rlhf validate --data`` and ingestion decide the same way.

    Returns:
        ``(format, row number it was detected from)``.

    Raises:
        DataError: no row matches a supported format (the message names the first row and its rule).
    """
    first_problem = None
    for number, row in rows:
        fmt = _format_of(row)
        if fmt is not None:
            return fmt, number
        if first_problem is None:
            try:
                detect_format(row)
            except MalformedRow as exc:
                first_problem = f"row {number}: rule {exc.rule}: {exc.detail}"
    raise DataError(f"{origin}: {first_problem or 'row -: rule no_rows: no rows'}"
                    + ("; no row matches a supported format" if first_problem else ""))


def _file_digest(path: str) -> dict:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"file": Path(path).name, "sha256": digest.hexdigest(), "bytes": size}


def _read_source(dataset: str, source: "SourceConfig", config: "DataConfig", records: dict[str, list],
                 invalid: list[dict], warnings: list[dict]) -> dict:
    allowed = COMPARISON_FORMATS if dataset == "comparisons" else DEMONSTRATION_FORMATS
    if source.optional and source.path and not Path(source.path).exists():
        return {"dataset": dataset, "name": source.name, "origin": f"{source.path} (optional, absent)",
                "format": source.format, "rows": 0}
    origin, rows = source_rows(source)
    fmt = None if source.format == "auto" else source.format
    if fmt is not None and fmt not in allowed:
        raise DataError(f"{origin}: row -: rule wrong_format: format {fmt!r} gives no {dataset}; "
                        f"use one of {', '.join(allowed)}")
    fmt_row = None if fmt is None else 0  # the row the format was detected from (0: configured)
    second_format: dict[str, int] = {}  # another format -> the first row with its keys
    pending: list[dict] = []  # rows before the format is known that match none
    first_invalid = len(invalid)
    count = 0

    def bad(number: int, row: Any, rule: str, detail: str) -> dict:
        return {"dataset": dataset, "source": source.name, "row": number, "id": _row_id(row), "rule": rule,
                "detail": detail}

    for number, row in rows:
        count += 1
        if isinstance(row, BadRow):
            invalid.append(bad(number, None, row.rule, row.detail))
            continue
        detected = _format_of(row)
        if fmt is None:
            if detected is None:
                try:
                    detect_format(row)
                except MalformedRow as exc:
                    pending.append(bad(number, row, exc.rule, exc.detail))
                continue
            if detected not in allowed:
                raise DataError(f"{origin}: row {number}: rule wrong_format: detected format {detected!r} gives no "
                                f"{dataset}; expected one of {', '.join(allowed)}")
            fmt, fmt_row = detected, number
        try:
            if not isinstance(row, dict):
                raise MalformedRow("not_an_object", f"row is {type(row).__name__}, expected an object")
            prompt, answer = PARSERS[fmt](row)
        except MalformedRow as exc:
            if detected is not None and detected != fmt:  # the real cause: a row of another format
                first = second_format.setdefault(detected, number)
                where = f"row {fmt_row}" if fmt_row else "the configuration"
                invalid.append(bad(number, row, "mixed_format",
                                   f"the keys of format {detected!r} in a {fmt!r} file ({fmt!r} from {where}); "
                                   f"the second format starts at row {first}"))
            else:
                invalid.append(bad(number, row, exc.rule, exc.detail))
            continue
        for rule, detail in structure_warnings(prompt):
            warnings.append(bad(number, row, rule, detail))
        prompt_text = render_prompt_text(prompt)
        answer_key = "responses" if dataset == "comparisons" else "response"
        records["prompt"].append(prompt)
        records[answer_key].append(answer)
        records["id"].append(content_id({"prompt": prompt, answer_key: answer}))
        records["split"].append(assign_split(prompt_text, config.splits, config.split_seed))
        records["source"].append(source.name)
        records["source_row"].append(int(number))
    if fmt is None and pending:
        first = pending[0]
        raise DataError(f"{origin}: row {first['row']}: rule {first['rule']}: {first['detail']}; no row matches a "
                        "supported format")
    invalid[first_invalid:] = sorted(invalid[first_invalid:] + pending, key=lambda r: r["row"])
    entry = {"dataset": dataset, "name": source.name, "format": fmt, "rows": count}
    # where the rows came from, the same on every machine (report.json is part of the data version's DVC output):
    # a local file by name and content hash, never its absolute path; a hub dataset by its id
    if source.path and Path(source.path).is_file():
        entry.update(_file_digest(source.path))
    else:
        entry["origin"] = origin
    return entry


def prompts_from_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The ``prompts`` dataset: the unique prompts of ``comparisons`` in first-seen order, each with its (shared)
    split and the source where it was first seen; ``id`` = content id of ``{"prompt": messages}``."""
    seen: set[str] = set()
    columns: dict[str, list] = {name: [] for name in COLUMNS["prompts"]}
    for prompt, split, source in zip(comparisons["prompt"], comparisons["split"], comparisons["source"]):
        if not isinstance(prompt, list):  # numpy arrays read back from Parquet; ingested prompts are lists already
            prompt = listify(prompt)
        pid = content_id({"prompt": prompt})
        if pid not in seen:
            seen.add(pid)
            for name, value in (("id", pid), ("prompt", prompt), ("split", split), ("source", source)):
                columns[name].append(value)
    return frame_from_columns("prompts", columns)


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
    warnings: list[dict] = []
    sources: list[dict] = []
    frames: dict[str, pd.DataFrame] = {}
    for dataset, configured in (("demonstrations", config.demonstrations), ("comparisons", config.comparisons)):
        records: dict[str, list] = {name: [] for name in COLUMNS[dataset]}  # one list per column, no dict per row
        for source in configured:
            sources.append(_read_source(dataset, source, config, records, invalid, warnings))
        frames[dataset] = frame_from_columns(dataset, records)
        del records
    frames["prompts"] = prompts_from_comparisons(frames["comparisons"])
    for item in sources:
        bad = sum(1 for row in invalid if row["dataset"] == item["dataset"] and row["source"] == item["name"])
        logger.info("read %s rows of %s from %s (%s format): %s invalid", item["rows"], item["dataset"],
                    item.get("file", item.get("origin")), item["format"], bad)
    return IngestResult(frames=frames, invalid=invalid, sources=sources, warnings=warnings)
