"""The reward-recipe vocabulary: what a request or a server profile can ask of a model's outputs.

`polyreward.service.postprocess` applies it (the formulas are in its docstring and docs/rewards.md);
`polyreward.service.profiles` loads named recipes from a file.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from polyreward.models.runtime.errors import PolyrewardError

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
# Recipe numbers: finite and at most 1e6 in size, so no product of them overflows to a non-finite reward.
Number = Annotated[float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)]
Positive = Annotated[float, Field(allow_inf_nan=False, ge=0, le=1e6)]
Space = Literal["debiased", "raw"]
Aggregate = Literal["gating", "sum", "and", "min", "groups", "worst_group"]
Extra = Literal["gating", "uncertainty", "intervals", "group_ranks", "group_z"]


class RecipeError(PolyrewardError, ValueError):
    """A recipe the model cannot apply; the message names the field, `type` says what is wrong."""

    def __init__(self, message: str, type: str):
        super().__init__(message)
        self.type = type


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pessimism(_Strict):
    kappa: Positive = Field(description="score − κ·σ(score): a lower confidence bound")
    uncertainty: Literal["epistemic", "predictive"] = Field(
        "epistemic", description="which σ: the heads' own (epistemic) or with the label noise (predictive)"
    )


class Transform(_Strict):
    reference: Literal["group", "references"] | dict[str, Number] = Field(
        description="u_k = log σ(x_k − ref_k), ref: 'group' (mean of the other items of the same prompt), "
        "'references' (the request's reference responses for that prompt) or fixed values per objective"
    )


class Constraints(_Strict):
    min: dict[str, Number] = Field(min_length=1, description="objective -> threshold on its value x")
    penalty: Positive = Field(1.0, description="score − penalty · Σ max(0, min − x)")


class RecipeSpec(_Strict):
    """What a request or a server profile says about turning outputs into a reward (all optional)."""

    space: Space | None = Field(
        None, description="'debiased' (rewards @ T, what the gating mixes) or 'raw' (head outputs) "
        "[default: debiased, raw for artifacts that record no transform]",
    )  # fmt: skip
    weights: dict[str, Number] | None = Field(
        None, description="objective -> weight for aggregate sum/and/min (unnamed objectives weigh 0)"
    )
    normalize: bool = Field(False, description="z-score each objective with the model's stats for the space")
    group_weights: dict[str, Positive] | None = Field(
        None, description="mixture models: group -> weight w_m ≥ 0 for aggregate 'groups', which reweights "
        "the router: Σ_m π'_m s_m with π'_m ∝ π_m(prompt) w_m ({name: 1}: that group alone; equal weights: the "
        "router's mixture; unnamed groups weigh 0; `/v1/adapt` returns them)",
    )  # fmt: skip
    gating_offset: dict[str, Number] | None = Field(
        None, description="objective -> δ_k added to the model's gating for aggregate 'gating': Σ_k (g_k + δ_k) "
        "y_k (unnamed objectives: 0; `/v1/adapt` over objectives returns it)",
    )  # fmt: skip
    aggregate: Aggregate | None = Field(
        None, description="gating (the model's own mixture: for mixture models the router's), sum, and (sum "
        "of log-sigmoids), min (worst objective), groups (mixture models: by group_weights), worst_group "
        "(mixture models: the lowest group score, MaxMin) [default: sum with weights, groups with "
        "group_weights, else gating]",
    )  # fmt: skip
    transform: Transform | None = None
    pessimism: Pessimism | None = None
    constraints: Constraints | None = None


RECIPE_FIELDS = tuple(RecipeSpec.model_fields)


def merge(base: RecipeSpec, override: BaseModel) -> RecipeSpec:
    """`base` (a profile) with the recipe fields `override` (a request) sets explicitly."""
    given = {f: getattr(override, f) for f in override.model_fields_set & set(RECIPE_FIELDS)}
    return base.model_copy(update=given)
