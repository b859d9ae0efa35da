"""Fair shares: one tenant floods `polyreward serve` with 10,000 items; another sends single-item requests.

For each setting of `tenant_token_budget` (the batch budget while two tenants wait), one server:
1. `alone`: the probe tenant sends --probes single-item /v1/score requests one after another, nothing else
   running;
2. `flood`: the flood tenant posts 10,000 items at once (40 requests of 250, tenant header "flood"); once
   they are queued, the probe sends the same requests again, then the flood is cancelled.

Reported: the probe's p50/p99 latency alone and under the flood and their ratio, the flood's items/s while
the probe ran, the flood items still queued when the probe started and how long a first-come-first-served
queue would have made the probe wait behind them (queued / flood items/s; the flood's items/s is every item
scored meanwhile, from the server's metrics, less the probe's), and how many probe requests
finished only after the whole flood. The load generator runs in this process: client_cpu beside server_cpu.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from bench.common import add_common, artifact_path, emit, pair_items, rmb_pairs, score_bodies, serve_argv
from bench.load import Server, percentile, proc_cpu_seconds
from bench.machine import cpu_model

HEADERS = {"content-type": "application/json"}


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--flood-items", type=int, default=10_000)
    parser.add_argument("--per-request", type=int, default=250, help="items per flood request")
    parser.add_argument("--probes", type=int, default=100, help="single-item probe requests per phase")
    parser.add_argument(
        "--tenant-token-budget", type=int, nargs="+", default=[0, 128],
        help="batch budgets while tenants compete (0: the normal budget)",
    )  # fmt: skip


async def metric(client, name: str) -> float:
    """The sum of a metric's samples over its label sets."""
    text = (await client.get("/metrics")).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name + "{"))


async def probe(client, bodies: list[bytes], flood_done: asyncio.Event | None = None) -> tuple[list, int]:
    """Sequential single-item requests: their latencies, and how many ended after the flood had finished."""
    latencies, late, parts = [], 0, []
    for body in bodies:
        started = time.monotonic()
        r = await client.post("/v1/score", content=body, headers={**HEADERS, "x-polyreward-tenant": "probe"})
        r.raise_for_status()
        latencies.append(time.monotonic() - started)
        parts.append((float(r.headers["x-queue-time-ms"]), float(r.headers["x-inference-time-ms"])))
        late += bool(flood_done and flood_done.is_set())
    return latencies, late, parts


async def phase(url: str, pid: int, probes: list[bytes], floods: list[bytes]) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=len(floods) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=1800) as client:
        await probe(client, probes[:10])  # warm-up: first connections, first batches of each length
        alone, _, _ = await probe(client, probes)
        done = asyncio.Event()
        flood_headers = {**HEADERS, "x-polyreward-tenant": "flood"}

        async def flood_all() -> None:
            await asyncio.gather(
                *(client.post("/v1/score", content=b, headers=flood_headers) for b in floods)
            )
            done.set()

        sizes = [len(json.loads(b)["items"]) for b in floods]
        before = await metric(client, "polyreward_items_scored_total")
        flood = asyncio.create_task(flood_all())
        deadline = time.monotonic() + 120
        while True:  # until every flood request is queued (or already scored), the last one aside
            depth = await metric(client, "polyreward_queue_depth")
            scored = await metric(client, "polyreward_items_scored_total")
            if depth + scored - before >= sum(sizes) - sizes[-1]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the flood did not queue: {depth:.0f} of {sum(sizes)} items after 120 s")
            await asyncio.sleep(0.2)
        t0, c0, s0 = time.monotonic(), time.process_time(), proc_cpu_seconds(pid)
        under, late, parts = await probe(client, probes, done)
        t1, c1, s1 = time.monotonic(), time.process_time(), proc_cpu_seconds(pid)
        scored = await metric(client, "polyreward_items_scored_total") - scored
        flood.cancel()
        await asyncio.gather(flood, return_exceptions=True)
    flood_rate = max(scored - len(probes), 0) / (t1 - t0)
    p99_alone, p99_under = percentile(alone, 0.99), percentile(under, 0.99)
    return {
        "probe_alone_p50_ms": round(1000 * percentile(alone, 0.5), 1),
        "probe_alone_p99_ms": round(1000 * p99_alone, 1),
        "probe_flood_p50_ms": round(1000 * percentile(under, 0.5), 1),
        "probe_flood_p99_ms": round(1000 * p99_under, 1),
        "p99_vs_alone": round(p99_under / p99_alone, 2),
        "probe_max_ms": round(1000 * max(under), 1),
        "probe_flood_queue_p50_ms": round(percentile([q for q, _ in parts], 0.5), 1),
        "probe_flood_infer_p50_ms": round(percentile([i for _, i in parts], 0.5), 1),
        "flood_queued_at_start": int(depth),
        "flood_items_per_s": round(flood_rate, 1),
        "fifo_wait_s": round(depth / flood_rate, 1) if flood_rate else None,
        "probes_after_flood": late,
        "client_cpu": round((c1 - c0) / (t1 - t0), 2),
        "server_cpu": round((s1 - s0) / (t1 - t0), 2) if s0 is not None and s1 is not None else None,
    }


def run(args) -> list[dict]:
    artifact = artifact_path(args.artifact)
    items = pair_items(rmb_pairs(max(args.probes, 200)))
    probes = score_bodies(items[: args.probes])
    n = args.flood_items
    flood_items = [items[i % len(items)].model_dump(exclude_none=True) for i in range(n)]
    floods = [
        json.dumps({"items": flood_items[i : i + args.per_request]}).encode()
        for i in range(0, n, args.per_request)
    ]
    common = {
        "workload": "tenants", "precision": args.precision, "flood_items": n, "probes": args.probes,
        "cpu": cpu_model(), "cores": os.cpu_count(),
    }  # fmt: skip
    records = []
    for budget in args.tenant_token_budget:
        env = {"POLYREWARD_MAX_QUEUE_ITEMS": str(2 * n), "POLYREWARD_REQUEST_TIMEOUT": "1800"}
        if budget:
            env["POLYREWARD_TENANT_TOKEN_BUDGET"] = str(budget)
        with Server("tenants", serve_argv(artifact, args.precision, args.config), env=env) as server:
            result = asyncio.run(phase(server.url, server.proc.pid, probes, floods))
        record = {**common, "tenant_token_budget": budget or "token_budget", **result}
        records.append(emit(record, args.json))
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench tenants", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
