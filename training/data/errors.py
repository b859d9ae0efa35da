"""Errors of the data readers: every message names the file, the line and the field."""

from __future__ import annotations

from polyreward.models.runtime.errors import PolyrewardError


class DataError(PolyrewardError, ValueError):
    """A data file or dataset spec the user must fix; the message names the file, the line and the field."""


class RowError(DataError):
    """A malformed value in one row. `reason` (field and problem, without the line) counts it by kind when the
    spec says `on_invalid: skip`."""

    def __init__(self, where: str, field: str, problem: str):
        self.reason = f"field '{field}': {problem}"
        super().__init__(f"{where}: {self.reason}")


class Skipped(Exception):
    """A row left out on purpose (an unlisted label, identical replies): counted by reason and logged."""
