"""Request and response bodies of the scoring API (DESIGN.md section 6). Unknown fields are refused."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.inputs import Item, Message, exactly_one_of
from models.manifest import Truncation

TRUNCATION = (
    "over-long items: 'left' drops the oldest tokens, 'error' refuses them [default: the model's policy]"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    model: str | None = Field(None, description="which loaded model [default: the only / first one]")
    items: list[Item] = Field(min_length=1, description="conversations to score")
    weights: dict[str, float] | None = Field(
        None, description="objective -> weight: replaces the gating with this scalarization"
    )
    normalize: bool = Field(False, description="z-score rewards with the model's calibration stats")
    return_: list[Literal["gating", "uncertainty"]] = Field(
        default_factory=lambda: ["gating"], alias="return", description="optional outputs to include"
    )
    truncation: Truncation | None = Field(None, description=TRUNCATION)


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_request, queue_full, unknown_model")
    message: str = Field(description="what is wrong, naming the field")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI documentation of the JSON errors a route can answer."""
    return {s: {"model": ErrorBody, "description": ERRORS[s]} for s in statuses}


ERRORS = {
    400: "the body is not valid JSON",
    401: "a valid 'Authorization: Bearer <key>' header is required",
    404: "no loaded model has that name",
    413: "the body or the number of items is over the limit",
    422: "a field is missing or invalid (the message names it), or an item is over-long with truncation 'error'",
    429: "the queue is full; retry after the `Retry-After` header's seconds",
    500: "an internal error (an inference failure fails only its batch)",
    503: "models are loading or the server is draining",
    504: "not scored within the request timeout; its items left the queue",
}
SCORING_ERRORS = error_responses(400, 401, 404, 413, 422, 429, 500, 504)


class ItemResult(BaseModel):
    score: float
    rewards: list[float]
    gating: list[float] | None = None
    uncertainty: list[float] | None = None
    tokens: int
    truncated: bool


class Usage(BaseModel):
    items: int
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    objectives: list[str]
    results: list[ItemResult]
    usage: Usage


class Pair(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=exactly_one_of(("prompt",), ("messages",)))
    prompt: str | None = None
    messages: list[Message] | None = Field(None, description="the conversation before the replies")
    chosen: str
    rejected: str

    @model_validator(mode="after")
    def _one_prompt(self) -> Pair:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self

    def items(self) -> tuple[Item, Item]:
        context = self.messages or [Message(role="user", content=self.prompt or "")]
        return tuple(  # type: ignore[return-value]
            Item(messages=[*context, Message(role="assistant", content=reply)])
            for reply in (self.chosen, self.rejected)
        )


class CompareRequest(_Strict):
    model: str | None = None
    pairs: list[Pair] = Field(min_length=1)
    truncation: Truncation | None = Field(None, description=TRUNCATION)


class PairResult(BaseModel):
    p_chosen: float = Field(description="P(chosen ≻ rejected) = sigmoid(score margin)")
    objectives: dict[str, float] = Field(description="per objective: sigmoid(reward margin)")


class CompareResponse(BaseModel):
    model: str
    results: list[PairResult]


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward protocol: `query` holds whole templated conversations."""

    model_config = ConfigDict(extra="allow")  # OpenRLHF may add fields; only these are read
    query: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, description="whole conversations, already rendered with the model's chat template"
    )
    prompts: list[str] | None = None
    labels: list | None = None


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]
