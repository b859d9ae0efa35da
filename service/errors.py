"""Every error answer, in one table: which exception becomes which status and type (TEI's one mapping).

The exception handlers, the `polyreward_rejections_total{reason}` counter and the OpenAPI documentation of
each route's errors are all generated from `RULES`, so a new error kind is one row here. Every error body is
`{"error": {"type", "message"}}`, the message naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from polyreward.models.runtime.builder import InputRejected
from polyreward.models.runtime.errors import describe, describe_errors
from polyreward.service.batcher import QueueFull
from polyreward.service.recipe import RecipeError
from polyreward.service.schemas import REQUEST_FIELDS


class ApiError(Exception):
    """An answer other than 200 that the service raises itself; `type` overrides the rule's (item rejections)."""

    def __init__(self, message: str, *, type: str | None = None):
        super().__init__(message)
        self.type = type


class NotReady(ApiError):
    """Models are loading (or failed to load), or the server is draining."""


class Unauthorized(ApiError):
    pass


class UnknownModel(ApiError):
    pass


class TooManyItems(ApiError):
    pass


class BodyTooLarge(ApiError):
    pass


class NotJson(ApiError):
    pass


class InvalidJson(ApiError):
    pass


class InvalidRequest(ApiError):
    """A field is missing or has a bad value; also unknown objectives and normalize without calibration."""


class ItemRejected(ApiError):
    """A valid item this model cannot score; `type` is the `InputRejected` subclass's."""


class ClientGone(ApiError):
    pass


@dataclass(frozen=True)
class Rule:
    error: type[BaseException]
    status: int
    type: str
    doc: str
    headers: Callable[[BaseException], dict[str, str]] | None = None


RULES: tuple[Rule, ...] = (
    Rule(InvalidJson, 400, "invalid_json", "the body is not valid JSON"),
    Rule(Unauthorized, 401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is required"),
    Rule(UnknownModel, 404, "unknown_model", "no loaded model has that name"),
    Rule(TooManyItems, 413, "too_many_items", "more items than max_items_per_request"),
    Rule(BodyTooLarge, 413, "body_too_large", "the body is larger than max_body_bytes"),
    Rule(NotJson, 415, "unsupported_media_type", "the body is not sent as 'content-type: application/json'"),
    Rule(InvalidRequest, 422, "invalid_request", "a field is missing or invalid (the message names it)"),
    Rule(
        RecipeError,
        422,
        "unknown_objective",
        "weights name an objective the model lacks (no_calibration: normalize asked of a model without "
        "calibration stats)",
    ),
    Rule(
        ItemRejected,
        422,
        "input_rejected",
        "an item this model cannot score: over-long with truncation 'error' (input_too_long), refused by the "
        "chat template (template_refused), or without the gating marker (no_gating_marker)",
    ),
    Rule(
        QueueFull,
        429,
        "queue_full",
        "the queue is full; retry after the `Retry-After` header's seconds",
        lambda e: {"Retry-After": str(math.ceil(e.retry_after))},  # type: ignore[attr-defined]
    ),
    Rule(
        ClientGone, 499, "client_disconnected", "the client closed the connection (nobody reads this answer)"
    ),
    Rule(Exception, 500, "internal", "an internal error (an inference failure fails only its batch)"),
    Rule(NotReady, 503, "not_ready", "models are loading or the server is draining"),
    Rule(TimeoutError, 504, "timeout", "not scored within the request timeout; its items left the queue"),
)
_INTERNAL = next(r for r in RULES if r.error is Exception)


def rule_for(error: BaseException) -> Rule:
    """The rule of an exception: the first that names its class, else `internal` (500)."""
    return next((r for r in RULES if r.error is not Exception and isinstance(error, r.error)), _INTERNAL)


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def answer(error: BaseException, rejections=None) -> JSONResponse:
    """The JSON answer to an exception, by its rule; counted in `rejections` (a Counter by reason) if given."""
    rule = rule_for(error)
    kind = getattr(error, "type", None) or rule.type
    if rejections is not None and rule.status != 500:
        rejections.labels(kind).inc()
    message = f"{type(error).__name__}: {error}" if rule is _INTERNAL else str(error)
    return error_response(rule.status, kind, message, rule.headers(error) if rule.headers else None)


def from_rejection(error: InputRejected, where: str) -> ItemRejected:
    """An item the model refused, located in the request (`items[3]`, `pairs[1].rejected`)."""
    return ItemRejected(f"{where}: {error.reason}", type=error.error_type)


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_request, queue_full, unknown_model")
    message: str = Field(description="what is wrong, naming the field")


class ErrorBody(BaseModel):
    error: ErrorDetail


def responses(*errors: type[BaseException]) -> dict[int | str, dict]:
    """OpenAPI documentation of the JSON errors a route can answer, from the rules of these exceptions."""
    docs: dict[int, list[str]] = {}
    for rule in RULES:
        if rule.error in errors and rule.status != 499:
            docs.setdefault(rule.status, []).append(f"{rule.type}: {rule.doc}")
    return {status: {"model": ErrorBody, "description": "; ".join(d)} for status, d in sorted(docs.items())}


# What every scoring route can answer.
SCORING = (
    InvalidJson, Unauthorized, UnknownModel, TooManyItems, BodyTooLarge, NotJson, InvalidRequest, RecipeError,
    ItemRejected, QueueFull, Exception, NotReady, TimeoutError,
)  # fmt: skip


def install_handlers(app) -> None:
    """Answer every error through `RULES`: the service's own, the engine's, FastAPI's validation, Starlette's."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    async def by_rule(request, error):
        return answer(error, request.app.state.metrics.rejections)

    for error in {rule.error for rule in RULES if rule.error is not Exception}:
        app.add_exception_handler(error, by_rule)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        return await by_rule(request, request_error(request.headers.get("content-type"), e.errors()))

    @app.exception_handler(ValidationError)
    async def invalid_value(request, e: ValidationError):
        return await by_rule(request, InvalidRequest(describe(e, limit=1)))

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):  # an unknown route, a wrong method
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return error_response(e.status_code, kind, str(e.detail), getattr(e, "headers", None))


def request_error(content_type: str | None, errors: list) -> ApiError:
    """FastAPI's validation errors of a body as one of ours: not JSON, not valid JSON, or a bad field."""
    if not (content_type or "").split(";")[0].strip().lower().endswith("json"):
        return NotJson(
            f"body: send JSON with the header 'content-type: application/json' (got {content_type!r})"
        )
    first = errors[0]
    if first["type"] == "json_invalid":
        return InvalidJson(f"body: not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    errors = [{**err, "loc": err["loc"][1:] or ("body",)} for err in errors]  # drop the leading "body"
    return InvalidRequest(describe_errors(errors, limit=1, known=REQUEST_FIELDS))
