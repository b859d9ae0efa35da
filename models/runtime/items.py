"""What gets scored: one conversation per item, in one of three shapes, and the readers of item files.

An item is chat `messages` ending with the assistant reply (`ChatItem`), a one-turn `prompt` + `response`
(`PromptItem`), or raw `text` that is already templated (`TextItem`, as OpenRLHF sends it). `Item` is their
discriminated union: pydantic picks the shape from the fields given, and its JSON schema is the `oneOf` of the
three, each with `additionalProperties: false`, so OpenAPI clients and fuzzers see the real shape.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from polyreward.models.runtime.errors import PolyrewardError, describe, suggestion


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_unicode(value: str) -> str:
    """Refuse strings that cannot be UTF-8 (a lone surrogate, as JSON's "\\ud800" escape gives)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode: a lone surrogate {value[e.start]!r} at character {e.start}"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Item(_Strict):
    label: Text | None = Field(
        None, description="the reference answer that correctness rules compare the response with "
        "(OpenRLHF's `labels`, verl's ground truth)",
    )  # fmt: skip

    def reply(self) -> str:
        """The text rules read: the assistant reply (a text item's whole text)."""
        raise NotImplementedError

    def with_reply(self, text: str) -> Item:
        """A copy whose reply is `text` (a text item's whole text), e.g. without its reasoning trace."""
        raise NotImplementedError


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class ChatItem(_Item):
    """A chat whose last message is the assistant reply to score."""

    messages: list[Message] = Field(
        min_length=1, description="a chat whose last message is the assistant reply"
    )

    @model_validator(mode="after")
    def _ends_with_the_reply(self) -> ChatItem:
        if self.messages[-1].role != "assistant":
            raise ValueError(
                f"messages[{len(self.messages) - 1}].role: the last message must be the assistant reply to score, "
                f"got {self.messages[-1].role!r}"
            )
        return self

    def as_messages(self) -> list[Message] | None:
        return self.messages

    def reply(self) -> str:
        return self.messages[-1].content

    def with_reply(self, text: str) -> ChatItem:
        reply = self.messages[-1].model_copy(update={"content": text})
        return self.model_copy(update={"messages": [*self.messages[:-1], reply]})


class PromptItem(_Item):
    """A one-turn chat: a user prompt and the assistant reply."""

    prompt: Text = Field(description="a user prompt")
    response: Text = Field(description="the assistant reply to `prompt`")

    def as_messages(self) -> list[Message] | None:
        return [Message(role="user", content=self.prompt), Message(role="assistant", content=self.response)]

    def reply(self) -> str:
        return self.response

    def with_reply(self, text: str) -> PromptItem:
        return self.model_copy(update={"response": text})


class TextItem(_Item):
    """A conversation already rendered with the model's chat template."""

    text: Text = Field(min_length=1, description="an already-templated conversation (as OpenRLHF sends it)")

    def as_messages(self) -> list[Message] | None:
        return None

    def reply(self) -> str:
        return self.text

    def with_reply(self, text: str) -> TextItem:
        return self.model_copy(update={"text": text})


# The shapes by the fields that make them; union tags are written <...> so error locations can drop them.
SHAPES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt": ("prompt", "response"),
    "text": ("text",),
}
COMMON_FIELDS = ("label",)  # fields every shape accepts
ITEM_FIELDS = (*(f for fields in SHAPES.values() for f in fields), *COMMON_FIELDS)
_ONE_OF = "an item needs one of: messages, prompt+response, text"


def _shapes_given(keys) -> list[str]:
    return [shape for shape, fields in SHAPES.items() if set(fields) & set(keys)]


def _check_shape(value: Any) -> Any:
    """Clear messages for items that are none or several of the shapes (before pydantic picks one)."""
    if not isinstance(value, dict):
        return value
    given = _shapes_given(value)
    if len(given) > 1:
        fields = " and ".join(f for f in ITEM_FIELDS if f in value and f not in COMMON_FIELDS)
        raise ValueError(f"give either messages, prompt+response or text, not {fields}")
    unknown = sorted(set(value) - set(ITEM_FIELDS))
    if not given:
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}{suggestion(unknown[0], ITEM_FIELDS)} ({_ONE_OF})")
        raise ValueError(_ONE_OF)
    pair = [f for f in SHAPES["prompt"] if f in value]
    # With a misspelt field beside, the model's own error says which field was meant.
    if given == ["prompt"] and len(pair) == 1 and not unknown:
        other = "response" if pair == ["prompt"] else "prompt"
        raise ValueError(f"{other}: required together with {pair[0]}")
    return value


def _shape_of(value: Any) -> str | None:
    if isinstance(value, dict):
        given = _shapes_given(value)
        return f"<{given[0]}>" if len(given) == 1 else None
    return {ChatItem: "<messages>", PromptItem: "<prompt>", TextItem: "<text>"}.get(type(value))


Item = Annotated[
    Annotated[ChatItem, Tag("<messages>")]
    | Annotated[PromptItem, Tag("<prompt>")]
    | Annotated[TextItem, Tag("<text>")],
    Discriminator(_shape_of, custom_error_type="item_shape", custom_error_message=_ONE_OF),
    BeforeValidator(_check_shape),
]
_ITEM: TypeAdapter[Item] = TypeAdapter(Item)


class InvalidItem(PolyrewardError, ValueError):
    """An item that is not one of the accepted shapes; the message names the field."""


def parse_item(obj: object, where: str = "item") -> Item:
    """Validate one item; pydantic's first error becomes one line such as `items[3]: messages[1].role: ...`."""
    if isinstance(obj, ChatItem | PromptItem | TextItem):
        return obj
    try:
        return _ITEM.validate_python(obj)
    except ValidationError as e:
        raise InvalidItem(f"{where}: {describe(e, limit=1, known=ITEM_FIELDS)}") from None


def jsonl_objects(
    path: str | os.PathLike, error: type[Exception] = InvalidItem
) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file (gzip-compressed when it ends in .gz).

    A line that is not a JSON object raises `error` naming the file and line: `items.jsonl:7: not valid JSON ...`.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                where = (
                    "the end of the line: is a closing brace or quote missing?"
                    if e.pos >= len(line.rstrip())
                    else None
                )
                detail = f"column {e.colno}" + (f", {where}" if where else "")
                raise error(f"{path}:{lineno}: not valid JSON ({e.msg} at {detail})") from None
            if not isinstance(row, dict):
                kind = "None" if row is None else type(row).__name__
                raise error(f"{path}:{lineno}: expected a JSON object, got {kind}")
            yield lineno, row


def read_items_jsonl(path: str | os.PathLike) -> tuple[list[Item], list[dict], list[int]]:
    """Items from a JSONL file, each line's other fields (ids and the like) to carry through, and line numbers.

    Errors name the file and line: `items.jsonl:7: messages[1].role: ...`.
    """
    items, extras, lines = [], [], []
    for lineno, row in jsonl_objects(path):
        extra = {k: v for k, v in row.items() if k not in ITEM_FIELDS}
        try:
            items.append(parse_item({k: v for k, v in row.items() if k in ITEM_FIELDS}, f"{path}:{lineno}"))
        except InvalidItem:
            absent = [f for f in ITEM_FIELDS if f not in row]
            for (
                key
            ) in extra:  # other fields are carried through, but a misspelt item field is the likelier cause
                if hint := suggestion(key, absent):
                    raise InvalidItem(f"{path}:{lineno}: {key}: unknown field{hint}") from None
            raise
        extras.append(extra)
        lines.append(lineno)
    return items, extras, lines


def sample_items() -> list[Item]:
    """The packaged sample: 40 conversations of very different lengths, several over 512 tokens (parity checks,
    `polyreward tune`)."""
    with resources.as_file(resources.files("polyreward.models") / "data" / "sample_items.jsonl") as path:
        return read_items_jsonl(path)[0]
