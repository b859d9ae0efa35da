"""Online throughput under load: `polyreward serve` vs the offline `Scorer` and a naive FastAPI+torch server.

For each client count (1, 8, 64, 256), C concurrent clients each send one single-item /v1/score request at a
time, cycling through real items (both sides of RMB pairs), for a warm-up and then D measured seconds; a 429
waits its Retry-After. A request counts when it finishes inside the measured window; its
latency is its full round trip. Engines: the offline Scorer (one process, `score(items)`, same items), the
service at each precision (a `polyreward serve` subprocess; POLYREWARD_* variables in this environment reach
it), and `bench.naive_server` (one transformers forward per request). The load generator is `wrk`
where installed (bench/wrk.py: C, one thread; `--client python` for this process's asyncio + httpx); it shares
the CPU with the server either way, and `client_cpu` and `server_cpu` (cores busy) show the split.

Batch statistics come from the server's /metrics, differenced over the measured window. The gating cache is
off in the server and the offline Scorer alike: the clients cycle through the same items, which a cache would
serve without prompt passes (`bench grpo` measures the cache).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench.common import (
    add_common,
    artifact_path,
    emit,
    pair_items,
    rmb_pairs,
    score_bodies,
    scorer_settings,
    serve_argv,
    timed,
)  # fmt: skip
from bench.machine import cpu_model

READY_TIMEOUT = 180.0  # seconds for a server to load its model
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 300.0
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class LoadResult:
    requests: int
    errors: int  # neither 200 nor 429
    rejected: int  # 429, each with Retry-After
    error_kinds: dict[str, int]  # status or exception → count, warm-up included
    latencies: list[float]
    seconds: float
    client_cpu: float  # cores this process kept busy during the window
    server_cpu: float | None
    metrics: dict[str, float]
    ok: int | None = None  # answered 200, when `latencies` are not kept (wrk)
    percentiles: tuple[float, float] | None = None  # (p50, p99) seconds, when `latencies` are not kept

    def p50_p99(self) -> tuple[float | None, float | None]:
        if self.percentiles:
            return self.percentiles
        return percentile(self.latencies, 0.5), percentile(self.latencies, 0.99)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process and its threads (children excluded)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def scrape(url: str) -> dict[str, float]:
    """Sums of the polyreward_* samples we use (over all label sets)."""
    import httpx

    wanted = (
        "polyreward_batch_size_sum", "polyreward_batch_size_count", "polyreward_batch_padded_tokens_sum",
        "polyreward_inference_duration_seconds_sum", "polyreward_queue_duration_seconds_sum",
        "polyreward_tokens_scored_total",
    )  # fmt: skip
    out = dict.fromkeys(wanted, 0.0)
    try:
        text = httpx.get(f"{url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def batch_stats(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in after}
    batches = d["polyreward_batch_size_count"]
    real_tokens = max(d["polyreward_tokens_scored_total"], 1)
    if batches <= 0:
        return {}
    return {
        "batches": int(batches),
        "mean_batch_items": d["polyreward_batch_size_sum"] / batches,
        "mean_batch_padded_tokens": d["polyreward_batch_padded_tokens_sum"] / batches,
        "padding_ratio": d["polyreward_batch_padded_tokens_sum"] / real_tokens,
        "mean_infer_ms": 1000 * d["polyreward_inference_duration_seconds_sum"] / batches,
        "mean_queue_ms": 1000 * d["polyreward_queue_duration_seconds_sum"] / batches,
        "infer_busy": d["polyreward_inference_duration_seconds_sum"] / seconds,
    }


class Server:
    """A server subprocess on a free port; always terminated on exit (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        ready_path: str = "/ready",
        env: dict | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.cwd = cwd
        self.ready_path = ready_path
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*argv, "--port", str(self.port)]
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.env}
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd
        )
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                        return self
                time.sleep(0.25)
            raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT:g}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        self.log.close()
        if exc_type is None:
            Path(self.log.name).unlink(missing_ok=True)
        else:
            print(f"{self.name} log: {self.log.name}", file=sys.stderr)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]


def check_response(url: str, body: bytes) -> None:
    import httpx

    r = httpx.post(f"{url}/v1/score", content=body, headers={"content-type": "application/json"}, timeout=60)
    result = r.json()["results"][0] if r.status_code == 200 else {}
    if not isinstance(result.get("score"), float) or not result.get("rewards"):
        raise RuntimeError(f"{url}/v1/score answered {r.status_code}: {r.text[:500]}")


def _marks(url: str, pid: int) -> tuple:
    """(monotonic time, this process's CPU seconds, the server's CPU seconds, its /metrics counters)."""
    return time.monotonic(), time.process_time(), proc_cpu_seconds(pid), scrape(url)


async def _drive(
    url: str, pid: int, bodies: list[bytes], clients: int, warmup: float, duration: float, path: str
):
    """Run the clients; return the requests that ended inside the measured window and its start/end marks."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    headers = {"content-type": "application/json"}
    records: list[tuple[float, float, int]] = []  # (end, latency, status: 200, 429 with Retry-After, or -1)
    error_kinds: dict[str, int] = {}
    counter = itertools.count()  # shared cursor over the items, so the mix matches the item set
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT) as client:
        stop_at = time.monotonic() + warmup + duration

        async def one_client() -> None:
            while time.monotonic() < stop_at:
                body = bodies[next(counter) % len(bodies)]
                started = time.monotonic()
                try:
                    r = await client.post(path, content=body, headers=headers)
                    status = r.status_code if r.status_code == 200 or "retry-after" in r.headers else -1
                    kind = str(r.status_code)
                except httpx.HTTPError as e:
                    status, kind = -1, type(e).__name__
                if status == -1:
                    error_kinds[kind] = error_kinds.get(kind, 0) + 1
                end = time.monotonic()
                records.append((end, end - started, status))
                if status == 429:
                    await asyncio.sleep(float(r.headers["retry-after"]))

        tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
        try:
            await asyncio.sleep(warmup)
            first = await asyncio.to_thread(_marks, url, pid)
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            last = await asyncio.to_thread(_marks, url, pid)
        finally:
            for t in tasks:  # requests still in flight do not count; stop waiting for them
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    inside = [(lat, status) for end, lat, status in records if first[0] <= end <= last[0]]
    return inside, first, last, error_kinds


def run_load(
    server: Server, bodies: list[bytes], clients: int, warmup: float, duration: float, path: str = "/v1/score"
) -> LoadResult:
    if path == "/v1/score":
        check_response(server.url, bodies[0])
    pid = server.proc.pid if server.proc else 0
    inside, (t0, c0, s0, m0), (t1, c1, s1, m1), error_kinds = asyncio.run(
        _drive(server.url, pid, bodies, clients, warmup, duration, path)
    )
    seconds = t1 - t0
    return LoadResult(
        requests=len(inside),
        errors=sum(status == -1 for _, status in inside),
        rejected=sum(status == 429 for _, status in inside),
        error_kinds=error_kinds,
        latencies=[lat for lat, status in inside if status == 200],
        seconds=seconds,
        client_cpu=(c1 - c0) / seconds,
        server_cpu=(s1 - s0) / seconds if s0 is not None and s1 is not None else None,
        metrics=batch_stats(m0, m1, seconds),
    )


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def load_line(common: dict, engine: str, clients: int, r: LoadResult, **ratios) -> dict:
    ips = (len(r.latencies) if r.ok is None else r.ok) / r.seconds  # one item per answered request
    p50, p99 = r.p50_p99()
    line = {
        **common,
        "engine": engine,
        "clients": clients,
        "seconds": round(r.seconds, 2),
        "requests": r.requests,
        "errors": r.errors,
        "rejected_429": r.rejected,
        "error_kinds": r.error_kinds or None,
        "items_per_s": round(ips, 2),
        "p50_ms": None if p50 is None else round(1000 * p50, 1),
        "p99_ms": None if p99 is None else round(1000 * p99, 1),
        **{k: round(ips / v, 3) for k, v in ratios.items() if v},
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.metrics.items()},
        "client_cpu": round(r.client_cpu, 2),
        "server_cpu": None if r.server_cpu is None else round(r.server_cpu, 2),
    }
    return line


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64, 256], help="concurrent clients")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per client count")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument(
        "--pairs", type=int, default=64, help="RMB pairs whose sides the clients cycle through"
    )
    parser.add_argument("--naive", action="store_true", help="also the naive FastAPI + transformers server")
    parser.add_argument(
        "--client", choices=["wrk", "python"], default=None,
        help="load generator: wrk (C; default when installed) or this process's asyncio + httpx",
    )  # fmt: skip


def offline_rate(scorer, items: list, repeats: int) -> float:
    """The offline Scorer's items/s on `items` (median of `repeats` passes)."""
    return len(items) / timed(lambda: scorer.score(items), repeats)


def run(args) -> list[dict]:
    from polyreward.models.runtime.scorer import Scorer

    artifact = artifact_path(args.artifact)
    items = pair_items(rmb_pairs(args.pairs))
    bodies = score_bodies(items)
    settings = scorer_settings(args.config)
    common = {
        "workload": "service", "items": len(items), "source": "rmb pairwise, both sides", "cpu": cpu_model(),
        "cores": os.cpu_count(), "settings": settings or "defaults",
    }  # fmt: skip
    records = []
    from bench import wrk

    client = args.client or ("wrk" if wrk.available() else "python")
    drive = wrk.run_load if client == "wrk" else run_load
    servers = [(f"service-{p}", serve_argv(artifact, p, args.config), p) for p in args.precision]
    if args.naive:
        naive_argv = [sys.executable, "-m", "bench.naive_server", "--artifact", str(artifact)]
        servers.append(("naive-fastapi-torch", naive_argv, "fp32"))
    for name, argv, precision in servers:
        scorer = Scorer(artifact, precision=precision, device="cpu", gating_cache=0, **settings)
        offline = partial(offline_rate, scorer, items, args.repeats)
        with Server(name, argv, env={"POLYREWARD_GATING_CACHE_ITEMS": "0"}) as server:
            for clients in args.clients:
                # The baseline right before and right after each load run (the server idle meanwhile), their
                # mean the ratio's denominator: on a shared machine the speed drifts within a minute.
                before = offline()
                r = drive(server, bodies, clients, args.warmup, args.duration)
                after = offline()
                base = (before + after) / 2
                line = load_line(common, name, clients, r, vs_offline=base)
                line |= {"client": client, "offline_items_per_s": [round(before, 2), round(after, 2)]}
                line["server_peak_rss_mb"] = round(peak_rss_mb(server.proc.pid) or 0)
                records.append(emit(line, args.json))
        del scorer
        gc.collect()
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench service", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
