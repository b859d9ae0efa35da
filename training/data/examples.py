"""The one example schema every data adapter maps onto: rated responses, preference pairs, best-of-N sets.

A conversation's prompt part is a list of messages without the final assistant turn; the responses are the
final assistant replies. `dataset` names the configured dataset, `split` is "train" or "test" (chosen by a
stable hash of the example id, see `polyreward.training.data.splits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from polyreward.models.runtime.items import ChatItem, Message


def scale_label(value: float, scale: tuple[float, float] | None) -> float:
    """A rating mapped from its label scale (lo, hi) onto [0, 1]; NaN (missing) and unscaled labels pass through."""
    if scale is None or math.isnan(value):
        return value
    lo, hi = scale
    return (value - lo) / (hi - lo)


def conversation(prompt: list[Message], response: str) -> ChatItem:
    return ChatItem(messages=[*prompt, Message(role="assistant", content=response)])


@dataclass
class RatingExample:
    """One response with absolute ratings: objective -> value (NaN when this example does not rate it)."""

    id: str
    dataset: str
    prompt: list[Message]
    response: str
    ratings: dict[str, float]
    split: str = "train"
    subset: str | None = None

    @property
    def item(self) -> ChatItem:
        return conversation(self.prompt, self.response)

    def rating(self, objective: str) -> float:
        return self.ratings.get(objective, math.nan)


@dataclass
class PairExample:
    """chosen ≻ rejected for the same prompt; `objective` says which objective the preference expresses."""

    id: str
    dataset: str
    prompt: list[Message]
    chosen: str
    rejected: str
    objective: str | None = None
    tie: bool = False
    split: str = "train"
    subset: str | None = None

    @property
    def items(self) -> tuple[ChatItem, ChatItem]:
        return conversation(self.prompt, self.chosen), conversation(self.prompt, self.rejected)


@dataclass
class BonExample:
    """Best-of-N: `best` should score above every one of `losers`."""

    id: str
    dataset: str
    prompt: list[Message]
    best: str
    losers: list[str]
    objective: str | None = None
    split: str = "test"
    subset: str | None = None

    @property
    def items(self) -> list[ChatItem]:
        return [conversation(self.prompt, r) for r in [self.best, *self.losers]]


@dataclass
class Examples:
    """Everything read from one or more datasets."""

    ratings: list[RatingExample] = field(default_factory=list)
    pairs: list[PairExample] = field(default_factory=list)
    bon: list[BonExample] = field(default_factory=list)

    def extend(self, other: Examples) -> None:
        self.ratings += other.ratings
        self.pairs += other.pairs
        self.bon += other.bon

    def where(self, split: str) -> Examples:
        return Examples(
            [e for e in self.ratings if e.split == split],
            [e for e in self.pairs if e.split == split],
            [e for e in self.bon if e.split == split],
        )
