"""The real server (`polyreward serve`, uvicorn on 127.0.0.1) on a real exported minilm_artifact, over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time

import httpx
import numpy as np
import pytest
from support.recipes import debiased

from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.scorer import Scorer

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def url(minilm_artifact, serve):
    with serve(minilm_artifact) as (u, _):
        yield u


ITEM = {"prompt": "What is 2 + 2?", "response": "4."}


def test_every_route(url, minilm_artifact):
    scorer = Scorer(minilm_artifact, precision="fp32", device="cpu")
    r = httpx.post(f"{url}/v1/score", json={"items": [ITEM], "return": ["gating"]})
    assert r.status_code == 200
    for header in ("x-request-id", "x-total-time-ms", "x-queue-time-ms", "x-inference-time-ms"):
        assert header in r.headers
    body = r.json()
    want = scorer.score([ITEM])[0]
    assert body["objectives"] == scorer.objectives and body["usage"] == {"items": 1, "tokens": want.tokens}
    assert abs(body["results"][0]["score"] - want.score) <= 1e-4
    x = debiased(scorer.manifest, [want])[0]
    assert np.allclose(body["results"][0]["rewards"], x, atol=1e-4)
    assert np.allclose(body["results"][0]["raw"]["rewards"], want.rewards, atol=1e-4)
    assert np.allclose(body["results"][0]["gating"], want.gating, atol=1e-4)

    weights = dict.fromkeys(scorer.objectives, 0.0) | {scorer.objectives[0]: 2.0}
    weighted = httpx.post(f"{url}/v1/score", json={"items": [ITEM], "weights": weights}).json()["results"][0]
    assert abs(weighted["score"] - 2 * x[0]) <= 1e-4 and "gating" not in weighted

    pair = {"prompt": ITEM["prompt"], "chosen": "4.", "rejected": "5."}
    cmp = httpx.post(f"{url}/v1/compare", json={"pairs": [pair]}).json()["results"][0]
    good, bad = scorer.score([ITEM, {"prompt": ITEM["prompt"], "response": "5."}])
    assert abs(cmp["p_chosen"] - 1 / (1 + np.exp(bad.score - good.score))) <= 1e-4
    assert set(cmp["objectives"]) == set(scorer.objectives)

    query = scorer.builder.render(
        PromptItem(**ITEM).as_messages()
    )  # a templated conversation, as OpenRLHF sends
    reward = httpx.post(f"{url}/get_reward", json={"query": [query], "prompts": ["What is 2 + 2?"]}).json()
    assert set(reward) == {"rewards", "scores", "extra_logs"}
    assert set(reward["extra_logs"]) == {*scorer.objectives, "model_score"} and len(reward["rewards"]) == 1
    assert abs(reward["rewards"][0] - scorer.score([{"text": query}])[0].score) <= 1e-4

    models = httpx.get(f"{url}/v1/models").json()["models"]
    assert models[0]["objectives"] == scorer.objectives and models[0]["precision"] == "fp32"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{url}/metrics").text
    assert "polyreward_batch_size_count" in metrics and "polyreward_model_info" in metrics


def test_64_concurrent_single_item_clients_match_offline_and_are_batched(url, minilm_artifact, mixed_items):
    items = [it.model_dump(exclude_none=True) for it in mixed_items[:64]]

    async def load():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*(client.post(f"{url}/v1/score", json={"items": [it]}) for it in items))
            return [r.json()["results"][0]["score"] for r in rs]

    before = _batch_counts(httpx.get(f"{url}/metrics").text)
    got = np.array(asyncio.run(load()))
    after = _batch_counts(httpx.get(f"{url}/metrics").text)
    want = np.array([r.score for r in Scorer(minilm_artifact, precision="fp32", device="cpu").score(items)])
    assert np.abs(got - want).max() <= 1e-4
    batches, batched_items = after[0] - before[0], after[1] - before[1]
    assert batched_items == 64 and batched_items / batches > 1


def _batch_counts(metrics: str) -> tuple[float, float]:
    count = float(re.search(r"^polyreward_batch_size_count\{[^}]*\} (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^polyreward_batch_size_sum\{[^}]*\} (\S+)", metrics, re.M).group(1))
    return count, total


def test_schemathesis_finds_no_server_errors(url, polyreward_bin):
    """Property-based requests generated from /openapi.json: no 5xx, documented statuses and content types,
    responses matching their schemas. (`positive_data_acceptance` is left out: the OpenAPI schema cannot say
    that the last message must be the assistant's.) A request may take as long as the server's own 60 s
    request timeout: 256 long items take 8 s here on a quiet machine, twice that with a core taken, and
    schemathesis' default of 10 s made a loaded machine a coin toss."""
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    proc = subprocess.run(
        [str(polyreward_bin.with_name("schemathesis")), "run", f"{url}/openapi.json", "--checks", checks,
         "--phases", "examples,fuzzing", "--max-examples", "40", "--seed", "7", "--workers", "1",
         "--max-time", "40", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout[-2000:]


@pytest.fixture(scope="session")
def promtool() -> str:
    """Session-scoped, so a missing tool skips before the module's server starts."""
    return shutil.which("promtool") or pytest.skip(
        "promtool not installed (Debian: apt-get install prometheus)"
    )


@pytest.fixture(scope="session")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or pytest.skip("chromium not installed (Debian: apt-get install chromium)")


def test_metrics_pass_promtool(promtool, url):
    httpx.post(f"{url}/v1/score", json={"items": [ITEM]})
    text = httpx.get(f"{url}/metrics").content
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"polyreward_requests_total" in text and b"polyreward_batch_size_bucket" in text


def test_docs_render_without_network(chromium, url):
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--virtual-time-budget=5000", "--dump-dom", f"{url}/docs"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    # Swagger UI built the page from /openapi.json: one operation block per route, none from a CDN.
    rendered = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', proc.stdout))
    assert {"/v1/score", "/v1/compare", "/get_reward", "/v1/models", "/metrics"} <= rendered, proc.stdout[
        -2000:
    ]
    assert "cdn.jsdelivr" not in httpx.get(f"{url}/docs").text


def test_client_disconnect_frees_its_items(minilm_artifact, mixed_items, serve):
    """A client that gives up while its items wait: they leave the queue (not scored), counted as a rejection."""
    with serve(minilm_artifact) as (u, _):
        backlog = [it.model_dump(exclude_none=True) for it in mixed_items] * 2

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                load = asyncio.ensure_future(client.post(f"{u}/v1/score", json={"items": backlog}))
                await asyncio.sleep(0.3)  # the backlog is queued or running
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(f"{u}/v1/score", json={"items": [ITEM] * 32}, timeout=0.2)
                assert (await load).status_code == 200

        asyncio.run(run())
        deadline = time.monotonic() + 30
        while "client_disconnected" not in (text := httpx.get(f"{u}/metrics").text):
            assert time.monotonic() < deadline, "no disconnect recorded"
            time.sleep(0.1)
        scored = float(re.search(r"^polyreward_items_scored_total\{[^}]*\} (\S+)", text, re.M).group(1))
        assert scored == len(backlog)  # the 32 abandoned items were dropped, not scored


def test_sigterm_drains(minilm_artifact, serve):
    """SIGTERM under load: /ready answers 503 while requests are still served, every request that got an
    answer got a 200, and the server exits once in-flight work is done."""
    with serve(minilm_artifact, drain_seconds="2") as (u, proc):
        answered: list[tuple[float, int]] = []
        refused = 0
        sent = 0

        async def client(c: int, http: httpx.AsyncClient):
            nonlocal refused, sent
            for k in range(200):  # bounded: stops at the first refused connection
                sent += 1
                try:
                    r = await http.post(
                        f"{u}/v1/score", json={"items": [{"prompt": f"q{c}", "response": "word " * (k % 50)}]}
                    )
                except httpx.TransportError:
                    refused += 1
                    return
                answered.append((time.monotonic(), r.status_code))

        async def run():
            async with httpx.AsyncClient(timeout=60) as http, httpx.AsyncClient(timeout=5) as probe:
                clients = [asyncio.ensure_future(client(c, http)) for c in range(16)]
                await asyncio.sleep(1.0)
                proc.terminate()
                signalled = time.monotonic()
                statuses = []
                while time.monotonic() - signalled < 20:
                    try:
                        statuses.append((await probe.get(f"{u}/ready")).status_code)
                    except httpx.TransportError:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.wait_for(asyncio.gather(*clients), 60)
                return signalled, statuses

        signalled, statuses = asyncio.run(run())
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert 503 in statuses and 200 not in statuses[statuses.index(503) :], statuses
        assert {code for _, code in answered} == {200}
        assert any(t > signalled + 1 for t, _ in answered)  # still served while draining
        assert len(answered) + refused == sent


def test_limits_auth_and_queue_cap(minilm_artifact, mixed_items, serve, error_of):
    keys = json.dumps(["secret-1", "secret-2"])
    with serve(
        minilm_artifact, api_keys=keys, max_items_per_request="4", max_body_bytes="65536", max_queue_items="8"
    ) as (u, _):
        auth = {"Authorization": "Bearer secret-2"}
        for route, body in [("/v1/score", {"items": [ITEM]}), ("/get_reward", {"query": ["x"]})]:
            assert error_of(httpx.post(f"{u}{route}", json=body), 401)
            assert error_of(
                httpx.post(f"{u}{route}", json=body, headers={"Authorization": "Bearer wrong"}), 401
            )
            assert httpx.post(f"{u}{route}", json=body, headers=auth).status_code == 200
        for route in ("/health", "/ready", "/metrics"):
            assert httpx.get(f"{u}{route}").status_code == 200
        assert "limit is 4" in error_of(
            httpx.post(f"{u}/v1/score", json={"items": [ITEM] * 5}, headers=auth), 413
        )
        big = {"items": [{"prompt": "x" * 70000, "response": "y"}]}
        assert "limit is 65536" in error_of(httpx.post(f"{u}/v1/score", json=big, headers=auth), 413)

        items = [it.model_dump(exclude_none=True) for it in mixed_items[:48]]

        batches = [items[i : i + 4] for i in range(0, len(items), 4)]  # 4 items a request fill the queue fast

        async def burst():
            async with httpx.AsyncClient(timeout=120, headers=auth) as client:
                return await asyncio.gather(
                    *(client.post(f"{u}/v1/score", json={"items": b}) for b in batches)
                )

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
        ok = [
            (it, res["score"])
            for b, r in zip(batches, responses, strict=True)
            if r.status_code == 200
            for it, res in zip(b, r.json()["results"], strict=True)
        ]
        want = Scorer(minilm_artifact, precision="fp32", device="cpu").score([it for it, _ in ok])
        assert max(abs(s - w.score) for (_, s), w in zip(ok, want, strict=True)) <= 1e-4


def test_the_port_opens_at_once_and_every_start_logs_what_is_served(
    minilm_artifact, export_family, polyreward_bin, free_port
):
    """/health answers while the models load and /ready answers 503 until they are loaded; the log says which
    model is served from where, on which graph and provider."""
    port, second = free_port(), export_family("llama")
    proc = subprocess.Popen(
        [polyreward_bin, "serve", minilm_artifact, second, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: list[tuple[int, int]] = []  # (/health, /ready) status pairs, in order
    try:
        deadline = time.monotonic() + 120
        while not seen or seen[-1][1] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the server never became ready"
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
                    seen.append((http.get("/health").status_code, http.get("/ready").status_code))
            except httpx.TransportError:
                time.sleep(0.01)
    finally:
        proc.terminate()
        _, log = proc.communicate(timeout=60)
    assert seen[0] == (200, 503) and {h for h, _ in seen} == {200}, seen
    for path in (minilm_artifact, second):
        name = json.loads((path / "manifest.json").read_text())["name"]
        assert re.search(
            rf"serving {re.escape(name)} \S+ from {re.escape(str(path))}: fp32 graph on CPUExecutionProvider",
            log,
        ), log
    assert "ready: serving" in log


def test_a_model_that_fails_to_load_stops_the_server_in_one_line(minilm_artifact, tmp_path, cli):
    damaged = shutil.copytree(minilm_artifact, tmp_path / "damaged")
    graph = damaged / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    proc = cli("serve", damaged, "--port", "0", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: {graph}: checksum mismatch — the file was modified or damaged after export; re-export the artifact"
    )
