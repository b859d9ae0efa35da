"""Request and response bodies of the scoring API (README, "Serve"; docs/architecture.md). Unknown fields are refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from polyreward.models.runtime.adapt import DEFAULT_STRENGTH
from polyreward.models.runtime.errors import field_names
from polyreward.models.runtime.items import ChatItem, Item, Message, Text
from polyreward.models.runtime.manifest import Truncation
from polyreward.service.recipe import Extra, FiniteFloat, RecipeSpec

TRUNCATION = (
    "over-long items: 'left' drops the oldest tokens, 'error' refuses them [default: the model's policy]"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeRequest(RecipeSpec):
    profile: str | None = Field(
        None, description="a reward profile the server loaded (`/v1/models` lists them); the request's own "
        "recipe fields override its fields [default: the server's default profile, if any]",
    )  # fmt: skip


class ScoreRequest(RecipeRequest):
    model: str | None = Field(None, description="which loaded model [default: the only / first one]")
    items: list[Item] = Field(min_length=1, description="conversations to score")
    references: list[Item] | None = Field(
        None, description="reference responses for transform.reference 'references': an item's reference "
        "is the mean over the references with the same prompt",
    )  # fmt: skip
    return_: list[Extra] = Field(
        default_factory=list,
        alias="return",
        description="optional outputs: 'uncertainty' (epistemic and predictive σ of each objective and of "
        "the score), 'intervals' (at `level`), 'group_ranks' / 'group_z' (each objective's mid-rank CDF / "
        "z-score among the request's items of the same prompt); 'gating' is returned whenever the gating "
        "aggregates",
    )
    level: FiniteFloat = Field(0.9, ge=0.01, le=0.99, description="coverage of `intervals`")
    truncation: Truncation | None = Field(None, description=TRUNCATION)


class RawValues(BaseModel):
    score: float = Field(description="the model's own gated score")
    rewards: list[float] = Field(description="the head outputs")


class ScoreUncertainty(BaseModel):
    epistemic: float | None
    predictive: float | None


class Uncertainty(BaseModel):
    epistemic: list[float]
    predictive: list[float]
    score: ScoreUncertainty


class Intervals(BaseModel):
    level: float
    rewards: list[tuple[float, float]]
    score: tuple[float, float] | None


class ItemResult(BaseModel):
    score: float
    rewards: list[float] = Field(description="the objectives in the response's space")
    raw: RawValues
    gating: list[float] | None = None
    transformed: list[float] | None = Field(None, description="log σ(x − ref) per objective")
    slack: dict[str, float] | None = Field(None, description="x − min per constrained objective")
    uncertainty: Uncertainty | None = None
    intervals: Intervals | None = None
    group_ranks: list[float] | None = None
    group_z: list[float] | None = None
    group_probs: list[float] | None = Field(
        None, description="mixture models: the router's probability of each group (`groups` order)"
    )
    group_scores: list[float] | None = Field(
        None, description="mixture models: each group's score, Σ_k G_mk (r @ T)_k"
    )
    stripped_chars: int | None = Field(
        None, description="characters the rules' `strip` removed from the reply"
    )
    rule_errors: dict[str, str] | None = Field(
        None, description="rule objectives that did not finish (their value is 0) and why"
    )
    tokens: int
    truncated: bool


class Usage(BaseModel):
    items: int
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    objectives: list[str]
    groups: list[str] | None = Field(
        None, description="mixture models: the groups of group_probs/group_scores"
    )
    space: str
    profile: str | None = None
    recipe: dict = Field(description="the recipe that was applied: the profile and the request's overrides")
    results: list[ItemResult]
    usage: Usage


class _Pair(_Strict):
    chosen: Text
    rejected: Text
    label: Text | None = Field(
        None, description="the reference answer of correctness rules, for both replies"
    )

    def context(self) -> list[Message]:
        raise NotImplementedError

    def items(self) -> tuple[ChatItem, ChatItem]:
        return tuple(  # type: ignore[return-value]
            ChatItem(messages=[*self.context(), Message(role="assistant", content=reply)], label=self.label)
            for reply in (self.chosen, self.rejected)
        )


class PromptPair(_Pair):
    prompt: Text

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


class CompareRequest(RecipeRequest):
    model: str | None = None
    pairs: list[Pair] = Field(min_length=1)
    uncertainty: bool = Field(
        False, description="account for the margin's epistemic σ: p = σ(m / √(1 + π σ² / 8)) (probit)"
    )
    truncation: Truncation | None = Field(None, description=TRUNCATION)


class PairResult(BaseModel):
    p_chosen: float = Field(description="P(chosen ≻ rejected) = σ(score margin), or its probit form")
    margin: float = Field(description="score(chosen) − score(rejected) under the recipe")
    margin_std: float | None = Field(None, description="√(σ_c² + σ_r²), epistemic (with `uncertainty`)")
    objectives: dict[str, float] = Field(description="per objective: σ(x_chosen − x_rejected)")


class CompareResponse(BaseModel):
    model: str
    space: str
    profile: str | None = None
    results: list[PairResult]


class AdaptRequest(_Strict):
    model: str | None = None
    pairs: list[Pair] = Field(min_length=1, max_length=256, description="the user's labelled pairs")
    over: Literal["groups", "objectives"] | None = Field(
        None, description="adapt the weights of the model's groups (mixture models: the posterior over which "
        "group the user is, the router as the prior) or an offset on the gating (MAP Bradley–Terry) [default: "
        "groups for mixture models]",
    )  # fmt: skip
    strength: Annotated[float, Field(allow_inf_nan=False, ge=1e-6, le=1e6)] = Field(
        DEFAULT_STRENGTH, description="objectives: λ of the Gaussian prior N(0, I/λ) on the gating offset"
    )
    truncation: Truncation | None = Field(None, description=TRUNCATION)


class AdaptFit(BaseModel):
    log_likelihood: float = Field(description="Σ log σ(margin) of the pairs under the adapted weights")
    population_log_likelihood: float = Field(description="the same under the population's")
    accuracy: float = Field(description="share of the pairs the adapted reward orders right")
    population_accuracy: float = Field(description="the same for the model's own score")


class AdaptResponse(BaseModel):
    model: str
    over: str
    pairs: int
    weights: dict[str, float] = Field(
        description="objective -> the adapted reward's weight on the debiased objectives, averaged over the "
        "pairs' prompts (it depends on the prompt): mean_i Σ_m π'_m(x_i) G_m(x_i), or mean_i g(x_i) + δ"
    )
    group_weights: dict[str, float] | None = Field(
        None, description="over groups: group -> w_m ∝ Π_i σ(margin_im), the router's reweighting"
    )
    gating_offset: dict[str, float] | None = Field(
        None, description="over objectives: objective -> δ_k, the MAP offset on the model's gating"
    )
    profile: dict = Field(
        description="the recipe fields a later /v1/score request sends to use the adaptation"
    )
    fit: AdaptFit


class RewardRequest(BaseModel):
    """OpenRLHF's remote reward protocol: `query` holds whole templated conversations."""

    model_config = ConfigDict(extra="allow")  # OpenRLHF may add fields; only these are read
    query: list[Annotated[Text, Field(min_length=1)]] = Field(
        min_length=1, description="whole conversations in the policy's chat template (recognised: Llama 3, "
        "ChatML, Gemma, Mistral, Human/Assistant, polyreward's plain template)",
    )  # fmt: skip
    prompts: list[Text] | None = None
    labels: list[Text | int | float | None] | None = Field(
        None, description="per query, the reference answer of correctness rules"
    )


class RewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]] = Field(
        description="each objective in the profile's space, and model_score (the model's own gated score)"
    )


# Every field name a request body can hold, for "did you mean" suggestions.
REQUEST_FIELDS = field_names(ScoreRequest, CompareRequest, AdaptRequest, RewardRequest)
