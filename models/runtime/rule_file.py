"""The rule file's schema: what `polyreward.models.runtime.rules` reads (its docstring has the format and the
value of each kind). Patterns are RE2; a file that does not validate is a `RuleError` naming the field."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.objectives import _NAME

Input = Literal["reply", "original"]
KINDS = ("format", "length", "json", "exact", "math")
POOLED = ("json", "math")  # what runs in worker processes under the time limit


class RuleError(PolyrewardError, ValueError):
    """A rule file that cannot be used; the message names the file, the rule and the field."""


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str):
    """An RE2 pattern, or ValueError with RE2's own reason (what RE2 does not support: backreferences,
    lookaround)."""
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options=options)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"RE2 cannot compile {pattern!r}: {reason}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Pattern(_Strict):
    pattern: str = Field(description="an RE2 pattern")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        compile_pattern(v)
        return v


class _Rule(_Strict):
    description: str = ""
    input: Input = Field("reply", description="the reply after `strip` (reply) or before it (original)")


class _Extracting(_Rule):
    extract: str | None = Field(None, description="a pattern with one group: the answer is its last match")

    @field_validator("extract")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        if v is not None and compile_pattern(v).groups != 1:
            raise ValueError(f"{v!r} must have exactly one group (the answer)")
        return v


class FormatRule(_Rule, _Pattern):
    kind: Literal["format"]


class LengthRule(_Rule):
    kind: Literal["length"]
    unit: Literal["words", "tokens"] = "words"
    min: Annotated[int, Field(ge=0)] = 0
    max: Annotated[int, Field(ge=1)] | None = None
    tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        0.0, description="units outside the band over which the value falls from 1 to 0"
    )

    @model_validator(mode="after")
    def _band(self) -> LengthRule:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max: {self.max} is below min {self.min}")
        return self


class JsonRule(_Extracting):
    kind: Literal["json"]
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="a JSON Schema the value must meet"
    )

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, v: dict | None) -> dict | None:
        if v is not None:
            from jsonschema import Draft202012Validator, SchemaError

            try:
                Draft202012Validator.check_schema(v)
            except SchemaError as e:
                raise ValueError(f"not a valid JSON Schema: {e.message}") from None
        return v


class ExactRule(_Extracting):
    kind: Literal["exact"]


class MathRule(_Extracting):
    kind: Literal["math"]


Rule = Annotated[FormatRule | LengthRule | JsonRule | ExactRule | MathRule, Field(discriminator="kind")]


class RuleFile(_Strict):
    strip: _Pattern | None = Field(
        None, description="removed from the reply before the learned heads read it"
    )
    time_limit: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 2.0
    workers: Annotated[int, Field(ge=1, le=32)] = Field(
        2, description="worker processes for json and math (one killed past the limit restarts meanwhile)"
    )
    rules: dict[str, Rule] = Field(default_factory=dict)

    @field_validator("rules")
    @classmethod
    def _names(cls, v: dict[str, Rule]) -> dict[str, Rule]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"rule name {name!r} must match {_NAME.pattern}")
        return v
