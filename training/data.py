"""Data adapters: raw rating and preference files -> the one example schema, configured in YAML, no code per set.

A `DatasetSpec` says which raw fields hold the prompt, the replies, the labels, the subset and the objective;
`read_dataset` reads a file (JSONL, JSON, Parquet, CSV, each optionally gzipped, or a `datasets` directory)
through it. Every row is checked while reading and every error names the file, the line and the field, so a
wrong field name fails before any model compute rather than after an hour of featurization.

Splits come from a stable hash of the example id (`split_of`), never from a random draw: the held-out part of a
set is the same on every machine and in every run, so evaluation numbers stay comparable.
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from models.errors import PolyrewardError, describe
from models.inputs import Message, jsonl_objects
from models.objectives import Objective
from training.examples import BonExample, Examples, PairExample, RatingExample

log = logging.getLogger("polyreward.data")

Format = Literal["auto", "jsonl", "json", "parquet", "csv", "hf"]
Split = Literal["train", "test"]
Scale = tuple[float, float]
Row = dict[str, Any]
T = TypeVar("T")


class DataError(PolyrewardError, ValueError):
    """A data file or dataset spec the user must fix; the message names the file, the line and the field."""


class _RowError(DataError):
    """A malformed value in one row. `reason` (field and problem, without the line) counts it by kind when the
    spec says `on_invalid: skip`."""

    def __init__(self, where: str, field: str, problem: str):
        self.reason = f"field '{field}': {problem}"
        super().__init__(f"{where}: {self.reason}")


class _Skipped(Exception):
    """A row left out on purpose (an unlisted label, identical replies): counted by reason and logged."""


# ---------------------------------------------------------------------------------------------- the spec


class RatingField(BaseModel):
    """A rating field that holds several samples (e.g. three judge scores), reduced to one number."""

    model_config = ConfigDict(extra="forbid")
    field: str
    reduce: Literal["mean", "first"] = "mean"


# Options that only make sense for some kinds; giving one to another kind is a config mistake.
_AB_OPTIONS = ("response_a", "response_b", "label", "label_a", "label_b")
_PAIR_OPTIONS = ("chosen", "rejected", *_AB_OPTIONS, "label_tie", "tie", "tie_when_equal", "pair_ratings")
_LABEL_OPTIONS = ("objective", "objective_value")
_KIND_OPTIONS = {
    "ratings": frozenset({"response", "ratings", "scale"}),
    "pairs": frozenset({*_PAIR_OPTIONS, "scale", *_LABEL_OPTIONS}),
    "bon": frozenset({"best", "losers", "loser_field", *_LABEL_OPTIONS}),
    "responses": frozenset({"response"}),
}
_ALL_KIND_OPTIONS = frozenset().union(*_KIND_OPTIONS.values())
# Options naming raw fields, checked on the first row so that a typo fails at once, naming the option.
_FIELD_OPTIONS = (
    *("id", "group", "prompt", "messages", "response", "chosen", "rejected", "response_a", "response_b"),
    *("label", "tie", "tie_when_equal", "best", "losers", "objective", "subset"),
)


class DatasetSpec(BaseModel):
    """How one dataset's raw rows map onto the example schema (one entry of a config's `datasets:` list)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="dataset name: example `dataset`, subset names, split hash")
    path: str = Field(description="file or `save_to_disk` directory; ${VAR} / ${VAR:-default} are expanded")
    kind: Literal["ratings", "pairs", "bon", "responses"] = Field(
        description="responses: unlabelled replies (for rescoring), read like ratings without `ratings`"
    )
    format: Format = Field(
        "auto", description="auto: from the suffix (.jsonl/.json/.parquet/.csv[.gz], dir=hf)"
    )
    hf_split: str = Field("train", description="split of a saved DatasetDict")
    limit: int | None = Field(None, ge=1, description="read at most this many rows, in file order")
    sample: float = Field(
        1.0, gt=0.0, le=1.0, description="keep this fraction of examples, chosen by a stable hash of the id"
    )
    holdout: float = Field(0.1, ge=0.0, le=1.0, description="fraction put in split 'test' (1.0: eval only)")
    id: str | list[str] | None = Field(None, description="field(s) holding a stable id; default: row number")
    group: str | list[str] | None = Field(
        None,
        description="field(s) hashed for the split instead of the id, so that rows sharing them "
        "(every response to one prompt) land on the same side",
    )

    # The conversation's prompt part: exactly one of these.
    prompt: str | list[str] | None = Field(
        None, description="field, or fields whose non-empty values are joined by a blank line"
    )
    messages: str | None = Field(
        None,
        description="field holding [{role, content}] without the reply (ratings without `response`: with)",
    )
    hh: bool = Field(False, description="the reply fields hold whole Anthropic-HH transcripts")
    on_invalid: Literal["error", "skip"] = Field(
        "error",
        description="a row with a malformed value (a non-string reply, HH transcripts with different prompt "
        "parts): error names file, line and field; skip leaves the row out and counts it by field and problem",
    )

    # kind: ratings
    response: str | None = None
    ratings: dict[str, str | RatingField] | str | None = Field(
        None, description="objective -> field, or one field holding an {objective: rating} object"
    )
    scale: Scale | dict[str, Scale] | None = Field(None, description="label scale, for all or per objective")

    # kind: pairs
    chosen: str | None = None
    rejected: str | None = None
    response_a: str | None = None
    response_b: str | None = None
    label: str | None = None
    label_a: list[int | str] = Field(default_factory=list, description="label values meaning A is better")
    label_b: list[int | str] = Field(default_factory=list, description="label values meaning B is better")
    label_tie: list[int | str] = Field(default_factory=list, description="label values meaning a tie")
    tie: str | None = Field(None, description="field holding true for a tie")
    tie_when_equal: tuple[str, str] | None = Field(None, description="two numeric fields; equal means a tie")
    pair_ratings: dict[str, tuple[str, str]] | None = Field(
        None, description="objective -> (chosen field, rejected field): also emit both sides as ratings"
    )

    # kind: bon
    best: str | None = None
    losers: str | None = None
    loser_field: str | None = Field(None, description="key inside each loser object; None: strings")

    # labels shared by kinds
    objective: str | None = Field(None, description="field naming the objective a pair/bon expresses")
    objective_value: str | None = Field(None, description="the objective every pair/bon expresses")
    subset: str | None = Field(None, description="field holding the subset")
    subset_pattern: str | None = Field(None, description="regex on the subset value (group 1 if any)")
    subset_value: str | None = Field(None, description="the subset of every example")

    def scale_of(self, objective: str) -> Scale | None:
        """The label scale of one objective, or None when the spec gives none."""
        if isinstance(self.scale, dict):
            return self.scale.get(objective)
        return self.scale

    def fields(self) -> list[tuple[str, str]]:
        """Every (spec option, raw field) this spec reads from a row: checked on the first row up front."""
        out = []
        for option in _FIELD_OPTIONS:
            value = getattr(self, option)
            out += [(option, value)] if isinstance(value, str) else [(option, f) for f in value or ()]
        if isinstance(self.ratings, str):
            out.append(("ratings", self.ratings))
        for objective, source in (self.ratings if isinstance(self.ratings, dict) else {}).items():
            out.append((f"ratings.{objective}", source if isinstance(source, str) else source.field))
        for objective, sides in (self.pair_ratings or {}).items():
            out += [(f"pair_ratings.{objective}", f) for f in sides]
        return out

    def _is_set(self, option: str) -> bool:
        return getattr(self, option) != type(self).model_fields[option].get_default(call_default_factory=True)

    @model_validator(mode="after")
    def _check(self) -> DatasetSpec:
        for option in sorted(_ALL_KIND_OPTIONS - _KIND_OPTIONS[self.kind]):
            if self._is_set(option):
                raise ValueError(f"{option}: not an option of kind {self.kind}")
        self._check_conversation()
        checks = {"ratings": self._check_ratings, "pairs": self._check_pairs, "bon": self._check_bon}
        checks.get(self.kind, self._check_response)()
        self._check_labels()
        return self

    def _check_conversation(self) -> None:
        given = [option for option in ("prompt", "messages", "hh") if self._is_set(option)]
        if len(given) != 1:
            got = " and ".join(given) or "none"
            raise ValueError(
                f"give exactly one of prompt, messages or hh: true for the prompt part, got {got}"
            )
        for option in ("prompt", "id", "group"):
            if getattr(self, option) == []:
                raise ValueError(f"{option}: empty list of fields")

    def _check_response(self) -> None:
        if self.response is None and self.messages is None:
            raise ValueError(
                f"response: required for kind {self.kind} (or messages holding the whole conversation, reply "
                "last)"
            )

    def _check_ratings(self) -> None:
        if not self.ratings:
            raise ValueError("ratings: required for kind ratings")
        self._check_response()
        if isinstance(self.ratings, dict):
            _check_objective_names("ratings", self.ratings)
            self._check_scale(list(self.ratings))
        else:
            self._check_scale(None)

    def _check_pairs(self) -> None:
        ab = [option for option in _AB_OPTIONS if self._is_set(option)]
        if self.chosen is None and self.rejected is None and not ab:
            raise ValueError(
                "chosen: required for kind pairs, with rejected (or response_a, response_b, label)"
            )
        if (self.chosen is not None or self.rejected is not None) and ab:
            raise ValueError(
                f"give either chosen+rejected or response_a+response_b+label, not both ({ab[0]})"
            )
        need = _AB_OPTIONS if ab else ("chosen", "rejected")
        missing = [option for option in need if not self._is_set(option)]
        if missing:
            raise ValueError(f"{missing[0]}: required with {', '.join(o for o in need if o not in missing)}")
        if self.label_tie and not ab:
            raise ValueError("label_tie: only with response_a+response_b+label")
        self._check_label_values()
        if self.pair_ratings is not None:
            if ab:
                raise ValueError("pair_ratings: only with chosen+rejected")
            _check_objective_names("pair_ratings", self.pair_ratings)
        elif self.scale is not None:
            raise ValueError("scale: only with pair_ratings for kind pairs")
        self._check_scale(list(self.pair_ratings or {}))

    def _check_label_values(self) -> None:
        owner: dict[str, str] = {}
        for option in ("label_a", "label_b", "label_tie"):
            for value in getattr(self, option):
                first = owner.setdefault(_label_key(value), option)
                if first != option:
                    raise ValueError(f"{option}: value {value!r} is also in {first}")

    def _check_bon(self) -> None:
        for option in ("best", "losers"):
            if getattr(self, option) is None:
                raise ValueError(f"{option}: required for kind bon")

    def _check_scale(self, objectives: list[str] | None) -> None:
        if self.scale is None:
            return
        scales = self.scale if isinstance(self.scale, dict) else {"": self.scale}
        for low, high in scales.values():
            if not low < high:
                raise ValueError(f"scale: the low end {low:g} must be below the high end {high:g}")
        if isinstance(self.scale, dict) and objectives is not None:
            unknown = sorted(set(self.scale) - set(objectives))
            if unknown:
                raise ValueError(
                    f"scale: {', '.join(unknown)} not among the objectives {', '.join(objectives)}"
                )

    def _check_labels(self) -> None:
        if self.objective is not None and self.objective_value is not None:
            raise ValueError("give either objective (a field) or objective_value (a constant), not both")
        if self.objective_value is not None:
            _check_objective_names("objective_value", [self.objective_value])
        if self.subset is not None and self.subset_value is not None:
            raise ValueError("give either subset (a field) or subset_value (a constant), not both")
        if self.subset_pattern is not None:
            if self.subset is None:
                raise ValueError("subset_pattern: only with subset (a field)")
            try:
                re.compile(self.subset_pattern)
            except re.error as e:
                raise ValueError(f"subset_pattern: not a valid regular expression ({e})") from None


def _objective_name(name: str) -> str:
    """`name` if it is a valid objective name, else ValueError with `Objective`'s own message."""
    try:
        return Objective(name=name).name
    except ValidationError as e:
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _check_objective_names(option: str, names: Any) -> None:
    for name in names:
        try:
            _objective_name(name)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None


class _Config(BaseModel):
    """The `datasets:` list of a config, validated in one go so that errors read `datasets[1].chosen: ...`."""

    datasets: list[DatasetSpec]


def load_specs(raw: list[dict], source: str) -> list[DatasetSpec]:
    """Validate a config's list of dataset dicts; errors name the source, e.g. `x.yaml: datasets[1].kind: ...`."""
    try:
        specs = _Config(datasets=raw).datasets
    except ValidationError as e:
        raise DataError(f"{source}: {describe(e)}") from None
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        first = seen.setdefault(spec.name, index)
        if first != index:
            raise DataError(
                f"{source}: datasets[{index}].name: {spec.name!r} is also the name of datasets[{first}] "
                "(ids and splits are keyed by it)"
            )
    return specs


# ---------------------------------------------------------------------------------------------- splits


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for a string: the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(dataset: str, example_id: str, holdout: float) -> Split:
    """'test' for a stable `holdout` fraction of a dataset's ids, 'train' for the rest (same on every run)."""
    return "test" if _fraction(f"{dataset}:{example_id}") < holdout else "train"


def subsplit(example_id: str, fraction: float, salt: str) -> bool:
    """True for a stable `fraction` of ids (e.g. a validation part inside 'train'); `salt` makes it independent
    of `split_of` and of other subsplits."""
    return _fraction(f"{salt}:{example_id}") < fraction


# ---------------------------------------------------------------------------------------------- reading files

_FORMAT_SUFFIXES = ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv"))


def _format_of(path: Path) -> str:
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
            raise DataError(f"{path}:row {number}: expected a JSON object, got {_type(row)}")
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
    fmt = _format_of(path) if format == "auto" else format
    try:
        yield from itertools.islice(_READERS[fmt](path, hf_split), limit)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from None


# ---------------------------------------------------------------------------------------------- raw values

_MISSING = object()


def _type(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _lookup(data: Row, path: str) -> Any:
    """The value at a dotted path ("a.b" is data["a"]["b"]; a key that itself holds the dots wins), or _MISSING."""
    if path in data:
        return data[path]
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


@dataclass(frozen=True)
class _Row:
    """One raw row and where it came from ("file:17"), so that every error names the file, line and field."""

    where: str
    data: Row

    def error(self, field: str, problem: str) -> _RowError:
        return _RowError(self.where, field, problem)

    def get(self, field: str, convert: Callable[[Any], T]) -> T:
        """The field's value through `convert`, whose ValueError becomes a DataError naming the field."""
        value = _lookup(self.data, field)
        if value is _MISSING:
            raise self.error(field, "missing")
        try:
            return convert(value)
        except ValueError as e:
            raise self.error(field, str(e)) from None

    def key(self, fields: str | list[str]) -> str:
        """An id or split key: the fields' values joined by ':'."""
        return ":".join(self.get(f, _key) for f in ([fields] if isinstance(fields, str) else fields))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type(value)}")
    return value


def _optional_text(value: Any) -> str:
    return "" if value is None else _text(value)


def _key(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a string or an integer, got {_type(value)}")
    return str(value)


def _optional_key(value: Any) -> str | None:
    return None if value is None else _key(value)


def _optional_objective(value: Any) -> str | None:
    return None if value is None else _objective_name(_text(value))


def _number(value: Any) -> float:
    """A rating: a number, or a numeric string (CSV cells); null and empty cells are NaN (not rated)."""
    if value is None or value == "":
        return math.nan
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"expected a number, got {_type(value)}")
    if math.isinf(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _flag(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _literal(text: str) -> Any:
    """A string that holds a JSON or Python literal, parsed (rmb stores some lists that way); else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def _list(value: Any) -> list:
    parsed = _literal(value) if isinstance(value, str) else value
    if not isinstance(parsed, list):
        raise ValueError(f"expected a list, got {_type(value)}")
    return parsed


def _mapping(value: Any) -> dict:
    parsed = _literal(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError(f"expected an object, got {_type(value)}")
    return parsed


_MESSAGES = TypeAdapter(list[Message])


def _messages(value: Any) -> list[Message]:
    """A list of {role, content} (possibly string-encoded); other keys of a message (names, models) are dropped."""
    try:
        raw = _list(value)
    except ValueError:
        raise ValueError(f"expected a list of {{role, content}}, got {_type(value)}") from None
    raw = [{k: m[k] for k in ("role", "content") if k in m} if isinstance(m, dict) else m for m in raw]
    try:
        messages = _MESSAGES.validate_python(raw)
    except ValidationError as e:
        raise ValueError(f"expected a list of {{role, content}}: {describe(e, limit=1)}") from None
    if not messages:
        raise ValueError("expected a list of {role, content}, got an empty list")
    return messages


def _prompt_messages(value: Any) -> list[Message]:
    messages = _messages(value)
    if messages[-1].role == "assistant":
        raise ValueError(
            "the last message is an assistant turn; this field must hold the prompt part without the reply"
        )
    return messages


def _rated_conversation(value: Any) -> tuple[list[Message], str]:
    messages = _messages(value)
    if messages[-1].role != "assistant":
        raise ValueError(
            f"the last message must be the rated assistant reply, got role {messages[-1].role!r}"
        )
    return messages[:-1], messages[-1].content


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def parse_hh(transcript: str) -> tuple[list[Message], str]:
    """An Anthropic-HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> (prompt part, final reply).

    The prompt part is every turn before the final Assistant turn; each turn's text is stripped.
    """
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an Anthropic-HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    turns = [
        Message(role="user" if speaker == "Human" else "assistant", content=text.strip())
        for speaker, text in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if turns[-1].role != "assistant":
        raise ValueError("the transcript does not end with an Assistant turn")
    return turns[:-1], turns[-1].content


def _label_key(value: object) -> str:
    """Labels compare as text (integral floats as ints), so YAML 1, JSON 1, parquet 1.0 and CSV "1" agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _in_scale(value: float, scale: Scale | None) -> float:
    if scale is not None and not math.isnan(value) and not scale[0] <= value <= scale[1]:
        raise ValueError(f"{value:g} is outside the scale [{scale[0]:g}, {scale[1]:g}]")
    return value


def _reduce(value: Any, how: Literal["mean", "first"]) -> float:
    """Several samples of one rating (a list, possibly string-encoded; a single number is a list of one) -> one;
    the mean skips missing samples."""
    parsed = _literal(value) if isinstance(value, str) else value
    numbers = [_number(v) for v in (parsed if isinstance(parsed, list) else [parsed])]
    if how == "first":
        return numbers[0] if numbers else math.nan
    present = [v for v in numbers if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def _loser_texts(value: Any, key: str | None) -> list[str]:
    texts = []
    for index, loser in enumerate(_list(value)):
        if key is not None:
            if not isinstance(loser, dict) or key not in loser:
                keys = ", ".join(loser) if isinstance(loser, dict) else _type(loser)
                raise ValueError(f"[{index}]: no key {key!r} (there: {keys})")
            loser = loser[key]
        try:
            texts.append(_text(loser))
        except ValueError as e:
            raise ValueError(f"[{index}]: {e}") from None
    return texts


# ---------------------------------------------------------------------------------------------- rows -> examples


def _prompt(spec: DatasetSpec, row: _Row) -> list[Message]:
    """The prompt part from a messages field or from prompt field(s) (a one-turn user prompt)."""
    if spec.messages is not None:
        return row.get(spec.messages, _prompt_messages)
    if isinstance(spec.prompt, str):
        return [Message(role="user", content=row.get(spec.prompt, _text))]
    parts = (row.get(f, _optional_text) for f in spec.prompt or [])
    return [Message(role="user", content="\n\n".join(p for p in parts if p))]


def _conversation(
    spec: DatasetSpec, row: _Row, replies: list[tuple[str, str]]
) -> tuple[list[Message], list[str]]:
    """The prompt part and the reply texts of (field, text) replies.

    Under `hh` every reply is a whole transcript: each is split, and all must share one prompt part, since a
    pair or best-of-N set compares replies to the same conversation.
    """
    if not spec.hh:
        return _prompt(spec, row), [text for _, text in replies]
    prompts, texts = [], []
    for field, transcript in replies:
        try:
            prompt, text = parse_hh(transcript)
        except ValueError as e:
            raise row.error(field, str(e)) from None
        if prompts and prompt != prompts[0]:
            raise row.error(
                field,
                "its prompt part (the turns before the final Assistant turn) differs from that of "
                f"'{replies[0][0]}'",
            )
        prompts.append(prompt)
        texts.append(text)
    return prompts[0], texts


def _rating(spec: DatasetSpec, row: _Row, objective: str, source: str | RatingField) -> float:
    scale = spec.scale_of(objective)
    if isinstance(source, str):
        return row.get(source, lambda v: _in_scale(_number(v), scale))
    return row.get(source.field, lambda v: _in_scale(_reduce(v, source.reduce), scale))


def _ratings(spec: DatasetSpec, row: _Row) -> dict[str, float]:
    if not isinstance(spec.ratings, str):
        return {
            objective: _rating(spec, row, objective, source)
            for objective, source in (spec.ratings or {}).items()
        }
    out = {}
    for objective, value in row.get(spec.ratings, _mapping).items():
        try:
            out[_objective_name(objective)] = _in_scale(_number(value), spec.scale_of(objective))
        except ValueError as e:
            raise row.error(f"{spec.ratings}.{objective}", str(e)) from None
    return out


def _rating_examples(spec: DatasetSpec, row: _Row, ident: str, common: dict[str, Any]) -> Examples:
    if spec.response is None:  # `messages` holds the whole conversation, the rated reply last
        prompt, response = row.get(spec.messages or "", _rated_conversation)
    else:
        prompt, (response,) = _conversation(spec, row, [(spec.response, row.get(spec.response, _text))])
    ratings = _ratings(spec, row) if spec.kind == "ratings" else {}
    if spec.kind == "ratings" and all(math.isnan(v) for v in ratings.values()):
        raise _Skipped("no rating given")
    return Examples(
        ratings=[RatingExample(ident, prompt=prompt, response=response, ratings=ratings, **common)]
    )


def _pair_sides(spec: DatasetSpec, row: _Row) -> tuple[str, str, bool]:
    """(field of the preferred reply, field of the other, tie) from chosen/rejected or from an A/B label."""
    if spec.chosen is not None and spec.rejected is not None:
        return spec.chosen, spec.rejected, False
    value = row.get(spec.label or "", lambda v: v)
    a, b, key = spec.response_a or "", spec.response_b or "", _label_key(value)
    for values, sides in (
        (spec.label_a, (a, b, False)),
        (spec.label_b, (b, a, False)),
        (spec.label_tie, (a, b, True)),
    ):
        if key in {_label_key(v) for v in values}:
            return sides
    raise _Skipped(f"label {value!r} not in label_a, label_b or label_tie")


def _tie(spec: DatasetSpec, row: _Row) -> bool:
    if spec.tie is not None and row.get(spec.tie, _flag):
        return True
    if spec.tie_when_equal is not None:
        first, second = (row.get(f, _number) for f in spec.tie_when_equal)
        return first == second
    return False


def _pair_examples(
    spec: DatasetSpec, row: _Row, ident: str, common: dict[str, Any], objective: str | None
) -> Examples:
    first, second, tie = _pair_sides(spec, row)
    replies = [(first, row.get(first, _text)), (second, row.get(second, _text))]
    prompt, (chosen, rejected) = _conversation(spec, row, replies)
    if chosen == rejected:
        raise _Skipped("chosen and rejected are the same text")
    pair = PairExample(
        ident,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        objective=objective,
        tie=tie or _tie(spec, row),
        **common,
    )
    if not spec.pair_ratings:
        return Examples(pairs=[pair])
    ratings = [
        RatingExample(
            f"{ident}:{side}",
            prompt=prompt,
            response=text,
            ratings={name: _rating(spec, row, name, fields[i]) for name, fields in spec.pair_ratings.items()},
            **common,
        )
        for i, (side, text) in enumerate((("chosen", chosen), ("rejected", rejected)))
    ]
    return Examples(ratings=ratings, pairs=[pair])


def _bon_examples(
    spec: DatasetSpec, row: _Row, ident: str, common: dict[str, Any], objective: str | None
) -> Examples:
    best_field, losers_field = spec.best or "", spec.losers or ""
    losers = row.get(losers_field, lambda v: _loser_texts(v, spec.loser_field))
    replies = [(best_field, row.get(best_field, _text))]
    replies += [(f"{losers_field}[{i}]", text) for i, text in enumerate(losers)]
    prompt, (best, *others) = _conversation(spec, row, replies)
    if not others:
        raise _Skipped("no losers")
    if best in others:
        raise _Skipped("best is also a loser")
    return Examples(
        bon=[BonExample(ident, prompt=prompt, best=best, losers=others, objective=objective, **common)]
    )


def _subset(spec: DatasetSpec, row: _Row) -> str | None:
    if spec.subset is None:
        return spec.subset_value
    value = row.get(spec.subset, _optional_key)
    if value is None or spec.subset_pattern is None:
        return value
    match = re.search(spec.subset_pattern, value)
    return value if match is None else match.group(1 if match.re.groups else 0)


def _examples(spec: DatasetSpec, row: _Row, ident: str) -> Examples:
    """One row's examples. Everything from a row shares one split (a pair and the ratings of its sides)."""
    key = row.key(spec.group) if spec.group else ident
    common = {
        "dataset": spec.name,
        "split": split_of(spec.name, key, spec.holdout),
        "subset": _subset(spec, row),
    }
    if spec.kind in ("ratings", "responses"):
        return _rating_examples(spec, row, ident, common)
    objective = row.get(spec.objective, _optional_objective) if spec.objective else spec.objective_value
    build = _pair_examples if spec.kind == "pairs" else _bon_examples
    return build(spec, row, ident, common, objective)


# ---------------------------------------------------------------------------------------------- datasets

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


def _check_fields(spec: DatasetSpec, row: _Row, where: str) -> None:
    """Every configured field must exist on the first row: a typo in a config fails at once, naming the option."""
    for option, field in spec.fields():
        if _lookup(row.data, field) is _MISSING:
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
    fmt = _format_of(path) if spec.format == "auto" else spec.format
    skipped = Counter() if skipped is None else skipped
    seen: dict[str, str] = {}  # id -> where it was read
    for number, data in read_records(path, fmt, spec.hf_split, spec.limit):
        row = _Row(f"{path}:{number}" if fmt == "jsonl" else f"{path}:row {number}", data)
        if not seen:
            _check_fields(spec, row, where)
        ident = row.key(spec.id) if spec.id else str(number)
        first = seen.setdefault(ident, row.where)
        if first != row.where:
            raise DataError(f"{row.where}: duplicate id {ident!r} (also at {first})")
        if spec.sample < 1.0 and not subsplit(ident, spec.sample, f"sample:{spec.name}"):
            continue
        try:
            yield row.where, data, _examples(spec, row, ident)
        except _Skipped as skip:
            skipped[str(skip)] += 1
        except _RowError as e:
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
