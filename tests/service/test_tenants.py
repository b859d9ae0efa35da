"""Tenants: fair order over tokens (unit), a flood does not hold back another tenant's item (the real batcher
on a real artifact), and a quota's 429 hits only the tenant over it (the app in process)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass

import pytest

from polyreward.models.runtime.scorer import Scorer
from polyreward.service.app import create_app
from polyreward.service.batcher import Batcher
from polyreward.service.settings import Settings
from polyreward.service.tenants import (
    FairQueue,
    Labels,
    TenantPolicy,
    tenant_for_key,
    tenant_from_header,
)


@dataclass(eq=False)
class Job:
    tenant: str
    tokens: int = 100
    cancelled: bool = False

    def gone(self) -> bool:
        return self.cancelled


def drain(queue: FairQueue, batch: int, limit: int) -> list[Job]:
    """Take batches of `batch` items from the front of the fair order, as the batcher does."""
    served: list[Job] = []
    while len(queue) and len(served) < limit:
        window = queue.window(4 * batch)
        queue.take(window[:batch], len(window))
        served += window[:batch]
    return served


def test_a_flood_runs_ahead_only_in_virtual_time():
    queue = FairQueue()
    queue.push("flood", [Job("flood") for _ in range(1000)])
    drain(queue, 8, 16)  # the flood is being served
    late = Job("late")
    queue.push("late", [late])
    assert queue.window(1) == [late]  # the newcomer is next, not behind 984 waiting items
    assert queue.depth("flood") == 984 and len(queue) == 985


def test_backlogged_tenants_share_tokens_by_weight():
    queue = FairQueue({"big": TenantPolicy(weight=3)})
    queue.push("big", [Job("big") for _ in range(400)])
    queue.push("small", [Job("small", tokens=50) for _ in range(800)])
    served = drain(queue, 8, 400)
    tokens = {t: sum(j.tokens for j in served if j.tenant == t) for t in ("big", "small")}
    assert abs(tokens["big"] / tokens["small"] - 3) < 0.2
    drain(queue, 8, 10_000)
    assert len(queue) == 0 and not queue._tenants  # nothing waits: no state kept


def test_gone_items_leave_the_queue():
    queue = FairQueue()
    jobs = [Job("a") for _ in range(5)]
    queue.push("a", jobs)
    jobs[0].cancelled = jobs[3].cancelled = True
    assert queue.window(10) == [jobs[1], jobs[2], jobs[4]] and len(queue) == 3


def test_tenant_names_come_from_keys_or_the_header():
    assert tenant_for_key("trainer-a:s3cret") == ("trainer-a", "s3cret")
    anonymous, secret = tenant_for_key("s3cret")
    assert secret == "s3cret" and anonymous.startswith("key-") and len(anonymous) == 12
    assert tenant_for_key("has space:x")[1] == "has space:x"  # not a name: the whole entry is the secret
    assert tenant_from_header(None) == "default" and tenant_from_header("job-7") == "job-7"
    with pytest.raises(ValueError, match="x-polyreward-tenant"):
        tenant_from_header("bad name!")
    label = Labels(["named"], max_labels=2)
    assert [label(t) for t in ("named", "x", "y", "z", "x")] == ["named", "x", "y", "other", "x"]


def _nice_values(batcher: Batcher) -> dict[str, int]:
    return {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) for t in batcher._threads}


@pytest.mark.slow
@pytest.mark.parametrize("nice", [0, 19])
def test_another_tenants_item_does_not_wait_behind_a_flood(export_family, mixed_items, nice):
    """With `nice` (a CPU server's default) the batches run at a lower priority and the probe on the express
    lane's own session; without it the probe shares the session and the workers wait for it."""
    scorer = Scorer(export_family("minilm"), precision="fp32", device="cpu", max_batch_items=16)
    batcher = Batcher(scorer, workers=1, nice=nice)
    batcher.start()
    if nice and sys.platform.startswith("linux"):
        deadline = time.monotonic() + 5  # the infer thread lowers its own priority as it starts
        while (threads := _nice_values(batcher))["infer-0"] != 19 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads["infer-0"] == 19 and threads["express"] < 19 and threads["prepare"] < 19
    assert (batcher._express_session is not None) == bool(nice)

    async def main():
        flood = asyncio.ensure_future(batcher.score_timed(mixed_items * 4, tenant="flood"))  # 256 items
        while batcher.tenant_depth("flood") < 200:
            await asyncio.sleep(0.005)
        started = time.monotonic()
        (result,), _ = await batcher.score_timed([mixed_items[0]], tenant="probe")
        waited = time.monotonic() - started
        assert not flood.done(), "the probe waited behind the whole flood"
        return result, waited, await flood

    try:
        result, waited, (flooded, _) = asyncio.run(main())
    finally:
        batcher.stop(timeout=60)
    assert abs(result.score - flooded[0].score) <= 1e-5 and len(flooded) == 256
    assert waited < 5.0


@pytest.mark.slow
@pytest.mark.parametrize("keys", [False, True])
def test_a_quota_429_hits_only_the_tenant_over_it(minilm_artifact, in_process, error_of, keys):
    settings = Settings(
        drain_seconds=0,
        api_keys=["a:key-of-a", "b:key-of-b"] if keys else [],
        tenants={"a": TenantPolicy(max_queue_items=4)},
    )
    who = (
        (lambda t: {"authorization": f"Bearer key-of-{t}"})
        if keys
        else (lambda t: {"x-polyreward-tenant": t})
    )
    items = [{"prompt": f"Question {i}?", "response": "An answer."} for i in range(5)]
    with in_process(create_app([minilm_artifact], settings)) as client:
        over = client.post("/v1/score", json={"items": items}, headers=who("a"))
        assert "tenant 'a' has 0 items waiting and a quota of 4" in error_of(over, 429)
        assert int(over.headers["retry-after"]) >= 1
        assert client.post("/v1/score", json={"items": items[:4]}, headers=who("a")).status_code == 200
        assert client.post("/v1/score", json={"items": items}, headers=who("b")).status_code == 200
        if not keys:
            assert "x-polyreward-tenant" in error_of(
                client.post("/v1/score", json={"items": items}, headers=who("no such/name")), 422
            )
        metrics = client.get("/metrics").text
    assert 'polyreward_tenant_rejections_total{tenant="a"} 1.0' in metrics
    assert 'polyreward_tenant_rejections_total{tenant="b"}' not in metrics
    assert 'polyreward_tenant_items_scored_total{tenant="a"} 4.0' in metrics
    assert 'polyreward_tenant_items_scored_total{tenant="b"} 5.0' in metrics
