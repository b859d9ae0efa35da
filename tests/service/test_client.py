"""service.client against the real server on 127.0.0.1: sync, async, retries, errors, TRL reward functions."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import numpy as np
import pytest
from support.recipes import debiased

from polyreward.models.runtime.items import parse_item
from polyreward.models.runtime.scorer import Scorer
from polyreward.service.client import AsyncRewardClient, RewardClient, ServiceError, as_trl_reward_funcs
from polyreward.service.postprocess import Recipe, prompt_key
from polyreward.service.recipe import RecipeSpec

pytestmark = [pytest.mark.slow, pytest.mark.integration]


GRPO = {
    "weights": {"objective0": 1.0, "objective1": 1.0},
    "aggregate": "and",
    "transform": {"reference": "group"},
}


@pytest.fixture(scope="module")
def url(minilm_artifact, serve, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("profiles") / "profiles.yaml"  # no default: only named requests use it
    profiles.write_text(f"profiles:\n  grpo: {json.dumps(GRPO)}\n")
    with serve(minilm_artifact, api_keys='["k1"]', profiles=str(profiles)) as (u, _):
        yield u


@pytest.fixture(scope="module")
def offline(minilm_artifact):
    return Scorer(minilm_artifact, precision="fp32", device="cpu")


def as_dicts(items):
    return [it.model_dump(exclude_none=True) for it in items]


def test_sync_client_matches_offline_and_splits_large_requests(url, offline, mixed_items):
    items = as_dicts(mixed_items[:20])
    with RewardClient(url, api_key="k1", max_items_per_request=6) as rm:  # 4 requests, merged in order
        out = rm.score(items, return_=["gating"])
        assert rm.models()[0]["objectives"] == out.objectives == offline.objectives
        pairs = rm.compare([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    want = offline.score(items)
    assert out.usage.items == 20 and out.usage.tokens == sum(w.tokens for w in want)
    assert np.abs(np.array([r.score for r in out.results]) - [w.score for w in want]).max() <= 1e-4
    assert np.allclose([r.rewards for r in out.results], debiased(offline.manifest, want), atol=1e-4)
    assert np.allclose([r.raw.rewards for r in out.results], [w.rewards for w in want], atol=1e-4)
    assert want[0].uncertainty is None and all(r.uncertainty is None for r in out.results)  # random heads
    good, bad = offline.score([{"prompt": "2+2?", "response": "4"}, {"prompt": "2+2?", "response": "5"}])
    assert abs(pairs.results[0].p_chosen - 1 / (1 + np.exp(bad.score - good.score))) <= 1e-4


def test_errors_name_the_problem(url):
    with RewardClient(url, api_key="k1", retries=0) as rm:
        with pytest.raises(ServiceError, match=r"422 invalid_request: items\[0\]: response: required") as e:
            rm.score([{"prompt": "no reply"}])
        assert e.value.status == 422 and e.value.type == "invalid_request"
        with pytest.raises(ServiceError, match="404 unknown_model"):
            rm.score([{"text": "x"}], model="nope")
    with RewardClient(url, api_key="wrong") as rm, pytest.raises(ServiceError, match="401 unauthorized"):
        rm.score([{"text": "x"}])


def test_connection_failures_are_retried_with_backoff_then_raised(free_port):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with (
        RewardClient(f"http://127.0.0.1:{port}", retries=3, backoff=0.1) as rm,
        pytest.raises(httpx.ConnectError),
    ):
        rm.models()
    assert time.monotonic() - started >= 0.35  # 3 waits of at least half of 0.1, 0.2, 0.4 s


def test_async_client_rides_out_a_full_queue(minilm_artifact, offline, mixed_items, serve):
    """Queue cap 8, 16 concurrent 4-item requests: the server answers 429s, the client waits Retry-After and
    retries, and every request ends with the right result."""
    items = as_dicts(mixed_items[:64])
    with serve(minilm_artifact, max_queue_items="8") as (u, _):

        async def burst():
            async with AsyncRewardClient(u, retries=20, backoff=0.05) as rm:
                parts = [items[i : i + 4] for i in range(0, len(items), 4)]
                return await asyncio.gather(*(rm.score(p) for p in parts))

        outs = asyncio.run(burst())
        refused = float(
            re.search(
                r'polyreward_rejections_total\{reason="queue_full"\} (\S+)', httpx.get(f"{u}/metrics").text
            )[1]
        )
    got = [r.score for out in outs for r in out.results]
    assert refused > 0  # the retries were needed
    assert np.abs(np.array(got) - [w.score for w in offline.score(items)]).max() <= 1e-4


def test_trl_reward_functions(url, offline):
    prompts = ["What is 2 + 2?", "Name a prime."]
    completions = ["4.", "9 is prime."]
    conv_prompts = [[{"role": "user", "content": p}] for p in prompts]
    conv_completions = [[{"role": "assistant", "content": c}] for c in completions]
    want = offline.score([{"prompt": p, "response": c} for p, c in zip(prompts, completions, strict=True)])
    names = offline.objectives

    (score,) = as_trl_reward_funcs(url, api_key="k1")
    assert score.__name__ == "polyreward_score"
    assert np.allclose(score(prompts=prompts, completions=completions), [w.score for w in want], atol=1e-4)
    # TRL's conversational format and extra dataset columns as keyword arguments
    got = score(
        prompts=conv_prompts, completions=conv_completions, completion_ids=[[1], [2]], label=["a", "b"]
    )
    assert np.allclose(got, [w.score for w in want], atol=1e-4)

    funcs = as_trl_reward_funcs(url, objectives=[names[2], names[0]], api_key="k1")
    assert [f.__name__ for f in funcs] == [f"polyreward_{names[2]}", f"polyreward_{names[0]}"]
    before = _score_requests(url)
    values = [f(prompts=prompts, completions=completions) for f in funcs]
    assert _score_requests(url) - before == 1  # the second function reused the first one's answer
    x = debiased(offline.manifest, want)  # per-objective functions give the debiased objectives
    assert np.allclose(values[0], x[:, 2], atol=1e-4)
    assert np.allclose(values[1], x[:, 0], atol=1e-4)

    (weighted,) = as_trl_reward_funcs(url, weights={names[0]: 0.5, names[1]: 2.0}, api_key="k1")
    expected = 0.5 * x[:, 0] + 2.0 * x[:, 1]
    assert np.allclose(weighted(prompts=prompts, completions=completions), expected, atol=1e-4)

    with pytest.raises(ValueError, match="unknown objectives"):
        as_trl_reward_funcs(url, objectives=["nope"], api_key="k1")


def test_a_trl_reward_function_from_a_group_profile(url, offline, minilm_artifact):
    """One function whose reward is the server profile's: a GRPO group's completions go in one request, so the
    group transform sees the whole group (a direct Recipe computation on the offline scores agrees)."""
    prompts, completions = ["Name a prime."] * 3, ["7.", "Nine.", "Two is the only even prime."]
    (reward,) = as_trl_reward_funcs(url, profile="grpo", api_key="k1")
    assert reward.__name__ == "polyreward_grpo"
    items = [{"prompt": p, "response": c} for p, c in zip(prompts, completions, strict=True)]
    want = Recipe.build(offline.manifest, RecipeSpec(**GRPO)).apply(
        offline.score(items), [prompt_key(parse_item(it)) for it in items]
    )
    assert np.allclose(
        reward(prompts=prompts, completions=completions), [w["score"] for w in want], atol=1e-4
    )
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        as_trl_reward_funcs(url, profile="nope", api_key="k1")


def _score_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(v)
        for v in re.findall(r'polyreward_requests_total\{route="/v1/score",status="200"\} (\S+)', text)
    )
