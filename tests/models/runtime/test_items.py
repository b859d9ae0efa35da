"""Items: the three shapes as one discriminated union, errors that name the field (and the field meant), and
the JSONL reader's file:line messages."""

from __future__ import annotations

import json

import pytest
from pydantic import TypeAdapter

from polyreward.models.runtime.items import (
    ChatItem,
    InvalidItem,
    Item,
    PromptItem,
    TextItem,
    parse_item,
    read_items_jsonl,
)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "messages[0].role: the last message must be the assistant",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role: Input should be"),
        ({"messages": [{"role": "user"}]}, "messages[0].content: Field required"),
        ({"prompt": "hi"}, "response: required together with prompt"),
        ({"response": "hi"}, "prompt: required together with response"),
        ({"text": "a", "messages": [{"role": "assistant", "content": "x"}]}, "not messages and text"),
        ({}, "an item needs one of: messages, prompt+response, text"),
        ({"text": 5}, "text: Input should be a valid string"),
        ({"text": ""}, "text: String should have at least 1 character"),
        ({"txt": "x"}, "unknown field 'txt'; did you mean 'text'?"),
        ({"prompt": "hi", "respnse": "yo"}, "respnse: unknown field; did you mean 'response'?"),
        (
            {"messages": [{"role": "assistant", "content": "x", "nmae": "a"}]},
            "messages[0].nmae: unknown field",
        ),
    ],
)
def test_invalid_items_name_the_field(obj, message):
    with pytest.raises(InvalidItem) as e:
        parse_item(obj, "items[3]")
    assert str(e.value).startswith("items[3]")
    assert message in str(e.value)


def test_each_shape_parses_to_its_own_model():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert isinstance(parse_item(chat), ChatItem)
    assert parse_item({"prompt": "hi", "response": "yo"}) == PromptItem(prompt="hi", response="yo")
    assert parse_item({"text": "User: hi"}) == TextItem(text="User: hi")
    assert parse_item(chat).as_messages() == parse_item({"prompt": "hi", "response": "yo"}).as_messages()


def test_the_json_schema_is_the_one_of_the_three_shapes():
    schema = TypeAdapter(Item).json_schema()
    shapes = [schema["$defs"][ref["$ref"].rsplit("/", 1)[1]] for ref in schema["oneOf"]]
    assert [sorted(s["required"]) for s in shapes] == [["messages"], ["prompt", "response"], ["text"]]
    assert all(s["additionalProperties"] is False for s in shapes)


def test_read_items_jsonl_names_file_line_and_the_field_meant(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps({"id": 1, "prompt": "p", "response": "r"}) + "\n\n" + json.dumps({"prompt": "p"}) + "\n"
    )
    with pytest.raises(InvalidItem, match=r"in\.jsonl:3: response: required together with prompt"):
        read_items_jsonl(path)
    path.write_text(json.dumps({"prompt": "p", "respnse": "r", "id": 3}) + "\n")  # other fields are carried
    with pytest.raises(InvalidItem, match=r"in\.jsonl:1: respnse: unknown field; did you mean 'response'\?"):
        read_items_jsonl(path)
    path.write_text('{"prompt": "p", "response": "r", "id": "a"}\n{not json\n')
    with pytest.raises(InvalidItem, match=r"in\.jsonl:2: not valid JSON \(.* at column 2\)"):
        read_items_jsonl(path)
    path.write_text('{"prompt": "p", "response": "r"\n')  # the closing brace is missing
    with pytest.raises(
        InvalidItem, match=r"in\.jsonl:1: not valid JSON \(.* at column 32, the end of the line"
    ):
        read_items_jsonl(path)
    path.write_text('{"prompt": "p", "response": "r", "id": "a"}\n')
    items, extras, lines = read_items_jsonl(path)
    assert items == [PromptItem(prompt="p", response="r")] and extras == [{"id": "a"}] and lines == [1]
