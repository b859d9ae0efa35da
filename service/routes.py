"""The HTTP routes. Each handler picks a model from the registry, hands the items to `serving`, and returns what
`serving` builds; errors are raised and answered by `polyreward.service.errors`."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from polyreward.service import serving
from polyreward.service.errors import SCORING, InvalidRequest, NotReady, Unauthorized, responses
from polyreward.service.registry import Registry
from polyreward.service.schemas import (
    AdaptRequest,
    AdaptResponse,
    CompareRequest,
    CompareResponse,
    RewardRequest,
    RewardResponse,
    ScoreRequest,
    ScoreResponse,
)
from polyreward.service.tenants import TENANT_HEADER, tenant_from_header

_bearer = HTTPBearer(auto_error=False, description="an API key, when the server has keys configured")


async def authorize(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With API keys configured, a scoring route needs one of them (compared in constant time, each one), and
    the key names the request's tenant; without keys the `X-Polyreward-Tenant` header does."""
    keys: list[tuple[str, bytes]] = request.app.state.api_keys
    if not keys:
        try:
            request.state.tenant = tenant_from_header(request.headers.get(TENANT_HEADER))
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return
    token = credentials.credentials.encode() if credentials else b""
    matches = [tenant for tenant, k in keys if hmac.compare_digest(token, k)]
    if not matches:
        raise Unauthorized("a valid 'Authorization: Bearer <key>' header is required")
    request.state.tenant = matches[0]


def registry(request: Request) -> Registry:
    return request.app.state.registry


router = APIRouter()
scoring = APIRouter(dependencies=[Depends(authorize)], responses=responses(*SCORING))


@scoring.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True)
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """Vector rewards for each item under a reward recipe (docs/rewards.md)."""
    model = registry(request).pick(body.model)
    profile, recipe = serving.recipe_for(request, model, body)
    rows = await serving.score_items(request, model, body, recipe)
    return serving.score_response(model, profile, recipe, rows)


@scoring.post("/v1/compare", response_model=CompareResponse, response_model_exclude_none=True)
async def compare(body: CompareRequest, request: Request) -> CompareResponse:
    """P(chosen ≻ rejected) for each pair, overall and per objective."""
    model = registry(request).pick(body.model)
    profile, recipe = serving.recipe_for(request, model, body)
    serving.compare_extras(recipe, body.uncertainty)
    items = [it for pair in body.pairs for it in pair.items()]
    results, _ = await serving.scored_with_rules(request, model, items, body.truncation, serving.at_pair_side)
    return serving.compare_response(model, profile, recipe, items, results, body.uncertainty)


@scoring.post("/v1/adapt", response_model=AdaptResponse, response_model_exclude_none=True)
async def adapt(body: AdaptRequest, request: Request) -> AdaptResponse:
    """Weights for one user from their labelled pairs, regularized toward the population; nothing is stored:
    later /v1/score requests send the returned `profile` fields (README, "Few-shot users")."""
    model = registry(request).pick(body.model)
    items = [it for pair in body.pairs for it in pair.items()]
    results = await serving.scored(request, model, items, body.truncation, serving.at_pair_side)
    return serving.adapt_response(model, body, results)


@scoring.post("/get_reward", response_model=RewardResponse)
async def get_reward(body: RewardRequest, request: Request) -> RewardResponse:
    """OpenRLHF's remote reward protocol: `query` holds whole conversations in the policy's chat template (Llama
    3, ChatML, Gemma, Mistral, Human/Assistant are recognised and re-rendered in the reward model's own),
    `labels` the reference answers of correctness rules; the server's default profile makes the reward."""
    model = registry(request).pick(None)
    _, recipe = serving.recipe_for(request, model)
    items = await asyncio.to_thread(serving.reward_items, request, body)
    recipe.check([serving.prompt_key(it) for it in items])  # groups: the prompts of recognised queries
    results, extras = await serving.scored_with_rules(request, model, items, where=serving.at_query)
    return serving.reward_response(recipe, items, results, extras)


@router.get("/v1/models", dependencies=[Depends(authorize)], responses=responses(Unauthorized))
async def list_models(request: Request) -> dict:
    """Loaded models (objectives, spaces, backbone, precision, providers, max length, version) and the
    reward profiles."""
    return {
        "models": [serving.model_info(m, request.app.state.rules) for m in registry(request)],
        **request.app.state.profiles.listing(),
    }


@router.get("/health")
async def health() -> dict:
    """Liveness: the process answers (also while models load)."""
    return {"status": "ok"}


@router.get("/ready", responses=responses(NotReady))
async def ready(request: Request) -> dict:
    """Readiness: 200 once every model is loaded and warm; 503 while loading, after a failed load, or draining."""
    models = registry(request)
    if not models.ready:
        raise NotReady(models.not_ready_reason())
    return {"status": "ready", "models": models.names}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> Response:
    """Prometheus text exposition: every series is prefixed `polyreward_`."""
    metrics = request.app.state.metrics
    for m in registry(request):
        metrics.queue_depth.labels(m.name).set(m.batcher.queue_depth)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


router.include_router(scoring)
