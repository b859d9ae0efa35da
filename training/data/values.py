"""Raw values: one row and where it came from, and the conversions of its fields (each error names the field)."""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from polyreward.models.runtime.errors import describe
from polyreward.models.runtime.items import Message
from polyreward.models.runtime.objectives import Objective
from polyreward.training.data.errors import RowError

Row = dict[str, Any]
Scale = tuple[float, float]
T = TypeVar("T")


def objective_name(name: str) -> str:
    """`name` if it is a valid objective name, else ValueError with `Objective`'s own message."""
    try:
        return Objective(name=name).name
    except ValidationError as e:
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def check_objective_names(option: str, names: Any) -> None:
    for name in names:
        try:
            objective_name(name)
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None


MISSING = object()


def type_name(value: object) -> str:
    return "None" if value is None else type(value).__name__


def lookup(data: Row, path: str) -> Any:
    """The value at a dotted path ("a.b" is data["a"]["b"]; a key that itself holds the dots wins), or MISSING."""
    if path in data:
        return data[path]
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


@dataclass(frozen=True)
class SourceRow:
    """One raw row and where it came from ("file:17"), so that every error names the file, line and field."""

    where: str
    data: Row

    def error(self, field: str, problem: str) -> RowError:
        return RowError(self.where, field, problem)

    def get(self, field: str, convert: Callable[[Any], T]) -> T:
        """The field's value through `convert`, whose ValueError becomes a DataError naming the field."""
        value = lookup(self.data, field)
        if value is MISSING:
            raise self.error(field, "missing")
        try:
            return convert(value)
        except ValueError as e:
            raise self.error(field, str(e)) from None

    def key(self, fields: str | list[str]) -> str:
        """An id or split key: the fields' values joined by ':'."""
        return ":".join(self.get(f, as_key) for f in ([fields] if isinstance(fields, str) else fields))


def as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type_name(value)}")
    return value


def as_optional_text(value: Any) -> str:
    return "" if value is None else as_text(value)


def as_key(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a string or an integer, got {type_name(value)}")
    return str(value)


def as_optional_key(value: Any) -> str | None:
    return None if value is None else as_key(value)


def as_optional_objective(value: Any) -> str | None:
    return None if value is None else objective_name(as_text(value))


def as_number(value: Any) -> float:
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
        raise ValueError(f"expected a number, got {type_name(value)}")
    if math.isinf(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def as_flag(value: Any) -> bool:
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


def as_list(value: Any) -> list:
    parsed = _literal(value) if isinstance(value, str) else value
    if not isinstance(parsed, list):
        raise ValueError(f"expected a list, got {type_name(value)}")
    return parsed


def as_mapping(value: Any) -> dict:
    parsed = _literal(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError(f"expected an object, got {type_name(value)}")
    return parsed


_MESSAGES = TypeAdapter(list[Message])


def _messages(value: Any) -> list[Message]:
    """A list of {role, content} (possibly string-encoded); other keys of a message (names, models) are dropped."""
    try:
        raw = as_list(value)
    except ValueError:
        raise ValueError(f"expected a list of {{role, content}}, got {type_name(value)}") from None
    raw = [{k: m[k] for k in ("role", "content") if k in m} if isinstance(m, dict) else m for m in raw]
    try:
        messages = _MESSAGES.validate_python(raw)
    except ValidationError as e:
        raise ValueError(f"expected a list of {{role, content}}: {describe(e, limit=1)}") from None
    if not messages:
        raise ValueError("expected a list of {role, content}, got an empty list")
    return messages


def as_prompt_messages(value: Any) -> list[Message]:
    messages = _messages(value)
    if messages[-1].role == "assistant":
        raise ValueError(
            "the last message is an assistant turn; this field must hold the prompt part without the reply"
        )
    return messages


def as_rated_conversation(value: Any) -> tuple[list[Message], str]:
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


def label_key(value: object) -> str:
    """Labels compare as text (integral floats as ints), so YAML 1, JSON 1, parquet 1.0 and CSV "1" agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def in_scale(value: float, scale: Scale | None) -> float:
    if scale is not None and not math.isnan(value) and not scale[0] <= value <= scale[1]:
        raise ValueError(f"{value:g} is outside the scale [{scale[0]:g}, {scale[1]:g}]")
    return value


def reduce_samples(value: Any, how: Literal["mean", "first"]) -> float:
    """Several samples of one rating (a list, possibly string-encoded; a single number is a list of one) -> one;
    the mean skips missing samples."""
    parsed = _literal(value) if isinstance(value, str) else value
    numbers = [as_number(v) for v in (parsed if isinstance(parsed, list) else [parsed])]
    if how == "first":
        return numbers[0] if numbers else math.nan
    present = [v for v in numbers if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def as_loser_texts(value: Any, key: str | None) -> list[str]:
    texts = []
    for index, loser in enumerate(as_list(value)):
        if key is not None:
            if not isinstance(loser, dict) or key not in loser:
                keys = ", ".join(loser) if isinstance(loser, dict) else type_name(loser)
                raise ValueError(f"[{index}]: no key {key!r} (there: {keys})")
            loser = loser[key]
        try:
            texts.append(as_text(loser))
        except ValueError as e:
            raise ValueError(f"[{index}]: {e}") from None
    return texts
