"""The uvicorn server `polyreward serve` runs: a drain on SIGTERM, and an exit when the models fail to load."""

from __future__ import annotations

import signal
import threading

import typer
import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn, plus a drain on SIGTERM: `/ready` answers 503 for `drain_seconds` while every request is still
    served (load balancers take the pod out of rotation), then uvicorn's graceful shutdown stops listening,
    finishes the requests in flight, and the batchers finish their queues. A second signal, or Ctrl-C, skips
    the drain. If loading the models fails, the server stops and `failure` holds why."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float):
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.draining = False
        self.failure: str | None = None
        config.app.state.registry.on_failure = self._load_failed

    def _load_failed(self, error: str) -> None:
        self.failure = error
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.draining or not self.drain_seconds:
            return super().handle_exit(sig, frame)
        self.draining = True
        self.config.app.state.registry.drain()
        typer.echo(
            f"SIGTERM: draining for {self.drain_seconds:g}s (/ready answers 503), then exiting", err=True
        )
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
