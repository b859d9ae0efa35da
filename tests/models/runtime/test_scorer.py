"""The scorer's phases on a real exported artifact: the batching policy is a value, and neither prompt
deduplication nor the gating cache changes a score."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest

from polyreward.models.runtime.batching import BatchingPolicy
from polyreward.models.runtime.gating_cache import GatingCache, prompt_key
from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.scorer import Scorer
from polyreward.models.runtime.session import create_session


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


def test_the_gating_cache_reuses_a_prompts_weights_and_changes_no_score(export_family, mixed_items):
    """A prompt seen before skips its gating pass (one 1-token stand-in row), and every result (gating, score,
    rewards) is what the scorer without the cache gives; the cached score is Σ g·(r @ T) from the manifest."""
    artifact = export_family("minilm")
    plain = Scorer(artifact, precision="fp32", device="cpu", gating_cache=0)
    assert plain.gating_cache is None
    cached = Scorer(artifact, precision="fp32", device="cpu")
    items = mixed_items
    want = plain.score(items)
    first = cached.score(items)  # fills the cache
    encoded = cached.tokenize(items)
    distinct = {e.prompt_ids for e in encoded}
    assert len(cached.gating_cache) == len(distinct) < len(items)  # mixed_items share some prompts
    # `score` computed each distinct prompt once, in prompt-only passes, before the items' batches
    assert cached.gating_cache.misses == len(distinct) and cached.gating_cache.hits == len(items)
    assert cached.prime_gating(encoded) == 0  # all known now
    feeds = cached.collate(encoded)
    assert feeds["prompt_input_ids"].shape == (1, 1) and len(feeds.cached) == len(items)
    again = cached.score(items)  # every prompt known now
    assert cached.gating_cache.hits >= len(items)
    transform = np.array(cached.manifest.transform)
    for w, f, a in zip(want, first, again, strict=True):
        assert np.allclose(a.gating, w.gating, atol=1e-6) and np.allclose(f.gating, w.gating, atol=1e-6)
        assert np.allclose(a.rewards, w.rewards, atol=1e-5)
        assert abs(a.score - w.score) <= 1e-5 and abs(f.score - w.score) <= 1e-5
        assert abs(a.score - float(np.dot(a.gating, np.array(a.rewards) @ transform))) <= 1e-5
    cached.gating_cache.clear()
    small = GatingCache(max_items=2)
    for i in range(3):
        small.put(prompt_key([i]), {"gating": np.ones(2)})
    assert len(small) == 2 and small.get(prompt_key([0])) is None  # the oldest left first


def test_the_baseline_without_deduplication_bypasses_the_cache(export_family):
    scorer = Scorer(export_family("minilm"), precision="fp32", device="cpu")
    group = [PromptItem(prompt="Name a prime number.", response=r) for r in ("2", "Seven.")]
    scorer.score(group)
    each = replace(scorer.policy, dedup_prompts=False)
    feeds = scorer.collate(scorer.tokenize(group), each)
    assert len(feeds["prompt_input_ids"]) == 2 and not feeds.cached


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_low_priority_session_lowers_only_its_own_threads(export_family, mixed_items):
    """`nice` lowers the priority of the intra-op threads the session starts, not the caller's; the second
    session (a server's express lane) keeps the process's, and both score the same."""
    scorer = Scorer(export_family("minilm"), precision="fp32", device="cpu", threads=2)
    tasks = lambda: {int(t) for t in os.listdir("/proc/self/task")}  # noqa: E731
    mine, before = _nice(threading.get_native_id()), tasks()
    low = create_session(scorer._graph, "cpu", threads=3, nice=7)
    pool = tasks() - before
    assert len(pool) == 2 and all(_nice(t) == max(7, mine) for t in pool)  # 3 threads: the caller and 2
    assert _nice(threading.get_native_id()) == mine
    before = tasks()
    second = scorer.second_session()
    assert all(_nice(t) == mine for t in tasks() - before)
    feeds = scorer.collate(scorer.tokenize(mixed_items[:8]))
    ours, theirs = scorer.forward(feeds, low), scorer.forward(feeds, second)
    assert np.abs(ours["score"] - theirs["score"]).max() <= 1e-6
