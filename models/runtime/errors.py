"""Errors the user can fix, and one-line, field-named descriptions of pydantic validation errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import get_args

from pydantic import BaseModel, ValidationError


class PolyrewardError(Exception):
    """Bad input, a damaged artifact, a wrong file: the CLI prints the message (no traceback) and exits 2."""


def describe(error: ValidationError, limit: int = 3, known: Iterable[str] = ()) -> str:
    """`messages[1].role: Input should be ...; input.max_length: ...` (at most `limit` errors)."""
    return describe_errors(error.errors(), limit, known)


def describe_errors(errors: list, limit: int = 3, known: Iterable[str] = ()) -> str:
    """`describe` for pydantic's error dicts (e.g. FastAPI's, whose locations start with "body").

    Locations drop the tags of discriminated unions (written `<...>`, see `polyreward.models.runtime.items`).
    An unknown field comes first and names the closest known one: a required field missing beside it (whose
    own error it then replaces), else one of `known` (`items[0].respnse: unknown field; did you mean 'response'?`).
    """
    errors = [{**e, "loc": tuple(x for x in e["loc"] if not _is_tag(x))} for e in errors]
    missing = {e["loc"] for e in errors if e["type"] == "missing"}
    explained: set[tuple] = set()
    parts = []
    for err in sorted(
        errors, key=lambda e: e["type"] != "extra_forbidden"
    ):  # stable: the rest keep their order
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent, name = err["loc"][:-1], str(err["loc"][-1])
            meant = closest(name, [str(loc[-1]) for loc in missing if loc[:-1] == parent])
            if meant:
                explained.add((*parent, meant))
            msg = "unknown field" + _did_you_mean(meant or closest(name, known))
        elif err["loc"] in explained:
            continue
        path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        parts.append(f"{path}: {msg}" if path else msg)
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f" (and {more} more)" if more > 0 else "")


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate `name` is most likely a typo of, if any is close."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return close[0] if close else None


def suggestion(name: str, candidates: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest candidate, or nothing."""
    return _did_you_mean(closest(name, candidates))


def _did_you_mean(name: str | None) -> str:
    return f"; did you mean {name!r}?" if name else ""


def field_names(*models: type[BaseModel]) -> set[str]:
    """Every field name (or alias) of these models and the models inside them: what "did you mean" picks from."""
    seen: set[type] = set()
    names: set[str] = set()

    def visit(annotation) -> None:
        for arg in get_args(annotation):
            visit(arg)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation not in seen:
            seen.add(annotation)
            for name, f in annotation.model_fields.items():
                names.add(f.alias or name)
                visit(f.annotation)

    for model in models:
        visit(model)
    return names


def _is_tag(segment: object) -> bool:
    return isinstance(segment, str) and segment.startswith("<") and segment.endswith(">")
