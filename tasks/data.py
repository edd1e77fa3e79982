"""Ingestion: input files in many formats -> the three canonical datasets (see DESIGN.md, "Canonical data").

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

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from flows.config import DataConfig, SourceConfig

logger = logging.getLogger(__name__)

DATASETS = ("demonstrations", "comparisons", "prompts")
COMPARISON_FORMATS = ("hh_rlhf", "prompt_chosen_rejected", "kwise")
DEMONSTRATION_FORMATS = ("messages", "alpaca", "seed_tasks")
COLUMNS: dict[str, list[str]] = {
    "demonstrations": ["id", "prompt", "response", "split", "source", "source_row"],
    "comparisons": ["id", "prompt", "responses", "split", "source", "source_row"],
    "prompts": ["id", "prompt", "split", "source"],
}
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                 "model": "assistant", "system": "system"}
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}
_ASSISTANT_MARK = "\n\nAssistant:"


class DataError(ValueError):
    """An input file that cannot be read (missing, unknown format, not JSON, ...). The message names the file, the row
    (where one is at fault) and the rule that failed."""


class MalformedRow(ValueError):
    """One input row that cannot become a canonical row.

    Attributes:
        rule: short snake_case id of the failed rule (``empty_reply``, ``prompt_mismatch``, ``no_assistant_turn``,
            ``identical_responses``, ``not_a_string``, ``tied_ranks``, ...).
        detail: a description that never contains the row's text.
    """

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"{rule}: {detail}" if detail else rule)
        self.rule = rule
        self.detail = detail


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


# ----------------------------------------------------------------------------------------------------------- messages


def render_prompt_text(messages: list[dict]) -> str:
    """The canonical text of a message list: ``"<role>: <content>"`` per message joined by blank lines.

    Used for split hashing, ids, duplicate detection and token-length estimates; not a chat template. An empty list
    renders as ``""``.
    """
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


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


def parse_hh_dialogue(text: str) -> list[dict]:
    """Parse an HH-RLHF transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into chat messages.

    Returns ``[{"role": "user" | "assistant", "content": str}, ...]`` in order, contents stripped; turns are kept as
    written (two assistant turns in a row stay two messages). A ``Human:`` / ``Assistant:`` without the blank line
    before it is part of the content, as in the published data.

    Raises:
        MalformedRow: ``not_a_string`` when ``text`` is not a str; ``text_before_first_turn`` when non-blank text
            precedes the first turn marker; ``no_turns`` when there is no turn marker at all.
    """
    if not isinstance(text, str):
        raise MalformedRow("not_a_string", f"dialogue is {type(text).__name__}, expected str")
    parts = _HH_TURN.split(text)
    if len(parts) == 1:
        raise MalformedRow("no_turns", "no 'Human:' or 'Assistant:' turn marker")
    if parts[0].strip():
        raise MalformedRow("text_before_first_turn", f"{len(parts[0].strip())} characters before the first turn")
    return [{"role": _HH_ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _check_prompt(prompt: list[dict]) -> list[dict]:
    if not prompt:
        raise MalformedRow("empty_prompt", "no turn before the final reply")
    for i, message in enumerate(prompt, 1):
        if not message["content"]:
            raise MalformedRow("empty_turn", f"prompt turn {i} of {len(prompt)} ({message['role']}) is empty")
    return prompt


def _check_responses(responses: list[str], names: list[str] | None = None) -> list[str]:
    names = names or [f"response {i + 1}" for i in range(len(responses))]
    for name, response in zip(names, responses):
        if not isinstance(response, str):
            raise MalformedRow("not_a_string", f"{name} is {type(response).__name__}, expected str")
        if not response.strip():
            raise MalformedRow("empty_reply", f"{name} is empty")
    stripped = [r.strip() for r in responses]
    if len(set(stripped)) < len(stripped):
        raise MalformedRow("identical_responses", "two of the ranked responses are the same text")
    return stripped


def split_hh_comparison(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Split an HH-RLHF pair of transcripts into the shared prompt and the two final replies.

    The prompt is every turn before the final ``"\\n\\nAssistant:"``; it must be the same (turn by turn, after
    stripping) in both transcripts. Either argument may also be a message list (the last message is the reply).

    Returns:
        ``(prompt_messages, chosen_reply, rejected_reply)``, replies stripped.

    Raises:
        MalformedRow: ``not_a_string``, ``no_assistant_turn``, ``last_turn_not_assistant``, ``prompt_mismatch`` (the
            transcripts differ before their last reply), ``empty_prompt``, ``empty_turn``, ``empty_reply`` and
            ``identical_responses``.
    """
    prompts: list[list[dict]] = []
    replies: list[str] = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(text, list):
            messages = _normalize_messages(text, name)
            if not messages or messages[-1]["role"] != "assistant":
                raise MalformedRow("no_assistant_turn", f"{name} does not end with an assistant message")
            prompts.append(messages[:-1])
            replies.append(messages[-1]["content"])
            continue
        if not isinstance(text, str):
            raise MalformedRow("not_a_string", f"{name} is {type(text).__name__}, expected str")
        cut = text.rfind(_ASSISTANT_MARK)
        if cut < 0:
            if text.startswith("Assistant:"):
                cut, mark = 0, len("Assistant:")
            else:
                raise MalformedRow("no_assistant_turn", f"{name} has no '\\n\\nAssistant:' turn")
        else:
            mark = len(_ASSISTANT_MARK)
        reply = text[cut + mark:]
        if "\n\nHuman:" in reply:
            raise MalformedRow("last_turn_not_assistant", f"{name} ends with a human turn")
        prefix = text[:cut]
        prompts.append(parse_hh_dialogue(prefix) if prefix.strip() else [])
        replies.append(reply.strip())
    if prompts[0] != prompts[1]:
        a, b = prompts
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise MalformedRow(
            "prompt_mismatch",
            f"chosen and rejected differ before their final reply: prompt turns {len(a)} vs {len(b)}, "
            f"first difference at turn {first + 1}",
        )
    prompt = _check_prompt(prompts[0])
    chosen_reply, rejected_reply = _check_responses(replies, ["chosen reply", "rejected reply"])
    return prompt, chosen_reply, rejected_reply


def _normalize_messages(value: Any, name: str = "messages") -> list[dict]:
    if isinstance(value, tuple):
        value = list(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, list):
        raise MalformedRow("bad_messages", f"{name} is {type(value).__name__}, expected a list of messages")
    out = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict):
            raise MalformedRow("bad_messages", f"{name}[{i}] is {type(message).__name__}, expected an object")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = _ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if role is None:
            raise MalformedRow("bad_messages", f"{name}[{i}] has no known role ({', '.join(ROLES)})")
        if not isinstance(content, str):
            raise MalformedRow("not_a_string", f"{name}[{i}].content is {type(content).__name__}, expected str")
        out.append({"role": role, "content": content.strip()})
    return out


def _prompt_from_value(value: Any, name: str = "prompt") -> list[dict]:
    """A prompt given as a plain string, an HH transcript string or a message list -> messages."""
    if isinstance(value, str):
        if value.lstrip().startswith("Human:"):
            messages = parse_hh_dialogue(value)
            if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                messages = messages[:-1]  # "...\n\nAssistant:" with the reply left open
            return messages
        return [{"role": "user", "content": value.strip()}]
    if value is None:
        raise MalformedRow("missing_field", f"'{name}' is missing")
    return _normalize_messages(value, name)


def _response_from_value(value: Any, name: str) -> str:
    """A response given as a string, a message dict or a message list ending with the assistant's reply."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if value is None:
        raise MalformedRow("missing_field", f"'{name}' is missing")
    messages = _normalize_messages(value, name)
    if not messages or messages[-1]["role"] != "assistant":
        raise MalformedRow("no_assistant_turn", f"{name} does not end with an assistant message")
    return messages[-1]["content"]


# -------------------------------------------------------------------------------------------------------- row formats


def _require(row: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise MalformedRow("missing_field", f"missing {', '.join(repr(k) for k in missing)}")


def _comparison_hh(row: dict) -> tuple[list[dict], list[str]]:
    _require(row, "chosen", "rejected")
    prompt, chosen, rejected = split_hh_comparison(_listify(row["chosen"]), _listify(row["rejected"]))
    return prompt, [chosen, rejected]


def _comparison_pcr(row: dict) -> tuple[list[dict], list[str]]:
    _require(row, "prompt", "chosen", "rejected")
    prompt = _check_prompt(_prompt_from_value(_listify(row["prompt"])))
    responses = [_response_from_value(_listify(row[k]), k) for k in ("chosen", "rejected")]
    return prompt, _check_responses(responses, ["chosen", "rejected"])


def _comparison_kwise(row: dict) -> tuple[list[dict], list[str]]:
    _require(row, "prompt")
    prompt = _check_prompt(_prompt_from_value(_listify(row["prompt"])))
    if row.get("responses") is not None:
        responses = _listify(row["responses"])
        if not isinstance(responses, list):
            raise MalformedRow("bad_ranking", "'responses' is not a list")
    else:
        _require(row, "completions", "ranks")
        completions, ranks = _listify(row["completions"]), _listify(row["ranks"])
        if not isinstance(completions, list) or not isinstance(ranks, list):
            raise MalformedRow("bad_ranking", "'completions' and 'ranks' must be lists")
        if len(completions) != len(ranks):
            raise MalformedRow("ranks_mismatch", f"{len(completions)} completions but {len(ranks)} ranks")
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ranks):
            raise MalformedRow("bad_ranking", "ranks must be numbers (1 = best)")
        if len(set(ranks)) < len(ranks):
            raise MalformedRow("tied_ranks", f"ranks {sorted(ranks)} contain ties")
        responses = [c for _, c in sorted(zip(ranks, completions), key=lambda pair: pair[0])]
    if len(responses) < 2:
        raise MalformedRow("too_few_responses", f"{len(responses)} responses, need at least 2")
    responses = [_response_from_value(_listify(r), f"response {i + 1}") for i, r in enumerate(responses)]
    return prompt, _check_responses(responses)


def _demonstration_messages(row: dict) -> tuple[list[dict], str]:
    _require(row, "messages")
    messages = _normalize_messages(_listify(row["messages"]))
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise MalformedRow("no_assistant_turn", "no assistant message")
    prompt = _check_prompt(messages[:last])
    return prompt, _check_responses([messages[last]["content"]], ["assistant reply"])[0]


def _instruction_prompt(instruction: Any, extra: Any) -> list[dict]:
    if not isinstance(instruction, str):
        raise MalformedRow("not_a_string", f"instruction is {type(instruction).__name__}, expected str")
    if extra is not None and not isinstance(extra, str):
        raise MalformedRow("not_a_string", f"input is {type(extra).__name__}, expected str")
    text = instruction.strip()
    if extra and extra.strip():
        text = f"{text}\n\n{extra.strip()}"
    if not instruction.strip():
        raise MalformedRow("empty_prompt", "instruction is empty")
    return [{"role": "user", "content": text}]


def _demonstration_alpaca(row: dict) -> tuple[list[dict], str]:
    _require(row, "instruction", "output")
    prompt = _instruction_prompt(row["instruction"], row.get("input"))
    return prompt, _check_responses([row["output"]], ["output"])[0]


def _demonstration_seed(row: dict) -> tuple[list[dict], str]:
    _require(row, "instruction", "instances")
    instances = _listify(row["instances"])
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise MalformedRow("no_instance", "'instances' has no {input, output} object")
    first = instances[0]
    if first.get("output") is None:
        raise MalformedRow("missing_field", "instances[0] has no 'output'")
    prompt = _instruction_prompt(row["instruction"], first.get("input"))
    return prompt, _check_responses([first["output"]], ["instances[0].output"])[0]


_PARSERS = {
    "hh_rlhf": _comparison_hh,
    "prompt_chosen_rejected": _comparison_pcr,
    "kwise": _comparison_kwise,
    "messages": _demonstration_messages,
    "alpaca": _demonstration_alpaca,
    "seed_tasks": _demonstration_seed,
}


def _listify(value: Any) -> Any:
    """numpy arrays (Parquet / Arrow list columns read through pandas) -> python lists, recursively for dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    return value


def detect_format(row: Any) -> str:
    """The input format of a row from its keys (used for ``format: auto``; the first row decides for a file).

    Raises:
        MalformedRow: ``unknown_format`` when the keys match no supported format.
    """
    if not isinstance(row, dict):
        if isinstance(row, _BadRow):  # e.g. a line that is not JSON
            raise MalformedRow(row.rule, row.detail)
        raise MalformedRow("not_an_object", f"row is {type(row).__name__}, expected an object")
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "responses" in keys or {"completions", "ranks"} <= keys:
        return "kwise"
    if {"chosen", "rejected"} <= keys:
        return "prompt_chosen_rejected" if "prompt" in keys else "hh_rlhf"
    if {"instruction", "instances"} <= keys:
        return "seed_tasks"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    raise MalformedRow("unknown_format", f"keys {sorted(keys)} match no supported format")


# ------------------------------------------------------------------------------------------------------------ readers


@dataclass
class _BadRow:
    rule: str
    detail: str


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")  # tolerate a byte-order mark (exports from Windows tools)


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, _BadRow("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: row 1: rule invalid_json: not a JSON document ({exc.msg}, line {exc.lineno})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):
            data = lists[0]  # {"data": [{...}, ...]}
        else:
            data = [data]  # a single row
    if not isinstance(data, list):
        raise DataError(f"{path}: row 1: rule not_a_list: the JSON document must be a list of objects")
    yield from enumerate(data, 1)


def _decode_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{" and value.rstrip()[-1:] in "]}":
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, (list, dict)):
            return decoded
    return value


def _read_csv(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: row ?: rule invalid_csv: {type(exc).__name__}: {exc}") from exc
    for number, record in enumerate(frame.to_dict(orient="records"), 1):
        yield number, {k: _decode_cell(v) for k, v in record.items()}


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
        raise DataError(f"{path}: row ?: rule invalid_parquet: {exc}") from exc
    yield from enumerate(rows, 1)


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
            ".parquet": _read_parquet, ".pq": _read_parquet}


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """The rows of a local file as ``(row_number, row)``, numbers 1-based: the line for JSON lines, the element for a
    JSON list, the data row (header not counted) for CSV and Parquet.

    JSON lines (``.jsonl``, ``.ndjson``), JSON (a list of objects, ``{"<key>": [...]}`` or JSON lines named ``.json``),
    CSV (cells holding JSON lists/objects are decoded) and Parquet; ``.gz`` on the text formats. A line that is not
    JSON is yielded as an invalid row (rule ``invalid_json``), not raised.

    Raises:
        DataError: the file is missing, has an unknown extension or cannot be read in its format.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: row -: rule file_missing: no such file")
    suffix = _base_suffix(path)
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(f"{path}: row -: rule unknown_extension: {suffix or 'none'}; use .jsonl[.gz], .json[.gz], "
                        ".csv[.gz] or .parquet")
    try:
        yield from reader(path)
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # bad gzip stream, bad encoding
        raise DataError(f"{path}: row ?: rule unreadable: {type(exc).__name__}: {exc}") from exc


def _read_hub(source: "SourceConfig") -> Iterator[tuple[int, Any]]:
    """Rows of a Hugging Face dataset (lazy import of ``datasets``)."""
    local = source.path or "(no path configured)"
    try:
        import datasets  # noqa: PLC0415

        try:
            dataset = datasets.load_dataset(source.hf_dataset, source.hf_config, split=source.hf_split)
        except ValueError:
            if not source.hf_config:
                raise
            # Anthropic/hh-rlhf names its subsets by folder (data_dir), not by config name.
            dataset = datasets.load_dataset(source.hf_dataset, data_dir=source.hf_config, split=source.hf_split)
    except Exception as exc:  # offline: ConnectionError, OfflineModeIsEnabled, FileNotFoundError, ...
        raise DataError(
            f"source {source.name!r}: row -: rule source_unavailable: the local file {local} is missing and the hub "
            f"dataset {source.hf_dataset!r} could not be loaded (hub unreachable?): {type(exc).__name__}: {exc}"
        ) from exc
    for number, row in enumerate(dataset, 1):
        yield number, row


def _source_rows(source: "SourceConfig") -> tuple[str, Iterator[tuple[int, Any]]]:
    if source.path and Path(source.path).is_file():
        return str(source.path), read_rows(source.path)
    if source.hf_dataset:
        origin = f"hf://{source.hf_dataset}" + (f"/{source.hf_config}" if source.hf_config else "")
        return f"{origin}:{source.hf_split}", _read_hub(source)
    if source.path:
        raise DataError(f"{source.path}: row -: rule file_missing: no such file (source {source.name!r})")
    raise DataError(f"source {source.name!r}: row -: rule no_location: set 'path' or 'hf_dataset'")


# ------------------------------------------------------------------------------------------------------------- ingest


def _row_id(row: Any) -> str | None:
    if isinstance(row, dict) and isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool):
        return str(row["id"])
    return None


def _read_source(dataset: str, source: "SourceConfig", config: "DataConfig", records: list[dict],
                 invalid: list[dict]) -> dict:
    allowed = COMPARISON_FORMATS if dataset == "comparisons" else DEMONSTRATION_FORMATS
    origin, rows = _source_rows(source)
    fmt = None if source.format == "auto" else source.format
    if fmt is not None and fmt not in allowed:
        raise DataError(f"{origin}: row -: rule wrong_format: format {fmt!r} gives no {dataset}; "
                        f"use one of {', '.join(allowed)}")
    count = 0
    for number, row in rows:
        count += 1
        if isinstance(row, _BadRow):
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
            prompt, answer = _PARSERS[fmt](row)
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


def frame_from_records(name: str, records: Iterable[dict]) -> pd.DataFrame:
    """A canonical frame (exact column order of ``COLUMNS[name]``) from dict records; ``source_row`` as int64."""
    frame = pd.DataFrame(list(records), columns=COLUMNS[name])
    if "source_row" in frame:
        frame["source_row"] = frame["source_row"].astype("int64")
    for column in frame.columns:
        if column in ("prompt", "responses"):
            frame[column] = frame[column].astype(object)
    return frame.reset_index(drop=True)


def prompts_from_comparisons(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The ``prompts`` dataset: the unique prompts of ``comparisons`` in first-seen order, each with its (shared)
    split and the source where it was first seen; ``id`` = content id of ``{"prompt": messages}``."""
    seen: dict[str, dict] = {}
    for prompt, split, source in zip(comparisons["prompt"], comparisons["split"], comparisons["source"]):
        prompt = _listify(prompt)
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


# ------------------------------------------------------------------------------------------------------------ storage

_REPORT = "report.json"


def _arrow_schema(name: str):
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = {
        "id": pa.string(),
        "prompt": pa.list_(message),
        "response": pa.string(),
        "responses": pa.list_(pa.string()),
        "split": pa.string(),
        "source": pa.string(),
        "source_row": pa.int64(),
    }
    return pa.schema([(column, fields[column]) for column in COLUMNS[name]])


def _frame_rows(name: str, frame: pd.DataFrame) -> list[dict]:
    rows = []
    for record in frame[COLUMNS[name]].to_dict(orient="records"):
        record["prompt"] = [{"role": m["role"], "content": m["content"]} for m in _listify(record["prompt"])]
        if "responses" in record:
            record["responses"] = [str(r) for r in _listify(record["responses"])]
        if "source_row" in record:
            record["source_row"] = int(record["source_row"])
        rows.append(record)
    return rows


def parquet_bytes(name: str, frame: pd.DataFrame) -> bytes:
    """The Parquet file of a canonical frame as bytes: fixed Arrow schema (messages as ``list<struct<role,content>>``),
    no pandas metadata, so identical data gives identical bytes (for the same pyarrow version)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(_frame_rows(name, frame), schema=_arrow_schema(name))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _version_of(blobs: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for filename in sorted(blobs):
        digest.update(filename.encode("utf-8"))
        digest.update(b"\0")
        digest.update(hashlib.sha256(blobs[filename]).digest())
    return digest.hexdigest()[:12]


def frames_version(frames: dict[str, pd.DataFrame]) -> str:
    """The data version that :func:`write_prepared` + :func:`data_version` would give these frames, without writing."""
    return _version_of({f"{name}.parquet": parquet_bytes(name, frames[name]) for name in DATASETS})


def _counts(frames: dict[str, pd.DataFrame]) -> dict[str, dict]:
    out = {}
    for name in DATASETS:
        frame = frames[name]
        splits = frame["split"].value_counts().to_dict() if len(frame) else {}
        out[name] = {"total": int(len(frame)), "splits": {str(k): int(v) for k, v in sorted(splits.items())}}
    return out


def write_prepared(result: IngestResult, prepared_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write the canonical datasets as ``demonstrations.parquet``, ``comparisons.parquet``, ``prompts.parquet`` and
    ``report.json`` (counts per dataset and split, the data version, the sources, the invalid / dropped rows) into
    ``prepared_dir``.

    Atomic: everything is written into a temporary folder beside ``prepared_dir`` which then replaces it by rename; on
    any failure the temporary folder is removed and an existing ``prepared_dir`` is left as it was.

    Args:
        result: the datasets (``result.invalid`` is written to the report as ``invalid``).
        prepared_dir: target folder (created; its parent too).
        extra: more JSON-serialisable keys for ``report.json`` (e.g. the validation summary).

    Returns:
        ``{"demonstrations", "comparisons", "prompts", "report"} -> Path`` of the final files.
    """
    target = Path(prepared_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    backup: Path | None = None
    try:
        blobs = {f"{name}.parquet": parquet_bytes(name, result.frames[name]) for name in DATASETS}
        for filename, blob in blobs.items():
            (staging / filename).write_bytes(blob)
        report = {
            "data_version": _version_of(blobs),
            "counts": _counts(result.frames),
            "sources": result.sources,
            "invalid": result.invalid,
        }
        report.update(extra or {})
        (staging / _REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, backup / target.name)
        try:
            os.rename(staging, target)
        except BaseException:
            if backup is not None:
                os.rename(backup / target.name, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    paths = {name: target / f"{name}.parquet" for name in DATASETS}
    paths["report"] = target / _REPORT
    return paths


def data_version(prepared_dir: str | Path) -> str:
    """12 hex chars: sha256 over the three Parquet files sorted by name (each file's name and the sha256 of its bytes).

    Identical data gives the identical version; this is the data version in MLflow inputs, cache keys and registry
    tags.

    Raises:
        FileNotFoundError: a Parquet file is missing (run ``rlhf prepare``).
    """
    folder = Path(prepared_dir)
    blobs = {}
    for name in DATASETS:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `rlhf prepare` first")
        blobs[path.name] = path.read_bytes()
    return _version_of(blobs)


def load_prepared(prepared_dir: str | Path, name: str, split: str | None = None) -> pd.DataFrame:
    """Read one prepared dataset back: ``prompt`` as a python list of ``{"role", "content"}`` dicts, ``responses`` as
    a python list of str, columns in canonical order; only the rows of ``split`` when given (source order kept).

    Raises:
        ValueError: ``name`` is not one of demonstrations, comparisons, prompts.
        FileNotFoundError: the file is missing (the message says to run ``rlhf prepare``).
    """
    import pyarrow.parquet as pq

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    path = Path(prepared_dir) / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `rlhf prepare` to ingest and validate the data first")
    frame = frame_from_records(name, pq.read_table(path).to_pylist())
    if split is not None:
        frame = frame[frame["split"] == split].reset_index(drop=True)
    return frame
