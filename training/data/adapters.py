"""Rows to examples: one row of any kind (ratings, pairs, best-of-N, responses) through its spec."""

from __future__ import annotations

import math
import re
from typing import Any

from polyreward.models.runtime.items import Message
from polyreward.training.data.errors import Skipped
from polyreward.training.data.examples import BonExample, Examples, PairExample, RatingExample
from polyreward.training.data.spec import DatasetSpec, RatingField
from polyreward.training.data.splits import split_of
from polyreward.training.data.values import (
    SourceRow,
    as_flag,
    as_loser_texts,
    as_mapping,
    as_number,
    as_optional_key,
    as_optional_objective,
    as_optional_text,
    as_prompt_messages,
    as_rated_conversation,
    as_text,
    in_scale,
    label_key,
    objective_name,
    parse_hh,
    reduce_samples,
)


def _prompt(spec: DatasetSpec, row: SourceRow) -> list[Message]:
    """The prompt part from a messages field or from prompt field(s) (a one-turn user prompt)."""
    if spec.messages is not None:
        return row.get(spec.messages, as_prompt_messages)
    if isinstance(spec.prompt, str):
        return [Message(role="user", content=row.get(spec.prompt, as_text))]
    parts = (row.get(f, as_optional_text) for f in spec.prompt or [])
    return [Message(role="user", content="\n\n".join(p for p in parts if p))]


def _conversation(
    spec: DatasetSpec, row: SourceRow, replies: list[tuple[str, str]]
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


def _rating(spec: DatasetSpec, row: SourceRow, objective: str, source: str | RatingField) -> float:
    scale = spec.scale_of(objective)
    if isinstance(source, str):
        return row.get(source, lambda v: in_scale(as_number(v), scale))
    return row.get(source.field, lambda v: in_scale(reduce_samples(v, source.reduce), scale))


def _ratings(spec: DatasetSpec, row: SourceRow) -> dict[str, float]:
    if not isinstance(spec.ratings, str):
        return {
            objective: _rating(spec, row, objective, source)
            for objective, source in (spec.ratings or {}).items()
        }
    out = {}
    for objective, value in row.get(spec.ratings, as_mapping).items():
        try:
            out[objective_name(objective)] = in_scale(as_number(value), spec.scale_of(objective))
        except ValueError as e:
            raise row.error(f"{spec.ratings}.{objective}", str(e)) from None
    return out


def _rating_examples(spec: DatasetSpec, row: SourceRow, ident: str, common: dict[str, Any]) -> Examples:
    if spec.response is None:  # `messages` holds the whole conversation, the rated reply last
        prompt, response = row.get(spec.messages or "", as_rated_conversation)
    else:
        prompt, (response,) = _conversation(spec, row, [(spec.response, row.get(spec.response, as_text))])
    ratings = _ratings(spec, row) if spec.kind == "ratings" else {}
    if spec.kind == "ratings" and all(math.isnan(v) for v in ratings.values()):
        raise Skipped("no rating given")
    return Examples(
        ratings=[RatingExample(ident, prompt=prompt, response=response, ratings=ratings, **common)]
    )


def _pair_sides(spec: DatasetSpec, row: SourceRow) -> tuple[str, str, bool]:
    """(field of the preferred reply, field of the other, tie) from chosen/rejected or from an A/B label."""
    if spec.chosen is not None and spec.rejected is not None:
        return spec.chosen, spec.rejected, False
    value = row.get(spec.label or "", lambda v: v)
    a, b, key = spec.response_a or "", spec.response_b or "", label_key(value)
    for values, sides in (
        (spec.label_a, (a, b, False)),
        (spec.label_b, (b, a, False)),
        (spec.label_tie, (a, b, True)),
    ):
        if key in {label_key(v) for v in values}:
            return sides
    raise Skipped(f"label {value!r} not in label_a, label_b or label_tie")


def _tie(spec: DatasetSpec, row: SourceRow) -> bool:
    if spec.tie is not None and row.get(spec.tie, as_flag):
        return True
    if spec.tie_when_equal is not None:
        first, second = (row.get(f, as_number) for f in spec.tie_when_equal)
        return first == second
    return False


def _pair_examples(
    spec: DatasetSpec, row: SourceRow, ident: str, common: dict[str, Any], objective: str | None
) -> Examples:
    first, second, tie = _pair_sides(spec, row)
    replies = [(first, row.get(first, as_text)), (second, row.get(second, as_text))]
    prompt, (chosen, rejected) = _conversation(spec, row, replies)
    if chosen == rejected:
        raise Skipped("chosen and rejected are the same text")
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
    spec: DatasetSpec, row: SourceRow, ident: str, common: dict[str, Any], objective: str | None
) -> Examples:
    best_field, losers_field = spec.best or "", spec.losers or ""
    losers = row.get(losers_field, lambda v: as_loser_texts(v, spec.loser_field))
    replies = [(best_field, row.get(best_field, as_text))]
    replies += [(f"{losers_field}[{i}]", text) for i, text in enumerate(losers)]
    prompt, (best, *others) = _conversation(spec, row, replies)
    if not others:
        raise Skipped("no losers")
    if best in others:
        raise Skipped("best is also a loser")
    return Examples(
        bon=[BonExample(ident, prompt=prompt, best=best, losers=others, objective=objective, **common)]
    )


def _subset(spec: DatasetSpec, row: SourceRow) -> str | None:
    if spec.subset is None:
        return spec.subset_value
    value = row.get(spec.subset, as_optional_key)
    if value is None or spec.subset_pattern is None:
        return value
    match = re.search(spec.subset_pattern, value)
    return value if match is None else match.group(1 if match.re.groups else 0)


def examples_of(spec: DatasetSpec, row: SourceRow, ident: str) -> Examples:
    """One row's examples. Everything from a row shares one split (a pair and the ratings of its sides)."""
    key = row.key(spec.group) if spec.group else ident
    common = {
        "dataset": spec.name,
        "split": split_of(spec.name, key, spec.holdout),
        "subset": _subset(spec, row),
    }
    if spec.kind in ("ratings", "responses"):
        return _rating_examples(spec, row, ident, common)
    objective = row.get(spec.objective, as_optional_objective) if spec.objective else spec.objective_value
    build = _pair_examples if spec.kind == "pairs" else _bon_examples
    return build(spec, row, ident, common, objective)
