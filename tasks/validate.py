"""The data gate: Great Expectations (GX 1.x) suites over the canonical datasets, run before any training.

One expectation suite per canonical dataset, run on a flat pandas frame derived from it (``prompt_text``,
``response`` / ``response_0..K-1``, token counts, ...) in an ephemeral GX context. Expectations:

- table: row count at least ``config.min_rows[dataset]`` (``ExpectTableRowCountToBeBetween``);
- rows: unique ``id``; non-empty prompt, prompt turns and responses (``ExpectColumnValueLengthsToBeBetween`` /
  ``ExpectColumnValuesToBeBetween`` on stripped texts); the prompt ends with a user turn; a known split; for comparisons
  at least two responses, all different (``ExpectSelectColumnValuesToBeUniqueWithinRecord``: chosen != rejected) and no
  duplicate comparison (``ExpectCompoundColumnsToBeUnique`` on prompt_text + response_0 + response_1);
- budgets: prompt tokens <= ``config.max_prompt_tokens`` and response tokens <= ``config.max_response_tokens``. Token
  counts come from ``count_tokens`` (e.g. the model's tokenizer) or, when it is None, from a ``ceil(len(text) / 4)``
  estimate (the report says which). Budgets are checked with ``mostly=0.99``: the trainers truncate to their own
  ``max_length``, so a few long rows (the real data has 3 comparisons and 2 demonstrations over the defaults by the
  estimate) are listed as warnings and kept; more than 1% over budget fails the gate (the budget or the data is wrong).

Decision (``run_validate``): malformed rows -- rows ingestion could not parse and rows failing a row-level
expectation -- are dropped with a report (which row, id, rule), because real collected data has a few (the HH-RLHF
harmless sample has 8 of 2,000: 0.4%), unless their fraction of a dataset exceeds ``config.max_invalid_fraction``
(default 2%), the policy is ``invalid_rows: fail``, or ``strict=True``; then :class:`ValidationFailed` stops the run.
Of duplicate rows the first (in source order) is kept. After dropping, the suites run again on the kept rows and must
pass; table-level failures (too few rows, budgets broken by more than 1% of rows) always fail.
Reports carry ids, source rows and rule names, never the rows' text (the comparison data is red-teaming text).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import pandas as pd
from pydantic import Field, model_validator

from rlhf_pipeline.tasks.datasets import DATASETS, data_version, frames_version, write_prepared
from rlhf_pipeline.tasks.formats import render_prompt_text
from rlhf_pipeline.tasks.ingest import IngestResult, ingest, prompts_from_comparisons
from rlhf_pipeline.tasks.stage import Section

logger = logging.getLogger(__name__)


#: names shown in reports, registry names and split names: letters, digits, '.', '_', '-' (no spaces, brackets, '/')
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class SourceConfig(Section):
    """One input data source.

    ``path`` is a local file (JSON, JSON lines, optionally gzip, Parquet, CSV); ``hf_dataset`` is the public dataset the
    same source resolves to when ``path`` is absent and a hub is reachable. ``format`` is detected from the rows when
    ``auto``. An ``optional`` source whose file does not exist yet adds no rows (the human-feedback comparisons before
    the first ``rlhf import-rankings``).
    """

    name: str = Field(pattern=NAME_PATTERN, description="shown in reports; letters, digits, '.', '_', '-'")
    path: str | None = Field(None, min_length=1)
    hf_dataset: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
    hf_config: str | None = Field(None, min_length=1)
    hf_split: str = Field("train", min_length=1)
    format: Literal["auto", "hh_rlhf", "prompt_chosen_rejected", "kwise", "messages", "alpaca", "seed_tasks"] = "auto"
    optional: bool = False


class DataConfig(Section):
    """Ingestion, splitting and validation of the canonical datasets."""

    comparisons: list[SourceConfig]
    demonstrations: list[SourceConfig]
    prepared_dir: str = Field("data/prepared", min_length=1)
    # Fractions of prompts per split; the split of a row is a hash of its prompt, so a prompt never crosses splits
    # and rows keep their split when new data arrives.
    splits: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {"train": 0.7, "validation": 0.1, "test": 0.2})
    split_seed: str = Field("rlhf-v1", min_length=1)
    invalid_rows: Literal["drop", "fail"] = "drop"
    max_invalid_fraction: float = Field(0.02, ge=0, le=1)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_response_tokens: int = Field(512, ge=1)
    min_rows: dict[Literal["demonstrations", "comparisons", "prompts"], Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {"demonstrations": 20, "comparisons": 50, "prompts": 20})

    @model_validator(mode="after")
    def _check_splits(self) -> DataConfig:
        total = sum(self.splits.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"data.splits must sum to 1, got {total}")
        for name in ("train", "test"):
            if not self.splits.get(name):
                raise ValueError(f"data.splits needs a non-empty '{name}' split")
        names = [s.name for s in self.comparisons + self.demonstrations]
        if len(set(names)) < len(names):
            raise ValueError(f"data: source names must be unique (rows are reported by source), got {names}")
        return self

#: Fraction of rows that must be within the token budgets (the rest are warnings, kept and truncated by the trainers).
BUDGET_MOSTLY = 0.99
ESTIMATE_NOTE = "estimated as ceil(len(text) / 4) characters per token (no tokenizer given)"
_INDEX_COLUMNS = ["id", "source", "source_row"]
#: the setting behind a bounded column (named in failure messages)
_SETTINGS = {"n_prompt_tokens": "data.max_prompt_tokens", "n_response_tokens": "data.max_response_tokens"}
_MAX_LISTED = 50


class ValidationFailed(RuntimeError):
    """The data gate failed. ``report`` (dict) holds the validation results and the failing / dropped rows; the message
    lists which rows (source, row number, id) failed which rule or expectation, never their text."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report if report is not None else {}


@dataclass
class ValidationReport:
    """Results of the suites.

    Attributes:
        success: every suite passed.
        datasets: ``name -> {"success", "evaluated" (expectations run), "rows", "failed": [failure...],
            "warnings": [failure...]}``; a failure is ``{"expectation" (GX class name), "column", "level" ("row" or
            "table"), "row_ids", "source_rows", "sources", "unexpected_count", "observed_value"}``. Warnings are
            soft (``mostly``) expectations that passed with some rows outside.
        token_counter: how token counts were obtained.
    """

    success: bool
    datasets: dict[str, dict] = field(default_factory=dict)
    token_counter: str = ESTIMATE_NOTE

    def to_dict(self) -> dict:
        """A JSON-serialisable copy."""
        return {"success": self.success, "token_counter": self.token_counter, "datasets": self.datasets}

    def format_failures(self) -> str:
        """Human-readable failures: dataset, expectation, column and the failing ids / source rows (no text)."""
        lines = []
        for name, result in self.datasets.items():
            for failure in result["failed"]:
                lines.append(f"{name}: {_describe(failure)}")
        return "\n".join(lines) if lines else "all expectations passed"


def _describe(failure: dict) -> str:
    column = failure.get("column")
    column = ", ".join(column) if isinstance(column, list) else column
    text = f"{failure['expectation']}" + (f" [{column}]" if column else "")
    if failure.get("level") == "table" and failure.get("observed_value") is not None:
        text += f": observed {failure['observed_value']}"
        if failure.get("expected"):
            text += f", expected {failure['expected']}"
    elif failure.get("expected"):  # a row-level bound, e.g. a token budget: say which and where it is set
        text += f" (expected {failure['expected']}"
        if failure.get("setting"):
            text += f", {failure['setting']}"
        if failure.get("mostly") is not None:
            text += f", for at least {failure['mostly']:.0%} of the rows"
        text += ")"
    if failure.get("exception"):
        text += f": error {failure['exception']}"
    rows = list(zip(failure.get("sources") or [], failure.get("source_rows") or [], failure.get("row_ids") or []))
    if rows:
        shown = ", ".join(f"{src} row {row} (id {rid})" if row is not None and row >= 0 else f"{src} (id {rid})"
                          for src, row, rid in rows[:_MAX_LISTED])
        more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
        text += f": {failure.get('unexpected_count', len(rows))} rows: {shown}{more}"
    return text


# --------------------------------------------------------------------------------------------------------- flat frame


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _as_list(value: Any) -> list:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    return list(value) if value is not None else []


def text_key(text: str) -> str:
    """What the suites see of a text: ``""`` for an empty text (so length checks still see it empty), else a 20-hex
    BLAKE2 digest (so uniqueness checks still compare texts). GX never holds the texts themselves: less memory and
    hashing on 100,000 rows, and the red-teaming text never reaches a validation result."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest() if text else ""


class TokenCounts:
    """Token counts of texts for the budget expectations, each distinct text counted once (the prompts of the
    comparisons would be counted again for the prompts dataset and in the second pass), in batches when
    ``count_tokens`` has a ``batch`` method (``texts -> counts``; a fast tokenizer encodes a batch in parallel).

    With ``within`` (the smallest token budget) and a counter that has an ``upper_bound(text)`` method (a byte-level
    tokenizer: at most one token per byte), a text whose bound is within every budget is not tokenized: its bound
    stands in for its count, which decides every budget expectation the same way (it passes)."""

    def __init__(self, count_tokens: Callable[[str], int] | None = None, batch_size: int = 2048,
                 within: int | None = None):
        self.count = count_tokens or _estimate_tokens
        self.batch = getattr(count_tokens, "batch", None)
        self.bound = getattr(count_tokens, "upper_bound", None) if within is not None else None
        self.within = within
        self.batch_size = batch_size
        self.known: dict[str, int] = {}  # text key -> count (or an upper bound within every budget)

    def __call__(self, texts: list[str], keys: list[str]) -> list[int]:
        todo: dict[str, str] = {}
        bounds: dict[str, int] = {}  # not kept: a bound is cheaper to recompute than to hold for 100,000 texts
        for text, key in zip(texts, keys):
            if key in self.known or key in bounds:
                continue
            if self.bound is not None:
                bound = self.bound(text)
                if bound <= self.within:
                    bounds[key] = bound
                    continue
            todo.setdefault(key, text)
        if todo:
            pending = list(todo.items())
            for i in range(0, len(pending), self.batch_size):
                chunk = pending[i:i + self.batch_size]
                if self.batch is not None:
                    counts = self.batch([text for _, text in chunk])
                else:
                    counts = [self.count(text) for _, text in chunk]
                for (key, _), n in zip(chunk, counts):
                    self.known[key] = int(n)
        return [bounds[key] if key in bounds else self.known[key] for key in keys]


def flat_frame(name: str, frame: pd.DataFrame, count_tokens: Callable[[str], int] | None = None,
               tokens: TokenCounts | None = None, chunk: int = 8192) -> pd.DataFrame:
    """The flat frame a suite runs on: ``id``, ``source``, ``source_row`` (``-1`` for prompts), ``split``,
    ``prompt_text`` (the :func:`text_key` of ``render_prompt_text``), ``n_turns``, ``min_turn_chars``,
    ``last_prompt_role``, ``n_prompt_tokens`` and, by dataset, ``response`` or ``n_responses`` + ``response_0..K-1``
    (text keys; ``None`` beyond a row's K), plus ``n_response_tokens`` (the longest response). Texts are stripped
    before they are keyed and counted; ``tokens`` shares counts between calls. Rows are processed ``chunk`` at a
    time, so the rendered texts of only one chunk are in memory."""
    tokens = tokens or TokenCounts(count_tokens)
    n = len(frame)
    data: dict[str, list] = {key: [] for key in ("prompt_text", "n_turns", "min_turn_chars", "last_prompt_role",
                                                   "n_prompt_tokens", "response", "n_response_tokens", "n_responses")}
    response_keys: list[list[str]] = []
    prompt_column = frame["prompt"].tolist()
    answers = (frame["response"].tolist() if name == "demonstrations" else
               frame["responses"].tolist() if name == "comparisons" else None)
    for lo in range(0, n, chunk):
        prompts = [_as_list(p) for p in prompt_column[lo:lo + chunk]]
        texts = [render_prompt_text([dict(m) for m in messages]).strip() for messages in prompts]
        keys = [text_key(t) for t in texts]
        data["prompt_text"] += keys
        data["n_turns"] += [len(m) for m in prompts]
        data["min_turn_chars"] += [min((len(str(m["content"]).strip()) for m in messages), default=0)
                                   for messages in prompts]
        data["last_prompt_role"] += [messages[-1]["role"] if messages else None for messages in prompts]
        data["n_prompt_tokens"] += tokens(texts, keys)
        if name == "demonstrations":
            texts = [str(r).strip() for r in answers[lo:lo + chunk]]
            keys = [text_key(t) for t in texts]
            data["response"] += keys
            data["n_response_tokens"] += tokens(texts, keys)
        elif name == "comparisons":
            ranked = [[str(r).strip() for r in _as_list(responses)] for responses in answers[lo:lo + chunk]]
            texts = [t for responses in ranked for t in responses]
            keys = [text_key(t) for t in texts]
            counts = iter(tokens(texts, keys))
            flat_keys = iter(keys)
            response_keys += [[next(flat_keys) for _ in responses] for responses in ranked]
            data["n_responses"] += [len(r) for r in ranked]
            data["n_response_tokens"] += [max((next(counts) for _ in responses), default=0) for responses in ranked]
    columns = ["id", "source", "source_row", "split", "prompt_text", "n_turns", "min_turn_chars", "last_prompt_role",
               "n_prompt_tokens"]
    out: dict[str, Any] = {
        "id": frame["id"].tolist(),
        "source": frame["source"].tolist(),
        "source_row": ([int(r) for r in frame["source_row"]] if "source_row" in frame else [-1] * n),
        "split": frame["split"].tolist(),
        **{key: data[key] for key in columns[4:]},
    }
    if name == "demonstrations":
        columns += ["response", "n_response_tokens"]
        out.update(response=data["response"], n_response_tokens=data["n_response_tokens"])
    elif name == "comparisons":
        k = max([2] + data["n_responses"])
        columns += ["n_responses"] + [f"response_{i}" for i in range(k)] + ["n_response_tokens"]
        out["n_responses"] = data["n_responses"]
        for i in range(k):
            out[f"response_{i}"] = [row[i] if i < len(row) else None for row in response_keys]
        out["n_response_tokens"] = data["n_response_tokens"]
    flat = pd.DataFrame(out, columns=columns)
    for column in columns:
        if column.startswith("response_") or column == "last_prompt_role":
            flat[column] = flat[column].astype(object)
    return flat


# ------------------------------------------------------------------------------------------------------------- suites


def _suite(name: str, flat: pd.DataFrame, config: DataConfig):
    """The expectation suite of one dataset (GX imported here, lazily)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=f"{name}-suite")
    add = suite.add_expectation
    add(gxe.ExpectTableRowCountToBeBetween(min_value=int(config.min_rows.get(name, 1))))
    add(gxe.ExpectColumnValuesToNotBeNull(column="id"))
    add(gxe.ExpectColumnValuesToBeUnique(column="id"))
    add(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(config.splits)))
    add(gxe.ExpectColumnValueLengthsToBeBetween(column="prompt_text", min_value=1))
    add(gxe.ExpectColumnValuesToBeBetween(column="min_turn_chars", min_value=1))
    add(gxe.ExpectColumnValuesToBeInSet(column="last_prompt_role", value_set=["user"]))
    add(gxe.ExpectColumnValuesToBeBetween(column="n_prompt_tokens", max_value=config.max_prompt_tokens,
                                          mostly=BUDGET_MOSTLY))
    if name == "prompts":
        add(gxe.ExpectColumnValuesToBeUnique(column="prompt_text"))
    elif name == "demonstrations":
        add(gxe.ExpectColumnValuesToNotBeNull(column="source_row"))
        add(gxe.ExpectColumnValueLengthsToBeBetween(column="response", min_value=1))
        add(gxe.ExpectColumnValuesToBeBetween(column="n_response_tokens", max_value=config.max_response_tokens,
                                              mostly=BUDGET_MOSTLY))
    elif name == "comparisons":
        k = sum(1 for c in flat.columns if c.startswith("response_"))
        add(gxe.ExpectColumnValuesToNotBeNull(column="source_row"))
        add(gxe.ExpectColumnValuesToBeBetween(column="n_responses", min_value=2))
        for i in range(k):
            add(gxe.ExpectColumnValueLengthsToBeBetween(column=f"response_{i}", min_value=1))
        # chosen != rejected; for K-wise rows every response differs (rows with fewer than j responses are skipped).
        for j in range(2, k + 1):
            add(gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord(
                column_list=[f"response_{i}" for i in range(j)],
                ignore_row_if="all_values_are_missing" if j == 2 else "any_value_is_missing"))
        add(gxe.ExpectCompoundColumnsToBeUnique(column_list=["prompt_text", "response_0", "response_1"]))
        add(gxe.ExpectColumnValuesToBeBetween(column="n_response_tokens", max_value=config.max_response_tokens,
                                              mostly=BUDGET_MOSTLY))
    return suite


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=project)


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, dict)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return value
    return value


def _failure(result) -> dict:
    config = result.expectation_config
    kwargs = config.kwargs
    details = result.result or {}
    indexed = details.get("unexpected_index_list") or []
    column = kwargs.get("column", kwargs.get("column_list"))
    entry: dict[str, Any] = {
        "expectation": _camel(config.type),
        "column": list(column) if isinstance(column, (list, tuple)) else column,
        "level": "row" if ("unexpected_count" in details or indexed) else "table",
        "mostly": kwargs.get("mostly"),
        "row_ids": [],
        "source_rows": [],
        "sources": [],
    }
    for item in indexed:  # dicts of the index columns (and the checked columns' values, which are dropped here)
        if isinstance(item, dict):
            entry["row_ids"].append(_plain(item.get("id")))
            entry["source_rows"].append(_plain(item.get("source_row")))
            entry["sources"].append(_plain(item.get("source")))
    bounds = {k: kwargs.get(k) for k in ("min_value", "max_value") if kwargs.get(k) is not None}
    entry["expected"] = " ".join(f"{k}={int(v) if isinstance(v, float) and v.is_integer() else v}"
                                 for k, v in bounds.items())
    if isinstance(entry["column"], str) and entry["column"] in _SETTINGS:
        entry["setting"] = _SETTINGS[entry["column"]]
    if entry["level"] == "row":
        entry["unexpected_count"] = int(details.get("unexpected_count", len(indexed)) or 0)
    else:
        entry["observed_value"] = _plain(details.get("observed_value"))
    if result.exception_info and result.exception_info.get("raised_exception"):
        entry["level"] = "table"
        entry["exception"] = str(result.exception_info.get("exception_message"))[:300]
    return entry


def validate_frames(
    frames: dict[str, pd.DataFrame],
    config: DataConfig,
    count_tokens: Callable[[str], int] | None = None,
    flats: dict[str, pd.DataFrame] | None = None,
) -> ValidationReport:
    """Run the GX suite of each canonical dataset in ``frames`` (any of demonstrations, comparisons, prompts).

    Args:
        frames: canonical frames (columns as in ``rlhf_pipeline.tasks.COLUMNS``).
        config: ``DataConfig`` (``min_rows``, ``max_prompt_tokens``, ``max_response_tokens``, ``splits``).
        count_tokens: text -> number of tokens; None estimates ``ceil(len / 4)`` (stated in the report).
        flats: their :func:`flat_frame` already computed (by dataset), used instead of computing them again.

    Returns:
        :class:`ValidationReport`; row-level failures name the failing rows by id, source and source row.
    """
    context = _context()
    datasource = context.data_sources.add_pandas("canonical")
    report = ValidationReport(success=True, token_counter="count_tokens" if count_tokens else ESTIMATE_NOTE)
    if count_tokens is None:
        logger.info("token counts %s", ESTIMATE_NOTE)
    tokens = TokenCounts(count_tokens)
    for name in DATASETS:
        if name not in frames:
            continue
        flat = (flats or {}).get(name)
        if flat is None:
            flat = flat_frame(name, frames[name], tokens=tokens)
        suite = context.suites.add(_suite(name, flat, config))
        batch_definition = datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        batch = batch_definition.get_batch(batch_parameters={"dataframe": flat})
        result = batch.validate(suite, result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": _INDEX_COLUMNS,
            "return_unexpected_index_query": False,
        })
        failed, warnings = [], []
        for item in result.results:
            entry = _failure(item)
            if not item.success:
                failed.append(entry)
            elif entry["level"] == "row" and entry.get("unexpected_count"):
                warnings.append(entry)
        report.datasets[name] = {"success": bool(result.success), "evaluated": len(result.results),
                                 "rows": int(len(flat)), "failed": failed, "warnings": warnings}
        report.success = report.success and bool(result.success)
    return report


# --------------------------------------------------------------------------------------------------------------- gate


_UNIQUE = re.compile(r"Unique")


def _rows_to_drop(name: str, flat: pd.DataFrame, failures: list[dict]) -> list[dict]:
    """Rows of one dataset that row-level failures name; of duplicates (uniqueness expectations) the first row in
    source order is kept. Returns ``[{"dataset", "source", "row", "id", "rule", "detail"}]`` in source order."""
    position = {(s, int(r)): i for i, (s, r) in enumerate(zip(flat["source"], flat["source_row"]))}
    drop: dict[int, dict] = {}
    # A row failing several expectations is reported once, under the first by name (deterministic).
    for failure in sorted(failures, key=lambda f: (f["expectation"], str(f["column"]))):
        if failure["level"] != "row" or failure.get("mostly") is not None:
            continue
        rows = sorted({position[(s, int(r))] for s, r in zip(failure["sources"], failure["source_rows"])
                       if (s, int(r)) in position})
        column = failure["column"]
        columns = column if isinstance(column, list) else [column]
        within_record = failure["expectation"] == "ExpectSelectColumnValuesToBeUniqueWithinRecord"
        if _UNIQUE.search(failure["expectation"]) and not within_record:
            seen = set()
            keep = set()
            for i in rows:
                key = tuple(flat.iloc[i][c] for c in columns)
                if key not in seen:
                    seen.add(key)
                    keep.add(i)
            rows = [i for i in rows if i not in keep]
            detail = f"duplicate of an earlier row ({', '.join(columns)})"
        else:
            detail = f"fails {failure['expectation']} on {', '.join(columns)}"
        for i in rows:
            drop.setdefault(i, {
                "dataset": name, "source": flat.iloc[i]["source"], "row": int(flat.iloc[i]["source_row"]),
                "id": flat.iloc[i]["id"], "rule": failure["expectation"], "detail": detail,
            })
    return [drop[i] for i in sorted(drop)]


def _row_order(row: dict) -> tuple:
    return (row["dataset"], str(row["source"]), row["row"] if isinstance(row["row"], int) else -1)


def _fail_message(reason: str, dropped: list[dict], report: ValidationReport | None) -> str:
    lines = [f"data validation failed: {reason}"]
    for row in dropped[:_MAX_LISTED]:
        lines.append(f"  {row['dataset']}: {row['source']} row {row['row']} (id {row['id']}): {row['rule']}"
                     + (f" - {row['detail']}" if row.get("detail") else ""))
    if len(dropped) > _MAX_LISTED:
        lines.append(f"  ... and {len(dropped) - _MAX_LISTED} more rows")
    if report is not None and not report.success:
        lines.append(report.format_failures())
    return "\n".join(lines)


def run_validate(
    config: DataConfig,
    count_tokens: Callable[[str], int] | None = None,
    prepared_dir: str | Path | None = None,
    strict: bool = False,
) -> dict:
    """The data gate used by ``rlhf validate`` and the pipeline: ingest, validate, drop or fail, re-validate, write.

    1. :func:`rlhf_pipeline.tasks.ingest.ingest` the configured sources; rows it could not parse are invalid.
    2. Run the demonstrations and comparisons suites; rows failing a row-level expectation are invalid too (of
       duplicates the first is kept; soft budget expectations drop nothing).
    3. Invalid rows are dropped with a report when ``config.invalid_rows == "drop"``, ``strict`` is False and they
       are at most ``config.max_invalid_fraction`` of their dataset's input rows; otherwise :class:`ValidationFailed`.
    4. The prompts are rebuilt from the kept comparisons and all three suites run again: they must pass (table-level
       failures such as too few rows always fail).
    5. With ``prepared_dir``, the datasets and ``report.json`` (with the dropped rows and the validation results) are
       written atomically by :func:`rlhf_pipeline.tasks.datasets.write_prepared`.

    Returns:
        ``{"version": 12-hex data version, "counts": {dataset: n_rows}, "dropped": [{"dataset", "source", "row", "id",
        "rule", "detail"}], "structure_warnings": [rows kept with an unusual dialogue structure, same shape; refused
        under ``strict`` / ``invalid_rows: fail``], "report_path": Path | None, "paths": {name: Path} (empty without
        prepared_dir), "validation": ValidationReport.to_dict()}``.

    Raises:
        ValidationFailed: as above; its message lists each failing row (source, row, id, rule) and failing
            expectation; ``.report`` holds the details.
        rlhf_pipeline.tasks.readers.DataError: a source cannot be read.
    """
    result = ingest(config)
    frames = dict(result.frames)
    dropped = [dict(row) for row in result.invalid]
    # every distinct text is counted once over both passes; short texts are not tokenized when a bound suffices
    tokens = TokenCounts(count_tokens, within=min(config.max_prompt_tokens, config.max_response_tokens))
    pair = ("demonstrations", "comparisons")
    flats = {name: flat_frame(name, frames[name], tokens=tokens) for name in pair}
    first = validate_frames({k: frames[k] for k in pair}, config, count_tokens, flats=flats)
    for name in pair:
        dropped += _rows_to_drop(name, flats[name], first.datasets[name]["failed"])

    input_rows = {name: len(frames[name]) + sum(1 for r in result.invalid if r["dataset"] == name)
                  for name in ("demonstrations", "comparisons")}
    fractions = {name: (sum(1 for r in dropped if r["dataset"] == name) / input_rows[name]) if input_rows[name] else 0.0
                 for name in input_rows}
    base_report = {"dropped": dropped, "invalid_fraction": fractions, "policy": config.invalid_rows,
                   "strict": strict, "max_invalid_fraction": config.max_invalid_fraction,
                   "first_pass": first.to_dict()}
    base_report["structure_warnings"] = result.warnings
    reason = None
    refused = dropped + result.warnings  # strict / "fail": unusual structure is refused too
    if refused and strict:
        reason = f"{len(refused)} invalid or unusual rows and strict mode allows none"
    elif refused and config.invalid_rows == "fail":
        reason = f"{len(refused)} invalid or unusual rows and data.invalid_rows is 'fail'"
    else:
        over = {n: f for n, f in fractions.items() if f > config.max_invalid_fraction}
        if over:
            reason = "; ".join(f"{n}: {f:.2%} of rows invalid > data.max_invalid_fraction "
                               f"{config.max_invalid_fraction:.2%}" for n, f in over.items())
    if reason:
        listed = refused if (strict or config.invalid_rows == "fail") else dropped
        raise ValidationFailed(_fail_message(reason, sorted(listed, key=_row_order), None), base_report)

    unchanged = []
    for name in pair:
        bad = {(r["source"], r["row"]) for r in dropped if r["dataset"] == name}
        if not any(r["dataset"] == name for r in dropped[len(result.invalid):]):
            unchanged.append(name)  # no row failed an expectation: the kept rows are the rows just validated
        frame = frames[name]
        keep = [(s, int(r)) not in bad for s, r in zip(frame["source"], frame["source_row"])]
        frames[name] = frame.loc[keep].reset_index(drop=True)
        flats[name] = flats[name].loc[keep].reset_index(drop=True)
    frames["prompts"] = prompts_from_comparisons(frames["comparisons"])
    flats["prompts"] = flat_frame("prompts", frames["prompts"], tokens=tokens)

    # the second pass: every suite on the kept rows (a suite whose rows did not change keeps its first-pass result)
    final = validate_frames({k: v for k, v in frames.items() if k not in unchanged}, config, count_tokens, flats=flats)
    for name in unchanged:
        final.datasets[name] = first.datasets[name]
        final.success = final.success and first.datasets[name]["success"]
    final.datasets = {name: final.datasets[name] for name in DATASETS if name in final.datasets}
    base_report["validation"] = final.to_dict()
    if not final.success:
        raise ValidationFailed(_fail_message("expectations failed on the kept rows", dropped, final), base_report)
    if dropped:
        logger.warning("dropped %d invalid rows (%s)", len(dropped),
                       ", ".join(f"{n} {f:.2%}" for n, f in fractions.items()))
    for row in dropped:
        logger.info("dropped %s %s row %s (id %s): %s", row["dataset"], row["source"], row["row"], row["id"],
                    row["rule"])
    for row in result.warnings:
        logger.warning("kept %s %s row %s (id %s) with unusual structure: %s (%s)", row["dataset"], row["source"],
                       row["row"], row["id"], row["rule"], row["detail"])

    del flats, tokens, first
    result.frames = {}
    gc.collect()  # the GX contexts and the flat frames, before the Parquet files need the memory
    paths: dict[str, Path] = {}
    report_path = None
    if prepared_dir is not None:
        kept = IngestResult(frames=frames, invalid=dropped, sources=result.sources)
        extra = {"dropped": dropped, "structure_warnings": result.warnings, "invalid_fraction": fractions,
                 "policy": config.invalid_rows, "validation": final.to_dict()}
        paths = write_prepared(kept, prepared_dir, extra=extra)
        report_path = paths["report"]
        version = data_version(prepared_dir)
    else:
        version = frames_version(frames)
    return {
        "version": version,
        "counts": {name: int(len(frames[name])) for name in DATASETS},
        "dropped": dropped,
        "structure_warnings": result.warnings,
        "report_path": report_path,
        "paths": paths,
        "validation": final.to_dict(),
    }
