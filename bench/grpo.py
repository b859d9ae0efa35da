"""A GRPO-shaped step: 64 prompts × 8 responses scored at once, with and without prompt deduplication.

Prompts and responses are RMB best-of-N sets (the best answer and its losers, cycled up to 8 per prompt).
With deduplication the items of one batch that share a prompt share its gating pass; without it every item
encodes its own prompt (what a reward model that gates per item does).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from bench.common import DATA, add_common, artifact_path, emit, jsonl, scorer_settings, timed
from bench.machine import cpu_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="responses per prompt")


def grpo_items(prompts: int, group: int):
    from polyreward.models.runtime.items import ChatItem

    rows = [r for r in jsonl(DATA / "rmb/bon.jsonl.gz") if len(r["losers"]) >= 3][:prompts]
    items = []
    for r in rows:
        answers = [r["best"], *(loser["answer"] for loser in r["losers"])]
        items += [
            ChatItem(
                messages=[*r["conversation"], {"role": "assistant", "content": answers[i % len(answers)]}]
            )
            for i in range(group)
        ]
    return items


def run(args) -> list[dict]:
    from polyreward.models.runtime.scorer import Scorer

    artifact = artifact_path(args.artifact)
    items = grpo_items(args.prompts, args.group)
    settings = scorer_settings(args.config)
    common = {
        "workload": "grpo", "prompts": args.prompts, "group": args.group, "items": len(items), "cpu": cpu_model(),
        "cores": os.cpu_count(), "settings": settings or "defaults",
    }  # fmt: skip
    records = []
    for precision in ("fp32", "int8"):
        scorer = Scorer(artifact, precision=precision, device="cpu", **settings)
        seconds = {}
        for dedup in (False, True):
            policy = replace(scorer.policy, dedup_prompts=dedup)
            seconds[dedup] = timed(lambda s=scorer, p=policy: s.score(items, policy=p), args.repeats)
            record = {
                **common, "engine": f"scorer-{precision}", "dedup_prompts": dedup,
                "seconds": round(seconds[dedup], 3), "items_per_s": round(len(items) / seconds[dedup], 2),
            }  # fmt: skip
            if dedup:
                record["speedup_vs_no_dedup"] = round(seconds[False] / seconds[True], 2)
            records.append(emit(record, args.json))
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench grpo", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
