"""Python clients for the scoring service, and TRL reward functions backed by it.

    from polyreward.service.client import RewardClient
    with RewardClient("http://127.0.0.1:8000", api_key="...") as rm:
        out = rm.score([{"prompt": "2+2?", "response": "4"}], return_=["gating", "uncertainty"])
        out.results[0].rewards          # one reward per objective, in out.objectives order

`AsyncRewardClient` is the same with `await`. Both share one retry policy (tenacity): 429 (queue full) and
503 (loading or draining) wait at least the server's `Retry-After`; connection failures, 502 and 504 back off
exponentially with jitter; at most `retries` retries. Any other error raises `ServiceError` naming the
server's error type and message. Large requests are split into `max_items_per_request` chunks (the server's
limit; default 256).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    wait_exponential_jitter,
)

from polyreward.service.schemas import AdaptResponse, CompareResponse, RewardResponse, ScoreResponse

RETRY_STATUSES = {429, 502, 503, 504}


class ServiceError(Exception):
    """An error answer from the service (or retries exhausted): `status`, `type`, `message`."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.type, self.message = status, kind, message


class _Base:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_items_per_request: int = 256,
    ):
        self.url = url.rstrip("/")
        self.model = model
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.chunk = max_items_per_request
        self._http_args: dict[str, Any] = {
            "base_url": self.url,
            "timeout": timeout,
            "headers": {"Authorization": f"Bearer {api_key}"} if api_key else {},
        }

    def _retry_policy(self) -> dict:
        """tenacity's arguments, shared by the sync and async clients."""
        backoff = wait_exponential_jitter(initial=self.backoff, max=self.max_backoff, jitter=self.backoff)

        def wait(state: RetryCallState) -> float:
            seconds = backoff(state)
            response = None if state.outcome is None or state.outcome.failed else state.outcome.result()
            after = response.headers.get("retry-after") if response is not None else None
            if after is not None:
                with contextlib.suppress(ValueError):  # an HTTP date: keep the backoff
                    seconds = max(seconds, min(float(after), self.max_backoff))
            return seconds

        return {
            "retry": retry_if_exception_type(httpx.TransportError)
            | retry_if_result(lambda r: r.status_code in RETRY_STATUSES),
            "wait": wait,
            "stop": stop_after_attempt(self.retries + 1),
            "retry_error_callback": lambda state: state.outcome.result(),  # the last answer, or its exception
        }

    @staticmethod
    def _result(response: httpx.Response) -> dict:
        if response.status_code == 200:
            return response.json()
        try:
            error = response.json()["error"]
            kind, message = error["type"], error["message"]
        except (ValueError, KeyError, TypeError):
            kind, message = "http", response.text[:500]
        raise ServiceError(response.status_code, kind, message)

    def _score_bodies(self, items: Sequence[dict], **options) -> Iterator[dict]:
        """Request bodies of at most `chunk` items, cut between prompts where possible (a group transform sees
        a prompt's whole group when its items are consecutive, as GRPO's are)."""
        options = {k: v for k, v in options.items() if v is not None}
        if "return_" in options:
            options["return"] = list(options.pop("return_"))
        model = options.pop("model", None) or self.model
        start = 0
        while start < len(items):
            end = min(start + self.chunk, len(items))
            cut = end
            while (
                end < len(items) and cut > start + 1 and _prompt_of(items[cut]) == _prompt_of(items[cut - 1])
            ):
                cut -= 1
            end = cut if cut > start + 1 else end
            yield {"items": list(items[start:end]), "model": model, **options}
            start = end

    @staticmethod
    def _merge_scores(parts: list[dict]) -> ScoreResponse:
        return ScoreResponse(
            **parts[0]
            | {
                "results": [r for p in parts for r in p["results"]],
                "usage": {k: sum(p["usage"][k] for p in parts) for k in ("items", "tokens")},
            }
        )


def _reward_body(query: Sequence[str], prompts: Sequence[str] | None, labels: Sequence | None) -> dict:
    return {
        "query": list(query),
        "prompts": None if prompts is None else list(prompts),
        "labels": None if labels is None else list(labels),
    }


def _prompt_of(item: dict) -> str | None:
    if "prompt" in item:
        return repr(item["prompt"])
    return repr(item["messages"][:-1]) if "messages" in item else None


class RewardClient(_Base):
    """Synchronous client (httpx): `score`, `compare`, `get_reward`, `models`. Use as a context manager."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self._http = httpx.Client(**self._http_args)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        return self._result(Retrying(**self._retry_policy())(self._http.request, method, path, json=body))

    def score(
        self,
        items: Sequence[dict],
        *,
        return_: Sequence[str] | None = None,
        truncation: str | None = None,
        model: str | None = None,
        **recipe,
    ) -> ScoreResponse:
        """Vector rewards for items ({"messages"} | {"prompt", "response"} | {"text"}), in input order.
        `recipe`: the request's recipe fields (profile, space, weights, normalize, aggregate, transform,
        pessimism, constraints, references, level), as JSON values."""
        bodies = self._score_bodies(items, return_=return_, truncation=truncation, model=model, **recipe)
        return self._merge_scores([self._request("POST", "/v1/score", b) for b in bodies])

    def compare(self, pairs: Sequence[dict], *, model: str | None = None, **recipe) -> CompareResponse:
        """P(chosen ≻ rejected) for pairs {"prompt" | "messages", "chosen", "rejected"}; `recipe` as in
        `score`, plus uncertainty=True for the probit form."""
        body = {"pairs": list(pairs), "model": model or self.model, **recipe}
        return CompareResponse.model_validate(self._request("POST", "/v1/compare", body))

    def adapt(
        self, pairs: Sequence[dict], *, over: str | None = None, model: str | None = None, **options
    ) -> AdaptResponse:
        """Weights for one user from their labelled pairs (`over`: groups or objectives; `strength`); send
        the returned `profile` fields with later `score` calls: `rm.score(items, **adapted.profile)`."""
        body = {"pairs": list(pairs), "model": model or self.model, "over": over, **options}
        return AdaptResponse.model_validate(self._request("POST", "/v1/adapt", body))

    def get_reward(
        self, query: Sequence[str], prompts: Sequence[str] | None = None, labels: Sequence | None = None
    ) -> RewardResponse:
        """OpenRLHF's protocol: rewards for templated conversations (`labels`: correctness rules' answers)."""
        return RewardResponse.model_validate(
            self._request("POST", "/get_reward", _reward_body(query, prompts, labels))
        )

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["models"]

    def profiles(self) -> dict:
        """The server's reward profiles: {"default": name or None, "profiles": {name: recipe}}."""
        listing = self._request("GET", "/v1/models")
        return {"default": listing.get("default"), "profiles": listing.get("profiles", {})}


class AsyncRewardClient(_Base):
    """Asynchronous client (httpx.AsyncClient); chunks of a large request are sent concurrently."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(**self._http_args)

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        policy = AsyncRetrying(**self._retry_policy())
        return self._result(await policy(self._http.request, method, path, json=body))

    async def score(
        self,
        items: Sequence[dict],
        *,
        return_: Sequence[str] | None = None,
        truncation: str | None = None,
        model: str | None = None,
        **recipe,
    ) -> ScoreResponse:
        bodies = self._score_bodies(items, return_=return_, truncation=truncation, model=model, **recipe)
        parts = await asyncio.gather(*(self._request("POST", "/v1/score", b) for b in bodies))
        return self._merge_scores(list(parts))

    async def compare(self, pairs: Sequence[dict], *, model: str | None = None, **recipe) -> CompareResponse:
        body = {"pairs": list(pairs), "model": model or self.model, **recipe}
        return CompareResponse.model_validate(await self._request("POST", "/v1/compare", body))

    async def get_reward(
        self, query: Sequence[str], prompts: Sequence[str] | None = None, labels: Sequence | None = None
    ) -> RewardResponse:
        body = _reward_body(query, prompts, labels)
        return RewardResponse.model_validate(await self._request("POST", "/get_reward", body))

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models"))["models"]


def trl_item(prompt: str | list[dict], completion: str | list[dict]) -> dict:
    """One TRL (prompt, completion) as a scoring item: plain text becomes prompt+response; conversational
    prompts (message lists) and completions ([{"role": "assistant", "content": ...}]) become messages."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    messages += [{"role": m.get("role", "assistant"), "content": m["content"]} for m in completion]
    return {"messages": messages}


def as_trl_reward_funcs(
    url: str,
    objectives: Sequence[str] | None = None,
    weights: dict[str, float] | None = None,
    *,
    profile: str | None = None,
    space: str | None = None,
    label_column: str | None = None,
    **client_options,
) -> list[Callable[..., list[float]]]:
    """Reward functions for TRL's `GRPOTrainer(reward_funcs=...)`: `f(prompts, completions, **kwargs)`.

    * `objectives=["helpfulness", ...]`: one function per objective (TRL logs each by its `__name__`,
      `polyreward_<objective>`, and sums them with `GRPOConfig.reward_weights`), in `space` (debiased by
      default: the values the gating mixes, on one scale);
    * `weights={"helpfulness": 1.0, "safety": 2.0}`: one function, `polyreward_weighted`, Σ w·x;
    * `profile="name"`: one function, `polyreward_<name>`, the server profile's reward (also the reward of
      the other two forms when given with them: objectives come back in the profile's space);
    * none of these: one function, `polyreward_score`, the server's default profile or the model's own score.

    `label_column`: the dataset column (TRL passes every column to reward functions) that holds each row's
    reference answer, sent as the items' `label` for the server's correctness rules (`serve --rules`).

    The functions of one call share their last answer, so K per-objective functions score a batch once; a
    GRPO batch's completions of one prompt go in one request, so group transforms see the whole group.
    `client_options` go to `RewardClient` (api_key, model, timeout, retries, ...).
    """
    if objectives is not None and weights is not None:
        raise ValueError("give objectives (one function each) or weights (one weighted function), not both")
    client = RewardClient(url, **client_options)
    recipe = {
        k: v for k, v in {"profile": profile, "space": space, "weights": weights}.items() if v is not None
    }
    models = client.models()  # not a scoring probe: a profile may refuse a lone item (a group transform)
    names = next((m for m in models if m["name"] == client.model), models[0])["objectives"]
    if profile is not None and profile not in (known := client.profiles()["profiles"]):
        raise ValueError(f"unknown profile {profile!r}; the server has {sorted(known)}")
    unknown = sorted(set(objectives or weights or ()) - set(names))
    if unknown:
        raise ValueError(f"unknown objectives {unknown}; the model has {names}")
    last: dict[str, Any] = {"key": None, "response": None}

    def scored(prompts, completions, columns: dict) -> ScoreResponse:
        items = [trl_item(p, c) for p, c in zip(prompts, completions, strict=True)]
        if label_column is not None:
            if label_column not in columns:
                raise ValueError(f"label_column: the dataset has no column {label_column!r}")
            labels = columns[label_column]
            items = [
                {**it, "label": str(lab)} if lab is not None else it
                for it, lab in zip(items, labels, strict=True)
            ]
        key = repr(items)
        if last["key"] != key:
            last["response"], last["key"] = client.score(items, return_=[], **recipe), key
        return last["response"]

    def make(name: str, objective: int | None) -> Callable[..., list[float]]:
        def reward(prompts, completions, **kwargs) -> list[float]:
            results = scored(prompts, completions, kwargs).results
            return [r.score if objective is None else r.rewards[objective] for r in results]

        reward.__name__ = reward.__qualname__ = name
        return reward

    if objectives is not None:
        return [make(f"polyreward_{n}", names.index(n)) for n in objectives]
    name = "weighted" if weights else (profile or "score")
    return [make(f"polyreward_{name}", None)]
