"""Reading input files and datasets into numbered rows: JSON lines (``.jsonl``, ``.ndjson``), JSON, CSV and Parquet
(``.gz`` on the text formats), or a Hugging Face dataset when a hub is reachable. Row numbers are 1-based (the line of
a JSON-lines file, the row of a CSV or Parquet file, the element of a JSON list), the same for every entry point; a
row that cannot be decoded is an invalid row under its number, and ``row -`` names a problem of the whole file."""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd

from rlhf_pipeline.tasks.formats import BadRow

if TYPE_CHECKING:  # pragma: no cover
    from rlhf_pipeline.tasks.validate import SourceConfig


class DataError(ValueError):
    """An input file that cannot be read (missing, unknown format, not JSON, ...). The message names the file, the row
    (where one is at fault) and the rule that failed."""



def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _encoding_problem(raw: bytes, exc: UnicodeDecodeError) -> BadRow:
    return BadRow("invalid_encoding", f"not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the row)")


def _has_undecodable(value: Any) -> bool:
    """Whether a value decoded with ``surrogateescape`` holds bytes that were not UTF-8 (lone surrogates)."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


_UNDECODABLE = BadRow("invalid_encoding", "holds bytes that are not UTF-8")


def _unreadable(path: Path, row: int | str, exc: BaseException, read: int) -> DataError:
    """A file that stops being readable part-way (a truncated or corrupt gzip stream): the source fails as a whole."""
    reason = {EOFError: "the compressed stream ends early (truncated file)"}.get(type(exc), f"{type(exc).__name__}: {exc}")
    so_far = f"; {read} rows were read before it" if read else ""
    return DataError(f"{path}: row {row}: rule unreadable: {reason}{so_far}")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """JSON lines, read as bytes and decoded line by line, so a line that is not UTF-8 or not JSON is an invalid row
    under its own line number (the rest of the file is read)."""
    number = 0
    with _open_binary(path) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as exc:  # truncated / corrupt gzip: the rows after it are lost
                raise _unreadable(path, number + 1, exc, number) from exc
            number += 1
            if number == 1 and raw.startswith(codecs.BOM_UTF8):  # exports from Windows tools
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, _encoding_problem(raw, exc)
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, BadRow("invalid_json", f"not valid JSON ({exc.msg} at column {exc.colno})")


def _read_bytes(path: Path) -> bytes:
    try:
        with _open_binary(path) as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise _unreadable(path, "-", exc, 0) from exc


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON document (a list of objects, ``{"<key>": [...]}`` or one object); JSON lines named ``.json`` are read as
    JSON lines. Bytes that are not UTF-8 make the element holding them an invalid row (``invalid_encoding``)."""
    text = _read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}: row -: rule invalid_json: not a JSON document ({exc.msg}, line {exc.lineno})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and len(lists) == 1 and all(isinstance(v, dict) for v in lists[0]):
            data = lists[0]  # {"data": [{...}, ...]}
        else:
            data = [data]  # a single row
    if not isinstance(data, list):
        raise DataError(f"{path}: row -: rule not_a_list: the JSON document must be a list of objects")
    for number, row in enumerate(data, 1):
        yield number, _UNDECODABLE if _has_undecodable(row) else row


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
    """CSV with a header; numbers are data rows (the header is not counted). Cells holding JSON lists / objects are
    decoded; a row with bytes that are not UTF-8 is an invalid row."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            encoding_errors="surrogateescape")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: row -: rule invalid_csv: {type(exc).__name__}: {exc}") from exc
    except (OSError, EOFError, zlib.error) as exc:
        raise _unreadable(path, "-", exc, 0) from exc
    for number, record in enumerate(frame.to_dict(orient="records"), 1):
        if _has_undecodable(record):
            yield number, _UNDECODABLE
            continue
        yield number, {k: _decode_cell(v) for k, v in record.items()}


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Parquet, streamed in record batches (rows numbered from 1 in file order)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
        raise DataError(f"{path}: row -: rule invalid_parquet: {exc}") from exc
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except Exception as exc:
        raise DataError(f"{path}: row {number + 1}: rule invalid_parquet: {exc}") from exc


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
            ".parquet": _read_parquet, ".pq": _read_parquet}


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """The rows of a local file as ``(row_number, row)``, streamed.

    One numbering for every entry point (``rlhf prepare``, ``rlhf validate``, the pipeline), 1-based: the line for
    JSON lines, the element for a JSON list, the data row (header not counted) for CSV and Parquet. A row that cannot
    be decoded (a line that is not JSON, bytes that are not UTF-8) is yielded as a :class:`BadRow` under its own number
    (rules ``invalid_json``, ``invalid_encoding``) and the rest of the file is read; the gate then drops or refuses it
    like any other malformed row.

    JSON lines (``.jsonl``, ``.ndjson``), JSON (a list of objects, ``{"<key>": [...]}`` or JSON lines named ``.json``),
    CSV (cells holding JSON lists/objects are decoded) and Parquet; ``.gz`` on the text formats.

    Raises:
        DataError: the file is missing, has an unknown extension or cannot be read as a whole (a truncated gzip stream:
            the message names the first row that could not be read); ``row -`` when no row is at fault.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: row -: rule file_missing: no such file")
    suffix = _base_suffix(path)
    reader = _READERS.get(suffix)
    if reader is None:
        raise DataError(f"{path}: row -: rule unknown_extension: {suffix or 'none'}; use .jsonl[.gz], .json[.gz], "
                        ".csv[.gz] or .parquet")
    yield from reader(path)


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
    """Where a source's rows come from (its local file, else its hub dataset) and the rows, numbered as
    :func:`read_rows` numbers them.

    Raises:
        DataError: neither the file nor a hub dataset is there (``file_missing``, ``no_location``).
    """
    if source.path and Path(source.path).is_file():
        return str(source.path), read_rows(source.path)
    if source.hf_dataset:
        origin = f"hf://{source.hf_dataset}" + (f"/{source.hf_config}" if source.hf_config else "")
        return f"{origin}:{source.hf_split}", _read_hub(source)
    if source.path:
        raise DataError(f"{source.path}: row -: rule file_missing: no such file (source {source.name!r})")
    raise DataError(f"source {source.name!r}: row -: rule no_location: set 'path' or 'hf_dataset'")
