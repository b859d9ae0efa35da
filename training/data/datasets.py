"""Whole datasets through their spec: rows in file order with their examples, and canonical files without a config.

Every row is checked while reading and every error names the file, the line and the field, so a wrong field
name fails before any model compute rather than after an hour of featurization.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from polyreward.models.runtime.errors import describe
from polyreward.training.data.adapters import examples_of
from polyreward.training.data.errors import DataError, RowError, Skipped
from polyreward.training.data.examples import Examples
from polyreward.training.data.files import Row, format_of, read_records
from polyreward.training.data.spec import DatasetSpec, Split
from polyreward.training.data.splits import subsplit
from polyreward.training.data.values import MISSING, SourceRow, lookup

log = logging.getLogger("polyreward.data")

_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _resolve_path(path: str, base_dir: Path | None, where: str) -> Path:
    """`${VAR}` / `${VAR:-default}` expanded; a relative path is taken from base_dir (the config's folder)."""

    def expand(ref: re.Match) -> str:
        value = os.environ.get(ref.group(1))
        if value:
            return value
        if ref.group(2) is not None:
            return ref.group(2)
        raise DataError(f"{where}: path: environment variable {ref.group(1)} is not set")

    resolved = Path(_ENV_REF.sub(expand, path)).expanduser()
    if base_dir is not None and not resolved.is_absolute():
        resolved = Path(base_dir) / resolved
    if not resolved.exists():
        raise DataError(f"{where}: path: {resolved} not found")
    return resolved


def _check_fields(spec: DatasetSpec, row: SourceRow, where: str) -> None:
    """Every configured field must exist on the first row: a typo in a config fails at once, naming the option."""
    for option, field in spec.fields():
        if lookup(row.data, field) is MISSING:
            there = ", ".join(list(row.data)[:30])
            raise DataError(
                f"{where}: {option}: field {field!r} not found in {row.where} (fields there: {there})"
            )


def _reasons(skipped: Counter[str]) -> str:
    return "; ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "none"


def _log_counts(spec: DatasetSpec, path: Path, rows: int, examples: Examples, skipped: Counter[str]) -> None:
    test = examples.where("test")
    ties = sum(p.tie for p in examples.pairs)
    log.info(
        "%s: %d rows from %s -> %d ratings, %d pairs (%d ties), %d bon; test split: %d ratings, %d pairs, "
        "%d bon; skipped: %s",
        spec.name,
        rows,
        path,
        len(examples.ratings),
        len(examples.pairs),
        ties,
        len(examples.bon),
        len(test.ratings),
        len(test.pairs),
        len(test.bon),
        _reasons(skipped),
    )


def dataset_rows(
    spec: DatasetSpec,
    base_dir: Path | None = None,
    where: str | None = None,
    skipped: Counter[str] | None = None,
) -> Iterator[tuple[str, Row, Examples]]:
    """(location, raw row, its examples) for each row of a dataset that maps onto examples, in file order.

    Rows left out (`sample`, a skip reason, or an invalid value with `on_invalid: skip`) are counted in
    `skipped` by reason. The first row is checked for every field the spec reads; ids must be unique.
    """
    where = where or f"dataset {spec.name!r}"
    path = _resolve_path(spec.path, base_dir, where)
    fmt = format_of(path) if spec.format == "auto" else spec.format
    skipped = Counter() if skipped is None else skipped
    seen: dict[str, str] = {}  # id -> where it was read
    for number, data in read_records(path, fmt, spec.hf_split, spec.limit):
        row = SourceRow(f"{path}:{number}" if fmt == "jsonl" else f"{path}:row {number}", data)
        if not seen:
            _check_fields(spec, row, where)
        ident = row.key(spec.id) if spec.id else str(number)
        first = seen.setdefault(ident, row.where)
        if first != row.where:
            raise DataError(f"{row.where}: duplicate id {ident!r} (also at {first})")
        if spec.sample < 1.0 and not subsplit(ident, spec.sample, f"sample:{spec.name}"):
            continue
        try:
            yield row.where, data, examples_of(spec, row, ident)
        except Skipped as skip:
            skipped[str(skip)] += 1
        except RowError as e:
            if spec.on_invalid == "error":
                raise
            skipped[f"invalid {e.reason}"] += 1
    if not seen:
        raise DataError(f"{where}: {path} has no rows")


def read_dataset(spec: DatasetSpec, base_dir: Path | None = None, where: str | None = None) -> Examples:
    """Read and validate a whole dataset through its spec.

    `where` prefixes config errors (e.g. "x.yaml datasets[2] (rmb)"); row errors name file, line and field.
    Ids must be unique within the dataset. One INFO line logs the counts and the skipped rows by reason.
    """
    where = where or f"dataset {spec.name!r}"
    path = _resolve_path(spec.path, base_dir, where)
    examples = Examples()
    skipped: Counter[str] = Counter()  # reason -> rows
    rows = 0
    for _, _, row_examples in dataset_rows(spec, base_dir, where, skipped):
        examples.extend(row_examples)
        rows += 1
    if not (examples.ratings or examples.pairs or examples.bon):
        raise DataError(f"{where}: every row of {path} was skipped: {_reasons(skipped)}")
    _log_counts(spec, path, rows + sum(skipped.values()), examples, skipped)
    return examples


def _canonical_options(path: Path, row: Row) -> dict[str, Any]:
    """Spec options for a canonical file, from its first row's keys."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        kind, options = "pairs", ("chosen", "rejected", "id", "subset", "objective", "tie")
    elif "ratings" in keys:
        kind, options = "ratings", ("ratings", "response", "id", "subset")
    elif {"best", "losers"} <= keys:
        kind, options = "bon", ("best", "losers", "id", "subset", "objective")
    else:
        raise DataError(
            f"{path}:1: not a canonical file: expected chosen+rejected, ratings, or best+losers "
            f"(fields there: {', '.join(row)})"
        )
    conversation = [option for option in ("prompt", "messages") if option in keys][:1]
    if not conversation:
        raise DataError(f"{path}:1: a canonical file needs a 'prompt' or 'messages' field")
    return {"kind": kind, **{option: option for option in (*options, *conversation) if option in keys}}


def _stem(path: Path) -> str:
    return Path(path.name.removesuffix(".gz")).stem


def canonical_options(path: str | os.PathLike) -> dict[str, Any]:
    """Spec options (kind and fields) for a file in the canonical schema, from its first row's keys."""
    path = Path(path)
    first = next(read_records(path, limit=1), None)
    if first is None:
        raise DataError(f"{path}: no rows")
    return _canonical_options(path, first[1])


def read_canonical(path: str | os.PathLike, split: Split = "test") -> Examples:
    """Read a file in the canonical schema without a config; its kind comes from the first row's keys.

    Pairs: {"prompt" | "messages", "chosen", "rejected", "subset"?, "objective"?, "tie"?, "id"?} (messages
    without the reply); ratings: {"prompt", "response" | "messages" (reply last), "ratings": {objective:
    number | null}, "id"?}; best-of-N: {"prompt" | "messages", "best", "losers": [str], "subset"?}. Canonical
    files are evaluation inputs, so every example gets split "test" unless `split` says otherwise.
    """
    path = Path(path)
    options = canonical_options(path)
    try:
        spec = DatasetSpec(
            name=_stem(path), path=str(path), holdout=1.0 if split == "test" else 0.0, **options
        )
    except ValidationError as e:
        raise DataError(f"{path}:1: not a canonical {options['kind']} file: {describe(e)}") from None
    return read_dataset(spec)
