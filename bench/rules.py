"""Rule objectives: what each kind adds per item, against scoring the same items with the model alone.

Items are real RMB replies (chosen and rejected of the first pairs, very mixed lengths) with a `label` and a
reasoning trace prepended, so every rule and the strip do real work. Each kind is timed alone
(`RuleSet.evaluate`, worker processes already warm), then all of them through `RuleSet.score` (strip, the
model, the rules) against `Scorer.score` on the same stripped items in the same run. In the service the rules run
beside the model's batches, so what they add to a request is at most their own time, not the sum.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import yaml

from bench.common import DATA, add_common, artifact_path, emit, jsonl, scorer_settings, timed
from bench.machine import cpu_model

RULES = {
    "format": {"kind": "format", "pattern": r"(?s)^\s*<think>.+</think>\s*\S", "input": "original"},
    "length": {"kind": "length", "min": 20, "max": 400, "tolerance": 200},
    "length_tokens": {"kind": "length", "unit": "tokens", "min": 20, "max": 600},
    "json": {"kind": "json", "extract": r"(?s)```json\s*(.*?)```", "schema": {"type": "object"}},
    "exact": {"kind": "exact", "extract": r"(?i)answer is:?\s*(.+)"},
    "math": {"kind": "math"},
}
STRIP = {"pattern": r"(?s)<think>.*?</think>\s*"}


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--items", type=int, default=256)


def rule_items(n: int):
    from polyreward.models.runtime.items import ChatItem

    items = []
    for row in jsonl(DATA / "rmb/pairwise.jsonl.gz", (n + 1) // 2):
        for reply in (row["chosen"], row["rejected"]):
            text = f"<think>Let me check the question carefully first.</think>\n{reply}"
            items.append(
                ChatItem(messages=[*row["conversation"], {"role": "assistant", "content": text}], label="42")
            )
    return items[:n]


def rule_set(rules: dict, strip: dict | None):
    from polyreward.models.runtime.rules import RuleSet

    path = Path(tempfile.mkdtemp()) / "rules.yaml"
    path.write_text(yaml.safe_dump({"strip": strip, "rules": rules} if strip else {"rules": rules}))
    return RuleSet.load(path)


def run(args) -> list[dict]:
    from polyreward.models.runtime.scorer import Scorer

    items = rule_items(args.items)
    scorer = Scorer(  # no gating cache: the rounds repeat the same items (bench/offline.py)
        artifact_path(args.artifact), precision="fp32", device="cpu", gating_cache=0,
        **scorer_settings(args.config),
    )  # fmt: skip
    common = {"workload": "rules", "items": len(items), "cpu": cpu_model(), "cores": os.cpu_count()}
    records = []
    stripped, _ = rule_set({}, STRIP).strip(items)  # the baseline reads what the heads read with the rules on
    model = timed(lambda: scorer.score(stripped), args.repeats)
    records.append(
        emit(
            {**common, "engine": "scorer-fp32", "ms_per_item": round(1e3 * model / len(items), 3)}, args.json
        )
    )
    for name, spec in RULES.items():
        rules = rule_set({name: spec}, None)
        try:
            rules.warm()
            seconds = timed(
                lambda r=rules: r.evaluate(items, items, scorer.builder.count_tokens), args.repeats
            )
        finally:
            rules.close()
        records.append(emit({**common, "rule": name, "kind": spec["kind"], "ms_per_item": round(1e3 * seconds / len(items), 3),
                             "vs_model": round(seconds / model, 4)}, args.json))  # fmt: skip
    rules = rule_set(RULES, STRIP)
    try:
        rules.warm()
        both = timed(lambda: rules.score(scorer, items), args.repeats)
    finally:
        rules.close()
    records.append(emit({**common, "engine": "scorer-fp32+all-rules", "ms_per_item": round(1e3 * both / len(items), 3),
                         "added_ms_per_item": round(1e3 * (both - model) / len(items), 3),
                         "ratio_vs_model": round(both / model, 3)}, args.json))  # fmt: skip
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench rules", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
