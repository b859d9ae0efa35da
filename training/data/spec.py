"""`DatasetSpec`: how one dataset's raw rows map onto the example schema, checked when the config loads."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from polyreward.models.runtime.errors import describe, field_names
from polyreward.training.data.errors import DataError
from polyreward.training.data.values import check_objective_names, label_key

Format = Literal["auto", "jsonl", "json", "parquet", "csv", "hf"]
Split = Literal["train", "test"]
Scale = tuple[float, float]


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
            check_objective_names("ratings", self.ratings)
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
            check_objective_names("pair_ratings", self.pair_ratings)
        elif self.scale is not None:
            raise ValueError("scale: only with pair_ratings for kind pairs")
        self._check_scale(list(self.pair_ratings or {}))

    def _check_label_values(self) -> None:
        owner: dict[str, str] = {}
        for option in ("label_a", "label_b", "label_tie"):
            for value in getattr(self, option):
                first = owner.setdefault(label_key(value), option)
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
            check_objective_names("objective_value", [self.objective_value])
        if self.subset is not None and self.subset_value is not None:
            raise ValueError("give either subset (a field) or subset_value (a constant), not both")
        if self.subset_pattern is not None:
            if self.subset is None:
                raise ValueError("subset_pattern: only with subset (a field)")
            try:
                re.compile(self.subset_pattern)
            except re.error as e:
                raise ValueError(f"subset_pattern: not a valid regular expression ({e})") from None


class _Config(BaseModel):
    """The `datasets:` list of a config, validated in one go so that errors read `datasets[1].chosen: ...`."""

    datasets: list[DatasetSpec]


def load_specs(raw: list[dict], source: str) -> list[DatasetSpec]:
    """Validate a config's list of dataset dicts; errors name the source, e.g. `x.yaml: datasets[1].kind: ...`."""
    try:
        specs = _Config(datasets=raw).datasets
    except ValidationError as e:
        raise DataError(f"{source}: {describe(e, known=field_names(DatasetSpec))}") from None
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        first = seen.setdefault(spec.name, index)
        if first != index:
            raise DataError(
                f"{source}: datasets[{index}].name: {spec.name!r} is also the name of datasets[{first}] "
                "(ids and splits are keyed by it)"
            )
    return specs
