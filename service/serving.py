"""The work behind the routes: a request's items through its model's batcher, and results into response bodies.

Handlers (`polyreward.service.routes`) call these and nothing else; engines never see HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from fastapi import Request

from polyreward.models.runtime.builder import InputRejected
from polyreward.models.runtime.items import Item
from polyreward.models.runtime.manifest import Truncation
from polyreward.models.runtime.scorer import ScoreResult
from polyreward.service.errors import ClientGone, TooManyItems, from_rejection
from polyreward.service.postprocess import Recipe, named, pair_probabilities
from polyreward.service.registry import Model
from polyreward.service.schemas import (
    CompareResponse,
    ItemResult,
    PairResult,
    RewardResponse,
    ScoreResponse,
    Usage,
)


def at_item(index: int) -> str:
    return f"items[{index}]"


def at_pair_side(index: int) -> str:
    return f"pairs[{index // 2}].{('chosen', 'rejected')[index % 2]}"


async def scored(
    request: Request,
    model: Model,
    items: Sequence[Item],
    truncation: Truncation | None = None,
    where: Callable[[int], str] = at_item,
) -> list[ScoreResult]:
    """Score a request's items through the model's queue. A client that disconnects first frees its items; an
    item the model refuses is reported at `where(index)`. Sets the request's timing for the response headers."""
    settings, metrics = request.app.state.settings, request.app.state.metrics
    if len(items) > settings.max_items_per_request:
        raise TooManyItems(f"items: {len(items)} items; the limit is {settings.max_items_per_request}")
    work = asyncio.ensure_future(
        model.batcher.score_timed(items, timeout=settings.request_timeout, truncation=truncation)
    )
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: its items leave the queue
            work.cancel()
            raise ClientGone("the client closed the connection")
        results, request.state.timing = work.result()
    except InputRejected as e:
        raise from_rejection(e, where(e.index)) from None
    finally:
        gone.cancel()
        metrics.queue_depth.labels(model.name).set(model.batcher.queue_depth)
    if truncated := sum(r.truncated for r in results):
        metrics.truncations.labels(model.name).inc(truncated)
    return results


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is already read, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def score_response(
    model: Model, results: list[ScoreResult], recipe: Recipe, extras: Sequence[str]
) -> ScoreResponse:
    out = []
    for r in results:
        score, rewards = recipe.apply(r)
        out.append(
            ItemResult(
                score=score,
                rewards=rewards,
                gating=None if recipe.replaces_gating else r.gating,
                uncertainty=r.uncertainty if "uncertainty" in extras else None,
                tokens=r.tokens,
                truncated=r.truncated,
            )
        )
    usage = Usage(items=len(results), tokens=sum(r.tokens for r in results))
    return ScoreResponse(model=model.name, objectives=model.scorer.objectives, results=out, usage=usage)


def compare_response(model: Model, results: list[ScoreResult]) -> CompareResponse:
    names = model.scorer.objectives
    out = []
    for chosen, rejected in zip(results[0::2], results[1::2], strict=True):
        p, per = pair_probabilities(chosen, rejected, names)
        out.append(PairResult(p_chosen=p, objectives=per))
    return CompareResponse(model=model.name, results=out)


def reward_response(model: Model, results: list[ScoreResult]) -> RewardResponse:
    scores = [r.score for r in results]
    columns = zip(*(r.rewards for r in results), strict=True)
    return RewardResponse(
        rewards=scores, scores=scores, extra_logs=named(model.scorer.objectives, [list(c) for c in columns])
    )


def model_info(model: Model) -> dict:
    m = model.scorer.manifest
    return {
        "name": model.name,
        "version": m.version,
        "objectives": model.scorer.objectives,
        "backbone": m.backbone.model_type,
        "head": m.head.kind,
        "precision": model.scorer.precision,
        "providers": model.scorer.providers,
        "max_length": m.input.max_length,
    }
