"""Soak: the service at 80 % of its measured maximum throughput for 10 minutes; errors and memory growth.

First 64 closed-loop clients measure the maximum items/s (as `bench service` does); then an open-loop
generator sends single-item requests at 80 % of it, while the server's resident memory is sampled every 10 s.
Growth is measured from the first sample after a minute of soak (allocators and caches warm) to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.common import add_common, artifact_path, emit, pair_items, rmb_pairs, score_bodies, serve_argv
from bench.load import Server, peak_rss_mb, percentile, run_load
from bench.machine import cpu_model


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured maximum items/s")
    parser.add_argument("--precision", default="int8", choices=["fp32", "int8"])
    parser.add_argument("--pairs", type=int, default=64)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def soak(url: str, pid: int, bodies: list[bytes], rate: float, seconds: float) -> dict:
    import httpx

    statuses: dict[str, int] = {}
    latencies: list[float] = []
    samples: list[tuple[float, float]] = []
    inflight = asyncio.Semaphore(512)  # bounded: a stalled server shows as errors, not as unbounded tasks

    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=512)
    ) as client:

        async def one(body: bytes) -> None:
            async with inflight:
                started = time.monotonic()
                try:
                    r = await client.post(
                        "/v1/score", content=body, headers={"content-type": "application/json"}
                    )
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                statuses[key] = statuses.get(key, 0) + 1
                if key == "200":
                    latencies.append(time.monotonic() - started)

        start = time.monotonic()
        tasks, sent, next_sample = set(), 0, start
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                samples.append((now - start, rss_mb(pid)))
                next_sample += 10
            while sent < (now - start) * rate:
                task = asyncio.create_task(one(bodies[sent % len(bodies)]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        samples.append((time.monotonic() - start, rss_mb(pid)))
    settled = [rss for t, rss in samples if t >= 60] or [samples[-1][1]]
    return {
        "requests": sent, "statuses": statuses, "achieved_items_per_s": round(statuses.get("200", 0) / seconds, 2),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1), "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "rss_start_mb": round(samples[0][1]), "rss_settled_mb": round(settled[0]), "rss_end_mb": round(samples[-1][1]),
        "rss_growth_pct": round(100 * (samples[-1][1] - settled[0]) / settled[0], 2),
        "rss_samples_mb": [round(rss) for _, rss in samples],
    }  # fmt: skip


def run(args) -> list[dict]:
    artifact = artifact_path(args.artifact)
    items = pair_items(rmb_pairs(args.pairs))
    bodies = score_bodies(items)
    argv = serve_argv(artifact, args.precision, args.config)
    with Server("soak", argv) as server:
        peak = run_load(server, bodies, 64, 3.0, 15.0)
        maximum = len(peak.latencies) / peak.seconds
        result = asyncio.run(
            soak(server.url, server.proc.pid, bodies, args.load * maximum, 60 * args.minutes)
        )
        result["rss_peak_mb"] = round(peak_rss_mb(server.proc.pid) or 0)  # the 64-client run included
    record = {
        "workload": "soak", "precision": args.precision, "cpu": cpu_model(), "minutes": args.minutes,
        "max_items_per_s": round(maximum, 2), "target_items_per_s": round(args.load * maximum, 2), **result,
        "errors": sum(n for status, n in result["statuses"].items() if status != "200"),
    }  # fmt: skip
    return [emit(record, args.json)]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
