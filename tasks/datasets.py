"""The canonical datasets on disk and their version: Parquet files with a fixed Arrow schema, ``report.json``, and
the data version (a content hash of the three Parquet files).

- ``demonstrations``: ``id``, ``prompt`` (list of ``{"role", "content"}`` messages), ``response`` (str), ``split``,
  ``source``, ``source_row`` -- supervised fine-tuning data (InstructGPT §3.5 "SFT").
- ``comparisons``: ``id``, ``prompt`` (messages), ``responses`` (list of str ranked best first, K >= 2), ``split``,
  ``source``, ``source_row`` -- reward-model data (InstructGPT §3.5 "RM"; K = 4..9 in the paper, K = 2 in HH-RLHF).
- ``prompts``: ``id``, ``prompt``, ``split``, ``source`` -- the unique prompts of the comparisons (PPO and evaluation).

The Parquet files are written deterministically (no pandas metadata), so identical data gives identical bytes and the
same data version.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from rlhf_pipeline.tasks.formats import listify

if TYPE_CHECKING:  # pragma: no cover
    from rlhf_pipeline.tasks.ingest import IngestResult

DATASETS = ("demonstrations", "comparisons", "prompts")
COLUMNS: dict[str, list[str]] = {
    "demonstrations": ["id", "prompt", "response", "split", "source", "source_row"],
    "comparisons": ["id", "prompt", "responses", "split", "source", "source_row"],
    "prompts": ["id", "prompt", "split", "source"],
}


def frame_from_columns(name: str, columns: dict[str, list]) -> pd.DataFrame:
    """A canonical frame from one list per column (no dict per row: the lighter way for 100,000 rows)."""
    frame = pd.DataFrame({column: pd.Series(columns[column], dtype=object) for column in COLUMNS[name]},
                         columns=COLUMNS[name])
    if "source_row" in frame:
        frame["source_row"] = frame["source_row"].astype("int64")
    for column in ("id", "split", "source", "response"):
        if column in frame and len(frame) == 0:
            frame[column] = frame[column].astype(object)
    return frame


def frame_from_records(name: str, records: Iterable[dict]) -> pd.DataFrame:
    """A canonical frame (exact column order of ``COLUMNS[name]``) from dict records; ``source_row`` as int64."""
    frame = pd.DataFrame(list(records), columns=COLUMNS[name])
    if "source_row" in frame:
        frame["source_row"] = frame["source_row"].astype("int64")
    for column in frame.columns:
        if column in ("prompt", "responses"):
            frame[column] = frame[column].astype(object)
    return frame.reset_index(drop=True)



_REPORT = "report.json"


def _new_dir(prefix: str, parent: Path) -> Path:
    """A fresh temporary folder in ``parent`` with the permissions of a plain ``mkdir`` (``mkdtemp`` makes it private,
    and it becomes a published folder by rename)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    return folder


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
        record["prompt"] = [{"role": m["role"], "content": m["content"]} for m in listify(record["prompt"])]
        if "responses" in record:
            record["responses"] = [str(r) for r in listify(record["responses"])]
        if "source_row" in record:
            record["source_row"] = int(record["source_row"])
        rows.append(record)
    return rows


def _arrow_table(name: str, frame: pd.DataFrame):
    """The canonical frame as an Arrow table, column by column (fast on 100,000 rows); rows the columnar conversion
    cannot take (numpy arrays read back from Parquet) go through :func:`_frame_rows`. Both give the same table."""
    import pyarrow as pa

    schema = _arrow_schema(name)
    try:
        arrays = []
        for column in COLUMNS[name]:
            # lists of {"role", "content"} dicts and lists of str convert as they are (no copy per row)
            arrays.append(pa.array(frame[column].tolist(), type=schema.field(column).type))
        return pa.Table.from_arrays(arrays, schema=schema)
    except (TypeError, KeyError, pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.Table.from_pylist(_frame_rows(name, frame), schema=schema)


def parquet_bytes(name: str, frame: pd.DataFrame) -> bytes:
    """The Parquet file of a canonical frame as bytes: fixed Arrow schema (messages as ``list<struct<role,content>>``),
    no pandas metadata, so identical data gives identical bytes (for the same pyarrow version)."""
    import pyarrow.parquet as pq

    table = _arrow_table(name, frame)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_parquet(name: str, frame: pd.DataFrame, path: Path) -> bytes:
    """Write :func:`parquet_bytes` of a canonical frame straight into ``path`` (no copy of the file in memory).

    Returns:
        the sha256 digest of the file's bytes.
    """
    import pyarrow.parquet as pq

    pq.write_table(_arrow_table(name, frame), str(path), compression="zstd")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def _version_from_digests(digests: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for filename in sorted(digests):
        digest.update(filename.encode("utf-8"))
        digest.update(b"\0")
        digest.update(digests[filename])
    return digest.hexdigest()[:12]


def _version_of(blobs: dict[str, bytes]) -> str:
    return _version_from_digests({name: hashlib.sha256(blob).digest() for name, blob in blobs.items()})


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
    staging = _new_dir(f".{target.name}.tmp-", target.parent)
    backup: Path | None = None
    try:
        digests = {}
        for name in DATASETS:  # straight into the file, one dataset at a time (the same bytes as parquet_bytes)
            digests[f"{name}.parquet"] = write_parquet(name, result.frames[name], staging / f"{name}.parquet")
        report = {
            "data_version": _version_from_digests(digests),
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


#: the files of one data version, in the order they are copied
VERSION_FILES = tuple(f"{name}.parquet" for name in DATASETS) + (_REPORT,)


def versions_dir(prepared_dir: str | Path) -> Path:
    """The content-addressed store beside ``prepared_dir``: ``<parent>/versions/<data version>/`` (``data/versions``)."""
    return Path(prepared_dir).parent / "versions"


def _is_intact(folder: Path, version: str) -> bool:
    try:
        return all((folder / name).is_file() for name in VERSION_FILES) and data_version(folder) == version
    except OSError:
        return False


def snapshot_version(prepared_dir: str | Path, store: str | Path | None = None) -> Path:
    """An immutable, content-addressed copy of the prepared datasets: ``store/<data version>/`` (default
    :func:`versions_dir`), holding the three Parquet files and ``report.json``, files read-only.

    Runs read this folder, never ``prepared_dir``: a later prepare that publishes a new version (or a ``dvc checkout``)
    changes ``prepared_dir`` but never a version a run is reading. Copied into a temporary folder, checked (the files'
    hash must equal ``report.json``'s ``data_version``: a folder that changed while it was copied is refused) and
    renamed into place; an existing intact copy is reused.

    Returns:
        the version's folder (its name is the data version).

    Raises:
        FileNotFoundError: a file of the prepared data is missing (run ``rlhf prepare``).
        ValueError: the files and ``report.json`` disagree (the folder changed while it was read, or was edited).
    """
    source = Path(prepared_dir)
    root = Path(store) if store is not None else versions_dir(source)
    root.mkdir(parents=True, exist_ok=True)
    staging = _new_dir(".tmp-", root)
    try:
        for name in VERSION_FILES:
            if not (source / name).is_file():
                raise FileNotFoundError(f"{source / name} not found: run `rlhf prepare` first")
            shutil.copyfile(source / name, staging / name)
        version = data_version(staging)
        recorded = json.loads((staging / _REPORT).read_text()).get("data_version")
        if recorded != version:
            raise ValueError(f"{source} is inconsistent: report.json says data version {recorded}, its files hash to "
                             f"{version} (changed while it was read, or edited by hand); prepare it again")
        target = root / version
        if target.is_dir() and _is_intact(target, version):
            return target
        if target.exists():  # a damaged copy (files deleted or edited): replace it
            shutil.rmtree(target, ignore_errors=True)
        for name in VERSION_FILES:
            (staging / name).chmod(0o444)
        try:
            os.rename(staging, target)
        except OSError:  # another process published the same version first
            if not _is_intact(target, version):
                raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
