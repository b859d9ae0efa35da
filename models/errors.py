"""Errors the user can fix, and one-line, field-named descriptions of pydantic validation errors."""

from __future__ import annotations

from pydantic import ValidationError


class PolyrewardError(Exception):
    """Bad input, a damaged artifact, a wrong file: the CLI prints the message (no traceback) and exits 2."""


def describe(error: ValidationError, limit: int = 3) -> str:
    """`messages[1].role: Input should be ...; input.max_length: ...` (at most `limit` errors)."""
    return describe_errors(error.errors(), limit)


def describe_errors(errors: list, limit: int = 3) -> str:
    """`describe` for pydantic's error dicts (e.g. FastAPI's, whose locations start with "body")."""
    parts = []
    for err in errors[:limit]:
        path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{path}: {msg}" if path else msg)
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
