"""The service workload's load generator when `wrk` is installed (Debian: `apt-get install wrk`).

wrk is C and event-driven: one thread holds 64 or 256 connections on one core for a few percent of it, where
the Python (asyncio + httpx) generator needs most of a core of the two the server runs on. Each connection
sends one single-item /v1/score request at a time; a Lua script cycles through the same request bodies as the
Python generator. wrk does not honour Retry-After: a 429 counts in `rejected_429` and the connection goes on.
Client CPU is wrk's own (its rusage), server CPU the server process's, over the measured run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.load import LoadResult, Server, batch_stats, check_response, proc_cpu_seconds, scrape

SCRIPT = r"""
local bodies = {}
for line in io.lines(os.getenv("POLYREWARD_BENCH_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
local headers = {["Content-Type"] = "application/json"}
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/score", headers, bodies[(i % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("POLYREWARD %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def _wrk(url: str, env: dict, clients: int, seconds: float) -> tuple[list[int], float]:
    """Run wrk; (its POLYREWARD summary numbers, its CPU seconds)."""
    argv = [
        "wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "300s",
        "-s", env["POLYREWARD_BENCH_SCRIPT"], f"{url}/v1/score",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env})
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [x for x in out.splitlines() if x.startswith("POLYREWARD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out[-2000:]}")
    return [int(v) for v in lines[-1].split()[1:]], usage.ru_utime + usage.ru_stime


def run_load(server: Server, bodies: list[bytes], clients: int, warmup: float, duration: float) -> LoadResult:
    check_response(server.url, bodies[0])
    pid = server.proc.pid if server.proc else 0
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        (Path(tmp) / "bodies.jsonl").write_bytes(b"\n".join(bodies) + b"\n")
        (Path(tmp) / "score.lua").write_text(SCRIPT)
        env = {
            "POLYREWARD_BENCH_BODIES": f"{tmp}/bodies.jsonl",
            "POLYREWARD_BENCH_SCRIPT": f"{tmp}/score.lua",
        }
        if warmup:
            _wrk(server.url, env, clients, warmup)
        m0, s0, t0 = scrape(server.url), proc_cpu_seconds(pid), time.monotonic()
        (requests, micros, errors, status_errors, p50, p99), client_cpu = _wrk(
            server.url, env, clients, duration
        )
        seconds = max(time.monotonic() - t0, micros / 1e6)
        s1, m1 = proc_cpu_seconds(pid), scrape(server.url)
    return LoadResult(
        requests=requests,
        errors=errors,
        rejected=status_errors,  # non-2xx answers; under this load only 429s are expected
        error_kinds={"socket": errors} if errors else {},
        latencies=[],
        seconds=micros / 1e6,
        client_cpu=client_cpu / (micros / 1e6),
        server_cpu=(s1 - s0) / seconds if s0 is not None and s1 is not None else None,
        metrics=batch_stats(m0, m1, seconds),
        ok=requests - errors - status_errors,
        percentiles=(p50 / 1e6, p99 / 1e6),
    )
