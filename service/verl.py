"""verl reward functions backed by a running polyreward server: `compute_score` and `compute_score_batch`.

verl 0.9.1's trainer (`python -m verl.trainer.main_ppo`) computes rewards in its reward loop, one rollout per
call of a custom function; name this module's `compute_score` with hydra overrides (the `+` adds keys that
verl's config does not declare; the top-level `custom_reward_function.*` keys of older verl are ignored by
0.9.1's `main_ppo`):

    reward.custom_reward_function.path=pkg://polyreward.service.verl \\
    reward.custom_reward_function.name=compute_score \\
    +reward.custom_reward_function.reward_kwargs.url=http://rm:8000 \\
    +reward.custom_reward_function.reward_kwargs.profile=careful \\
    +reward.custom_reward_function.reward_kwargs.prompt_key=question

(`profile` and `prompt_key` are optional; `url` and `api_key` may come from `POLYREWARD_URL` and
`POLYREWARD_API_KEY` in the reward workers' environment instead: they run as Ray actors.) The reward loop scores
each rollout in a request of its own (concurrently; the server batches them), so a profile with a group
transform is refused there (`group_too_small`). verl's reward managers that score a whole batch in one call
(`verl.workers.reward_manager.BatchRewardManager`, older verl's `reward_model.reward_manager=batch`; 0.9.1's
trainer no longer offers it) take `compute_score_batch` with the same keyword arguments: one request per batch,
cut only between prompts, so a group transform sees each GRPO group whole.

verl passes only the decoded response (`solution_str`), the dataset row's `reward_model.ground_truth` and its
`extra_info`. Each rollout becomes one item: `{"prompt": extra_info[prompt_key], "response": solution_str}`
when the row carries its prompt there (verl's example preprocessors put the question under "question"; a list
of chat messages gives a `messages` item), else `{"text": solution_str}` (an empty reply without a prompt:
`{"messages": [{"role": "assistant", "content": ""}]}`, as text items must not be empty). The ground truth
becomes the item's `label`, the reference answer the server's correctness rules compare with: a string as it
is, a number as `str()` writes it, a one-element list as its element, a longer list as JSON; None (or NaN, a
missing value) gives no label.

The result is `{"score": reward, objective: value, ...}`: the reward of the server's default profile (or of
`profile`), and every objective in the response's space. verl's managers put `score` in the reward tensor (at
the response's last token) and each key in `reward_extra_info`, logged per key. An objective called "score"
would shadow the reward and is left out. Every call of one process shares one `RewardClient` (see
`reward_client`), with its retries; a server error raises `ServiceError`, which stops the run rather than
training on made-up rewards.

This module imports neither torch nor verl: verl imports it.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from polyreward.service.client import RewardClient, trl_item

# What verl's reward managers pass besides the four arguments when a reward model is enabled.
VERL_EXTRAS = frozenset({"reward_router_address", "reward_model_tokenizer"})
# RewardClient's options, accepted as reward_kwargs.
CLIENT_OPTIONS = frozenset({"model", "timeout", "retries", "backoff", "max_backoff", "max_items_per_request"})

_clients: dict[tuple, RewardClient] = {}
_lock = threading.Lock()


def reward_client(url: str | None = None, api_key: str | None = None, **options) -> RewardClient:
    """This process's client for (url, api_key, options): created on first use, then shared by every call
    and thread (a forked child makes its own). `url` defaults to $POLYREWARD_URL, `api_key` to
    $POLYREWARD_API_KEY."""
    url = url or os.environ.get("POLYREWARD_URL")
    if not url:
        raise ValueError(
            "no polyreward server: give reward_kwargs.url (+reward.custom_reward_function.reward_kwargs.url=...) "
            "or set POLYREWARD_URL in the reward workers' environment"
        )
    api_key = api_key or os.environ.get("POLYREWARD_API_KEY") or None
    key = (os.getpid(), url.rstrip("/"), api_key, tuple(sorted(options.items())))
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = RewardClient(url, api_key=api_key, **options)
    return client


def label_of(ground_truth: Any) -> str | None:
    """verl's ground truth as an item's `label` (see the module docstring)."""
    if hasattr(ground_truth, "tolist"):  # numpy scalars and arrays, as parquet rows give them
        ground_truth = ground_truth.tolist()
    if ground_truth is None or (isinstance(ground_truth, float) and math.isnan(ground_truth)):
        return None
    if isinstance(ground_truth, bytes):
        return ground_truth.decode()
    if isinstance(ground_truth, (list, tuple)):
        if len(ground_truth) == 1:
            return label_of(ground_truth[0])
        return json.dumps(list(ground_truth), ensure_ascii=False, default=str)
    if isinstance(ground_truth, Mapping):
        return json.dumps(dict(ground_truth), ensure_ascii=False, default=str)
    return str(ground_truth)


def item_of(
    solution_str: str, ground_truth: Any, extra_info: Mapping | None, prompt_key: str | None = "question"
) -> dict:
    """One rollout as a scoring item (see the module docstring)."""
    prompt = (extra_info or {}).get(prompt_key) if prompt_key else None
    if hasattr(prompt, "tolist"):  # a message list read from parquet
        prompt = prompt.tolist()
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
        if isinstance(prompt, list):
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        item = trl_item(prompt, solution_str)
    elif solution_str:
        item = {"text": solution_str}
    else:
        item = {"messages": [{"role": "assistant", "content": ""}]}
    label = label_of(ground_truth)
    return item if label is None else {**item, "label": label}


def _options(kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - VERL_EXTRAS - CLIENT_OPTIONS)
    if unknown:
        raise TypeError(
            f"polyreward.service.verl: unknown reward_kwargs {unknown}; known: url, api_key, profile, "
            f"prompt_key, {', '.join(sorted(CLIENT_OPTIONS))}"
        )
    return {k: v for k, v in kwargs.items() if k in CLIENT_OPTIONS}


def _score(items: list[dict], url, api_key, profile, options: dict) -> list[dict]:
    client = reward_client(url, api_key, **options)
    out = client.score(items, return_=[], profile=profile)
    names = out.objectives
    results = []
    for i, r in enumerate(out.results):
        row = {"score": r.score, **{n: v for n, v in zip(names, r.rewards, strict=True) if n != "score"}}
        if not all(math.isfinite(v) for v in row.values()):  # the server never answers one; never train on it
            raise ValueError(f"polyreward returned a non-finite reward for item {i}: {row}")
        results.append(row)
    return results


def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
    prompt_key: str | None = "question",
    **kwargs,
) -> dict[str, float]:
    """verl's custom reward function for one rollout: {"score": reward, objective: value, ...}.

    `kwargs`: RewardClient options (model, timeout, retries, backoff, max_backoff, max_items_per_request);
    the reward-model arguments verl adds are ignored, any other name is refused (a misspelt reward_kwargs key
    would otherwise go unnoticed for a whole run)."""
    options = _options(kwargs)
    return _score(
        [item_of(solution_str, ground_truth, extra_info, prompt_key)], url, api_key, profile, options
    )[0]


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping | None] | None = None,
    *,
    url: str | None = None,
    api_key: str | None = None,
    profile: str | None = None,
    prompt_key: str | None = "question",
    **kwargs,
) -> list[dict[str, float]]:
    """verl's batched custom reward function (BatchRewardManager's keyword arguments): one result per rollout,
    as `compute_score` gives, from one request (chunked by the client at the server's item limit, between
    prompts)."""
    options = _options(kwargs)
    if extra_infos is None:
        extra_infos = [None] * len(solution_strs)
    items = [
        item_of(s, g, e, prompt_key)
        for s, g, e in zip(solution_strs, ground_truths, extra_infos, strict=True)
    ]
    if not items:
        return []
    return _score(items, url, api_key, profile, options)
