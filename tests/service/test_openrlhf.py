"""OpenRLHF 0.11.2's own reward code against the real server (service/openrlhf.py; README, "OpenRLHF").

OpenRLHF's rollout executor, `openrlhf.utils.agent.SingleTurnAgentExecutor` (what each vLLM engine actor runs
for each sample), is driven as `RolloutRayActor.generate_responses` drives it: tokenize the prompt, generate,
decode prompt + response, fetch that one rollout's reward by HTTP (`--reward.remote_url URL`) or through the
`reward_func` it loads from `--reward.remote_url FILE.py`. Its rollout → Experience conversion
(`SamplesGenerator._process_response_into_experience`) then makes the training tensors. vLLM and a Ray cluster
cannot run here, so the engine is a stand-in returning fixed token ids and `vllm` is a stub module while
samples_generator is imported."""

from __future__ import annotations

import ast
import asyncio
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from support.recipes import debiased
from support.tinymodels import llama3_tokenizer

from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.scorer import Scorer
from polyreward.service import openrlhf as ours
from polyreward.service.client import ServiceError

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OPENRLHF = "pip install --no-deps openrlhf==0.11.2 && pip install pylatexenc aiohttp"
agent = pytest.importorskip("openrlhf.utils.agent", reason=OPENRLHF)
prompts_dataset = pytest.importorskip("openrlhf.datasets.prompts_dataset", reason=OPENRLHF)

TEMPLATE = "User: {}\n\nAssistant: "  # --data.input_template: the served model's own (plain) template
ROW = {"question": "What is 2 + 2?", "answer": "4"}
REPLIES = ["4.", "5.", "Four: 2 + 2 = 4.", "I don't know."]  # --rollout.n_samples_per_prompt 4


@pytest.fixture(scope="module")
def url(minilm_artifact, serve):
    with serve(minilm_artifact) as (u, _):  # OpenRLHF's HTTP client sends no Authorization header
        yield u


@pytest.fixture(scope="module")
def keyed_url(minilm_artifact, serve):
    with serve(minilm_artifact, api_keys='["k1"]') as (u, _):
        yield u


@pytest.fixture(scope="module")
def offline(minilm_artifact):
    return Scorer(minilm_artifact, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def policy():
    """The policy's tokenizer (a small Llama-3-style byte-level BPE): decoding gives back the text exactly."""
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def rollout(offline):
    """The prompt and label as OpenRLHF's PromptDataset makes them from a row (`--data.input_key question
    --data.label_key answer --data.input_template ...`), checked to be the served model's template."""
    prompt, label = prompts_dataset.preprocess_data(ROW, TEMPLATE, "question", "answer")
    item = PromptItem(prompt=ROW["question"], response=REPLIES[0])
    assert offline.builder.render(item.as_messages()) == prompt + REPLIES[0] and label == "4"
    return prompt, label


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "polyreward_reward.py"  # the two-line file of the module docstring
    path.write_text("from polyreward.service.openrlhf import reward_func  # noqa: F401\n")
    return path


class Engine:
    """Stands in for `RolloutRayActor.generate` (vLLM): each call returns the next reply's token ids. No EOS
    id ends them, so each query is exactly the served template's text, whatever the server makes of EOS."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.prompt_ids = tokenizer, list(replies), []

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.prompt_ids.append(list(prompt_token_ids))
        reply = self.replies.pop(0)
        ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None)])


def rollouts(executor, tokenizer, prompt, label, replies) -> list[dict]:
    """What `RolloutRayActor.generate_responses` does for a prompt: one `execute` per sample, concurrently."""
    engine = Engine(tokenizer, replies)
    params = SimpleNamespace(max_tokens=64, logprobs=None)  # the SamplingParams fields execute reads

    async def run():
        samples = [
            executor.execute(prompt, label, params, max_length=256, hf_tokenizer=tokenizer, llm_engine=engine)
            for _ in replies
        ]
        return await asyncio.gather(*samples)

    outs = asyncio.run(run())
    assert engine.prompt_ids == [tokenizer(prompt, add_special_tokens=False)["input_ids"]] * len(replies)
    return outs


def queries(prompt, replies) -> list[str]:
    return [prompt + r for r in replies]


def assert_rewards(outs, offline, texts) -> None:
    """Each rollout's reward, score and extra_logs are the server's numbers for its text, computed offline."""
    want = offline.score([{"text": t} for t in texts])
    x = debiased(offline.manifest, want)
    for out, w, xi in zip(outs, want, x, strict=True):
        assert out["reward"] is not None, "OpenRLHF logged a failed reward request"
        assert out["reward"] == out["scores"] == pytest.approx([w.score], abs=1e-4)
        assert set(out["extra_logs"]) == {*offline.objectives, "model_score"}
        assert [out["extra_logs"][n][0] for n in offline.objectives] == pytest.approx(xi, abs=1e-4)
        assert out["extra_logs"]["model_score"] == pytest.approx([w.score], abs=1e-4)


def reward_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    pattern = r'polyreward_requests_total\{(?=[^}]*route="/get_reward")(?=[^}]*status="200")[^}]*\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, text))


def test_openrlhf_http_client_posts_one_rollout_per_request(url, offline, policy, rollout):
    prompt, label = rollout
    executor = agent.SingleTurnAgentExecutor([f"{url}/get_reward"])  # train_ppo_ray splits the flag on ","
    before = reward_requests(url)
    outs = rollouts(executor, policy, prompt, label, REPLIES)
    assert reward_requests(url) - before == len(REPLIES)  # one request per rollout, not per batch
    texts = queries(prompt, REPLIES)
    assert [policy.decode(o["observation_tokens"], skip_special_tokens=False) for o in outs] == texts
    assert_rewards(outs, offline, texts)


def test_openrlhf_loads_our_reward_func_which_sends_the_key(
    keyed_url, offline, policy, rollout, reward_file, monkeypatch
):
    prompt, label = rollout
    monkeypatch.setenv("POLYREWARD_URL", f"{keyed_url}/get_reward")  # the URL form the HTTP flag takes
    monkeypatch.setenv("POLYREWARD_API_KEY", "k1")
    executor = agent.SingleTurnAgentExecutor([str(reward_file)])
    assert executor.reward_func is ours.reward_func  # importlib.util.spec_from_file_location, then exec
    texts = queries(prompt, REPLIES)
    outs = rollouts(executor, policy, prompt, label, REPLIES)
    assert_rewards(outs, offline, texts)

    # 0.11.2 calls it with one rollout (`_fetch_rewards_via_func`); the contract is one value per query
    batch = executor.reward_func(texts, [prompt] * len(texts), [label] * len(texts))
    assert batch["rewards"] == batch["scores"] == pytest.approx([o["reward"][0] for o in outs], abs=1e-4)
    logs = {n: pytest.approx([o["extra_logs"][n][0] for o in outs], abs=1e-4) for n in outs[0]["extra_logs"]}
    assert batch["extra_logs"] == logs
    assert ours.reward_func([], [], []) == {"rewards": [], "scores": [], "extra_logs": {}}

    monkeypatch.setenv("POLYREWARD_API_KEY", "wrong")
    with pytest.raises(ServiceError, match="401 unauthorized"):
        executor.reward_func(texts[:1], [prompt], [label])
    (out,) = rollouts(executor, policy, prompt, label, REPLIES[:1])
    assert out["reward"] is None and out["scores"] is None  # OpenRLHF logs the error and moves on
    monkeypatch.delenv("POLYREWARD_URL")
    with pytest.raises(RuntimeError, match="POLYREWARD_URL is not set"):
        executor.reward_func(texts[:1], [prompt], [label])


@pytest.fixture
def experience_of(monkeypatch):
    """OpenRLHF's `SamplesGenerator._process_response_into_experience` (a rollout's dict → its Experience).
    Its module imports vllm (SamplingParams, and vllm_engine's names): stubbed here; the openrlhf.trainer
    modules that saw the stub are dropped again after the test."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams, vllm.__version__ = object, "0.0"
    for name, module in {
        "vllm": vllm,
        "vllm.inputs": SimpleNamespace(TokensPrompt=dict),
        "vllm.utils": SimpleNamespace(random_uuid=lambda: "0"),
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    loaded = set(sys.modules)
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    yield lambda out: SamplesGenerator._process_response_into_experience(None, out, max_len=256)
    for name in set(sys.modules) - loaded:
        if name.startswith("openrlhf.trainer"):
            del sys.modules[name]


def test_both_options_give_openrlhf_the_same_training_tensors(
    url, offline, policy, rollout, reward_file, experience_of, monkeypatch
):
    prompt, label = rollout
    monkeypatch.setenv("POLYREWARD_URL", url)
    monkeypatch.delenv("POLYREWARD_API_KEY", raising=False)
    by_http = rollouts(agent.SingleTurnAgentExecutor([f"{url}/get_reward"]), policy, prompt, label, REPLIES)
    by_func = rollouts(agent.SingleTurnAgentExecutor([str(reward_file)]), policy, prompt, label, REPLIES)
    want = offline.score([{"text": t} for t in queries(prompt, REPLIES)])
    for h, f, w in zip(map(experience_of, by_http), map(experience_of, by_func), want, strict=True):
        assert h.rewards.shape == (1, 1)  # what OpenRLHF makes of the JSON lists, by either option
        assert h.rewards.item() == pytest.approx(w.score, abs=1e-4)
        assert set(h.info) == set(f.info) >= {"reward", "score", "model_score", *offline.objectives}
        pairs = {"rewards": (h.rewards, f.rewards), "scores": (h.scores, f.scores)}
        pairs |= {k: (h.info[k], f.info[k]) for k in h.info}
        for name, (a, b) in pairs.items():  # equal to float32 rounding: the server batches as it likes
            assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-4), name


def test_the_documented_flag_is_the_one_openrlhf_defines():
    """`--reward.remote_url` (0.11.2's dotted flags; `--remote_rm_url` is refused), in our docstring too."""
    cli = Path(agent.__file__).parents[1] / "cli" / "train_ppo_ray.py"
    flags = {
        node.args[0].value
        for node in ast.walk(ast.parse(cli.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args
        and isinstance(node.args[0], ast.Constant)
    }  # fmt: skip
    assert "--reward.remote_url" in flags and "--remote_rm_url" not in flags
    assert {"--data.label_key", "--data.input_key", "--data.input_template"} <= flags
    assert "--reward.remote_url /abs/path/polyreward_reward.py" in ours.__doc__


@pytest.fixture(scope="module")
def rules_url(minilm_artifact, serve, tmp_path_factory):
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text("rules:\n  correct: {kind: math}\n")
    with serve(minilm_artifact, rules=str(rules)) as (u, _):
        yield u


def test_a_llama3_policy_with_labels_gets_the_reward_models_own_reading(rules_url, policy):
    """The policy's template is Llama 3's (`--data.input_template`), the reward model's is plain: the server
    reads the messages out of OpenRLHF's query, and OpenRLHF's `labels` are the math rule's reference answers."""
    template = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    prompt, label = prompts_dataset.preprocess_data(ROW, template, "question", "answer")
    outs = rollouts(
        agent.SingleTurnAgentExecutor([f"{rules_url}/get_reward"]), policy, prompt, label, REPLIES
    )
    items = [{"prompt": ROW["question"], "response": r, "label": label} for r in REPLIES]
    with httpx.Client(base_url=rules_url) as c:
        want = c.post("/v1/score", json={"items": items}).json()["results"]
        as_text = c.post("/v1/score", json={"items": [{"text": prompt + REPLIES[0], "label": label}]}).json()
    assert [o["reward"][0] for o in outs] == pytest.approx([w["score"] for w in want], abs=1e-4)
    assert [o["extra_logs"]["correct"][0] for o in outs] == [
        1.0,
        0.0,
        1.0,
        0.0,
    ]  # "4.", "5.", "…= 4.", "I don't know."
    assert abs(as_text["results"][0]["score"] - want[0]["score"]) > 1e-3  # the template did matter
