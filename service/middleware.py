"""What every response gets, whatever its route: the body-size limit, `x-request-id` and timing headers, the
request metrics, and a JSON error (never a bare 500 page) when something fails below."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import Request

from polyreward.service.batcher import Timing
from polyreward.service.errors import BodyTooLarge, answer

log = logging.getLogger("polyreward.service")


async def envelope(request: Request, call_next):
    started = time.perf_counter()
    request.state.timing = None
    settings, metrics = request.app.state.settings, request.app.state.metrics
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_body_bytes:
        response = answer(
            BodyTooLarge(f"body is {length} bytes; the limit is {settings.max_body_bytes}"),
            metrics.rejections,
        )
    else:
        try:
            response = await call_next(request)
        except Exception as e:  # a failed batch, a bug: still a JSON error with headers and metrics
            log.exception("%s %s failed", request.method, request.url.path)
            response = answer(e)
    total = time.perf_counter() - started
    path = getattr(request.scope.get("route"), "path", "unmatched")
    metrics.requests.labels(path, str(response.status_code)).inc()
    metrics.request_seconds.labels(path).observe(total)
    response.headers["x-request-id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
    response.headers["x-total-time-ms"] = f"{total * 1000:.2f}"
    timing: Timing | None = request.state.timing
    if timing is not None:
        response.headers["x-queue-time-ms"] = f"{timing.queue_seconds * 1000:.2f}"
        response.headers["x-inference-time-ms"] = f"{timing.infer_seconds * 1000:.2f}"
    return response
