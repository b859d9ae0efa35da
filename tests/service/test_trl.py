"""TRL's own GRPOTrainer against the real `polyreward serve`: two training steps of a tiny random policy with
polyreward's reward functions (per-objective ones with `reward_weights`, and one server profile with a group
transform), checked against the trainer's logs, the server's counters and a direct /v1/score of the same items."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import httpx
import numpy as np
import pytest

from polyreward.service.client import RewardClient, as_trl_reward_funcs

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Real-looking prompts; each training step takes two of them (a batch of 6 = 2 prompts x 3 generations).
PROMPTS = [
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give me three tips for sleeping better.",
    "Explain the difference between weather and climate in two sentences.",
]
GENERATIONS, BATCH = 3, 6
OBJECTIVES = ["objective2", "objective0"]  # a subset, not in the model's order
WEIGHTS = [2.0, 0.5]
GROUP = {
    "weights": {"objective0": 1.0, "objective1": 1.0},
    "aggregate": "and",
    "transform": {"reference": "group"},
}
# ChatML, for a policy tokenizer that has no chat template of its own (conversational prompts need one).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def url(minilm_artifact, serve, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("trl-profiles") / "profiles.yaml"  # no default: named requests only
    profiles.write_text(f"profiles:\n  grpo: {json.dumps(GROUP)}\n")
    with serve(minilm_artifact, profiles=str(profiles)) as (u, _):
        yield u


@pytest.fixture(scope="module")
def policy_dir(tiny_decoder, tmp_path_factory) -> Path:
    """A tiny random Qwen2-style decoder and its ChatML tokenizer (our own copy: the template may be set)."""
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    out = tiny_decoder(tmp_path_factory.mktemp("trl-policy") / "qwen2", "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(out)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML
        tokenizer.save_pretrained(out)
    return out


class Recorded:
    """A reward function that records what the trainer passed it and what it returned (TRL names it by its
    `__name__`, which stays the wrapped function's)."""

    def __init__(self, func):
        self.func, self.__name__, self.calls = func, func.__name__, []

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        rewards = self.func(prompts=prompts, completions=completions, **kwargs)
        self.calls.append({"prompts": list(prompts), "completions": list(completions), "rewards": rewards})
        self.kwargs = sorted(kwargs)
        return rewards


def train(policy_dir: Path, rows: list[dict], reward_funcs: list, out: Path, **config):
    """Two GRPO steps of the tiny policy on CPU; returns (trainer, whether the policy's weights moved)."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    checkpointing = "activation_checkpointing"  # transformers 5's gradient_checkpointing (TRL's default: on)
    if checkpointing not in GRPOConfig.__dataclass_fields__:
        checkpointing = "gradient_checkpointing"
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir))
    before = [p.detach().clone() for p in policy.parameters()]
    args = GRPOConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=BATCH, num_generations=GENERATIONS,
        max_completion_length=8, temperature=1.0, report_to=[], use_cpu=True, bf16=False, logging_steps=1,
        save_strategy="no", seed=0, **{checkpointing: False}, **config,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=policy,
        processing_class=AutoTokenizer.from_pretrained(policy_dir),
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    return trainer, moved


def step_logs(trainer) -> list[dict]:
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert [h["step"] for h in logs] == [1, 2], trainer.state.log_history
    return logs


def counters(url: str) -> tuple[float, float]:
    """(/v1/score requests answered 200, items scored) from the server's Prometheus metrics."""
    text = httpx.get(f"{url}/metrics").text
    requests = re.findall(r'polyreward_requests_total\{route="/v1/score",status="200"\} (\S+)', text)
    items = re.findall(r"polyreward_items_scored_total\{[^}]*\} (\S+)", text)
    return sum(map(float, requests)), sum(map(float, items))


def assert_grouped(prompts: list) -> None:
    """The batch holds whole GRPO groups, each prompt's completions side by side (what a group transform and
    the client's request splitting rely on)."""
    assert len(prompts) == BATCH
    groups = [prompts[i : i + GENERATIONS] for i in range(0, BATCH, GENERATIONS)]
    assert all(g == [g[0]] * GENERATIONS for g in groups), prompts
    assert groups[0][0] != groups[1][0]


def test_grpo_with_per_objective_rewards_and_reward_weights(url, policy_dir, tmp_path):
    funcs = [Recorded(f) for f in as_trl_reward_funcs(url, objectives=OBJECTIVES)]
    names = [f"polyreward_{n}" for n in OBJECTIVES]
    assert [f.__name__ for f in funcs] == names
    rows = [{"prompt": p, "topic": f"t{i}"} for i, p in enumerate(PROMPTS)]  # an extra column: a keyword
    requests, items = counters(url)

    trainer, moved = train(policy_dir, rows, funcs, tmp_path, reward_weights=WEIGHTS)

    assert trainer.state.global_step == 2 and moved
    # one request per step serves all the per-objective functions (they share the batch's answer)
    new_requests, new_items = counters(url)
    assert (new_requests - requests, new_items - items) == (2, 2 * BATCH)
    assert all(len(f.calls) == 2 for f in funcs)
    assert {"completion_ids", "trainer_state", "topic"} <= set(funcs[0].kwargs)

    with RewardClient(url) as rm:
        for step, log in enumerate(step_logs(trainer)):
            call = funcs[0].calls[step]
            assert all(f.calls[step]["completions"] == call["completions"] for f in funcs)
            assert all(isinstance(p, str) for p in call["prompts"] + call["completions"])
            assert_grouped(call["prompts"])
            values = np.array([f.calls[step]["rewards"] for f in funcs])  # (functions, batch)
            assert np.isfinite(values).all() and values.std(axis=1).min() > 0
            # TRL's logs: each function's batch mean by its name; `reward` the reward_weights sum
            for name, v in zip(names, values, strict=True):
                assert math.isclose(log[f"rewards/{name}/mean"], v.mean(), rel_tol=1e-5, abs_tol=1e-5)
            assert math.isclose(
                log["reward"], (np.array(WEIGHTS) @ values).mean(), rel_tol=1e-5, abs_tol=1e-5
            )
            assert log["reward_std"] > 0
            # the same items scored directly: per-objective functions give the objectives as the server does
            direct = rm.score(
                [
                    {"prompt": p, "response": c}
                    for p, c in zip(call["prompts"], call["completions"], strict=True)
                ]
            )
            want = np.array(
                [[r.rewards[direct.objectives.index(n)] for r in direct.results] for n in OBJECTIVES]
            )
            assert np.allclose(values, want, atol=1e-4)


def test_grpo_conversational_with_a_group_profile(url, policy_dir, tmp_path):
    (reward,) = funcs = [Recorded(f) for f in as_trl_reward_funcs(url, profile="grpo")]
    assert reward.__name__ == "polyreward_grpo"
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    requests, items = counters(url)

    trainer, moved = train(policy_dir, rows, funcs, tmp_path)

    assert trainer.state.global_step == 2 and moved
    new_requests, new_items = counters(url)
    assert (new_requests - requests, new_items - items) == (2, 2 * BATCH)
    assert len(reward.calls) == 2

    with RewardClient(url) as rm:
        for call, log in zip(reward.calls, step_logs(trainer), strict=True):
            prompts, completions = call["prompts"], call["completions"]
            assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
            assert all(c == [{"role": "assistant", "content": c[0]["content"]}] for c in completions)
            assert_grouped(prompts)
            values = np.array(call["rewards"])
            assert np.isfinite(values).all() and values.std() > 0
            assert math.isclose(
                log["rewards/polyreward_grpo/mean"], values.mean(), rel_tol=1e-5, abs_tol=1e-5
            )
            assert math.isclose(log["reward"], values.mean(), rel_tol=1e-5, abs_tol=1e-5)
            # the profile's reward of the whole batch, as messages, in one direct request
            chats = [{"messages": [*p, *c]} for p, c in zip(prompts, completions, strict=True)]
            direct = rm.score(chats, profile="grpo")
            assert np.allclose(values, [r.score for r in direct.results], atol=1e-4)
            # the group transform is per prompt: each group scored alone gets the same rewards
            alone = [
                r.score
                for i in (0, GENERATIONS)
                for r in rm.score(chats[i : i + GENERATIONS], profile="grpo").results
            ]
            assert np.allclose(values, alone, atol=1e-4)


def test_grpo_with_rule_objectives_and_labels_from_a_dataset_column(
    minilm_artifact, serve, policy_dir, tmp_path
):
    """A server with rule objectives (`serve --rules`): a length band and math correctness against the
    dataset's `answer` column (`label_column`), as per-objective functions beside a learned one."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  short: {kind: length, max: 3, tolerance: 4}\n  correct: {kind: math}\n")
    rows = [{"prompt": p, "answer": str(i)} for i, p in enumerate(PROMPTS)]
    with serve(minilm_artifact, rules=str(rules)) as (url, _):
        funcs = [Recorded(f) for f in as_trl_reward_funcs(url, objectives=["objective0", "short", "correct"],
                                                          label_column="answer")]  # fmt: skip
        trainer, _ = train(policy_dir, rows, funcs, tmp_path / "run", reward_weights=[1.0, 0.5, 2.0])
        (unlabelled,) = as_trl_reward_funcs(url, objectives=["correct"])
        with pytest.raises(Exception, match=r"items\[0\]\.label: rule 'correct'"):
            unlabelled(prompts=PROMPTS[:1], completions=["1"])
        (wrong_column,) = as_trl_reward_funcs(url, objectives=["correct"], label_column="solution")
        with pytest.raises(ValueError, match="label_column: the dataset has no column 'solution'"):
            wrong_column(prompts=PROMPTS[:1], completions=["1"], answer=["1"])
        (scored,) = as_trl_reward_funcs(url, objectives=["correct"], label_column="answer")
        assert scored(prompts=PROMPTS[:2], completions=["The answer is $1$", "0"], answer=["1", "1"]) == [
            1.0,
            0.0,
        ]
    assert trainer.state.global_step == 2
    for step in range(2):
        call = funcs[1].calls[step]
        words = [len(c.split()) for c in call["completions"]]
        assert call["rewards"] == pytest.approx([max(0.0, 1 - max(0, n - 3) / 4) for n in words])
        assert all(v in (0.0, 1.0) for v in funcs[2].calls[step]["rewards"])
