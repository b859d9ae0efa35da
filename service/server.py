"""The uvicorn server `polyreward serve` runs, with a drain on SIGTERM."""

from __future__ import annotations

import signal
import threading

import typer
import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn, plus a drain on SIGTERM: `/ready` answers 503 for `drain_seconds` while every request is still
    served (load balancers take the pod out of rotation), then uvicorn's graceful shutdown stops listening,
    finishes the requests in flight, and the batchers finish their queues. A second signal, or Ctrl-C, skips
    the drain."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float):
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.draining or not self.drain_seconds:
            return super().handle_exit(sig, frame)
        self.draining = True
        self.config.app.state.ready = False
        typer.echo(
            f"SIGTERM: draining for {self.drain_seconds:g}s (/ready answers 503), then exiting", err=True
        )
        timer = threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
