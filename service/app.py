"""The HTTP API: routes only translate JSON to and from the batcher (DESIGN.md sections 6 and 8).

One `Batcher` per loaded model; every error is `{"error": {"type", "message"}}` with the status it deserves;
every response carries `x-request-id` and timing headers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, JsonConfigSettingsSource, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import PolyrewardError, describe, describe_errors
from models.inputs import InputRejected, Item
from models.manifest import Truncation
from models.scorer import Scorer, ScoreResult, resolve_device
from service.batcher import Batcher, QueueFull, Timing
from service.metrics import Metrics
from service.schemas import (
    SCORING_ERRORS,
    CompareRequest,
    CompareResponse,
    ItemResult,
    PairResult,
    RewardRequest,
    RewardResponse,
    ScoreRequest,
    ScoreResponse,
    Usage,
    error_responses,
)

log = logging.getLogger("polyreward.service")


class Settings(BaseSettings):
    """Server settings: `polyreward serve` flags, then `POLYREWARD_*` environment variables, then the JSON file
    named by POLYREWARD_CONFIG (`polyreward tune` writes one), then the defaults."""

    model_config = SettingsConfigDict(env_prefix="POLYREWARD_", extra="ignore")
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys (none: no auth)")
    api_key_file: Path | None = Field(None, description="file with one API key per line")
    precision: str = "auto"
    device: str = "auto"
    token_budget: int | None = Field(None, ge=64, description="padded tokens per batch [512 CPU, 16384 GPU]")
    max_batch_items: int = Field(64, ge=1)
    workers: int | None = Field(None, ge=1, description="batches run side by side [2 on CPU, 1 on GPU]")
    threads: int | None = Field(
        None, ge=1, description="ONNX Runtime threads per batch [the CPUs the container may use]"
    )
    spin: bool | None = Field(
        None, description="ONNX Runtime threads spin while idle [off with 2+ CPU workers]"
    )
    max_wait_ms: float = Field(2.0, ge=0)
    max_queue_items: int = Field(4096, ge=1)
    max_items_per_request: int = Field(256, ge=1)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    request_timeout: float = Field(60.0, gt=0, description="seconds before a request answers 504")
    drain_seconds: float = Field(
        5.0, ge=0, description="after SIGTERM: /ready answers 503 this long while requests are still served"
    )

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_other):
        path = os.environ.get("POLYREWARD_CONFIG")
        if not path:
            return init_settings, env_settings
        if not Path(path).is_file():
            raise PolyrewardError(f"POLYREWARD_CONFIG: {path}: not found")
        return init_settings, env_settings, JsonConfigSettingsSource(settings_cls, json_file=path)

    def api_key_list(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_key_file:
            keys += [k.strip() for k in self.api_key_file.read_text().splitlines() if k.strip()]
        return keys


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container's CPU limit;
    os.cpu_count() reports the whole node, and one ORT thread per node core would thrash a 2-CPU pod)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


@dataclass
class LoadedModel:
    name: str
    scorer: Scorer
    batcher: Batcher


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def create_app(artifacts: list[Path], settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    keys = [k.encode() for k in settings.api_key_list()]
    models: dict[str, LoadedModel] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = resolve_device(settings.device)
        # On a CPU, two batches side by side, each free to use every core, threads parked rather than spinning
        # (measured on 2 cores under 64 single-item clients: 0.84-0.93x the offline Scorer's items/s, against
        # 0.74x for one batch at a time, while one client alone keeps its latency).
        cpu = device == "cpu"
        workers = settings.workers or (2 if cpu else 1)
        threads = settings.threads or (available_cpus() if cpu else None)
        spin = settings.spin if settings.spin is not None else (False if cpu and workers > 1 else None)
        for path in artifacts:
            scorer = Scorer(
                path, precision=settings.precision, device=device,  # type: ignore[arg-type]
                token_budget=settings.token_budget, max_batch_items=settings.max_batch_items,
                threads=threads, spin=spin,
            )  # fmt: skip
            name = scorer.manifest.name
            if name in models:
                raise PolyrewardError(f"two artifacts are both named {name!r}; models need distinct names")
            batcher = Batcher(
                scorer, max_queue_items=settings.max_queue_items, max_wait=settings.max_wait_ms / 1000,
                workers=workers,
                on_batch=metrics.on_batch(name),
            )  # fmt: skip
            batcher.start()
            scorer.score([Item(prompt="warm up", response="ok")])  # first run allocates; not a user's request
            models[name] = LoadedModel(name, scorer, batcher)
            metrics.model_info.labels(
                name, scorer.manifest.version, scorer.precision, scorer.providers[0]
            ).set(1)
            metrics.queue_capacity.labels(name).set(settings.max_queue_items)
        app.state.ready = True
        yield
        app.state.ready = False
        for m in models.values():
            m.batcher.stop(timeout=settings.request_timeout)

    app = FastAPIOffline(  # /docs and /redoc from packaged assets: clusters are often air-gapped
        title="polyreward",
        version="0.1.0",
        description="Vector rewards from multi-objective reward models.",
        lifespan=lifespan,
    )
    app.state.ready = False  # set when models are loaded and warm; cleared while draining (service.cli)
    app.state.models = models
    app.state.metrics = metrics

    @app.middleware("http")
    async def envelope(request: Request, call_next):
        started = time.perf_counter()
        request.state.timing = None
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            metrics.rejections.labels("body_too_large").inc()
            response = _error(
                413, "body_too_large", f"body is {length} bytes; the limit is {settings.max_body_bytes}"
            )
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # a failed batch, a bug: still a JSON error with headers and metrics
                log.exception("%s %s failed", request.method, request.url.path)
                response = _error(500, "internal", f"{type(e).__name__}: {e}")
        total = time.perf_counter() - started
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.request_seconds.labels(path).observe(total)
        response.headers["x-request-id"] = request_id
        response.headers["x-total-time-ms"] = f"{total * 1000:.2f}"
        timing: Timing | None = request.state.timing
        if timing is not None:
            response.headers["x-queue-time-ms"] = f"{timing.queue_seconds * 1000:.2f}"
            response.headers["x-inference-time-ms"] = f"{timing.infer_seconds * 1000:.2f}"
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError):
        return _error(e.status, e.kind, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException):  # unknown route, bad method, bad body
        kind = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return _error(e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return _error(
                400,
                "invalid_json",
                f"body: not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
            )
        errors = [{**err, "loc": err["loc"][1:] or ("body",)} for err in e.errors()]  # drop "body"
        return _error(422, "invalid_request", describe_errors(errors, limit=1))

    @app.exception_handler(ValidationError)
    async def invalid_value(_request: Request, e: ValidationError):
        return _error(422, "invalid_request", describe(e, limit=1))

    async def authorize(request: Request) -> None:  # async: no worker-thread hop per request
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ").encode() if header.startswith("Bearer ") else b""
        if not any(hmac.compare_digest(token, k) for k in keys):
            metrics.rejections.labels("unauthorized").inc()
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is required")

    auth = [Depends(authorize)]

    def pick(name: str | None) -> LoadedModel:
        if name is None:
            return next(iter(models.values()))
        if name not in models:
            raise ApiError(
                404, "unknown_model", f"model: {name!r} is not loaded (loaded: {', '.join(models)})"
            )
        return models[name]

    async def run(
        request: Request,
        model: LoadedModel,
        items: list[Item],
        truncation: Truncation | None = None,
        where=lambda i: f"items[{i}]",
    ) -> list[ScoreResult]:
        if len(items) > settings.max_items_per_request:
            metrics.rejections.labels("too_many_items").inc()
            raise ApiError(
                413,
                "too_many_items",
                f"items: {len(items)} items; the limit is {settings.max_items_per_request}",
            )
        work = asyncio.ensure_future(
            model.batcher.score_timed(items, timeout=settings.request_timeout, truncation=truncation)
        )
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away: its items leave the queue
                work.cancel()
                metrics.rejections.labels("client_disconnected").inc()
                raise ApiError(499, "client_disconnected", "the client closed the connection")
            results, timing = work.result()
        except QueueFull as e:
            metrics.rejections.labels("queue_full").inc()
            raise ApiError(
                429, "queue_full", str(e), {"Retry-After": str(math.ceil(e.retry_after))}
            ) from None
        except TimeoutError:
            metrics.rejections.labels("timeout").inc()
            raise ApiError(504, "timeout", f"not scored within {settings.request_timeout:g}s") from None
        except InputRejected as e:
            metrics.rejections.labels(e.error_type).inc()
            raise ApiError(422, e.error_type, f"{where(e.index)}: {e.reason}") from None
        finally:
            gone.cancel()
            metrics.queue_depth.labels(model.name).set(model.batcher.queue_depth)
        request.state.timing = timing
        truncated = sum(r.truncated for r in results)
        if truncated:
            metrics.truncations.labels(model.name).inc(truncated)
        return results

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        response_model_exclude_none=True,
        dependencies=auth,
        responses=SCORING_ERRORS,
    )
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        """Vector rewards for each item: per-objective rewards, gating weights and the gated score."""
        model = pick(body.model)
        names = model.scorer.objectives
        weights = None
        if body.weights is not None:
            unknown = sorted(set(body.weights) - set(names))
            if unknown:
                raise ApiError(
                    422, "unknown_objective", f"weights: unknown objectives {unknown}; known: {names}"
                )
            weights = np.array([body.weights.get(n, 0.0) for n in names])
        calibration = model.scorer.manifest.calibration or {}
        if body.normalize and not calibration:
            raise ApiError(422, "no_calibration", f"normalize: model {model.name!r} has no calibration stats")
        results = await run(request, model, body.items, body.truncation)
        out = []
        for r in results:
            rewards = np.array(r.rewards)
            if body.normalize:
                rewards = np.array(
                    [
                        (v - calibration[n].mean) / (calibration[n].std or 1.0)
                        for v, n in zip(rewards, names, strict=True)
                    ]
                )
            value = float(rewards @ weights) if weights is not None else r.score
            out.append(
                ItemResult(
                    score=value,
                    rewards=rewards.tolist(),
                    gating=r.gating if "gating" in body.return_ and weights is None else None,
                    uncertainty=r.uncertainty if "uncertainty" in body.return_ else None,
                    tokens=r.tokens,
                    truncated=r.truncated,
                )
            )
        return ScoreResponse(
            model=model.name, objectives=names, results=out,
            usage=Usage(items=len(results), tokens=sum(r.tokens for r in results)),
        )  # fmt: skip

    @app.post("/v1/compare", response_model=CompareResponse, dependencies=auth, responses=SCORING_ERRORS)
    async def compare(body: CompareRequest, request: Request) -> CompareResponse:
        """P(chosen ≻ rejected) for each pair, overall and per objective."""
        model = pick(body.model)
        items = [it for p in body.pairs for it in p.items()]
        results = await run(
            request,
            model,
            items,
            body.truncation,
            lambda i: f"pairs[{i // 2}].{('chosen', 'rejected')[i % 2]}",
        )
        sigmoid = lambda x: float(1 / (1 + math.exp(-x)))  # noqa: E731
        out = []
        for c, r in zip(results[0::2], results[1::2], strict=True):
            per = {
                n: sigmoid(a - b)
                for n, a, b in zip(model.scorer.objectives, c.rewards, r.rewards, strict=True)
            }
            out.append(PairResult(p_chosen=sigmoid(c.score - r.score), objectives=per))
        return CompareResponse(model=model.name, results=out)

    @app.post("/get_reward", response_model=RewardResponse, dependencies=auth, responses=SCORING_ERRORS)
    async def get_reward(body: RewardRequest, request: Request) -> RewardResponse:
        """OpenRLHF's remote reward protocol: `query` holds whole templated conversations."""
        model = pick(None)
        results = await run(request, model, [Item(text=q) for q in body.query])
        scores = [r.score for r in results]
        logs = {n: [r.rewards[k] for r in results] for k, n in enumerate(model.scorer.objectives)}
        return RewardResponse(rewards=scores, scores=scores, extra_logs=logs)

    @app.get("/v1/models", dependencies=auth, responses=error_responses(401))
    async def list_models() -> dict:
        """Loaded models: objectives, backbone, precision, providers, max length, version."""
        return {
            "models": [
                {
                    "name": m.name,
                    "version": m.scorer.manifest.version,
                    "objectives": m.scorer.objectives,
                    "backbone": m.scorer.manifest.backbone.model_type,
                    "head": m.scorer.manifest.head.kind,
                    "precision": m.scorer.precision,
                    "providers": m.scorer.providers,
                    "max_length": m.scorer.manifest.input.max_length,
                }
                for m in models.values()
            ]
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses=error_responses(503))
    async def ready():
        if not app.state.ready:
            return _error(503, "not_ready", "models are loading or the server is draining")
        return {"status": "ready", "models": list(models)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Prometheus text exposition: every series is prefixed `polyreward_`."""
        for m in models.values():
            metrics.queue_depth.labels(m.name).set(m.batcher.queue_depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is already read, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
