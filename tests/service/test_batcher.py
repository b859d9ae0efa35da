"""The dynamic batcher on a real exported MiniLM artifact: concurrency, queue cap, deadlines, errors, draining."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from polyreward.models.runtime.scorer import Scorer
from polyreward.service.batcher import Batcher, BatchStats, QueueFull

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scorer(export_family):
    return Scorer(export_family("minilm"), precision="fp32", device="cpu", max_batch_items=32)


def run_with(scorer, coro_fn, **options):
    stats: list[BatchStats] = []
    batcher = Batcher(scorer, on_batch=stats.append, **options)
    batcher.start()
    try:
        return asyncio.run(coro_fn(batcher)), stats, batcher
    finally:
        batcher.stop(timeout=30)


@pytest.mark.parametrize(("workers", "busy_threads"), [(1, None), (2, None), (2, 1)])
def test_concurrent_single_item_requests_are_batched_and_match_offline(
    scorer, mixed_items, workers, busy_threads
):
    items = mixed_items[:64]

    async def clients(batcher):
        return await asyncio.gather(*(batcher.score([it]) for it in items))

    results, stats, _ = run_with(scorer, clients, workers=workers, busy_threads=busy_threads)
    offline = scorer.score(items)
    got = np.array([r[0].rewards + r[0].gating + [r[0].score] for r in results])
    want = np.array([r.rewards + r.gating + [r.score] for r in offline])
    assert np.abs(got - want).max() <= 1e-4
    assert sum(s.items for s in stats) == 64
    assert np.mean([s.items for s in stats]) > 1  # requests really were batched together
    assert all(s.padded_tokens >= s.real_tokens for s in stats)


def test_queue_cap_rejects_the_excess_with_retry_after_and_serves_the_rest(scorer, mixed_items, monkeypatch):
    gate = threading.Event()  # holds the device busy until the whole burst has arrived
    real_forward = scorer.forward
    monkeypatch.setattr(
        scorer, "forward", lambda feeds, session=None: (gate.wait(30), real_forward(feeds, session))[1]
    )

    async def burst(batcher):
        tasks = [asyncio.ensure_future(batcher.score([it])) for it in mixed_items[:40]]
        await asyncio.sleep(1.0)  # every request tokenized and queued or refused
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results, _, _ = run_with(scorer, burst, max_queue_items=8)
    rejected = [r for r in results if isinstance(r, QueueFull)]
    served = [(i, r) for i, r in enumerate(results) if isinstance(r, list)]
    assert rejected and served and len(rejected) + len(served) == 40
    assert all(r.retry_after > 0 for r in rejected)
    offline = scorer.score([mixed_items[i] for i, _ in served])
    assert max(abs(r[0].score - o.score) for (_, r), o in zip(served, offline, strict=True)) <= 1e-4


def test_a_request_past_its_deadline_leaves_the_queue(scorer, mixed_items):
    async def scenario(batcher):
        slow = [batcher.score(mixed_items[:32]) for _ in range(4)]  # keep the device busy
        late = batcher.score(mixed_items[:2], timeout=0.001)
        out = await asyncio.gather(*slow, late, return_exceptions=True)
        return out, batcher.queue_depth

    (out, depth), stats, _ = run_with(scorer, scenario)
    assert isinstance(out[-1], TimeoutError)
    assert all(isinstance(r, list) and len(r) == 32 for r in out[:-1])
    assert depth == 0
    assert sum(s.items for s in stats) <= 4 * 32 + 2


def test_an_inference_error_fails_only_its_batch(scorer, mixed_items, monkeypatch):
    calls = {"n": 0}
    real_forward = scorer.forward

    def flaky(feeds, session=None):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real_forward(feeds, session)

    monkeypatch.setattr(scorer, "forward", flaky)

    async def scenario(batcher):
        first = await asyncio.gather(batcher.score(mixed_items[:3]), return_exceptions=True)
        second = await batcher.score(mixed_items[3:6])
        return first[0], second

    (first, second), _, _ = run_with(scorer, scenario)
    assert isinstance(first, RuntimeError) and "device lost" in str(first)
    assert len(second) == 3


def test_stop_finishes_queued_work(scorer, mixed_items, monkeypatch):
    gate = threading.Event()
    real_forward = scorer.forward
    monkeypatch.setattr(
        scorer, "forward", lambda feeds, session=None: (gate.wait(30), real_forward(feeds, session))[1]
    )

    async def scenario(batcher):
        tasks = [asyncio.ensure_future(batcher.score([it])) for it in mixed_items[:20]]
        await asyncio.sleep(1.0)  # all queued; the first batch is held on the device
        stopping = asyncio.get_running_loop().run_in_executor(None, batcher.stop, 30)
        refused = await asyncio.gather(batcher.score(mixed_items[:1]), return_exceptions=True)
        gate.set()
        await stopping
        return await asyncio.gather(*tasks), refused[0]

    (results, refused), stats, _ = run_with(scorer, scenario)
    assert len(results) == 20 and all(len(r) == 1 for r in results)
    assert sum(s.items for s in stats) == 20
    assert isinstance(refused, QueueFull)  # a draining batcher takes no new work


def test_two_workers_run_batches_side_by_side(scorer, mixed_items, monkeypatch):
    """The first batch runs on the scorer's session with all its threads; one that starts while another runs
    takes the one-thread session (`busy_threads`), so two batches do not fight over the cores."""
    running, most = 0, 0
    sessions: list[tuple[int, object]] = []  # (batches already running, the session passed) per batch
    lock = threading.Lock()
    real_forward = scorer.forward

    def infer(feeds, session=None):
        nonlocal running, most
        with lock:
            sessions.append((running, session))
            running += 1
            most = max(most, running)
        try:
            return real_forward(feeds, session)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(scorer, "forward", infer)

    async def clients(batcher):
        return await asyncio.gather(*(batcher.score([it]) for it in mixed_items[:48]))

    results, stats, batcher = run_with(scorer, clients, workers=2, busy_threads=1)
    assert most == 2  # two batches were in the session at once
    assert sum(s.items for s in stats) == 48 and all(len(r) == 1 for r in results)
    assert sessions[0] == (0, None)  # the first batch had the machine to itself: every thread
    narrow = batcher._busy_session
    assert narrow.get_session_options().intra_op_num_threads == 1
    assert all(session is narrow for ahead, session in sessions if ahead)  # beside another: one thread
