"""The work behind the routes: a request's items through its model's batcher, and results into response bodies.

Handlers (`polyreward.service.routes`) call these and nothing else; engines never see HTTP.
"""

from __future__ import annotations

import asyncio
import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from fastapi import Request

from polyreward.models.runtime import adapt
from polyreward.models.runtime.builder import InputRejected
from polyreward.models.runtime.items import ChatItem, Item, TextItem
from polyreward.models.runtime.manifest import Truncation
from polyreward.models.runtime.rules import MissingLabel, RuleSet, append_rules
from polyreward.models.runtime.scorer import ScoreResult
from polyreward.models.runtime.templates import FORMATS, recognize
from polyreward.service.batcher import QueueFull
from polyreward.service.errors import ClientGone, InvalidRequest, TooManyItems, from_rejection
from polyreward.service.postprocess import Recipe, margin_probability, prompt_key, sigmoid
from polyreward.service.recipe import RecipeError, merge
from polyreward.service.registry import Model
from polyreward.service.schemas import (
    AdaptFit,
    AdaptRequest,
    AdaptResponse,
    CompareResponse,
    ItemResult,
    PairResult,
    RecipeRequest,
    RewardRequest,
    RewardResponse,
    ScoreRequest,
    ScoreResponse,
    Usage,
)
from polyreward.service.tenants import DEFAULT_TENANT


def at_item(index: int) -> str:
    return f"items[{index}]"


def at_query(index: int) -> str:
    return f"query[{index}]"


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
    tenant = getattr(request.state, "tenant", DEFAULT_TENANT)
    label = request.app.state.tenant_label(tenant)
    work = asyncio.ensure_future(
        model.batcher.score_timed(
            items, timeout=settings.request_timeout, truncation=truncation, tenant=tenant
        )
    )
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: its items leave the queue
            work.cancel()
            raise ClientGone("the client closed the connection")
        results, timing = work.result()
        request.state.timing = timing
    except InputRejected as e:
        raise from_rejection(e, where(e.index)) from None
    except QueueFull:
        metrics.tenant_rejections.labels(label).inc()
        raise
    finally:
        gone.cancel()
        metrics.queue_depth.labels(model.name).set(model.batcher.queue_depth)
    metrics.tenant_items.labels(label).inc(len(results))
    metrics.tenant_queue_seconds.labels(label).observe(timing.queue_seconds)
    if truncated := sum(r.truncated for r in results):
        metrics.truncations.labels(model.name).inc(truncated)
    return results


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is already read, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def recipe_for(
    request: Request, model: Model, body: RecipeRequest | None = None
) -> tuple[str | None, Recipe]:
    """A request's recipe: its profile (or the server's default) with the request's own fields on top; without
    a body (`/get_reward`), the default profile. The server's rule objectives follow the learned ones."""
    name, base = request.app.state.profiles.spec(body.profile if body else None)
    rules = request.app.state.rules.names
    return name, Recipe.build(model.scorer.manifest, merge(base, body) if body else base, rules)


async def scored_with_rules(
    request: Request,
    model: Model,
    items: Sequence[Item],
    truncation: Truncation | None = None,
    where: Callable[[int], str] = at_item,
) -> tuple[list[ScoreResult], list[dict]]:
    """`scored` with the server's rule objectives: replies stripped before the model reads them, every rule
    evaluated (off the event loop, beside the model's batches) and appended to the rewards. Also per item
    what the response reports of the rules: the characters stripped and the rules that could not finish."""
    rules = request.app.state.rules
    if not rules:
        return await scored(request, model, items, truncation, where), [{} for _ in items]
    try:
        rules.check_labels(items)
    except MissingLabel as e:
        raise InvalidRequest(f"{where(e.index)}.label: {e.reason}", type="missing_label") from None
    stripped, removed = await asyncio.to_thread(rules.strip, items)
    checks = asyncio.ensure_future(
        asyncio.to_thread(rules.evaluate, items, stripped, model.scorer.builder.count_tokens)
    )
    try:
        results = await scored(request, model, stripped, truncation, where)
    except BaseException:
        checks.cancel()
        raise
    evaluation = await checks
    for errors in evaluation.errors:
        for name in errors:
            request.app.state.metrics.rule_failures.labels(name).inc()
    extras = [
        {"stripped_chars": n if rules.file.strip else None, "rule_errors": errors or None}
        for n, errors in zip(removed, evaluation.errors, strict=True)
    ]
    return append_rules(results, evaluation.values), extras


async def score_items(request: Request, model: Model, body: ScoreRequest, recipe: Recipe) -> list[dict]:
    """Score a /v1/score request's items (and references) and apply its recipe."""
    refs = body.references or []
    if refs and not recipe.needs_references:
        raise RecipeError("references: only transform.reference 'references' reads them", "unused_references")
    groups = [prompt_key(it) for it in body.items]
    recipe.check(groups, {prompt_key(it) for it in refs}, body.return_, body.level)  # before scoring
    n = len(body.items)
    where = lambda i: at_item(i) if i < n else f"references[{i - n}]"  # noqa: E731
    results, extras = await scored_with_rules(request, model, [*body.items, *refs], body.truncation, where)
    by_prompt: dict = defaultdict(list)
    for item, r in zip(refs, results[n:], strict=True):
        by_prompt[prompt_key(item)].append(r)
    rows = recipe.apply(results[:n], groups, by_prompt, body.return_, body.level)
    return [
        {**row, **extra, "tokens": r.tokens, "truncated": r.truncated}
        for row, extra, r in zip(rows, extras[:n], results[:n], strict=True)
    ]


def score_response(model: Model, profile: str | None, recipe: Recipe, rows: list[dict]) -> ScoreResponse:
    usage = Usage(items=len(rows), tokens=sum(r["tokens"] for r in rows))
    return ScoreResponse(
        model=model.name, objectives=list(recipe.names), groups=list(recipe.groups) or None, space=recipe.space,
        profile=profile,
        recipe=recipe.spec.model_dump(exclude_none=True), results=[ItemResult(**r) for r in rows], usage=usage,
    )  # fmt: skip


def compare_extras(recipe: Recipe, uncertainty: bool) -> list[str]:
    """What /v1/compare asks of the recipe; checked before anything is scored."""
    if uncertainty and not recipe.has_uncertainty:
        raise RecipeError("uncertainty: this model's heads carry no uncertainty output", "no_uncertainty")
    return ["uncertainty"] if uncertainty else []


def compare_response(
    model: Model,
    profile: str | None,
    recipe: Recipe,
    items: list,
    results: list[ScoreResult],
    uncertainty: bool,
) -> CompareResponse:
    """Per pair: P(chosen ≻ rejected) from the recipe's score margin (probit-adjusted by its epistemic σ with
    `uncertainty`), and per objective σ(x_c − x_r)."""
    extras = compare_extras(recipe, uncertainty)
    rows = recipe.apply(results, [prompt_key(it) for it in items], extras=extras)
    out = []
    for chosen, rejected in zip(rows[0::2], rows[1::2], strict=True):
        margin = chosen["score"] - rejected["score"]
        std = None
        if uncertainty:
            sigmas = [side["uncertainty"]["score"]["epistemic"] for side in (chosen, rejected)]
            std = None if None in sigmas else float(np.hypot(*sigmas))
        per = dict(
            zip(
                recipe.names,
                sigmoid(np.subtract(chosen["rewards"], rejected["rewards"])).tolist(),
                strict=True,
            )
        )
        out.append(
            PairResult(
                p_chosen=margin_probability(margin, (std or 0.0) ** 2),
                margin=margin,
                margin_std=std,
                objectives=per,
            )
        )
    return CompareResponse(model=model.name, space=recipe.space, profile=profile, results=out)


def adapt_response(model: Model, body: AdaptRequest, results: list[ScoreResult]) -> AdaptResponse:
    """Weights for one user from their pairs (`polyreward.models.runtime.adapt`, formulas there)."""
    m = model.scorer.manifest
    groups = m.head.groups
    over = body.over or ("groups" if groups else "objectives")
    if over == "groups" and not groups:
        raise RecipeError(
            f"over: model {m.name!r} has no groups (not a mixture model); use 'objectives'", "no_groups"
        )
    if m.transform is None:
        raise RecipeError(
            f"over: model {m.name!r} records no transform, so no debiased space to adapt in", "no_transform"
        )
    chosen, rejected = results[0::2], results[1::2]
    delta = (np.array([r.rewards for r in chosen]) - np.array([r.rewards for r in rejected])) @ np.array(
        m.transform
    )
    population = np.array([c.score - r.score for c, r in zip(chosen, rejected, strict=True)])
    names, offset, group_weights = model.scorer.objectives, None, None
    if over == "groups":
        margins = np.array([c.group_scores for c in chosen]) - np.array([r.group_scores for r in rejected])
        probs = np.array([c.group_probs for c in chosen])
        fit = adapt.over_groups(margins, probs)
        tilted = probs.clip(1e-12) * fit.weights
        tilted /= tilted.sum(-1, keepdims=True)
        weights = np.einsum("pm,pmk->k", tilted, np.array([c.group_gating for c in chosen])) / len(chosen)
        group_weights = dict(zip(groups, fit.weights.tolist(), strict=True))  # type: ignore[arg-type]
        profile = {"aggregate": "groups", "group_weights": group_weights}
    else:
        fit = adapt.over_objectives(delta, population, body.strength)
        weights = np.mean([c.gating for c in chosen], 0) + fit.weights
        offset = dict(zip(names, fit.weights.tolist(), strict=True))
        profile = {"aggregate": "gating", "gating_offset": offset}
    if not np.isfinite(weights).all() or not math.isfinite(fit.log_likelihood):
        raise RecipeError("pairs: the adapted weights are not finite numbers for these pairs", "non_finite")
    return AdaptResponse(
        model=model.name, over=over, pairs=len(chosen), weights=dict(zip(names, weights.tolist(), strict=True)),
        group_weights=group_weights, gating_offset=offset, profile=profile,
        fit=AdaptFit(
            log_likelihood=fit.log_likelihood, population_log_likelihood=fit.prior_log_likelihood,
            accuracy=float((fit.margins > 0).mean()), population_accuracy=float((population > 0).mean()),
        ),
    )  # fmt: skip


def reward_items(request: Request, body: RewardRequest) -> list[Item]:
    """/get_reward's queries as items: a query in a chat format `templates.recognize` knows becomes its
    messages (so the reward model reads them in its own template); any other is scored as text, counted, or
    refused when the server is set to. `labels` are the items' reference answers. Blocking (linear in the
    text): the route runs it off the event loop."""
    labels = body.labels or [None] * len(body.query)
    if len(labels) != len(body.query):
        raise InvalidRequest(f"labels: {len(labels)} labels for {len(body.query)} queries")
    refuse = request.app.state.settings.unrecognized_queries == "refuse"
    items: list[Item] = []
    for i, (query, label) in enumerate(zip(body.query, labels, strict=True)):
        label = None if label in (None, "") else str(label)  # OpenRLHF sends "" without --data.label_key
        found = recognize(query)
        if found is None:
            if refuse:
                raise InvalidRequest(
                    f"query[{i}]: in no known chat format ({', '.join(FORMATS)}); the server refuses "
                    "unrecognized queries (unrecognized_queries: refuse)", type="unrecognized_query",
                )  # fmt: skip
            request.app.state.metrics.unrecognized_queries.inc()
            items.append(TextItem(text=query, label=label))
        else:
            items.append(ChatItem(messages=found.messages, label=label))
    try:
        request.app.state.rules.check_labels(items)
    except MissingLabel as e:
        raise InvalidRequest(f"labels[{e.index}]: {e.reason}", type="missing_label") from None
    return items


def reward_response(
    recipe: Recipe, items: list, results: list[ScoreResult], extras: list[dict]
) -> RewardResponse:
    """OpenRLHF's answer: the default profile's score; each objective (rule objectives included), the model's
    own score and the characters stripped from each reply as extra_logs."""
    rows = recipe.apply(results, [prompt_key(it) for it in items])
    scores = [row["score"] for row in rows]
    logs = {n: [row["rewards"][k] for row in rows] for k, n in enumerate(recipe.names)}
    logs["model_score"] = [r.score for r in results]
    if extras and extras[0].get("stripped_chars") is not None:
        logs["stripped_chars"] = [float(e["stripped_chars"]) for e in extras]
    return RewardResponse(rewards=scores, scores=scores, extra_logs=logs)


def model_info(model: Model, rules: RuleSet) -> dict:
    m = model.scorer.manifest
    return {
        "name": model.name,
        "version": m.version,
        "objectives": [*model.scorer.objectives, *rules.names],
        "kinds": {**dict.fromkeys(model.scorer.objectives, "learned"), **rules.kinds},
        "backbone": m.backbone.model_type,
        "head": m.head.kind,
        **({"groups": m.head.groups, "routing": m.head.routing} if m.head.groups else {}),
        "precision": model.scorer.precision,
        "providers": model.scorer.providers,
        "max_length": m.input.max_length,
        "spaces": ["debiased", "raw"] if m.transform is not None else ["raw"],
        "uncertainty": "uncertainty" in model.scorer.output_names,
        "intervals": sorted(n for n, u in (m.uncertainty or {}).items() if u.conformal),
    }
