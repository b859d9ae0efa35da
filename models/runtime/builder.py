"""The one input builder: items -> token ids with the reward and gating positions.

Featurization, export checks, the scorer and the service all turn conversations into model inputs through
`InputBuilder.build` (then `polyreward.models.runtime.batching.collate`) and nothing else, so training and
serving cannot drift apart.

Conventions (the README's "How inputs become tokens"; docs/architecture.md for the flow):

* The prompt part is everything before the final assistant turn. The reward is read at the last real token
  of the whole conversation; the gating embedding at the last token of the prompt part (decoders: from the
  same pass; encoders: the prompt encoded on its own and mean-pooled).
* Over-long inputs keep their leading special tokens (BOS/CLS), then drop the oldest tokens first (prompt,
  then the start of the response), so the end of the response, where the reward is read, always survives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError
from tokenizers import Tokenizer

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.items import Item, Message, TextItem
from polyreward.models.runtime.manifest import InputPolicy, Truncation

Kind = Literal["encoder", "decoder"]
# Leading / trailing special tokens (BOS, CLS / SEP, EOS) kept through truncation; at most this many each.
_MAX_PROTECTED = 2


class InputRejected(PolyrewardError, ValueError):
    """A valid item this model cannot score; `reason` is the message without the item's location."""

    error_type = "input_rejected"

    def __init__(self, index: int, reason: str):
        self.index, self.reason = index, reason
        super().__init__(f"items[{index}]: {reason}")


class InputTooLong(InputRejected):
    error_type = "input_too_long"

    def __init__(self, index: int, tokens: int, max_length: int):
        self.tokens, self.max_length = tokens, max_length
        super().__init__(index, f"{tokens} tokens exceeds max_length {max_length} and truncation is 'error'")


class TemplateRefused(InputRejected):
    error_type = "template_refused"


class NoGatingMarker(InputRejected):
    """The conversation lacks the text the model reads its gating embedding at (ArmoRM's assistant header)."""

    error_type = "no_gating_marker"

    def __init__(self, index: int, marker: str, truncated: bool):
        where = "left after truncating to max_length" if truncated else "in the conversation"
        super().__init__(
            index,
            f"no {marker!r} {where}: this model reads its gating weights at the assistant header that opens "
            "the final reply, so send `messages` ending with the assistant turn, or `text` in its chat template",
        )


@dataclass(frozen=True)
class Encoded:
    """One item ready for batching. Positions index `input_ids` (unpadded)."""

    input_ids: tuple[int, ...]
    gating_pos: int  # last token of the prompt part (decoders read the gating embedding here)
    prompt_ids: tuple[int, ...] | None  # encoders only: the prompt part tokenized on its own
    truncated: bool

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def render_plain(messages: Sequence[Message]) -> str:
    """The documented template for tokenizers without a chat template: 'User: ..' turns joined by blank lines."""
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in messages)


class InputBuilder:
    """Turns items into `Encoded` inputs for one tokenizer, backbone kind and input policy."""

    def __init__(self, tokenizer, kind: Kind, policy: InputPolicy):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("polyreward needs a fast (Rust) tokenizer with offsets; got a slow one")
        self.tokenizer = tokenizer
        self.kind: Kind = kind
        self.policy = policy
        # A private copy of the Rust tokenizer with the file's own truncation/padding switched off.
        self._tok = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._special = frozenset(tokenizer.all_special_ids)
        # Templated text carries its own BOS; the plain template relies on the tokenizer's post-processor.
        self._add_special = policy.template == "plain"
        self.response_marker = self._find_response_marker()
        marker = policy.gating_marker
        self._gating_ids = self._tok.encode(marker, add_special_tokens=False).ids if marker else None
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    @classmethod
    def template_for(cls, tokenizer) -> Literal["chat", "plain"]:
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"

    def render(self, messages: Sequence[Message]) -> str:
        if not messages:
            return ""
        if self.policy.template == "plain":
            return render_plain(messages)
        return self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], tokenize=False, add_generation_prompt=False
        )

    def _find_response_marker(self) -> str:
        """The text that opens an assistant turn in this template (used to split raw `text` items)."""
        prompt = [Message(role="user", content="\x01P")]
        reply = "\x02R"
        full = self.render([*prompt, Message(role="assistant", content=reply)])
        head = _shared_prefix(self.render(prompt), full)
        return full[len(head) : full.index(reply)]

    def split(self, item: Item) -> tuple[str, str]:
        """(prompt part, whole conversation) as rendered text; the prompt part is a prefix of the whole."""
        if isinstance(item, TextItem):
            text = item.text
            cut = text.rfind(self.response_marker) if self.response_marker else -1
            # No assistant marker: nothing tells prompt from response, so the gating reads the whole text.
            return (text[:cut] if cut >= 0 else text), text
        messages = item.as_messages() or []
        full = self.render(messages)
        prompt = self.render(messages[:-1])
        return _shared_prefix(prompt, full), full

    def _split_item(self, index: int, item: Item) -> tuple[str, str]:
        try:
            return self.split(item)
        except TemplateError as e:  # e.g. Gemma's and Mistral's templates raise on a system turn
            raise TemplateRefused(
                index, f"the model's chat template refused this conversation: {e}"
            ) from None

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Each text's length in this model's tokens, without special tokens (length rules)."""
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def build(self, items: Sequence[Item], truncation: Truncation | None = None) -> list[Encoded]:
        """Tokenize a list of items (in one Rust call) and apply truncation; results in input order.

        `truncation` overrides the artifact's policy for this call ("error" refuses over-long items).
        """
        refuse = (truncation or self.policy.truncation) == "error"
        parts = [self._split_item(i, it) for i, it in enumerate(items)]
        encodings = self._tok.encode_batch([full for _, full in parts], add_special_tokens=self._add_special)
        prompt_ids: dict[str, list[int]] = {}
        if self.kind == "encoder":  # each distinct prompt tokenized once
            distinct = list(dict.fromkeys(p for p, _ in parts))
            encoded = self._tok.encode_batch(distinct, add_special_tokens=self._add_special)
            prompt_ids = {text: enc.ids for text, enc in zip(distinct, encoded, strict=True)}
        out = []
        for i, ((prompt, _), enc) in enumerate(zip(parts, encodings, strict=True)):
            ids = list(enc.ids)
            gating_pos = 0  # encoders read the gating embedding from the prompt's own pass instead
            if self.kind == "decoder":
                n_prompt = len(prompt)
                gating_pos = max(
                    (j for j, (_, end) in enumerate(enc.offsets) if 0 < end <= n_prompt), default=0
                )
            ids, gating_pos, truncated = self._truncate(i, ids, gating_pos, refuse)
            if self._gating_ids:
                gating_pos = _last_occurrence(ids, self._gating_ids)
                if gating_pos < 0:
                    raise NoGatingMarker(i, self.policy.gating_marker or "", truncated)
            p_ids = None
            if self.kind == "encoder":
                p_ids, _, p_trunc = self._truncate(i, prompt_ids[prompt] or ids[:1], 0, refuse)
                truncated = truncated or p_trunc
                p_ids = tuple(p_ids)
            out.append(Encoded(tuple(ids), gating_pos, p_ids, truncated))
        return out

    def _truncate(
        self, index: int, ids: list[int], gating_pos: int, refuse: bool
    ) -> tuple[list[int], int, bool]:
        max_len = self.policy.max_length
        if len(ids) <= max_len:
            return ids, gating_pos, False
        if refuse:
            raise InputTooLong(index, len(ids), max_len)
        head = _run_length(ids, self._special)
        drop = len(ids) - max_len
        kept = ids[:head] + ids[head + drop :]
        if gating_pos >= head + drop:
            gating_pos -= drop
        elif gating_pos >= head:  # the whole prompt part was dropped: fall back to the leading special token
            gating_pos = max(head - 1, 0)
        return kept, gating_pos, True


def _shared_prefix(a: str, b: str) -> str:
    """The longest common prefix of two strings, character by character (what templates share)."""
    return os.path.commonprefix([a, b])  # noqa: RUF071 - character-wise is exactly what is meant


def _last_occurrence(ids: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of `pattern` in `ids`, or -1 (ArmoRM's `find_token_for_gating`)."""
    n = len(pattern)
    for j in range(len(ids) - n, -1, -1):
        if ids[j] == pattern[0] and ids[j : j + n] == pattern:
            return j
    return -1


def _run_length(ids: list[int], special: frozenset[int]) -> int:
    n = 0
    while n < min(_MAX_PROTECTED, len(ids)) and ids[n] in special:
        n += 1
    return n


# Decoders' default length limit when the model's own is longer: the length Skywork evaluates its V2 reward
# models at. Their attention is chunked (memory linear in length), so an item this long scores in a batch of its
# own; `--max-length` goes up to the model's context.
DECODER_MAX_LENGTH = 16384


def input_policy(
    config,
    tokenizer,
    kind: Kind,
    *,
    max_length: int | None = None,
    truncation: Truncation = "left",
    padding_side: Literal["left", "right"] | None = None,
) -> InputPolicy:
    """The input policy for a backbone: one place, so featurization and export always agree.

    Defaults: the model's own length limit (capped at 512 for encoders, `DECODER_MAX_LENGTH` for decoders); right
    padding for encoders, left for decoders.
    """
    if max_length is None:
        limits = [
            getattr(config, "max_position_embeddings", None),
            getattr(tokenizer, "model_max_length", None),
        ]
        usable = [int(v) for v in limits if isinstance(v, int) and 8 <= v < 1_000_000]
        max_length = min([*usable, 512 if kind == "encoder" else DECODER_MAX_LENGTH])
    return InputPolicy(
        template=InputBuilder.template_for(tokenizer),
        max_length=max_length,
        truncation=truncation,
        padding_side=padding_side or ("left" if kind == "decoder" else "right"),
    )
