"""Toy datasets for the data tests: rows, a JSONL writer and a pairs spec."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from polyreward.models.runtime.items import Message
from polyreward.training.data import DatasetSpec

PAIRS = [
    {"uid": "a", "q": "What is 2+2?", "good": "4", "bad": "5"},
    {"uid": "b", "q": "Capital of France?", "good": "Paris", "bad": "Lyon"},
    {"uid": "c", "q": "Largest planet?", "good": "Jupiter", "bad": "Mars"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def pairs_spec(path: Path, **options) -> DatasetSpec:
    base = {
        "name": "toy",
        "path": str(path),
        "kind": "pairs",
        "prompt": "q",
        "chosen": "good",
        "rejected": "bad",
    }
    return DatasetSpec(**{**base, **options})


def user(text: str) -> Message:
    return Message(role="user", content=text)
