"""Online throughput under load: `polyreward serve` vs the offline `Scorer` and a naive FastAPI+torch server.

C concurrent clients each send one single-item /v1/score request at a time, cycling through N real items, for
a warm-up and then D measured seconds. A request counts when it finishes inside the measured window; its
latency is its full round trip. Engines: the offline Scorer (one process, `score(items)`, same items), the
service at each precision (a `polyreward serve` subprocess; POLYREWARD_* variables in this environment reach
it), and `bench.naive_server` (one transformers forward per request). The load generator runs in this
process and shares the CPU with the server; `client_cpu` and `server_cpu` (cores busy) show the split.

Batch statistics come from the server's /metrics, differenced over the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.offline import cpu_model, real_items, timed

os.environ.setdefault("HF_HUB_OFFLINE", "1")

READY_TIMEOUT = 180.0  # seconds for a server to load its model
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 300.0
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class LoadResult:
    requests: int
    errors: int
    latencies: list[float]
    seconds: float
    client_cpu: float  # cores this process kept busy during the window
    server_cpu: float | None
    metrics: dict[str, float]


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

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [*argv, "--port", str(self.port)]
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
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


async def _drive(url: str, pid: int, bodies: list[bytes], clients: int, warmup: float, duration: float):
    """Run the clients; return the requests that ended inside the measured window and its start/end marks."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    headers = {"content-type": "application/json"}
    records: list[tuple[float, float, bool]] = []  # (end, latency, ok)
    counter = itertools.count()  # shared cursor over the items, so the mix matches the item set
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT) as client:
        stop_at = time.monotonic() + warmup + duration

        async def one_client() -> None:
            while time.monotonic() < stop_at:
                body = bodies[next(counter) % len(bodies)]
                started = time.monotonic()
                try:
                    r = await client.post("/v1/score", content=body, headers=headers)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                end = time.monotonic()
                records.append((end, end - started, ok))

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
    inside = [(lat, ok) for end, lat, ok in records if first[0] <= end <= last[0]]
    return inside, first, last


def run_load(server: Server, bodies: list[bytes], clients: int, warmup: float, duration: float) -> LoadResult:
    check_response(server.url, bodies[0])
    pid = server.proc.pid if server.proc else 0
    inside, (t0, c0, s0, m0), (t1, c1, s1, m1) = asyncio.run(
        _drive(server.url, pid, bodies, clients, warmup, duration)
    )
    seconds = t1 - t0
    return LoadResult(
        requests=len(inside),
        errors=sum(not ok for _, ok in inside),
        latencies=[lat for lat, ok in inside if ok],
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
    ips = (r.requests - r.errors) / r.seconds  # items scored: one item per request
    line = {
        **common,
        "engine": engine,
        "clients": clients,
        "seconds": round(r.seconds, 2),
        "requests": r.requests,
        "errors": r.errors,
        "items_per_s": round(ips, 2),
        "p50_ms": round(1000 * percentile(r.latencies, 0.5), 1) if r.latencies else None,
        "p99_ms": round(1000 * percentile(r.latencies, 0.99), 1) if r.latencies else None,
        **{k: round(ips / v, 3) for k, v in ratios.items() if v},
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.metrics.items()},
        "client_cpu": round(r.client_cpu, 2),
        "server_cpu": None if r.server_cpu is None else round(r.server_cpu, 2),
    }
    return line


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench load", description=__doc__)
    parser.add_argument("--artifact", default="build/demo/artifact")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per server")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--items", type=int, default=128, help="real items to cycle through")
    parser.add_argument("--repeats", type=int, default=3, help="offline Scorer repeats (median)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    args = parser.parse_args(argv)

    from models.scorer import DEFAULT_TOKEN_BUDGET, Scorer
    from service.app import Settings

    settings = Settings()  # the server's batching settings (POLYREWARD_*), used offline too
    items, source = real_items(args.items)
    bodies = [json.dumps({"items": [it.model_dump(exclude_none=True)]}).encode() for it in items]
    common = {
        "workload": "load",
        "items": len(items),
        "source": source,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "token_budget": settings.token_budget or DEFAULT_TOKEN_BUDGET["cpu"],
        "max_batch_items": settings.max_batch_items,
        "server_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("POLYREWARD_")},
    }

    def emit(line: dict) -> None:
        print(json.dumps(line), flush=True)

    offline: dict[str, float] = {}
    if not args.skip_offline:
        for precision in args.precision:
            scorer = Scorer(
                args.artifact, precision=precision, device="cpu",
                token_budget=settings.token_budget, max_batch_items=settings.max_batch_items,
            )  # fmt: skip
            secs = timed(lambda s=scorer: s.score(items), args.repeats)
            offline[precision] = len(items) / secs
            emit({**common, "engine": f"offline-scorer-{precision}", "seconds": round(secs, 2),
                  "items_per_s": round(offline[precision], 2)})  # fmt: skip
            del scorer
            gc.collect()

    naive = None
    if not args.skip_naive:
        argv_naive = [sys.executable, "-m", "bench.naive_server", "--artifact", args.artifact]
        with Server("naive", argv_naive) as server:
            r = run_load(server, bodies, args.clients, args.warmup, args.duration)
        naive = (r.requests - r.errors) / r.seconds
        emit(load_line(common, "naive-fastapi-torch", args.clients, r, vs_offline=offline.get("fp32")))

    for precision in args.precision:
        argv_serve = [sys.executable, "-m", "models.cli", "serve", args.artifact, "--precision", precision]
        with Server(f"service-{precision}", argv_serve) as server:
            r = run_load(server, bodies, args.clients, args.warmup, args.duration)
        emit(
            load_line(
                common, f"service-{precision}", args.clients, r,
                vs_offline=offline.get(precision), vs_naive=naive,
            )
        )  # fmt: skip
