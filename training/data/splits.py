"""Splits from a stable hash of the example id, never from a random draw: the held-out part of a set is the same
on every machine and in every run, so evaluation numbers stay comparable."""

from __future__ import annotations

import hashlib

from polyreward.training.data.spec import Split


def _fraction(key: str) -> float:
    """A stable number in [0, 1) for a string: the first 8 bytes of its sha256."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(dataset: str, example_id: str, holdout: float) -> Split:
    """'test' for a stable `holdout` fraction of a dataset's ids, 'train' for the rest (same on every run)."""
    return "test" if _fraction(f"{dataset}:{example_id}") < holdout else "train"


def subsplit(example_id: str, fraction: float, salt: str) -> bool:
    """True for a stable `fraction` of ids (e.g. a validation part inside 'train'); `salt` makes it independent
    of `split_of` and of other subsplits."""
    return _fraction(f"{salt}:{example_id}") < fraction
