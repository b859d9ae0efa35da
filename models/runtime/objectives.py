"""Objective specs: what each of the K reward outputs means.

The order of objectives is the order of the columns of every reward, gating and uncertainty output; it is
fixed when heads are trained and recorded in both the heads file and the artifact manifest.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class Objective(BaseModel):
    """One interpretable reward dimension (helpfulness, harmlessness, verbosity, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="identifier used in APIs and files, e.g. 'helpfulness'")
    description: str = ""
    source: str = Field("", description="where its labels came from, e.g. 'just_eval_ratings/helpfulness'")
    scale: tuple[float, float] | None = Field(
        None, description="the label scale, e.g. (1, 5); None if unscaled"
    )

    @field_validator("scale")
    @classmethod
    def _ordered_scale(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"scale {v} must be (lo, hi) with lo < hi")
        return v

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"objective name {v!r} must match {_NAME.pattern}")
        return v


def check_objectives(objectives: list[Objective]) -> list[Objective]:
    """Refuse an empty list or duplicate names; return the list unchanged."""
    if not objectives:
        raise ValueError("at least one objective is required")
    names = [o.name for o in objectives]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate objective names: {dupes}")
    return objectives
