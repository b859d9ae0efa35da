"""Request and response bodies of the scoring API (README, "Serve"; docs/architecture.md). Unknown fields are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from polyreward.models.runtime.errors import field_names
from polyreward.models.runtime.items import ChatItem, Item, Message
from polyreward.models.runtime.manifest import Truncation

TRUNCATION = (
    "over-long items: 'left' drops the oldest tokens, 'error' refuses them [default: the model's policy]"
)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    model: str | None = Field(None, description="which loaded model [default: the only / first one]")
    items: list[Item] = Field(min_length=1, description="conversations to score")
    weights: dict[str, FiniteFloat] | None = Field(
        None,
        description="objective -> weight: score = Σ w·rewards instead of the gating (gating is then left out)",
    )
    normalize: bool = Field(False, description="z-score rewards with the model's calibration stats")
    return_: list[Literal["gating", "uncertainty"]] = Field(
        default_factory=list,
        alias="return",
        description="optional outputs besides score, rewards and gating: 'uncertainty' (per-objective standard "
        "deviation, for heads that carry it); 'gating' is always returned unless `weights` replace it",
    )
    truncation: Truncation | None = Field(None, description=TRUNCATION)


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


class _Pair(_Strict):
    chosen: str
    rejected: str

    def context(self) -> list[Message]:
        raise NotImplementedError

    def items(self) -> tuple[ChatItem, ChatItem]:
        return tuple(  # type: ignore[return-value]
            ChatItem(messages=[*self.context(), Message(role="assistant", content=reply)])
            for reply in (self.chosen, self.rejected)
        )


class PromptPair(_Pair):
    prompt: str

    def context(self) -> list[Message]:
        return [Message(role="user", content=self.prompt)]


class ChatPair(_Pair):
    messages: list[Message] = Field(description="the conversation before the replies")

    def context(self) -> list[Message]:
        return self.messages


def _one_prompt(value: Any) -> Any:
    if isinstance(value, dict) and ("prompt" in value) == ("messages" in value):
        raise ValueError("give exactly one of prompt or messages")
    return value


def _pair_shape(value: Any) -> str:
    if isinstance(value, dict):
        return "<messages>" if "messages" in value else "<prompt>"
    return "<messages>" if isinstance(value, ChatPair) else "<prompt>"


Pair = Annotated[
    Annotated[PromptPair, Tag("<prompt>")] | Annotated[ChatPair, Tag("<messages>")],
    Discriminator(_pair_shape),
    BeforeValidator(_one_prompt),
]


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


# Every field name a request body can hold, for "did you mean" suggestions.
REQUEST_FIELDS = field_names(ScoreRequest, CompareRequest, RewardRequest)
