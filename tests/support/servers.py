"""Servers for tests: the real `polyreward serve` on 127.0.0.1, and the app in this process (httpx's
ASGITransport with asgi-lifespan, on an event loop of its own so tests stay synchronous)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal
from asgi_lifespan import LifespanManager

from support.cli import ENV, POLYREWARD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(get, deadline_s: float = 120, alive=lambda: None) -> None:
    """Poll /ready until it answers 200 (bounded in time); `alive` raises if the server died meanwhile."""
    deadline = time.monotonic() + deadline_s
    while True:
        alive()
        assert time.monotonic() < deadline, f"not ready in {deadline_s:g} s"
        try:
            if get("/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)


@contextmanager
def serve_process(
    *artifacts, command=(POLYREWARD, "serve"), cwd=None, **settings
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`polyreward serve ARTIFACT... --port P` (or another `command` that takes those arguments, run in `cwd`)
    with POLYREWARD_<SETTING> variables; yields (url, process) once /ready answers 200, and stops it after."""
    port = free_port()
    env = {**ENV, **{f"POLYREWARD_{k.upper()}": v for k, v in {"drain_seconds": "0", **settings}.items()}}
    proc = subprocess.Popen(
        [*command, *map(str, artifacts), "--port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def alive() -> None:
        assert proc.poll() is None, f"server exited: {proc.stderr.read()}"

    try:
        wait_ready(lambda path: httpx.get(url + path, timeout=1), alive=alive)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class InProcessClient:
    """Synchronous `get` / `post` / `request` on an httpx.AsyncClient bound to the app in this process."""

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient, app):
        self.portal, self.client, self.app = portal, client, app

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        return self.portal.call(lambda: self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@asynccontextmanager
async def _running(app) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://polyreward"
        ) as client,
    ):
        yield client


@contextmanager
def in_process(app, ready: bool = True) -> Iterator[InProcessClient]:
    """Run the app's lifespan and talk to it without a socket; waits for /ready unless `ready` is False."""
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(_running(app)) as client:
        facade = InProcessClient(portal, client, app)
        if ready:
            wait_ready(facade.get, deadline_s=60)
        yield facade


def error_of(response: httpx.Response, status: int) -> str:
    """The message of a JSON error answer, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return body["error"]["message"]
