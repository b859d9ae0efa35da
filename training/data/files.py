"""Reading rows from files: JSONL, JSON, Parquet, CSV (each optionally gzipped) and `datasets` directories."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from polyreward.models.runtime.items import jsonl_objects
from polyreward.training.data.errors import DataError
from polyreward.training.data.spec import Format
from polyreward.training.data.values import type_name

Row = dict[str, Any]


_FORMAT_SUFFIXES = ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv"))


def format_of(path: Path) -> str:
    """The format a path's suffix (or being a directory) implies."""
    if path.is_dir():
        return "hf"
    name = path.name.lower()
    for suffix, fmt in _FORMAT_SUFFIXES:
        if name.removesuffix(".gz").endswith(suffix):
            if fmt == "parquet" and name.endswith(".gz"):
                raise DataError(f"{path}: gzipped parquet is not supported (parquet compresses internally)")
            return fmt
    raise DataError(
        f"{path}: unknown format (expected .jsonl, .json, .parquet or .csv, optionally .gz, or a directory "
        "saved by datasets); set `format:`"
    )


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)


def _jsonl_rows(path: Path, _split: str) -> Iterator[tuple[int, Row]]:
    return jsonl_objects(path, DataError)


def _json_rows(path: Path, _split: str) -> Iterator[tuple[int, Row]]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
            ) from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, or an object with one list value")
    for number, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}:row {number}: expected a JSON object, got {type_name(row)}")
        yield number, row


def _parquet_rows(path: Path, _split: str) -> Iterator[tuple[int, Row]]:
    import pyarrow as pa  # only parquet needs it
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        rows = (row for batch in batches for row in batch.to_pylist())
        yield from enumerate(rows, 1)
    except pa.ArrowException as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from None


def _csv_rows(path: Path, _split: str) -> Iterator[tuple[int, Row]]:
    csv.field_size_limit(2**31 - 1)  # whole responses live in cells; the default 128 KiB limit rejects some
    with _open_text(path, newline="") as f:
        yield from enumerate(csv.DictReader(f), 1)


def _hf_rows(path: Path, split: str) -> Iterator[tuple[int, Row]]:
    import datasets  # slow to import; only `save_to_disk` directories need it

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r} (splits there: {', '.join(data)}); set `hf_split:`")
        data = data[split]
    yield from enumerate(data, 1)


_READERS: dict[str, Callable[[Path, str], Iterator[tuple[int, Row]]]] = {
    "jsonl": _jsonl_rows,
    "json": _json_rows,
    "parquet": _parquet_rows,
    "csv": _csv_rows,
    "hf": _hf_rows,
}


def read_records(
    path: str | os.PathLike, format: Format = "auto", hf_split: str = "train", limit: int | None = None
) -> Iterator[tuple[int, Row]]:
    """(row number, row dict) for each row of a file, in file order; JSONL is streamed.

    The number is the 1-based line for JSONL (blank lines are skipped but counted) and the 1-based row
    otherwise. CSV cells are strings. An unreadable file or bad JSON raises DataError naming the file.
    """
    path = Path(path)
    fmt = format_of(path) if format == "auto" else format
    try:
        yield from itertools.islice(_READERS[fmt](path, hf_split), limit)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from None
