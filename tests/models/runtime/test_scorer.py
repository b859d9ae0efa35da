"""The scorer's phases on a real exported artifact: the batching policy is a value, and prompt deduplication
changes no score."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from polyreward.models.runtime.batching import BatchingPolicy
from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.scorer import Scorer


def test_the_policy_follows_the_device_and_a_call_may_replace_it(export_family, mixed_items):
    scorer = Scorer(export_family("minilm"), precision="fp32", device="cpu")
    assert scorer.policy == BatchingPolicy(512, 64) == BatchingPolicy.for_device("cpu")
    assert BatchingPolicy.for_device("cuda") == BatchingPolicy(16384, 64)
    encoded = scorer.tokenize(mixed_items)
    tiny = BatchingPolicy(token_budget=64, max_items=2)
    batches = scorer.plan(encoded, tiny)
    assert all(len(b) <= 2 for b in batches) and len(batches) > len(scorer.plan(encoded))
    small = np.array([r.score for r in scorer.score(mixed_items, policy=tiny)])
    assert np.abs(small - [r.score for r in scorer.score(mixed_items)]).max() <= 1e-5  # fp32: batch-invariant
    assert scorer.policy == BatchingPolicy(512, 64)  # the call did not change the scorer's own


def test_prompt_deduplication_changes_no_score(export_family, mixed_items):
    """The GRPO benchmark's baseline (every item encodes its own prompt) scores exactly what dedup scores."""
    scorer = Scorer(export_family("minilm"), precision="fp32", device="cpu")
    group = [
        PromptItem(prompt="Name a prime number.", response=r) for r in ("2", "Seven.", "9 is prime.", "11")
    ]
    assert len(scorer.collate(scorer.tokenize(group))["prompt_input_ids"]) == 1
    shared = scorer.score(mixed_items + group)
    each = replace(scorer.policy, dedup_prompts=False)
    assert len(scorer.collate(scorer.tokenize(group), each)["prompt_input_ids"]) == 4
    alone = scorer.score(mixed_items + group, policy=each)
    assert np.allclose([r.score for r in shared], [r.score for r in alone], atol=1e-5)
