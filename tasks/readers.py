"""Reading input files and datasets into numbered rows: JSON lines (``.jsonl``, ``.ndjson``), JSON, CSV and Parquet
(``.gz`` on the text formats), or a Hugging Face dataset when a hub is reachable. Row numbers are 1-based (the line of
a JSON-lines file, the row of a CSV or Parquet file, the element of a JSON list)."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd

from rlhf_pipeline.tasks.formats import BadRow

if TYPE_CHECKING:  # pragma: no cover
    from rlhf_pipeline.tasks.validate import SourceConfig


class DataError(ValueError):
    """An input file that cannot be read (missing, unknown format, not JSON, ...). The message names the file, the row
    (where one is at fault) and the rule that failed."""



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
                yield number, BadRow("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})")


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


def source_rows(source: "SourceConfig") -> tuple[str, Iterator[tuple[int, Any]]]:
    if source.path and Path(source.path).is_file():
        return str(source.path), read_rows(source.path)
    if source.hf_dataset:
        origin = f"hf://{source.hf_dataset}" + (f"/{source.hf_config}" if source.hf_config else "")
        return f"{origin}:{source.hf_split}", _read_hub(source)
    if source.path:
        raise DataError(f"{source.path}: row -: rule file_missing: no such file (source {source.name!r})")
    raise DataError(f"source {source.name!r}: row -: rule no_location: set 'path' or 'hf_dataset'")
