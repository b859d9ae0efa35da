"""Recognising the common chat formats in already-templated text, and recovering its messages.

OpenRLHF sends a reward server the policy's templated conversation as one string. When the policy's chat
template is not the reward model's, `recognize` recovers the messages so that they can be rendered again with
the reward model's own template. The formats (`FORMATS`):

* ``llama3``: ``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>`` turns (Llama 3, 3.1, 3.2,
  3.3 Instruct; 3.1's default "Cutting Knowledge Date" system block is kept as a system message);
* ``chatml``: ``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` turns (Qwen2, 2.5, 3; Qwen3's ``<think>`` block
  stays in the reply);
* ``gemma``: ``<start_of_turn>ROLE\\nCONTENT<end_of_turn>\\n`` turns, role ``model`` is the assistant;
* ``mistral``: ``[INST] USER [/INST] REPLY</s>`` turns, with or without the spaces (v1, v3, v3-tekken); a
  system prompt is wherever the template merged it (a user turn);
* ``human_assistant``: Anthropic HH, ``\\n\\nHuman: ...\\n\\nAssistant: ...`` (the blank lines at the start
  optional);
* ``plain``: polyreward's own template for tokenizers without one (`builder.render_plain`):
  ``User: ...\\n\\nAssistant: ...``, starting with ``User: `` or ``System: ``.

Leading BOS tokens and trailing EOS tokens (with whitespace around them) are dropped, so a reply may end in
EOS tokens or be cut off with no end-of-turn token at all; an empty reply is an assistant message with empty
content. Contents are stripped (the templates trim them). Header roles other than system/user/assistant
(Llama's ``ipython``, ChatML's ``tool``) become ``tool``. A text counts only when it starts with the format's
first token, every turn parses, it has a user turn and it ends on an assistant turn; anything else is None.

Every parser walks the text once, finding each marker from where the last search stopped, so the time is
linear in the text's length whatever it holds; a text of more than `MAX_TURNS` turns is not taken for a
conversation (None), which keeps a text of many tiny turns from costing a message object per few bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import re2

from polyreward.models.runtime.items import Message

FORMATS: tuple[str, ...] = ("llama3", "chatml", "gemma", "mistral", "human_assistant", "plain")

BOS_TOKENS = ("<|begin_of_text|>", "<bos>", "<s>")
EOS_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<eos>",
    "</s>",
)
_MAX_ROLE = 32  # the longest role name a header may carry
MAX_TURNS = 10_000  # more turns than any real conversation: such a text is not re-rendered (None)

Turn = tuple[str, str]  # (role as Message spells it, raw content)


@dataclass(frozen=True)
class Recognized:
    format: str  # one of FORMATS
    messages: list[Message]  # the conversation; the last one is the assistant reply being scored


def recognize(text: str) -> Recognized | None:
    """The messages of `text` if it is in one of FORMATS with at least one user turn and ending in an
    assistant reply; else None."""
    body = text[_lead_end(text) : _tail_start(text)]
    found = next(((fmt, parse) for fmt, openers, parse in _PARSERS if body.startswith(openers)), None)
    if found is None:
        return None
    fmt, parse = found
    turns = parse(body)
    if not turns or turns[-1][0] != "assistant" or all(role != "user" for role, _ in turns):
        return None
    return Recognized(fmt, [Message(role=role, content=content.strip()) for role, content in turns])


class _Cursor:
    """The first occurrence of any of a few markers at or after a position that never moves back.

    Each marker's next occurrence is remembered, so every marker is searched for across the text at most
    once in all: linear time, however the markers are spread."""

    def __init__(self, text: str, markers: tuple[str, ...]):
        self.text = text
        self.markers = markers
        self.next = dict.fromkeys(markers, -2)  # -2: not searched yet; -1: none left

    def find(self, pos: int) -> tuple[int, str | None]:
        best, found = -1, None
        for marker in self.markers:
            at = self.next[marker]
            if at != -1 and at < pos:
                at = self.next[marker] = self.text.find(marker, pos)
            if at >= 0 and (best < 0 or at < best):
                best, found = at, marker
        return best, found


def _skip_space(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not whitespace (or the text's length)."""
    while pos < len(text):
        chunk = text[pos : pos + 64]  # str.lstrip in C, on bounded slices: linear however long the run
        rest = chunk.lstrip()
        if rest:
            return pos + len(chunk) - len(rest)
        pos += len(chunk)
    return len(text)


def _alternatives(tokens: tuple[str, ...]) -> str:
    return "|".join([r"\s", *(re2.escape(t) for t in tokens)])


# RE2 runs in linear time, so a text made of nothing but BOS or EOS tokens costs one pass.
_LEAD = re2.compile(f"(?:{_alternatives(BOS_TOKENS)})*")
_TAIL = re2.compile(f"(?:{_alternatives(EOS_TOKENS)})*\\z")


def _lead_end(text: str) -> int:
    """Where the text starts once leading whitespace and BOS tokens are dropped."""
    return _LEAD.match(text).end()


def _tail_start(text: str) -> int:
    """Where the text ends once trailing whitespace and EOS tokens are dropped."""
    return _TAIL.search(text).start()


def _role(name: str, aliases: dict[str, str]) -> str | None:
    """A header's role as Message spells it; None when the header cannot be a role at all."""
    role = aliases.get(name)
    if role is None and name.replace("_", "a").replace("-", "a").replace(".", "a").isalnum():
        role = "tool"  # ipython, tool, function, ...
    return role


def _headers(open_: str, role_end: str, closes: tuple[str, ...], aliases: dict[str, str]):
    """A parser of `OPEN ROLE ROLE_END CONTENT CLOSE` turns, optionally separated by whitespace; the last
    turn may run to the end of the text (cut off, or its close token already dropped as an EOS)."""

    def parse(text: str) -> list[Turn] | None:
        closing = _Cursor(text, closes)
        turns: list[Turn] = []
        pos, n = 0, len(text)
        while pos < n:
            if not text.startswith(open_, pos) or len(turns) >= MAX_TURNS:
                return None
            start = pos + len(open_)
            stop = text.find(role_end, start, start + _MAX_ROLE + len(role_end))
            if stop < 0:
                if not role_end.isspace() or n - start > _MAX_ROLE:
                    return None
                stop = n  # an empty reply: the text ends in the role name, its newline dropped as whitespace
            role = _role(text[start:stop], aliases)
            if role is None:
                return None
            begin = min(stop + len(role_end), n)
            close, marker = closing.find(begin)
            if marker is None:
                turns.append((role, text[begin:]))
                break
            turns.append((role, text[begin:close]))
            pos = _skip_space(text, close + len(marker))
        return turns

    return parse


_INST, _END_INST, _EOS = "[INST]", "[/INST]", "</s>"


def _mistral(text: str) -> list[Turn] | None:
    """`[INST] user [/INST] reply</s>` turns; `</s>`, `<s>` and whitespace between turns are optional."""
    cursor = _Cursor(text, (_INST, _END_INST, _EOS))
    turns: list[Turn] = []
    pos, n = 0, len(text)
    while len(turns) < MAX_TURNS:
        start = pos + len(_INST)
        close, marker = cursor.find(start)
        if marker != _END_INST:
            return None  # the text ends in a user turn, or the turn is malformed
        turns.append(("user", text[start:close]))
        begin = close + len(_END_INST)
        stop, marker = cursor.find(begin)
        if marker is None:
            turns.append(("assistant", text[begin:]))
            return turns
        if marker == _END_INST:
            return None
        turns.append(("assistant", text[begin:stop]))
        pos = stop
        if marker == _EOS:
            pos = _skip_space(text, stop + len(_EOS))
            if text.startswith("<s>", pos):
                pos = _skip_space(text, pos + len("<s>"))
            if pos >= n:
                return turns
            if not text.startswith(_INST, pos):
                return None
    return None


def _labelled(markers: dict[str, str]):
    """A parser of `Label: content` turns joined by blank lines, `markers` mapping "\\n\\nLabel:" to roles;
    the text starts with one of the labels without its blank lines."""

    def parse(text: str) -> list[Turn] | None:
        cursor = _Cursor(text, tuple(markers))
        first = next(m for m in markers if text.startswith(m[2:]))
        role, pos = markers[first], len(first) - 2
        turns: list[Turn] = []
        while len(turns) < MAX_TURNS:
            stop, marker = cursor.find(pos)
            if marker is None:
                turns.append((role, text[pos:]))
                return turns
            turns.append((role, text[pos:stop]))
            role, pos = markers[marker], stop + len(marker)
        return None

    return parse


_PARSERS: tuple[tuple[str, tuple[str, ...], Callable[[str], list[Turn] | None]], ...] = (
    (
        "llama3",
        ("<|start_header_id|>",),
        _headers("<|start_header_id|>", "<|end_header_id|>", ("<|eot_id|>", "<|eom_id|>"), {
            "system": "system", "user": "user", "assistant": "assistant",
        }),
    ),
    (
        "chatml",
        ("<|im_start|>",),
        _headers("<|im_start|>", "\n", ("<|im_end|>",), {
            "system": "system", "user": "user", "assistant": "assistant",
        }),
    ),
    (
        "gemma",
        ("<start_of_turn>",),
        _headers("<start_of_turn>", "\n", ("<end_of_turn>",), {
            "system": "system", "user": "user", "model": "assistant", "assistant": "assistant",
        }),
    ),
    ("mistral", (_INST,), _mistral),
    (
        "human_assistant",
        ("Human:",),
        _labelled({"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}),
    ),
    (
        "plain",
        ("User: ", "System: "),
        _labelled({
            "\n\nSystem:": "system", "\n\nUser:": "user", "\n\nAssistant:": "assistant", "\n\nTool:": "tool",
        }),
    ),
)  # fmt: skip
