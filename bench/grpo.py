"""A GRPO-shaped step: 64 prompts × 8 responses scored at once, four ways.

Prompts and responses are RMB best-of-N sets (the best answer and its losers, cycled up to 8 per prompt).
`no-dedup`: every item encodes its own prompt (what a reward model that gates per item does); `dedup`: the
items of one batch that share a prompt share its gating pass; `dedup+cache`: each prompt's gating pass runs
once in the step, whatever batch its responses land in (the gating cache, emptied before every step);
`floor`: every prompt already cached, so no gating pass runs at all (the cost floor the cache is held to).
The four take turns, round after round; each is the median of its rounds, and `cache_vs_floor` the median of
the rounds' ratios. `gating_pass_vs_floor`: the step's distinct prompts through their gating passes alone (what
the cache cannot remove) over the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

from bench.common import DATA, add_common, artifact_path, emit, jsonl, scorer_settings, timed
from bench.machine import cpu_model

# (name, deduplicate prompts within a batch, gating cache: None off, "cold" emptied each step, "warm" full)
VARIANTS = [
    ("no-dedup", False, None),
    ("dedup", True, None),
    ("dedup+cache", True, "cold"),
    ("floor", True, "warm"),
]


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
        cache = scorer.gating_cache
        if cache is None:
            raise SystemExit(
                f"{artifact}: this model has no gating cache (a decoder, or no recorded transform)"
            )

        def step(dedup: bool, mode: str | None, scorer=scorer, cache=cache) -> None:
            scorer.gating_cache = cache if mode else None
            if mode == "cold":
                cache.clear()
            scorer.score(items, policy=replace(scorer.policy, dedup_prompts=dedup))

        # The variants take turns, round after round (medians): on a shared machine the speed drifts within
        # a minute, and variants timed one after another would drift apart with it.
        runs: dict[str, list[float]] = {variant: [] for variant, _, _ in VARIANTS}
        for round_ in range(args.repeats + 1):  # round 0: the warm-up
            for variant, dedup, mode in VARIANTS:
                started = time.perf_counter()
                step(dedup, mode)
                if round_:
                    runs[variant].append(time.perf_counter() - started)
        seconds = {variant: statistics.median(times) for variant, times in runs.items()}
        # The cache against the floor round by round (the two ran seconds apart), and what the step's own gating
        # pass costs: its 64 prompts through `prime_gating` alone, the work the cache cannot remove.
        paired = statistics.median(c / f for c, f in zip(runs["dedup+cache"], runs["floor"], strict=True))
        scorer.gating_cache, encoded = cache, scorer.tokenize(items)

        def gating_pass_alone(scorer=scorer, cache=cache, encoded=encoded) -> None:
            cache.clear()
            scorer.prime_gating(encoded)

        gating_pass = timed(gating_pass_alone, args.repeats)
        for variant, _, _ in VARIANTS:
            record = {
                **common, "engine": f"scorer-{precision}", "variant": variant,
                "seconds": round(seconds[variant], 3), "items_per_s": round(len(items) / seconds[variant], 2),
                "speedup_vs_no_dedup": round(seconds["no-dedup"] / seconds[variant], 2),
            }  # fmt: skip
            if variant == "floor":
                record["cache_vs_floor"] = round(paired, 3)
                record["gating_pass_vs_floor"] = round(gating_pass / seconds["floor"], 3)
            records.append(emit(record, args.json))
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench grpo", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
